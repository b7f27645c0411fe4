"""Transport security (TLS, mutual TLS) and authorization by identity, for every component.

Off by default: with no TLS configuration every server listens in plaintext and nobody is
checked. That insecure mode is for local development and tests only: anyone who can reach a
port can submit transactions, register a participant, or call a participant's Commit.

With TLS on (a CA, a certificate and a key for this process) every server requires mutual TLS:
a peer without a certificate signed by the CA fails the handshake, so its call never reaches
a handler (UNAVAILABLE). Every call that does arrive is authorized by the peer's identity,
which is its certificate's Common Name (and DNS subject alternative names) as the TLS layer
verified it; a call the policy does not allow gets PERMISSION_DENIED. The policy:

    dtm.v1.Participant/*            (Prepare, Commit, Rollback,     the coordinator identity
                                     PrepareBatch, DecideBatch,
                                     Recover)
    dtm.v1.ParticipantAdmin/*                                       operators
    dtm.v1.Coordinator/RegisterParticipant                         participants
    dtm.v1.Coordinator/QueryOutcome                                participants, operators
    dtm.v1.Coordinator/ReportHeuristic                             participants (their own)
    dtm.v1.Coordinator/Submit, SubmitBatch                         clients
    dtm.v1.Coordinator/GetTransaction, ListTransactions,           clients, operators
        RetryTransaction, ListParticipants, ListHeuristics
    dtm.v1.Coordinator/ForgetHeuristic, UnregisterParticipant      operators
    grpc.health.v1.Health/*, server reflection                     anyone (with a valid cert)
    anything else (the services' read APIs)                         clients, operators

Default identities: coordinator "coordinator"; participants "inventory", "orders", "payment",
"notification"; clients "client" and "operator"; operators "operator". A participant may
also only register under its own name: its certificate's Common Name, which must be one of
the participant identities (checked by the coordinator's RegisterParticipant).

Configuration, flags first, then environment, then the configuration file's (or its
DTM_<SECTION>_TLS_* variables') tls_ca, tls_cert and tls_key of the process's own section
([cli] for the dtm command):

    --tls-ca PATH         DTM_TLS_CA      the CA that signed every peer's certificate
    --tls-cert PATH       DTM_TLS_CERT    this process's certificate (PEM)
    --tls-key PATH        DTM_TLS_KEY     this process's private key (PEM)
    --authz-clients A,B   DTM_AUTHZ_CLIENTS       identities allowed to Submit and read
    --authz-operators A   DTM_AUTHZ_OPERATORS     identities allowed on ParticipantAdmin
    --authz-participants  DTM_AUTHZ_PARTICIPANTS  identities allowed to register / inquire
    --authz-coordinator   DTM_AUTHZ_COORDINATOR   the identity allowed to drive participants

The --authz-* settings need TLS: a server given one without TLS refuses to start (it would
authorize nobody).

Every server requires a client certificate: Python's gRPC cannot ask for one without requiring
it, so a "certificates optional" mode would give no peer an identity (DTM_TLS_REQUIRE_CLIENT_CERT
=0 is refused).

`python -m dtm.tools.certs --out certs/` (or `make certs`) makes a test CA and certificates.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from dtm import config, grpc_edge

COORDINATOR_IDENTITY = "coordinator"
PARTICIPANT_IDENTITIES = frozenset({"inventory", "orders", "payment", "notification"})
CLIENT_IDENTITIES = frozenset({"client", "operator"})
OPERATOR_IDENTITIES = frozenset({"operator"})

# Methods (or whole services, as "/pkg.Service/") anyone with a valid certificate may call:
# health checks must work for orchestrators and the cluster's readiness probe alike.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

ServicerContext = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:
    from cryptography import x509

    Handler = grpc.RpcMethodHandler[Any, Any]
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the runtime classes are not generic
    Handler = grpc.RpcMethodHandler
    ServerInterceptor = grpc.aio.ServerInterceptor


#: Who a method requires: (the role in words, its identities, the settings that name them).
Role = tuple[str, frozenset[str], str]


@dataclass(frozen=True)
class Policy:
    """Who may call what; see the module docstring for the table."""

    coordinator: frozenset[str] = frozenset({COORDINATOR_IDENTITY})
    participants: frozenset[str] = PARTICIPANT_IDENTITIES
    clients: frozenset[str] = CLIENT_IDENTITIES
    operators: frozenset[str] = OPERATOR_IDENTITIES

    def rules(self) -> tuple[dict[str, Role], Role]:
        """(prefix -> role, default): a prefix is a full method name ("/pkg.Service/Method")
        or a whole service ("/pkg.Service/")."""
        coordinator = ("the coordinator", self.coordinator, "--authz-coordinator")
        participants = ("a participant", self.participants, "--authz-participants")
        clients = ("a permitted client", self.clients, "--authz-clients")
        operators = ("an operator", self.operators, "--authz-operators")
        # Operators read everything a client reads (and ask outcomes as participants do):
        # `dtm force` checks the coordinator's decision with an operator certificate, and a
        # narrowed --authz-clients must not make that check fail.
        reads = (
            "a permitted client or an operator",
            self.clients | self.operators,
            "--authz-clients or --authz-operators",
        )
        inquiries = (
            "a participant or an operator",
            self.participants | self.operators,
            "--authz-participants or --authz-operators",
        )
        table = {
            "/dtm.v1.Participant/": coordinator,
            "/dtm.v1.ParticipantAdmin/": operators,
            "/dtm.v1.Coordinator/RegisterParticipant": participants,
            "/dtm.v1.Coordinator/QueryOutcome": inquiries,
            # Each only under its own name: checked by the handler (may_register_as).
            "/dtm.v1.Coordinator/ReportHeuristic": participants,
            "/dtm.v1.Coordinator/Submit": clients,
            "/dtm.v1.Coordinator/SubmitBatch": clients,
            "/dtm.v1.Coordinator/GetTransaction": reads,
            "/dtm.v1.Coordinator/ListTransactions": reads,
            "/dtm.v1.Coordinator/RetryTransaction": reads,
            "/dtm.v1.Coordinator/ListParticipants": reads,
            "/dtm.v1.Coordinator/ListHeuristics": reads,
            "/dtm.v1.Coordinator/ForgetHeuristic": operators,
            "/dtm.v1.Coordinator/UnregisterParticipant": operators,
        }
        return table, reads


@dataclass(frozen=True)
class TlsConfig:
    """One process's TLS material (PEM files) and the authorization policy it enforces."""

    ca_cert: Path
    cert: Path
    key: Path
    policy: Policy = field(default_factory=Policy)

    @classmethod
    def for_identity(cls, certs_dir: Path, identity: str, **overrides: Any) -> TlsConfig:
        """The files `dtm.tools.certs` writes for `identity` under `certs_dir`."""
        return cls(
            ca_cert=certs_dir / "ca.pem",
            cert=certs_dir / f"{identity}.pem",
            key=certs_dir / f"{identity}-key.pem",
            **overrides,
        )

    # Read once per process: channels and probes are made often, the files never change
    # under a running process (rotation means a restart).
    @cached_property
    def ca_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    @cached_property
    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    @cached_property
    def key_pem(self) -> bytes:
        return self.key.read_bytes()


