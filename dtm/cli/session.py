"""What every command shares: exit statuses, errors, the session (its channels, TLS and
coordinator), and the one-line report of a failed call.

Part of `dtm.cli`: see its docstring."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc

from dtm import config, security
from dtm.cli import tables as fmt
from dtmpb.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    shop_pb2,
)

# ---- exit statuses ----
EXIT_OK = 0
#: Something failed: the coordinator or a participant unreachable, a call refused, bad input.
EXIT_ERROR = 1
#: The command line is wrong (argparse's own status), a confirmation is missing, or a
#: configuration is refused (the file, a DTM_* variable, TLS files missing or not working),
#: as every server exits on one.
EXIT_USAGE = 2
#: The command worked and the answer is "no": a transaction aborted, a participant unhealthy,
#: an invariant of the shop violated (`dtm check`).
EXIT_NO = 3
#: The outcome of a submitted transaction is unknown (see Outcome.OUTCOME_UNKNOWN), or whether
#: the shop's invariants hold: `dtm check --settle` found it still busy at its deadline.
EXIT_UNKNOWN = 4
#: Refused as unsafe: `force` against the coordinator's decision, or `branches forget` of a
#: forced branch the coordinator may still decide or has not yet recorded the heuristic of.
#: Not an error to retry as is: the message says what to wait for, or which flag overrides.
EXIT_UNSAFE = 5
#: Standard output was closed by its reader (`dtm config | head -1`): 128 + SIGPIPE, as a
#: command killed by the signal reports it.
EXIT_BROKEN_PIPE = 141

DEFAULT_TIMEOUT_S = 5.0
#: A transaction in doubt this long is "stuck" for `txn list --stuck` even without a retry.
STUCK_AFTER_S_DEFAULT = 30.0
IN_DOUBT_STATES = (
    coordinator_pb2.TRANSACTION_STATE_DECIDING,
    coordinator_pb2.TRANSACTION_STATE_COMMITTING,
    coordinator_pb2.TRANSACTION_STATE_UNKNOWN,
)
STATE_NAMES = {
    fmt.state_name(value): value
    for value in (
        coordinator_pb2.TRANSACTION_STATE_PREPARING,
        coordinator_pb2.TRANSACTION_STATE_DECIDING,
        coordinator_pb2.TRANSACTION_STATE_COMMITTING,
        coordinator_pb2.TRANSACTION_STATE_COMMITTED,
        coordinator_pb2.TRANSACTION_STATE_ABORTING,
        coordinator_pb2.TRANSACTION_STATE_ABORTED,
        coordinator_pb2.TRANSACTION_STATE_UNKNOWN,
    )
}
BRANCH_STATE_NAMES = {
    fmt.branch_state_name(value): value
    for value in (
        participant_pb2.BRANCH_STATE_PREPARING,
        participant_pb2.BRANCH_STATE_PREPARED,
        participant_pb2.BRANCH_STATE_COMMITTED,
        participant_pb2.BRANCH_STATE_ROLLED_BACK,
        participant_pb2.BRANCH_STATE_REFUSED,
        participant_pb2.BRANCH_STATE_READ_ONLY,
    )
}


def parse_states(texts: Sequence[str] | None, names: Mapping[str, Any]) -> list[Any]:
    """The values of --state (repeated, or comma-separated: `dtm branches` took only the
    first, while `dtm txn list` took both), by their names; a usage CliError for another."""
    states = []
    for text in texts or ():
        for name in text.split(","):
            if name.strip().lower() not in names:
                raise CliError(f"--state {name!r}: expected one of {', '.join(names)}", EXIT_USAGE)
            states.append(names[name.strip().lower()])
    return states


SUBMIT_KEYS = ("transaction_id", "timeout_ms", "branches")
BRANCH_KEYS = ("participant", "type", "operation")
#: Make sure the operation types are in the default descriptor pool for `submit`.
_OPERATION_FILES = (shop_pb2.DESCRIPTOR,)

FORCE_WARNING = """\
refusing to force without --i-understand.

Forcing a branch is a heuristic decision: the participant commits or rolls back its prepared
branch on its own, without the coordinator. If the coordinator decided the other way, this
branch now disagrees with the others and the transaction is no longer atomic (stock taken for
an order that does not exist, money captured for a cancelled order); the coordinator reports
the branch as heuristic, and someone has to repair the data by hand.

Do it only when the coordinator is gone for good and its decision cannot be learned. When the
coordinator is running, the participant learns the outcome by itself (it asks), and
`dtm txn retry ID` pushes phase 2 now. Check `dtm txn show ID` first.