# ---- configuration from flags and environment ----

_AUTHZ_ROLES = ("clients", "operators", "participants", "coordinator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --tls-* and --authz-* flags; `from_options` turns them into a TlsConfig."""
    group = parser.add_argument_group(
        "security", "TLS and authorization (off unless a CA, certificate and key are given)"
    )
    group.add_argument("--tls-ca", type=Path, default=None, help="CA certificate (DTM_TLS_CA)")
    group.add_argument("--tls-cert", type=Path, default=None, help="certificate (DTM_TLS_CERT)")
    group.add_argument("--tls-key", type=Path, default=None, help="private key (DTM_TLS_KEY)")
    defaults = Policy()
    for role in _AUTHZ_ROLES:
        env = f"DTM_AUTHZ_{role.upper()}"
        # The defaults are worth showing: "operator" is a client too unless narrowed.
        default = ",".join(sorted(getattr(defaults, role)))
        group.add_argument(
            f"--authz-{role}",
            default=None,
            metavar="ID[,ID...]",
            help=f"identities allowed as {role} ({env}; default: {default})",
        )


def _identities(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def from_options(
    options: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    configured: Mapping[str, Path | None] | None = None,
    *,
    enforcing: bool = True,
    configured_in: str = "the configuration",
) -> TlsConfig | None:
    """TLS configuration from the flags of `add_arguments`, falling back to DTM_TLS_* and
    DTM_AUTHZ_* variables, then to `configured` (a server's tls_ca, tls_cert and tls_key from
    the configuration file or DTM_<SECTION>_TLS_*: see `dtm.config.tls_files`); None
    (insecure mode) when no TLS file is given anywhere. ValueError when only some of CA,
    certificate and key are given, or a file is missing, or (for a server, `enforcing`) an
    authorization policy is given without TLS, where nothing would enforce it;
    TlsMaterialError (a ValueError) when the files cannot work together (see
    `check_material`). Each error names the setting a file came from: its flag, its
    variable, or its key in `configured_in` (where `configured` came from: see
    `dtm.config.tls_origin`)."""
    env = os.environ if environ is None else environ
    configured = configured or {}
    paths: dict[str, Path] = {}
    # Where each file was given, for messages: an operator who set tls_ca in a file looks
    # for that key, not for a --tls-ca flag never given.
    names: dict[str, str] = {}
    for name in ("ca", "cert", "key"):
        flag: Path | None = getattr(options, f"tls_{name}", None)
        variable = f"DTM_TLS_{name.upper()}"
        from_configuration = configured.get(name)
        if flag is not None:
            paths[name], names[name] = flag, f"--tls-{name}"
        elif env.get(variable):
            # ~ as the configuration's paths take it (a shell leaves it in a quoted value).
            paths[name], names[name] = Path(env[variable]).expanduser(), variable
        elif from_configuration is not None:
            paths[name], names[name] = from_configuration, f"tls_{name} ({configured_in})"
    if not paths:
        given = [
            f"--authz-{role}"
            if getattr(options, f"authz_{role}", None)
            else f"DTM_AUTHZ_{role.upper()}"
            for role in _AUTHZ_ROLES
            if getattr(options, f"authz_{role}", None) or env.get(f"DTM_AUTHZ_{role.upper()}")
        ]
        if given and enforcing:
            raise ValueError(
                f"{', '.join(given)} given without TLS: authorization needs mutual TLS (the "
                "identities come from the peers' certificates), and a plaintext server "
                "authorizes nobody; give --tls-ca, --tls-cert and --tls-key (or DTM_TLS_*, or "
                "tls_* in the configuration file), or drop the authorization settings"
            )
        return None
    missing = [f"--tls-{name}" for name in ("ca", "cert", "key") if name not in paths]
    if missing:
        raise ValueError(
            f"TLS needs a CA, a certificate and a key; missing {', '.join(missing)} "
            "(or DTM_TLS_*, or tls_ca, tls_cert, tls_key in the configuration file: in the "
            "server's own section, or in [cli] for the dtm command)"
        )
    for name, path in paths.items():
        if not path.is_file():
            raise ValueError(f"{names[name]}: {path} is not a readable file")
    check_material(paths["ca"], paths["cert"], paths["key"], names)
    roles: dict[str, frozenset[str]] = {}
    for role in _AUTHZ_ROLES:
        flag = getattr(options, f"authz_{role}", None)
        text = flag or env.get(f"DTM_AUTHZ_{role.upper()}")
        if text:
            roles[role] = _identities(text)
            if not roles[role]:
                # "," or " ": a policy that lets nobody in that role, which no server can use
                # (a coordinator nobody may submit to, a participant nobody may drive).
                setting = f"--authz-{role}" if flag else f"DTM_AUTHZ_{role.upper()}"
                default = ",".join(sorted(getattr(Policy(), role)))
                raise ValueError(
                    f"{setting} {text!r} names no identity: give at least one (comma-separated), "
                    f"or leave it out for the default ({default})"
                )
    require = env.get("DTM_TLS_REQUIRE_CLIENT_CERT", "1")
    # Every word a boolean setting takes for false ("off" passed unnoticed here).
    if require.strip().lower() in config.FALSE_WORDS:
        # It used to turn client certificates off: then the server never asks for one, no
        # peer has an identity, and every guarded method refuses every caller.
        raise ValueError(
            f"DTM_TLS_REQUIRE_CLIENT_CERT={require} is not supported: Python's gRPC cannot ask "
            "for a client certificate without requiring it, so no caller would have an identity "
            "and every guarded method would refuse it; unset it (mutual TLS), or run without "
            "--tls-* (plaintext, local development only)"
        )
    return TlsConfig(
        ca_cert=paths["ca"], cert=paths["cert"], key=paths["key"], policy=Policy(**roles)
    )


class TlsMaterialError(ValueError):
    """A CA, certificate or key that cannot work: gRPC would only say it cannot listen."""


def check_material(ca: Path, cert: Path, key: Path, names: Mapping[str, str] | None = None) -> None:
    """TlsMaterialError, naming the file and the problem, unless `ca` holds PEM certificates,
    `cert` a PEM certificate (its chain may follow) signed by one of them, and `key` the
    unencrypted PEM private key of that certificate. gRPC checks none of this where it can be
    reported: a bad file makes binding fail, which reads as a port in use. `names` ("ca",
    "cert", "key" -> the setting that gave each file) default to the flags."""
    names = {"ca": "--tls-ca", "cert": "--tls-cert", "key": "--tls-key", **(names or {})}
    # Imported here, for TLS only: cryptography's bindings add about 8 MB to every process.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    def read(flag: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as error:
            raise TlsMaterialError(f"{flag}: cannot read {path}: {error.strerror}") from None

    def certificates(flag: str, path: Path, what: str, key_hint: str) -> list[x509.Certificate]:
        data = read(flag, path)
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            hint = f" (it is a private key: {key_hint})" if b"PRIVATE KEY" in data else ""
            raise TlsMaterialError(f"{flag}: {path} holds no PEM {what}{hint}") from None

    # A key given for the CA is most likely the CA's own key (ca-key.pem beside ca.pem).
    authorities = certificates(
        names["ca"], ca, "CA certificate", "give the CA's certificate, not its key"
    )
    chain = certificates(names["cert"], cert, "certificate", "certificate and key swapped?")
    data = read(names["key"], key)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsMaterialError(
            f"{names['key']}: {key} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it is a certificate: certificate and key swapped?)"
        raise TlsMaterialError(
            f"{names['key']}: {key} holds no PEM private key"
            f"{hint if b'CERTIFICATE' in data else ''}"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise TlsMaterialError(
            f"{names['key']}: {key} is not the private key of the certificate of "
            f"{names['cert']}, {cert}: give the key made with that certificate"
        )
    # The leaf, or the last certificate of its chain, must be issued by one of the CAs.
    issuers = [
        authority
        for authority in authorities
        if any(_issued_by(issued, authority) for issued in (chain[0], chain[-1]))
    ]
    if not issuers:
        raise TlsMaterialError(
            f"{names['cert']}: {cert} is not signed by the CA in {ca} (a certificate of "
            "another CA?)"
        )
    # Dates: gRPC checks them only in the handshake, where an expired certificate reads as
    # "Socket closed" on one side and "certificate verify failed" on the other.
    now = datetime.datetime.now(datetime.UTC)
    for position, issued in enumerate(chain):
        where = cert if position == 0 else f"{cert} (its chain)"
        _check_dates(names["cert"], where, issued, now)
    if not any(_valid_at(authority, now) for authority in issuers):
        _check_dates(names["ca"], ca, issuers[0], now)


def _valid_at(certificate: x509.Certificate, now: datetime.datetime) -> bool:
    return certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc


def _check_dates(
    flag: str, path: Path | str, certificate: x509.Certificate, now: datetime.datetime
) -> None:
    """TlsMaterialError, one line naming the file and the date, unless `certificate` is valid
    at `now`."""
    if certificate.not_valid_after_utc <= now:
        when = certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        raise TlsMaterialError(
            f"{flag} {path} expired on {when}; renew it (test certificates: "
            "python -m dtm.tools.certs --out DIR, with --new-ca if its CA expired too)"
        )
    if now < certificate.not_valid_before_utc:
        when = certificate.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC")
        raise TlsMaterialError(
            f"{flag} {path} is not valid before {when} (is this machine's clock right?)"
        )


def _issued_by(cert: x509.Certificate, authority: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def arguments(cfg: TlsConfig | None) -> list[str]:
    """The command-line flags that reproduce `cfg` in a child process."""
    if cfg is None:
        return []
    args = ["--tls-ca", str(cfg.ca_cert), "--tls-cert", str(cfg.cert), "--tls-key", str(cfg.key)]
    default = Policy()
    for role in _AUTHZ_ROLES:
        identities: frozenset[str] = getattr(cfg.policy, role)
        if identities != getattr(default, role):
            args += [f"--authz-{role}", ",".join(sorted(identities))]
    return args


# ---- credentials and channels ----


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(cfg.key_pem, cfg.cert_pem)],
        root_certificates=cfg.ca_pem,
        require_client_auth=True,
    )


def https_server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """What `server_credentials` is to gRPC, for an HTTPS server (the /metrics endpoint): this
    process's certificate, and a client certificate signed by the CA required, since every
    gRPC server here requires one (mutual TLS). ssl.SSLError when the files do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cfg.cert, cfg.key)
    context.load_verify_locations(cafile=cfg.ca_cert)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=cfg.ca_pem, private_key=cfg.key_pem, certificate_chain=cfg.cert_pem
    )


def _options(server_identity: str | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = list(grpc_edge.CHANNEL_OPTIONS)
    if server_identity:
        # Verify the server's certificate names this identity (not merely "some certificate
        # of our CA valid for 127.0.0.1"), so a process that took over a participant's port
        # cannot pose as it.
        options.append(("grpc.ssl_target_name_override", server_identity))
    return options


def channel(
    address: str, cfg: TlsConfig | None, server_identity: str | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: mutual TLS with `cfg`, plaintext when it is None.
    `server_identity`, when given, is the identity the server's certificate must carry."""
    if cfg is None:
        return grpc.aio.insecure_channel(address, options=grpc_edge.CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(
        address, channel_credentials(cfg), options=_options(server_identity)
    )


def sync_channel(
    address: str, cfg: TlsConfig | None, server_identity: str | None = None
) -> grpc.Channel:
    """`channel`, for blocking callers (the cluster's readiness probes)."""
    if cfg is None:
        return grpc.insecure_channel(address, options=grpc_edge.CHANNEL_OPTIONS)
    return grpc.secure_channel(address, channel_credentials(cfg), options=_options(server_identity))


def coordinator_identity(cfg: TlsConfig | None) -> str | None:
    """The identity the coordinator's certificate must carry, for `server_identity`; None
    (any certificate of the CA) when TLS is off or several coordinator identities are allowed."""
    if cfg is None or len(cfg.policy.coordinator) != 1:
        return None
    return next(iter(cfg.policy.coordinator))


# ---- failed handshakes, told apart ----


class HandshakeFailure(enum.Enum):
    """What went wrong when a call failed in the TLS handshake, as its details tell it.

    gRPC reports a failed handshake as UNAVAILABLE ("failed to connect to all addresses"), as
    it reports a server that is not running; the words OpenSSL put in the details say which."""

    #: The peer's certificate does not carry the identity asked for (ssl_target_name_override).
    IDENTITY = "identity"
    #: This side spoke TLS, the peer answered in plaintext.
    PLAINTEXT_PEER = "plaintext peer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    #: The peer's certificate is not signed by our CA (or the peer refused ours).
    UNTRUSTED = "untrusted"
    #: Some other handshake failure.
    OTHER = "other"
    #: This side spoke plaintext and the peer closed the connection: it requires TLS.
    TLS_PEER = "tls peer"


def handshake_failure(details: str, tls: bool) -> HandshakeFailure | None:
    """How a call whose status details are `details` failed its TLS handshake, or None when
    they do not read as one. `tls`: whether this side spoke TLS."""
    lowered = details.lower()
    if "hostname verification" in lowered or "peer name" in lowered:
        return HandshakeFailure.IDENTITY
    if "wrong_version_number" in lowered:
        return HandshakeFailure.PLAINTEXT_PEER
    if "expired" in lowered:  # OpenSSL's "certificate has expired": ours, the peer's, a CA's
        return HandshakeFailure.EXPIRED
    if "not yet valid" in lowered:
        return HandshakeFailure.NOT_YET_VALID
    if "certificate_verify_failed" in lowered:
        return HandshakeFailure.UNTRUSTED
    if "handshake failed" in lowered or "ssl_error" in lowered:
        return HandshakeFailure.OTHER
    if not tls and "socket closed" in lowered:
        return HandshakeFailure.TLS_PEER
    return None


# ---- identity and authorization ----


def peer_identities(context: ServicerContext) -> frozenset[str]:
    """The identities the verified peer certificate carries: its Common Name and subject
    alternative names. Empty for a plaintext peer or one that showed no certificate."""
    auth = context.auth_context()
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return frozenset(name.decode(errors="replace") for name in names)


def peer_name(context: ServicerContext) -> str:
    """The peer's Common Name, for messages and logs ("(no certificate)" without one)."""
    common = list(context.auth_context().get("x509_common_name", ()))
    return common[0].decode(errors="replace") if common else "(no certificate)"


Rule = Role | None  # None for open methods


class AuthorizationInterceptor(ServerInterceptor):
    """Refuses, with PERMISSION_DENIED, any call whose peer identity the policy does not allow.

    Runs on every call, so the work per call is one dict lookup of the method (rules are
    resolved once per method and cached, as are the wrapped handlers) and, for a guarded
    method, one look at the connection's auth context.
    """

    def __init__(self, policy: Policy) -> None:
        self._table, self._default = policy.rules()
        self._rules: dict[str, Rule] = {}
        # method -> (original handler, guarded handler): the server hands back the same
        # registered handler for a method every time, so the guard is built once.
        self._guarded: dict[str, tuple[Handler, Handler]] = {}

    def rule(self, method: str) -> Rule:
        rule = self._rules.get(method, ...)
        if rule is ...:
            rule = self._resolve(method)
            self._rules[method] = rule
        return rule

    def _resolve(self, method: str) -> Rule:
        if method.startswith(OPEN_SERVICES):
            return None
        if method in self._table:
            return self._table[method]
        service = method[: method.rfind("/") + 1]
        return self._table.get(service, self._default)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: None, and gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        rule = self.rule(method)
        if rule is None:
            return handler
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guard(handler, method, rule)
        self._guarded[method] = (handler, guarded)
        return guarded


async def _check(
    context: ServicerContext, method: str, role: str, allowed: frozenset[str], settings: str
) -> None:
    if peer_identities(context) & allowed:
        return
    # The settings that name the identities: a new participant (examples/loyalty) is refused
    # here until the coordinator's --authz-participants names it.
    await grpc_edge.abort(
        context,
        grpc.StatusCode.PERMISSION_DENIED,
        f"identity {peer_name(context)!r} may not call {method}: it requires {role} "
        f"(identities: {', '.join(sorted(allowed)) or 'none'}; the refusing server's {settings})",
    )


def _guard(handler: Handler, method: str, rule: Role) -> Handler:
    """`handler` with the identity check in front of its behaviour, whatever its kind."""
    role, allowed, settings = rule
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary: Any = handler.unary_unary

        async def guarded_unary_unary(request: Any, context: ServicerContext) -> Any:
            await _check(context, method, role, allowed, settings)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded_unary_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        unary_stream: Any = handler.unary_stream

        async def guarded_unary_stream(
            request: Any, context: ServicerContext
        ) -> AsyncIterator[Any]:
            await _check(context, method, role, allowed, settings)
            async for response in unary_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(guarded_unary_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        stream_unary: Any = handler.stream_unary

        async def guarded_stream_unary(requests: Any, context: ServicerContext) -> Any:
            await _check(context, method, role, allowed, settings)
            return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(guarded_stream_unary, deserialize, serialize)
    stream_stream: Any = handler.stream_stream

    async def guarded_stream_stream(requests: Any, context: ServicerContext) -> AsyncIterator[Any]:
        await _check(context, method, role, allowed, settings)
        async for response in stream_stream(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(guarded_stream_stream, deserialize, serialize)


def server_interceptors(cfg: TlsConfig | None) -> Sequence[ServerInterceptor]:
    """The interceptors a server needs: none in insecure mode (nothing to authorize by)."""
    return [] if cfg is None else [AuthorizationInterceptor(cfg.policy)]


def may_register_as(context: ServicerContext, cfg: TlsConfig | None, name: str) -> bool:
    """Whether the caller may register participant `name`: it must be its certificate's
    Common Name and one of the policy's participant identities, so one participant cannot
    redirect another's traffic, nor register under another name its certificate happens to
    carry (every certificate of `dtm.tools.certs` has DNS:localhost). Always true in
    insecure mode."""
    if cfg is None:
        return True
    common = context.auth_context().get("x509_common_name", ())
    return name in cfg.policy.participants and [name.encode()] == list(common)


def describe(cfg: TlsConfig | None) -> str:
    """One line for startup logs."""
    if cfg is None:
        return "insecure (plaintext, no authorization: local development only)"
    return f"mutual TLS, certificate {cfg.cert}"