Re-run with --i-understand to force."""


class CliError(Exception):
    """A failure to report in one line (no traceback), with the exit status to use."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    """What every command needs: options, addresses, TLS, channels (closed at the end)."""

    options: argparse.Namespace
    out: TextIO
    channels: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    #: Participants that failed to answer a command that asks several (reported on stderr).
    failures: int = 0
    _coordinator_address: str | None = None
    _coordinator_channel: grpc.Channel | None = None
    _coordinator: coordinator_pb2_grpc.CoordinatorStub | None = None
    _tls: tuple[security.TlsConfig | None] | None = None  # (the answer,) once known

    @property
    def json(self) -> bool:
        return bool(self.options.json)

    @property
    def timeout(self) -> float:
        return float(self.options.timeout)

    @property
    def coordinator_address(self) -> str:
        if self._coordinator_address is None:
            self._coordinator_address = self.options.coordinator or _configured_coordinator(
                self.options.config
            )
        return self._coordinator_address

    def use_coordinator(self, address: str) -> None:
        """Make `address` the coordinator this session asks (the one a participant reached
        by --address uses), before anything has asked another."""
        assert self._coordinator_channel is None, "the session asked a coordinator already"
        self._coordinator_address = address

    @property
    def tls(self) -> security.TlsConfig | None:
        """From the flags, else DTM_TLS_*, else [cli] of the configuration file. Worked out
        at the first call to a server: a command that calls none never reads the file."""
        if self._tls is None:
            self._tls = (_tls_of(self.options),)
        return self._tls[0]

    def channel(self, address: str, identity: str | None) -> grpc.Channel:
        return self.channels.enter_context(security.sync_channel(address, self.tls, identity))

    @property
    def coordinator_identity(self) -> str | None:
        """With TLS, the identity the coordinator's certificate must carry: from
        --coordinator-identity, else coordinator_identity of [cli] (or
        DTM_CLI_COORDINATOR_IDENTITY), else DTM_AUTHZ_COORDINATOR, else "coordinator"."""
        if self.tls is None:
            return None
        identity: str = self.options.coordinator_identity or ""
        if not identity:
            try:
                identity = config.load(self.options.config).cli.coordinator_identity
            except config.ConfigError as error:
                hint = "--coordinator-identity NAME"
                raise _refused(error, {(config.CLI, "coordinator_identity")}, hint) from None
        return identity or security.coordinator_identity(self.tls)

    @property
    def coordinator_channel(self) -> grpc.Channel:
        if self._coordinator_channel is None:
            address = self.coordinator_address
            self._coordinator_channel = self.channel(address, self.coordinator_identity)
        return self._coordinator_channel

    @property
    def coordinator(self) -> coordinator_pb2_grpc.CoordinatorStub:
        if self._coordinator is None:
            self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self.coordinator_channel)
        return self._coordinator

    def call_coordinator(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self.coordinator, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise rpc_error(error, "the coordinator", self.coordinator_address, self) from None

    def admin(self, target: Target) -> participant_pb2_grpc.ParticipantAdminStub:
        channel = self.channel(target.address, target.identity)
        return participant_pb2_grpc.ParticipantAdminStub(channel)


def _configured_coordinator(path: Path | None) -> str:
    try:
        return config.load(path).participant.coordinator
    except config.ConfigError as error:
        hint = "--coordinator HOST:PORT"
        raise _refused(error, {(config.PARTICIPANT, "coordinator")}, hint) from None


def _refused(error: config.ConfigError, settings: set[tuple[str, str]], flag: str) -> CliError:
    """A configuration refused (EXIT_USAGE), with "(or pass FLAG)" only when the value refused
    is one of `settings`, which FLAG stands in for. Added to any problem of the file (a bad
    value elsewhere, invalid TOML), the hint misled: passing the flag met the same problem at
    the next reading of the file, with the next flag suggested."""
    if error.setting in settings:
        return CliError(f"{error} (or pass {flag})", EXIT_USAGE)
    return CliError(str(error), EXIT_USAGE)


def _tls_of(options: argparse.Namespace) -> security.TlsConfig | None:
    """The flags' TLS files, else DTM_TLS_*'s, else those of [cli] in the configuration file
    (read only when the flags and the environment leave one out)."""
    given = [
        getattr(options, f"tls_{name}", None) or os.environ.get(f"DTM_TLS_{name.upper()}")
        for name in ("ca", "cert", "key")
    ]
    configured: dict[str, Path | None] = {}
    configured_in = "[cli] of the configuration"
    if not all(given):
        try:
            settings = config.load(options.config)
        except config.ConfigError as error:
            tls_settings = {(config.CLI, f"tls_{name}") for name in ("ca", "cert", "key")}
            hint = "--tls-ca, --tls-cert and --tls-key"
            raise _refused(error, tls_settings, hint) from None
        configured = config.tls_files(settings.cli)
        configured_in = config.tls_origin(settings, config.CLI)
    try:
        return security.from_options(
            options, configured=configured, enforcing=False, configured_in=configured_in
        )
    except ValueError as error:  # a file missing, or files that cannot work (TlsMaterialError)
        raise CliError(str(error), EXIT_USAGE) from None


def rpc_error(
    error: grpc.RpcError, what: str, address: str, session: Session, timeout: float | None = None
) -> CliError:
    """A CliError saying what failed and what to do about it (`timeout`: the call's deadline,
    when not --timeout)."""
    code: grpc.StatusCode | None = None
    details: str | None = str(error)
    # An asyncio call's error (`dtm check` reads the services with dtm.invariants) is no
    # grpc.Call, but has the same code() and details().
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        code, details = error.code(), error.details()
    tls_hint = _tls_hint(details or "", what, session)
    if tls_hint is not None:
        return CliError(f"cannot reach {what} at {address}: {tls_hint} ({details})")
    if code is grpc.StatusCode.UNAVAILABLE and "failed parsing http/2" in (details or "").lower():
        # An HTTP/1 server answered (a /metrics port, say): "is it running?" would mislead.
        return CliError(
            f"cannot reach {what} at {address}: something answers there, but not in gRPC "
            "(HTTP/2): a /metrics port (`make up`'s 9100-9104) or another HTTP server? Give "
            f"the gRPC port (`make up`'s 50050-50054) ({details})"
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        if what == "the coordinator":
            hint = (
                "is it running? try `make up` (or `dtm coordinator`), or point --coordinator at it"
            )
        else:
            hint = "is it running? `dtm participants` shows every participant's health"
        return CliError(f"cannot reach {what} at {address}: {hint} ({details})")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(
            f"{what} at {address} did not answer within {timeout or session.timeout:g} s "
            "(try a longer --timeout)"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED or code is grpc.StatusCode.UNAUTHENTICATED:
        return CliError(
            f"{what} at {address} refused the call ({details}); with TLS on, use an operator "
            "certificate (--tls-ca, --tls-cert, --tls-key, or tls_* in [cli] of the "
            "configuration file)"
        )
    if code is grpc.StatusCode.UNIMPLEMENTED:
        # Another server at that port (a participant's, most likely): "Method not found!".
        if what == "the coordinator":
            hint = "is that address a dtm coordinator? (it does not serve the Coordinator service)"
        else:
            hint = (
                "it does not serve this method: ParticipantAdmin is optional (a participant "
                "outside the SDK need serve only the Participant service), or this is another "
                "kind of server"
            )
        return CliError(f"{what} at {address} answered UNIMPLEMENTED: {details}; {hint}")
    name = code.name if code is not None else "error"
    return CliError(f"{what} at {address} answered {name}: {details}")


def _tls_hint(details: str, what: str, session: Session) -> str | None:
    """What to check when a call failed in the TLS handshake (gRPC reports it as a failure
    to connect, which otherwise reads as a server that is not running); None otherwise."""
    failure = security.handshake_failure(details, session.tls is not None)
    files = "--tls-ca, --tls-cert, --tls-key, or tls_* in [cli] of the configuration file"
    if failure is security.HandshakeFailure.IDENTITY:
        if what == "the coordinator":
            expected = session.coordinator_identity
            return (
                f"its certificate does not carry the identity {expected!r}: name the one it "
                "carries with --coordinator-identity (or coordinator_identity in [cli])"
            )
        return f"its certificate does not carry the identity of {what}"
    if failure is security.HandshakeFailure.PLAINTEXT_PEER:
        return f"TLS handshake failed: it does not seem to speak TLS (plaintext?); check {files}"
    if failure is security.HandshakeFailure.EXPIRED:
        # Ours, or the CA's, or the server's: not a wrong CA, and nothing the other flags fix.
        return (
            f"TLS handshake failed: a certificate has expired (the one of {what}, or its CA; "
            f"ours are checked at start); renew it"
        )
    if failure is security.HandshakeFailure.NOT_YET_VALID:
        return (
            f"TLS handshake failed: a certificate is not valid yet (the one of {what}, or "
            "its CA): is either machine's clock wrong?"
        )
    if failure is security.HandshakeFailure.UNTRUSTED:
        return (
            "TLS handshake failed: its certificate is not signed by the CA given (or the "
            f"server refused ours); check {files}"
        )
    if failure is security.HandshakeFailure.OTHER:
        return f"TLS handshake failed; check {files}"
    if failure is security.HandshakeFailure.TLS_PEER:
        return f"it closed the connection: does it require TLS? Give {files}"
    return None


def _stdout_to_devnull() -> None:
    """After a BrokenPipeError: point standard output at /dev/null, so that Python's flush at
    exit does not fail again ("Exception ignored ... BrokenPipeError"). The standard recipe
    (see the signal module's documentation on SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor: a test's StringIO
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@dataclass(frozen=True)
class Target:
    """A participant to call: its name (for messages), address, and the identity its TLS
    certificate must carry (None: any certificate of the CA, when the name is not known)."""

    name: str
    address: str
    identity: str | None
    # The incarnation the registry holds for it ("": not known, not checked).
    incarnation: str = ""

    def addressed(self, request: Any) -> Any:
        """`request` (an admin call's) naming the participant and incarnation meant, so that
        another one now at the address refuses it (a stale registry) instead of answering,
        or being forced, under this name. None of it when only an address was given."""
        request.participant = self.identity or ""
        request.incarnation = self.incarnation
        return request

    @property
    def what(self) -> str:
        """The participant in a message that goes on "at ADDRESS": reached by --address alone
        its name is that address, and "participant 127.0.0.1:1 at 127.0.0.1:1" said it twice."""
        return "the participant" if self.name == self.address else f"participant {self.name}"
