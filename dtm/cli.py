"""The `dtm` command: run the servers, submit and inspect transactions, operate participants.

    dtm coordinator [FLAGS]            run the coordinator in the foreground
    dtm service NAME [FLAGS]           run inventory, orders, payment or notification
    dtm submit FILE.json               submit a transaction described in JSON
    dtm txn list [FILTERS]             recent transactions
    dtm txn show ID                    one transaction, branch by branch
    dtm txn retry ID                   retry phase 2 of a committing transaction now
    dtm participants                   the registry, with each participant's health and incarnation
    dtm participants remove NAME       unregister a decommissioned participant
    dtm locks                          the locks every participant holds, and who waits
    dtm branches                       every participant's branches
    dtm branches forget ID BRANCH ...  stop keeping a forced branch for its coordinator
    dtm trace ID                       one transaction across every process and its logs
    dtm force ID BRANCH ...            heuristic commit/rollback of an in-doubt branch
    dtm heuristics                     heuristic outcomes the coordinator keeps
    dtm heuristics forget ID BRANCH    stop reporting one, once it is reconciled
    dtm log dump PATH                  every record of a write-ahead log
    dtm crashpoints                    the named crash points (DTM_CRASH_AT)
    dtm config                         the configuration in effect

Every command that reads prints a table, or JSON with --json. The coordinator's address is
--coordinator, else [participant] coordinator of the configuration (file, DTM_CONFIG,
DTM_PARTICIPANT_COORDINATOR), else 127.0.0.1:50050. The calls are plain blocking gRPC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc
from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtm import cli_format as fmt
from dtm import config, crashpoints, limits, security
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
#: The command line is wrong (argparse's own status), or a confirmation is missing.
EXIT_USAGE = 2
#: The command worked and the answer is "no": a transaction aborted, a participant unhealthy.
EXIT_NO = 3
#: The outcome of a submitted transaction is unknown (see Outcome.OUTCOME_UNKNOWN).
EXIT_UNKNOWN = 4
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
                raise CliError(f"{error} (or pass --coordinator-identity NAME)") from None
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
        raise CliError(f"{error} (or pass --coordinator HOST:PORT)") from None


def _tls_of(options: argparse.Namespace) -> security.TlsConfig | None:
    """The flags' TLS files, else DTM_TLS_*'s, else those of [cli] in the configuration file
    (read only when the flags and the environment leave one out)."""
    given = [
        getattr(options, f"tls_{name}", None) or os.environ.get(f"DTM_TLS_{name.upper()}")
        for name in ("ca", "cert", "key")
    ]
    configured: dict[str, Path | None] = {}
    if not all(given):
        try:
            configured = config.tls_files(config.load(options.config).cli)
        except config.ConfigError as error:
            raise CliError(f"{error} (or pass --tls-ca, --tls-cert and --tls-key)") from None
    try:
        return security.from_options(options, configured=configured, enforcing=False)
    except security.TlsMaterialError as error:
        raise CliError(str(error)) from None
    except ValueError as error:
        raise CliError(str(error), EXIT_USAGE) from None


def rpc_error(
    error: grpc.RpcError, what: str, address: str, session: Session, timeout: float | None = None
) -> CliError:
    """A CliError saying what failed and what to do about it (`timeout`: the call's deadline,
    when not --timeout)."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    tls_hint = _tls_hint(details or "", what, session)
    if tls_hint is not None:
        return CliError(f"cannot reach {what} at {address}: {tls_hint} ({details})")
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
            hint = "is that address a dtm participant? (it does not serve this method)"
        return CliError(f"{what} at {address} answered UNIMPLEMENTED: {details}; {hint}")
    name = code.name if code is not None else "error"
    return CliError(f"{what} at {address} answered {name}: {details}")


def _tls_hint(details: str, what: str, session: Session) -> str | None:
    """What to check when a call failed in the TLS handshake (gRPC reports it as a failure
    to connect, which otherwise reads as a server that is not running); None otherwise."""
    lowered = details.lower()
    files = "--tls-ca, --tls-cert, --tls-key, or tls_* in [cli] of the configuration file"
    if "hostname verification" in lowered or "peer name" in lowered:
        if what == "the coordinator":
            expected = session.coordinator_identity
            return (
                f"its certificate does not carry the identity {expected!r}: name the one it "
                "carries with --coordinator-identity (or coordinator_identity in [cli])"
            )
        return f"its certificate does not carry the identity of {what}"
    if "wrong_version_number" in lowered:
        return f"TLS handshake failed: it does not seem to speak TLS (plaintext?); check {files}"
    if "expired" in lowered:
        # OpenSSL's "certificate has expired" (ours, or the CA's, or the server's): not a
        # wrong CA, and nothing the other flags can fix.
        return (
            f"TLS handshake failed: a certificate has expired (the one of {what}, or its CA; "
            f"ours are checked at start); renew it"
        )
    if "not yet valid" in lowered:
        return (
            f"TLS handshake failed: a certificate is not valid yet (the one of {what}, or "
            "its CA): is either machine's clock wrong?"
        )
    if "certificate_verify_failed" in lowered:
        return (
            "TLS handshake failed: its certificate is not signed by the CA given (or the "
            f"server refused ours); check {files}"
        )
    if "handshake failed" in lowered or "ssl_error" in lowered:
        return f"TLS handshake failed; check {files}"
    if session.tls is None and "socket closed" in lowered:
        return f"it closed the connection: does it require TLS? Give {files}"
    return None


# ---- transactions ----


def cmd_submit(session: Session) -> int:
    request = load_submission(session.options.file, session)
    # No id in the file: one is made up here (`txn-` and a random hex, as
    # OrderClient.submit_until_known does), so that it can be named, looked up and retried.
    generated = not request.transaction_id
    if generated:
        request.transaction_id = f"txn-{uuid.uuid4().hex}"
    timeout_ms = request.timeout_ms or limits.TRANSACTION_TIMEOUT_MS_DEFAULT
    # Submit answers once the outcome is known, which the transaction timeout bounds.
    deadline = timeout_ms / 1000 + session.timeout
    address = session.coordinator_address
    _check_size(request)
    _check_coordinator_reachable(session, request.transaction_id)
    try:
        response = session.coordinator.Submit(request, timeout=deadline)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if code in SUBMIT_UNKNOWN_CODES:
            problem = _unknown_submit(error, request, generated, deadline)
            raise CliError(problem, EXIT_UNKNOWN) from None
        raise rpc_error(error, "the coordinator", address, session, deadline) from None
    outcome = fmt.outcome_name(response.outcome)
    if session.json:
        fmt.emit_json(
            {
                "transaction_id": response.transaction_id,
                "outcome": outcome,
                "reason": response.reason,
                "branches": [fmt.branch_status_dict(b) for b in response.branches],
            },
            session.out,
        )
    else:
        print(f"transaction {response.transaction_id}: {outcome.upper()}", file=session.out)
        if response.reason:
            print(f"reason: {response.reason}", file=session.out)
        _branch_status_table(response.branches, session.out, phase_two=False)
    if response.outcome == coordinator_pb2.OUTCOME_COMMITTED:
        return EXIT_OK
    return EXIT_UNKNOWN if response.outcome == coordinator_pb2.OUTCOME_UNKNOWN else EXIT_NO


def _check_size(request: coordinator_pb2.SubmitRequest) -> None:
    """Refuse a request over gRPC's message limit here: the channel refuses to send it with
    RESOURCE_EXHAUSTED, which read as the coordinator's answer ("the coordinator at ...
    answered RESOURCE_EXHAUSTED: CLIENT: Sent message larger than max")."""
    size = request.ByteSize()
    if size > limits.MESSAGE_BYTES_MAX:
        raise CliError(
            f"transaction {request.transaction_id} is {size:,} bytes, over the "
            f"{limits.MESSAGE_BYTES_MAX:,}-byte message limit (and each operation may be at "
            f"most {limits.OPERATION_BYTES_MAX:,} bytes): nothing was sent"
        )


#: A Submit that failed with one of these may have reached the coordinator, and committed.
SUBMIT_UNKNOWN_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


def _check_coordinator_reachable(session: Session, transaction_id: str) -> None:
    """Raise the usual "cannot reach the coordinator" CliError (exit 1) when a health check
    cannot reach it: then the Submit is not sent at all, and its failure is certain. (gRPC
    does not say whether a failed call got through; once the coordinator answered, a Submit
    that fails to connect may have been sent, and is reported as unknown.) Any answer
    (NOT_SERVING, UNIMPLEMENTED, PERMISSION_DENIED...) means it can be reached."""
    health = health_pb2_grpc.HealthStub(session.coordinator_channel)
    try:
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=session.timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            address = session.coordinator_address
            problem = rpc_error(error, "the coordinator", address, session)
            raise CliError(f"{problem}; transaction {transaction_id} was not sent") from None


def _unknown_submit(
    error: grpc.RpcError, request: coordinator_pb2.SubmitRequest, generated: bool, deadline: float
) -> str:
    """What to say when a Submit's outcome is unknown: the transaction, and how to learn it."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        failure = f"no answer within {deadline:g} s"
    else:
        failure = f"{code.name if code is not None else 'error'}: {details}"
    txn_id = request.transaction_id
    retry = "submit the same file again (same transaction_id)"
    if generated:
        retry = f'submit again with "transaction_id": "{txn_id}" added to the file'
    return (
        f"outcome unknown: transaction {txn_id} may have reached the coordinator and may "
        f"still commit ({failure}). Look it up with `dtm txn show {txn_id}`, or {retry}: a Submit "
        "with a transaction_id already run is never run twice"
    )


def load_submission(path: Path, session: Session) -> coordinator_pb2.SubmitRequest:
    """The SubmitRequest a JSON file describes; CliError names the first thing wrong."""
    where = "standard input" if str(path) == "-" else str(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read {where}: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"{where}: not valid JSON: {error}") from None
    except RecursionError:
        raise CliError(f"{where}: nested too deeply to be a transaction") from None
    if not isinstance(document, dict):
        raise CliError(f"{where}: expected a JSON object with {', '.join(SUBMIT_KEYS)}")
    _check_keys(where, document, SUBMIT_KEYS)
    # Absent or "": left empty, cmd_submit makes one up. Present, it is the caller's retry
    # key: never replaced.
    transaction_id = document.get("transaction_id", "")
    timeout_ms = document.get("timeout_ms", 0)
    if not isinstance(transaction_id, str) or not _encodable(transaction_id):
        raise CliError(f"{where}: transaction_id must be a string of valid Unicode")
    if (
        isinstance(timeout_ms, bool)
        or not isinstance(timeout_ms, int)
        or not 0 <= timeout_ms <= limits.TRANSACTION_TIMEOUT_MS_MAX
    ):
        raise CliError(
            f"{where}: timeout_ms must be an integer 0..{limits.TRANSACTION_TIMEOUT_MS_MAX} "
            "(0: the coordinator's default)"
        )
    branches = document.get("branches")
    if not isinstance(branches, list) or not branches:
        raise CliError(f"{where}: branches must be a non-empty list")
    request = coordinator_pb2.SubmitRequest(transaction_id=transaction_id, timeout_ms=timeout_ms)
    for index, branch in enumerate(branches):
        request.branches.append(_branch_request(f"{where}: branch {index}", branch, session))
    return request


def _encodable(text: str) -> bool:
    try:
        _utf8(text)
    except argparse.ArgumentTypeError:
        return False
    return True


def _check_keys(where: str, document: dict[str, Any], known: Sequence[str]) -> None:
    for key in document:
        if key not in known:
            raise CliError(f"{where}: unknown key {key!r} (expected {', '.join(known)})")


def _branch_request(where: str, branch: object, session: Session) -> coordinator_pb2.BranchRequest:
    if not isinstance(branch, dict):
        raise CliError(f"{where}: expected an object with {', '.join(BRANCH_KEYS)}")
    _check_keys(where, branch, BRANCH_KEYS)
    participant, type_name = branch.get("participant"), branch.get("type")
    if not isinstance(participant, str) or not participant or not _encodable(participant):
        raise CliError(f"{where}: participant must be a participant's name")
    if not isinstance(type_name, str) or not type_name or not _encodable(type_name):
        raise CliError(f"{where}: type must be a message name such as dtm.v1.ReserveStock")
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        raise CliError(
            f"{where}: unknown message type {type_name!r}{_operation_types_hint(session)}"
        ) from None
    operation = message_factory.GetMessageClass(descriptor)()
    fields = branch.get("operation", {})
    if not isinstance(fields, dict):
        raise CliError(
            f"{where} ({participant}): operation must be an object of {type_name}'s fields"
        )
    try:
        json_format.ParseDict(fields, operation)
    except json_format.ParseError as error:
        raise CliError(f"{where} ({participant}): not a valid {type_name}: {error}") from None
    packed = any_pb2.Any()
    packed.Pack(operation)
    return coordinator_pb2.BranchRequest(participant=participant, operation=packed)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type): inf, nan, 0 or -1 is an error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive, finite number of seconds")
    return value


def _address(text: str) -> str:
    """A HOST:PORT given on the command line (argparse type). An empty one is an error: read
    as "not given", it would quietly send the commands to the default address instead."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; expected HOST:PORT")
    _utf8(text)
    port = text.rpartition(":")[2]
    digits = port.lstrip("0")
    if port.isascii() and port.isdigit() and not (0 < len(digits) <= 5 and int(digits) <= 65535):
        # gRPC would dial the port modulo 65536: another server, or another process.
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be 1..65535")
    return text


def _utf8(text: str) -> str:
    """Text from argv or a JSON file that protobuf can carry (argv's undecodable bytes and a
    JSON "\\ud800" are lone surrogates); argparse type, and a check."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


def _call_seconds(text: str) -> float:
    """--timeout: _seconds, at most a day (far larger ones overflow gRPC's deadline clock and
    every call fails at once with DEADLINE_EXCEEDED)."""
    value = _seconds(text)
    if value > 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: at most 86400 seconds (a day)")
    return value


def _operation_types_hint(session: Session) -> str:
    """'; inventory takes dtm.v1.ReserveStock, ...' from the registry, if it answers."""
    try:
        response = session.coordinator.ListParticipants(
            coordinator_pb2.ListParticipantsRequest(), timeout=session.timeout
        )
    except grpc.RpcError:
        return ""
    takes = [
        f"{p.name} takes {', '.join(p.capabilities.operation_types) or 'any type'}"
        for p in response.participants
    ]
    return f" ({'; '.join(takes)})" if takes else ""


def _branch_status_table(
    branches: Sequence[coordinator_pb2.BranchStatus], out: TextIO, phase_two: bool = True
) -> None:
    """One row per branch; `phase_two` False drops the phase-2 columns (a Submit answers as
    soon as the decision is durable, before any acknowledgement could arrive)."""
    headers = ["#", "PARTICIPANT", "VOTE", "REASON"]
    if phase_two:
        headers += ["ACKED", "ATTEMPTS", "LAST ERROR", "HEURISTIC"]
    rows: list[list[object]] = []
    for b in branches:
        row: list[object] = [b.branch, b.participant, fmt.vote_name(b.vote) or "-"]
        row.append(fmt.clip(b.reason) or "-")
        if phase_two:
            row += [
                "yes" if b.acknowledged else "no",
                b.phase_two_attempts,
                fmt.clip(b.last_error) or "-",
                b.heuristic or "-",
            ]
        rows.append(row)
    fmt.table(headers, rows, out)


def cmd_txn_list(session: Session) -> int:
    options = session.options
    states: list[coordinator_pb2.TransactionState] = []
    if options.in_doubt or options.stuck:
        states = list(IN_DOUBT_STATES)
    for text in options.state or ():
        for name in text.split(","):
            if name.strip().lower() not in STATE_NAMES:
                raise CliError(
                    f"--state {name!r}: expected one of {', '.join(STATE_NAMES)}", EXIT_USAGE
                )
            states.append(STATE_NAMES[name.strip().lower()])
    # Stuck is decided here, after the listing: asked for only --limit in-doubt transactions,
    # the newest (still on their first try) hid an older stuck one. So ask for all the
    # coordinator lists, and cut to --limit after the filter.
    asked = limits.LIST_TRANSACTIONS_LIMIT_MAX if options.stuck else options.limit
    response = session.call_coordinator(
        "ListTransactions",
        coordinator_pb2.ListTransactionsRequest(states=states, limit=asked),
    )
    now = fmt.now_ms()
    found = list(response.transactions)
    if options.stuck:
        found = [
            txn
            for txn in found
            if any(b.phase_two_attempts > 0 for b in txn.branches)
            or fmt.age_s(txn.created_at_unix_ms, now) > options.stuck_after
        ][: options.limit]
    if session.json:
        fmt.emit_json([fmt.transaction_dict(txn, now) for txn in found], session.out)
        return EXIT_OK
    if not found:
        print("no transactions" + (" match" if states else ""), file=session.out)
        return EXIT_OK
    fmt.table(
        ["ID", "STATE", "AGE", "BRANCHES", "P2 ATTEMPTS", "LAST ERROR"],
        [
            [
                txn.transaction_id,
                fmt.state_name(txn.state),
                fmt.duration(fmt.age_s(txn.created_at_unix_ms, now)),
                fmt.branches_summary(txn),
                sum(b.phase_two_attempts for b in txn.branches),
                fmt.clip(fmt.last_error(txn)) or "-",
            ]
            for txn in found
        ],
        session.out,
    )
    return EXIT_OK


def cmd_txn_show(session: Session) -> int:
    txn = session.call_coordinator(
        "GetTransaction", coordinator_pb2.GetTransactionRequest(transaction_id=session.options.id)
    )
    _print_transaction(txn, session)
    return EXIT_OK


def _print_transaction(txn: coordinator_pb2.Transaction, session: Session) -> None:
    now = fmt.now_ms()
    if session.json:
        fmt.emit_json(fmt.transaction_dict(txn, now), session.out)
        return
    decided = "-"
    if txn.decided_at_unix_ms:
        decided = f"{txn.decided_at_unix_ms - txn.created_at_unix_ms} ms after the start"
    pairs = {
        "transaction": txn.transaction_id,
        "state": fmt.state_name(txn.state),
        "reason": txn.reason or "-",
        "age": fmt.duration(fmt.age_s(txn.created_at_unix_ms, now)),
        "decided": decided,
        "timeout": f"{txn.timeout_ms} ms",
    }
    if txn.committed_earlier:
        # What its branches are told is this attempt's abort, not the state's "committed".
        pairs["committed"] = (
            f"by an earlier attempt ({txn.committed_earlier}); this attempt decided abort, "
            "which its own branches are told"
        )
    fmt.key_values(pairs, session.out)
    print(file=session.out)
    _branch_status_table(txn.branches, session.out)


def cmd_txn_retry(session: Session) -> int:
    txn = session.call_coordinator(
        "RetryTransaction",
        coordinator_pb2.RetryTransactionRequest(transaction_id=session.options.id),
    )
    if session.json:
        fmt.emit_json(fmt.transaction_dict(txn), session.out)
        return EXIT_OK
    state = fmt.state_name(txn.state)
    if txn.state != coordinator_pb2.TRANSACTION_STATE_COMMITTING:
        print(
            f"transaction {txn.transaction_id} is {state}: nothing to retry (only the phase 2 "
            "of a committing transaction is retried)",
            file=session.out,
        )
        return EXIT_OK
    waiting = [
        b.participant
        for b in txn.branches
        if b.vote == coordinator_pb2.VOTE_PREPARED and not b.acknowledged
    ]
    print(
        f"transaction {txn.transaction_id}: phase 2 retried now for "
        f"{', '.join(waiting) or 'nobody'}; follow it with `dtm txn show {txn.transaction_id}`",
        file=session.out,
    )
    return EXIT_OK


# ---- heuristic outcomes ----


def cmd_heuristics(session: Session) -> int:
    response = session.call_coordinator(
        "ListHeuristics", coordinator_pb2.ListHeuristicsRequest(limit=session.options.limit)
    )
    found = list(response.heuristics)
    if session.json:
        fmt.emit_json([fmt.heuristic_dict(h) for h in found], session.out)
        if response.total > len(found):
            # The list is the JSON contract; that it is cut goes where the table says it.
            print(
                f"dtm: note: {len(found)} of {response.total} heuristic outcomes listed: "
                "--limit for more",
                file=sys.stderr,
            )
        return EXIT_OK
    if not found:
        # Not "every branch followed its decision": a forced branch reaches this list once its
        # Commit or Rollback, or its participant's report after an inquiry, reached the
        # coordinator; until then its participant keeps it awaiting.
        print(
            "no heuristic outcomes known to the coordinator; forced branches not yet "
            "reconciled with it are listed by `dtm branches --awaiting`",
            file=session.out,
        )
        return EXIT_OK
    now = fmt.now_ms()
    fmt.table(
        [
            "TRANSACTION",
            "BRANCH",
            "PARTICIPANT",
            "OUTCOME",
            "DECISION",
            "FOUND BY",
            "AGE",
            "DETAIL",
        ],
        [
            [
                h.transaction_id,
                h.branch,
                h.participant,
                h.outcome,
                fmt.outcome_name(h.decision),
                fmt.found_by(h),
                fmt.duration(fmt.age_s(h.recorded_at_unix_ms, now)),
                fmt.clip(h.detail) or "-",
            ]
            for h in found
        ],
        session.out,
    )
    if response.total > len(found):
        print(f"({len(found)} of {response.total}: --limit for more)", file=session.out)
    return EXIT_OK


def cmd_heuristics_forget(session: Session) -> int:
    options = session.options
    request = coordinator_pb2.ForgetHeuristicRequest(
        transaction_id=options.id, branch=options.branch
    )
    try:
        response = session.coordinator.ForgetHeuristic(request, timeout=session.timeout)
    except grpc.RpcError as error:
        address = session.coordinator_address
        if isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.NOT_FOUND:
            # Its own message names the API call (ListHeuristics); here, the command.
            raise CliError(
                f"the coordinator at {address} keeps no heuristic outcome for "
                f"{options.id}/{options.branch}: never recorded, or already forgotten "
                "(`dtm heuristics` lists them)"
            ) from None
        raise rpc_error(error, "the coordinator", address, session) from None
    if session.json:
        fmt.emit_json(fmt.heuristic_dict(response.forgotten), session.out)
        return EXIT_OK
    forgotten = response.forgotten
    print(
        f"forgot the {forgotten.outcome} of {forgotten.transaction_id}/{forgotten.branch} "
        f"at {forgotten.participant}",
        file=session.out,
    )
    return EXIT_OK


# ---- participants ----


#: Added when the coordinator cannot be reached to look a participant up in its registry.
WITHOUT_COORDINATOR_HINT = (
    "without the coordinator, give the participant's --address HOST:PORT to ask it directly"
)


def _registry(
    session: Session, unreachable_hint: str = ""
) -> list[coordinator_pb2.ParticipantInfo]:
    """The coordinator's registry; `unreachable_hint` is added to the error when the
    coordinator cannot be reached (not when it refuses, or fails the TLS handshake)."""
    try:
        response = session.coordinator.ListParticipants(
            coordinator_pb2.ListParticipantsRequest(), timeout=session.timeout
        )
    except grpc.RpcError as error:
        problem = rpc_error(error, "the coordinator", session.coordinator_address, session)
        code = error.code() if isinstance(error, grpc.Call) else None
        details = (error.details() if isinstance(error, grpc.Call) else None) or ""
        unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # A failed TLS handshake is a coordinator that answers, with other TLS settings.
        if (
            unreachable_hint
            and unreachable
            and _tls_hint(details, "the coordinator", session) is None
        ):
            problem = CliError(f"{problem}; {unreachable_hint}", problem.status)
        raise problem from None
    return list(response.participants)


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


def _targets(session: Session) -> list[Target]:
    """The participants to ask: the one at --address, else the registry's (only
    --participant's, when given)."""
    options = session.options
    if options.address:
        name = options.participant or options.address
        return [Target(name, options.address, options.participant)]
    registry = _registry(session, WITHOUT_COORDINATOR_HINT)
    if options.participant:
        registry = [p for p in registry if p.name == options.participant]
        if not registry:
            raise CliError(
                f"participant {options.participant!r} is not registered with the coordinator "
                f"at {session.coordinator_address} (`dtm participants` lists them; --address "
                "HOST:PORT reaches a participant directly)"
            )
    return [Target(p.name, p.address, p.name, p.incarnation) for p in registry]


def _ask_all(
    session: Session, call: Callable[[participant_pb2_grpc.ParticipantAdminStub, Target], Any]
) -> Iterator[tuple[str, Any]]:
    """Call every target participant at once (futures); yields (name, response) in order.
    A participant that fails is reported on stderr; the command then exits with EXIT_ERROR."""
    pending = [(target, call(session.admin(target), target)) for target in _targets(session)]
    for target, future in pending:
        try:
            yield target.name, future.result()
        except grpc.RpcError as error:
            problem = rpc_error(error, target.what, target.address, session)
            print(f"dtm: error: {problem}", file=sys.stderr)
            session.failures += 1


def _nobody_answered(session: Session, answers: Sequence[tuple[str, Any]]) -> bool:
    """Whether every participant asked failed (each is already reported on stderr): then the
    command prints nothing, since "no locks held" or [] would claim what nobody said."""
    return session.failures > 0 and not answers


def cmd_participants_remove(session: Session) -> int:
    response = session.call_coordinator(
        "UnregisterParticipant",
        coordinator_pb2.UnregisterParticipantRequest(name=session.options.name),
    )
    removed = response.participant
    # The incarnation says which process's registration went (another may have registered
    # under the name since `dtm participants` was read), as `dtm participants` names it.
    if session.json:
        fmt.emit_json(
            {"name": removed.name, "address": removed.address, "incarnation": removed.incarnation},
            session.out,
        )
    else:
        incarnation = f" incarnation {removed.incarnation}" if removed.incarnation else ""
        print(
            f"unregistered {removed.name}{incarnation} (was at {removed.address})",
            file=session.out,
        )
    if _serving(session, removed.address, removed.name):
        # Done all the same (the coordinator's registry is what the command changes), but
        # not for good: a participant registers at every start.
        print(
            f"dtm: warning: {removed.name} at {removed.address} is still running (health "
            "SERVING): it gets no new transactions, and registers again at its next start; "
            "stop the service to decommission it",
            file=sys.stderr,
        )
    return EXIT_OK


def _serving(session: Session, address: str, identity: str) -> bool:
    """Whether the server at `address` answers its health check SERVING (briefly: a stopped
    one refuses the connection at once)."""
    stub = health_pb2_grpc.HealthStub(session.channel(address, identity))
    try:
        answer = stub.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=min(session.timeout, 2.0)
        )
    except grpc.RpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def cmd_participants(session: Session) -> int:
    registry = _registry(session)
    probes = []
    identities = []
    for info in registry:
        stub = health_pb2_grpc.HealthStub(session.channel(info.address, info.name))
        probes.append(
            stub.Check.future(health_pb2.HealthCheckRequest(service=""), timeout=session.timeout)
        )
        # Health says a server answers at the address, not which: ask it, as the registered
        # participant and incarnation, for something it refuses to another's caller.
        target = Target(info.name, info.address, info.name, info.incarnation)
        identities.append(
            session.admin(target).ListLocks.future(
                target.addressed(participant_pb2.ListLocksRequest()), timeout=session.timeout
            )
        )
    rows: list[dict[str, Any]] = []
    for info, probe, identity in zip(registry, probes, identities, strict=True):
        try:
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(probe.result().status)
        except grpc.RpcError as error:
            code = error.code().name if isinstance(error, grpc.Call) else "error"
            health = f"UNREACHABLE ({code})"
        other = _another_process(identity)
        if other is not None and health == "SERVING":
            health = "ANOTHER PROCESS"
            print(f"dtm: warning: {info.name} at {info.address}: {other}", file=sys.stderr)
        rows.append(
            {
                "name": info.name,
                "address": info.address,
                "health": health,
                # The id the participant keeps with its log: another one under the same name
                # is another process, or one whose log was lost ("": a participant from
                # before incarnations).
                "incarnation": info.incarnation,
                "one_phase": info.capabilities.one_phase,
                "batch": info.capabilities.batch,
                "operation_types": list(info.capabilities.operation_types),
                "registered_at_unix_ms": info.registered_at_unix_ms,
            }
        )
    healthy = all(row["health"] == "SERVING" for row in rows)
    if session.json:
        fmt.emit_json(rows, session.out)
    elif not rows:
        print(
            f"no participants registered with the coordinator at {session.coordinator_address}",
            file=session.out,
        )
    else:
        fmt.table(
            [
                "NAME",
                "ADDRESS",
                "HEALTH",
                "INCARNATION",
                "CAPABILITIES",
                "OPERATION TYPES",
                "REGISTERED",
            ],
            [
                [
                    row["name"],
                    row["address"],
                    row["health"],
                    row["incarnation"] or "-",
                    ",".join(c for c in ("one_phase", "batch") if row[c]) or "-",
                    ", ".join(row["operation_types"]) or "any",
                    fmt.duration(fmt.age_s(row["registered_at_unix_ms"])) + " ago",
                ]
                for row in rows
            ],
            session.out,
        )
    return EXIT_OK if healthy else EXIT_NO


def _another_process(identity: Any) -> str | None:
    """The refusal of a call addressed to a registered participant by whatever answers at its
    address, when that is another participant or incarnation (a stale registry); else None
    (answered, or failed otherwise: a participant without the admin service, say)."""
    from dtm.coordinator.ports import MISDIRECTED_METADATA_KEY  # only here: a heavy import

    try:
        identity.result()
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call):
            return None
        metadata = error.trailing_metadata() or ()
        if any(key == MISDIRECTED_METADATA_KEY for key, _ in metadata):
            return error.details() or "another participant answers there"
    return None


def cmd_locks(session: Session) -> int:
    answers = list(
        _ask_all(
            session,
            lambda admin, target: admin.ListLocks.future(
                target.addressed(participant_pb2.ListLocksRequest()), timeout=session.timeout
            ),
        )
    )
    if _nobody_answered(session, answers):
        return EXIT_ERROR
    found = [(name, lock) for name, response in answers for lock in response.locks]
    if session.json:
        fmt.emit_json([fmt.lock_dict(name, lock) for name, lock in found], session.out)
    elif not found:
        print("no locks held", file=session.out)
    else:
        fmt.table(
            ["PARTICIPANT", "RESOURCE", "MODE", "HOLDERS", "HELD FOR", "WAITERS"],
            [
                [
                    name,
                    lock.resource,
                    lock.mode,
                    ", ".join(lock.holders),
                    fmt.duration(fmt.age_s(lock.held_since_unix_ms)),
                    ", ".join(lock.waiters) or "-",
                ]
                for name, lock in found
            ],
            session.out,
        )
    return EXIT_ERROR if session.failures else EXIT_OK


def cmd_branches(session: Session) -> int:
    options = session.options
    states = [participant_pb2.BRANCH_STATE_PREPARED] if options.in_doubt else []
    for name in options.state or ():
        if name.lower() not in BRANCH_STATE_NAMES:
            raise CliError(
                f"--state {name!r}: expected one of {', '.join(BRANCH_STATE_NAMES)}", EXIT_USAGE
            )
        states.append(BRANCH_STATE_NAMES[name.lower()])
    answers = list(
        _ask_all(
            session,
            lambda admin, target: admin.ListBranches.future(
                target.addressed(
                    participant_pb2.ListBranchesRequest(
                        states=states, awaiting_coordinator=options.awaiting
                    )
                ),
                timeout=session.timeout,
            ),
        )
    )
    if _nobody_answered(session, answers):
        return EXIT_ERROR
    found = [
        (name, info)
        for name, response in answers
        # The participant lists oldest first; keep the newest `limit` of each.
        for info in list(response.branches)[-options.limit :]
    ]
    for name, response in answers:
        _note_cut(name, len(response.branches), options.limit)
    if session.json:
        fmt.emit_json([fmt.branch_info_dict(name, info) for name, info in found], session.out)
    elif not found:
        print("no branches" + (" match" if states or options.awaiting else ""), file=session.out)
    else:
        fmt.table(
            ["PARTICIPANT", "TRANSACTION", "BRANCH", "STATE", "AGE", "REASON", "HEURISTIC"],
            [
                [
                    name,
                    info.transaction_id,
                    info.branch,
                    fmt.branch_state_name(info.state),
                    fmt.duration(fmt.age_s(info.updated_at_unix_ms)),
                    fmt.clip(info.reason) or "-",
                    fmt.branch_heuristic(info),
                ]
                for name, info in found
            ],
            session.out,
        )
    return EXIT_ERROR if session.failures else EXIT_OK


def _note_cut(name: str, listed: int, limit: int) -> None:
    """Say on stderr that --limit left some of a participant's branches out (the forced ones
    awaiting reconciliation among them, with --awaiting), as `dtm heuristics` does."""
    if listed <= limit:
        return
    # A participant answers at most LIST_TRANSACTIONS_LIMIT_MAX: there may be more.
    more = " or more" if listed >= limits.LIST_TRANSACTIONS_LIMIT_MAX else ""
    print(
        f"dtm: note: {name}: the newest {limit} of {listed}{more} branches listed: --limit for "
        "more",
        file=sys.stderr,
    )


def cmd_force(session: Session) -> int:
    options = session.options
    if not options.i_understand:
        print(f"dtm: {FORCE_WARNING}", file=sys.stderr)
        return EXIT_USAGE
    _refuse_contradiction(session)
    request = participant_pb2.ForceOutcomeRequest(
        transaction_id=options.id,
        branch=options.branch,
        commit=options.commit,
        i_understand_this_is_heuristic=True,
    )
    return _act_on_branch(
        session,
        lambda admin, target: admin.ForceOutcome(
            target.addressed(request), timeout=session.timeout
        ),
        lambda name, info: (
            f"{name}: branch {info.transaction_id}/{info.branch} forced to "
            f"{fmt.branch_state_name(info.state)} (heuristic: {info.heuristic or '-'})"
        ),
    )


def cmd_branches_forget(session: Session) -> int:
    options = session.options
    request = participant_pb2.ForgetBranchRequest(transaction_id=options.id, branch=options.branch)
    return _act_on_branch(
        session,
        lambda admin, target: admin.ForgetBranch(
            target.addressed(request), timeout=session.timeout
        ),
        lambda name, info: (
            f"{name}: forgot forced branch {info.transaction_id}/{info.branch} "
            f"({fmt.branch_state_name(info.state)}, heuristic: {info.heuristic}); it is no "
            "longer kept for its coordinator"
        ),
    )


def _act_on_branch(
    session: Session,
    call: Callable[[participant_pb2_grpc.ParticipantAdminStub, Target], Any],
    done: Callable[[str, participant_pb2.BranchInfo], str],
) -> int:
    """One admin call about one branch of the participant the options name; prints the
    branch it answers with (JSON, or the line `done` makes of it)."""
    target = _one_target(session)
    try:
        response = call(session.admin(target), target)
    except grpc.RpcError as error:
        raise rpc_error(error, target.what, target.address, session) from None
    if session.json:
        fmt.emit_json(fmt.branch_info_dict(target.name, response.branch), session.out)
    else:
        print(done(target.name, response.branch), file=session.out)
    return EXIT_OK


def _one_target(session: Session) -> Target:
    """The one participant a command acts on: --participant (through the registry) or
    --address."""
    options = session.options
    if not options.participant and not options.address:
        raise CliError(
            "say which participant: --participant NAME or --address HOST:PORT", EXIT_USAGE
        )
    return _targets(session)[0]


def _refuse_contradiction(session: Session) -> None:
    """Refuse to force against a decision the coordinator knows: that breaks atomicity for
    certain, and the decision can simply be delivered instead (`dtm txn retry`). A coordinator
    with no record of the transaction decided abort (presumed abort: it answers ABORTED to the
    participants' QueryOutcome), so a forced commit is refused then, unless --coordinator-lost
    says its log is gone. Only a coordinator that cannot be reached (UNAVAILABLE, or no answer
    within --timeout) lets the force go on unchecked: that is the case forcing is for. Any
    other failure to ask (PERMISSION_DENIED, a failed TLS handshake) refuses: the check must
    not fail open."""
    options = session.options
    try:
        txn = session.coordinator.GetTransaction(
            coordinator_pb2.GetTransactionRequest(transaction_id=options.id),
            timeout=session.timeout,
        )
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = (error.details() if isinstance(error, grpc.Call) else None) or ""
        unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # A failed TLS handshake is a coordinator that answers, with other TLS settings.
        if code in unreachable and _tls_hint(details, "the coordinator", session) is None:
            return
        if code is grpc.StatusCode.NOT_FOUND:
            if options.commit and not options.coordinator_lost:
                raise CliError(
                    f"the coordinator at {session.coordinator_address} has no record of "
                    f"{options.id}: under presumed abort that means it aborted (its "
                    "participants are told ABORTED), so forcing commit would break atomicity. "
                    "Force --rollback instead; only if that coordinator lost its log (or never "
                    "ran this transaction) and the transaction may have committed, re-run with "
                    "--coordinator-lost"
                ) from None
            return
        problem = rpc_error(error, "the coordinator", session.coordinator_address, session)
        raise CliError(
            f"{problem}; refusing to force {options.id} without knowing the coordinator's "
            "decision (a coordinator that cannot be reached at all does not stop a force)"
        ) from None
    if txn.state in (
        coordinator_pb2.TRANSACTION_STATE_PREPARING,
        coordinator_pb2.TRANSACTION_STATE_DECIDING,
    ):
        # It is deciding now, within the transaction's timeout: whichever way a force went,
        # the decision could contradict it a moment later.
        state = coordinator_pb2.TransactionState.Name(txn.state).removeprefix("TRANSACTION_STATE_")
        raise CliError(
            f"the coordinator at {session.coordinator_address} is still deciding {options.id} "
            f"({state.lower()}): forcing now could contradict its decision. Wait for it "
            f"(`dtm txn show {options.id}`); it comes within the transaction's timeout"
        )
    # This attempt's own decision, which its branches are told: a transaction committed by an
    # earlier attempt reads COMMITTED, but this attempt decided abort (a branch of it in doubt
    # is one a participant that forgot the earlier commit prepared again); ABORTING has
    # decided abort, only its client's answer waits.
    committed = not txn.committed_earlier and txn.state in (
        coordinator_pb2.TRANSACTION_STATE_COMMITTING,
        coordinator_pb2.TRANSACTION_STATE_COMMITTED,
    )
    aborted = bool(txn.committed_earlier) or txn.state in (
        coordinator_pb2.TRANSACTION_STATE_ABORTING,
        coordinator_pb2.TRANSACTION_STATE_ABORTED,
    )
    if (committed and not options.commit) or (aborted and options.commit):
        decision = "commit" if committed else "abort"
        raise CliError(
            f"the coordinator at {session.coordinator_address} decided {decision} for "
            f"{options.id}: forcing {'commit' if options.commit else 'rollback'} would break "
            f"atomicity. {_deliver_instead(txn)}"
        )


def _deliver_instead(txn: coordinator_pb2.Transaction) -> str:
    """What to do instead of forcing against a known decision. `dtm txn retry` pushes only the
    Commits of a committing transaction: suggested for any other state, it answered "nothing to
    retry"."""
    if txn.state == coordinator_pb2.TRANSACTION_STATE_COMMITTING and not txn.committed_earlier:
        return f"Deliver the decision instead: `dtm txn retry {txn.transaction_id}`"
    return (
        "The participant learns it without you: a branch prepared longer than its "
        "in_doubt_after_ms asks the coordinator (`dtm txn show "
        f"{txn.transaction_id}` shows the decision)"
    )


# ---- local tools ----


def cmd_log_dump(session: Session) -> int:
    from dtm import wal

    path: Path = session.options.path
    if not path.exists():
        raise CliError(
            f"{path} does not exist; a log is a directory DATA_DIR/<process>/wal, e.g. "
            ".dtm-data/coordinator/wal or .dtm-data/inventory/wal"
        )
    if path.is_dir() and not _has_segments(path):
        logs = sorted(str(p.parent) for p in path.glob("*/wal/*.wal"))
        if (path / "wal").is_dir():
            path = path / "wal"
        elif logs:
            unique = sorted(set(logs))
            raise CliError(f"{path} holds no log segments; it has logs at: {', '.join(unique)}")
        # Printing nothing would read as "an empty log": say that there is none here.
        if not _has_segments(path):
            raise CliError(
                f"{path} holds no log segments (*.wal files); a log is a directory "
                "DATA_DIR/<process>/wal, e.g. .dtm-data/coordinator/wal"
            )
    try:
        lines = list(wal.dump(path))
    except OSError as error:
        raise CliError(f"cannot read {path}: {error}") from None
    not_a_log = None
    if lines and lines[-1].startswith("NOT A LOG"):
        # /etc/services, or garbage named like a segment: an error, not a "torn tail". The
        # records of the segments before it are printed first (they were hidden).
        not_a_log = lines.pop().removeprefix("NOT A LOG ")
        if not lines:
            raise CliError(not_a_log)
    corrupted = not_a_log is not None or any(line.startswith("CORRUPTED") for line in lines)
    if session.json:
        document: dict[str, Any] = {"path": str(path), "lines": lines, "corrupted": corrupted}
        if not_a_log is not None:
            document["not_a_log"] = not_a_log
        fmt.emit_json(document, session.out)
    elif not lines:
        # Printing nothing read as a failure to look (a zero-byte file, or a new log).
        print(f"{path}: empty, no records", file=session.out)
    else:
        for line in lines:
            print(line, file=session.out)
    if not_a_log is not None:
        raise CliError(not_a_log)
    return EXIT_ERROR if corrupted else EXIT_OK


def _has_segments(directory: Path) -> bool:
    return any(p.suffix == ".wal" for p in directory.iterdir())


def cmd_crashpoints(session: Session) -> int:
    if session.json:
        fmt.emit_json(dict(crashpoints.POINTS), session.out)
        return EXIT_OK
    fmt.table(["CRASH POINT", "WHERE"], list(crashpoints.POINTS.items()), session.out)
    print(
        f"\narm one with {crashpoints.ENVIRONMENT_VARIABLE}=<point> (die at its first hit) or "
        f"{crashpoints.ENVIRONMENT_VARIABLE}=<point>@<n> (at its n-th)",
        file=session.out,
    )
    return EXIT_OK


def cmd_config(session: Session) -> int:
    try:
        settings = config.load(session.options.config)
    except config.ConfigError as error:
        raise CliError(str(error)) from None
    document = settings.as_dict()
    if session.json:
        fmt.emit_json(document, session.out)
        return EXIT_OK
    source = settings.source or "none (built-in defaults and DTM_* variables)"
    print(f"# configuration in effect; file: {source}", file=session.out)
    overriding = [
        name for name in ("DTM_TLS_CA", "DTM_TLS_CERT", "DTM_TLS_KEY") if os.environ.get(name)
    ]
    if overriding:
        # dtm.security reads these after the file: they win over every section's tls_* below.
        print(
            f"# {', '.join(overriding)} set: overrides tls_* of every process started here",
            file=session.out,
        )
    for section, values in document.items():
        print(f"\n[{section}]", file=session.out)
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}", file=session.out)
    return EXIT_OK


def run_server(options: argparse.Namespace, extra: list[str]) -> int:
    """`dtm coordinator` / `dtm service NAME`: the process's own main, in the foreground."""
    args = list(extra)
    if options.config is not None:
        args = ["--config", str(options.config), *args]
    if options.command == "coordinator":
        from dtm.coordinator.server import main as server_main
    else:
        if options.name is None:
            raise CliError(f"which service? one of {', '.join(config.SERVICES)}", EXIT_USAGE)
        import importlib

        module = importlib.import_module(f"participants.services.{options.name}")
        server_main = module.main
    try:
        server_main(args)
    except SystemExit as done:  # --help, or a usage error the server's parser reported
        if isinstance(done.code, int):
            return done.code
        if isinstance(done.code, str):
            # SystemExit("message") (a bad --config or --initial): Python would print it at
            # exit; caught here, it is printed here, or the process ends without a word.
            print(done.code, file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a port in use, an unreadable data directory...
        raise CliError(str(error)) from None
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


# ---- the command line ----


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_limit(parser: argparse.ArgumentParser, help: str) -> None:
    """--limit N of a list command, within what the servers' list calls accept."""
    parser.add_argument(
        "--limit",
        type=_bounded_int(1, limits.LIST_TRANSACTIONS_LIMIT_MAX),
        default=limits.LIST_TRANSACTIONS_LIMIT_DEFAULT,
        metavar="N",
        help=help,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dtm",
        description="Operate dtm: run the servers, submit and inspect transactions, look at\n"
        "participants' locks and branches. `dtm COMMAND --help` for each command.",
        epilog="exit status: 0 ok; 1 error (unreachable, refused, bad input); 2 usage;\n"
        "  3 the answer is no (transaction aborted, participant unhealthy); 4 outcome unknown;\n"
        "  141 the output's reader went away (`dtm config | head -1`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--coordinator",
        type=_address,
        metavar="HOST:PORT",
        default=None,
        help="the coordinator (default: [participant] coordinator of the configuration, "
        "DTM_PARTICIPANT_COORDINATOR, else 127.0.0.1:50050)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="TOML configuration file (default: $DTM_CONFIG); also passed to "
        "`dtm coordinator` and `dtm service`",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--timeout",
        type=_call_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g})",
    )
    # The client side of dtm.security: the certificate to call with (an operator's, since
    # the admin calls need one). Its --authz-* flags are server policy, so they are not here.
    tls = parser.add_argument_group("TLS", "mutual TLS, when the servers use it")
    tls.add_argument("--tls-ca", type=Path, metavar="PATH", help="CA certificate (DTM_TLS_CA)")
    tls.add_argument("--tls-cert", type=Path, metavar="PATH", help="certificate (DTM_TLS_CERT)")
    tls.add_argument("--tls-key", type=Path, metavar="PATH", help="private key (DTM_TLS_KEY)")
    tls.add_argument(
        "--coordinator-identity",
        metavar="NAME",
        help="the name the coordinator's certificate must carry (default: coordinator_identity "
        'in [cli], DTM_CLI_COORDINATOR_IDENTITY, DTM_AUTHZ_COORDINATOR, else "coordinator")',
    )
    # --json is accepted after the command too; SUPPRESS keeps the global one otherwise.
    as_json = _Parser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "coordinator",
        add_help=False,
        help="run the coordinator in the foreground (`dtm coordinator --help` for its flags)",
    )
    service = commands.add_parser(
        "service",
        add_help=False,
        help="run one service in the foreground (`dtm service NAME --help` for its flags)",
    )
    service.add_argument("name", nargs="?", choices=config.SERVICES, metavar="NAME")

    submit = commands.add_parser(
        "submit",
        parents=[as_json],
        help="submit a transaction described in JSON",
        description='FILE: {"transaction_id": "...", "timeout_ms": 5000, "branches": '
        '[{"participant": "inventory", "type": "dtm.v1.ReserveStock", "operation": '
        '{"lines": [{"sku": "sku-apple", "quantity": 1}]}}]}. transaction_id and timeout_ms '
        "are optional (an id is generated, so that the transaction can be looked up). "
        "Exit status 0 committed, 3 aborted, 4 unknown: the answer was lost (the coordinator "
        "went away, or no answer within the transaction's timeout and --timeout) and the "
        "transaction, named with its id, may still commit; `dtm txn show ID` or submit again "
        "with the same transaction_id. 1 when the coordinator cannot be reached: nothing was "
        "sent.",
    )
    submit.add_argument("file", type=Path, metavar="FILE", help="the JSON file, or - for stdin")
    submit.set_defaults(handler=cmd_submit)

    txn = commands.add_parser("txn", help="list, show or retry transactions")
    txn_commands = txn.add_subparsers(dest="txn_command", metavar="COMMAND", required=True)
    txn_list = txn_commands.add_parser(
        "list",
        parents=[as_json],
        help="recent transactions, newest first",
        description="In doubt: deciding, committing or unknown (a participant may not know "
        "the outcome yet). Stuck: in doubt and retried in phase 2, or older than "
        f"--stuck-after (looked for among the {limits.LIST_TRANSACTIONS_LIMIT_MAX:,} newest in "
        "doubt).",
    )
    which = txn_list.add_mutually_exclusive_group()
    which.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help=f"only these states (repeat or comma-separate): {', '.join(STATE_NAMES)}",
    )
    which.add_argument("--in-doubt", action="store_true", help="deciding, committing or unknown")
    which.add_argument("--stuck", action="store_true", help="in doubt and retried, or old")
    txn_list.add_argument(
        "--stuck-after",
        type=_seconds,
        default=STUCK_AFTER_S_DEFAULT,
        metavar="SECONDS",
        help="age after which an in-doubt transaction is stuck "
        f"(default {STUCK_AFTER_S_DEFAULT:g})",
    )
    _add_limit(
        txn_list,
        f"at most N (default {limits.LIST_TRANSACTIONS_LIMIT_DEFAULT}, "
        f"at most {limits.LIST_TRANSACTIONS_LIMIT_MAX})",
    )
    txn_list.set_defaults(handler=cmd_txn_list)
    txn_show = txn_commands.add_parser("show", parents=[as_json], help="one transaction")
    txn_show.add_argument("id", type=_utf8, metavar="ID")
    txn_show.set_defaults(handler=cmd_txn_show)
    txn_retry = txn_commands.add_parser(
        "retry",
        parents=[as_json],
        help="retry phase 2 of a committing transaction now (skip the backoff)",
    )
    txn_retry.add_argument("id", type=_utf8, metavar="ID")
    txn_retry.set_defaults(handler=cmd_txn_retry)

    participants = commands.add_parser(
        "participants",
        parents=[as_json],
        help="the registry, with each participant's health and incarnation",
        description="Exit status 3 when a participant is not SERVING.",
    )
    participants.set_defaults(handler=cmd_participants)
    participants_commands = participants.add_subparsers(
        dest="participants_command", metavar="COMMAND", required=False
    )
    remove = participants_commands.add_parser(
        "remove",
        parents=[as_json],
        help="unregister a decommissioned participant (durable; stop it first)",
        description="Refused while a transaction not yet finished has a branch there. A "
        "participant registers again when it starts, so stop the service first: removing one "
        "that still answers its health check SERVING is done, with a warning.",
    )
    remove.add_argument("name", type=_utf8, metavar="NAME", help="the participant")
    remove.set_defaults(handler=cmd_participants_remove)

    # SUPPRESS, as for --json: a subcommand's copy (`branches forget`) must not reset what
    # was given before it (`dtm branches --participant orders forget ...`).
    parser.set_defaults(participant=None, address=None)
    target = _Parser(add_help=False)
    target.add_argument(
        "--participant", metavar="NAME", default=argparse.SUPPRESS, help="only this participant"
    )
    target.add_argument(
        "--address",
        type=_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="ask the participant at this address directly, without the coordinator",
    )
    # `force` and `branches forget` act on one branch: the flag names where it is, and one of
    # the two is required (cmd_force says so), so "only this participant" would mislead.
    holder = _Parser(add_help=False)
    holder.add_argument(
        "--participant",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="the participant holding the branch, found through the coordinator "
        "(this or --address is required)",
    )
    holder.add_argument(
        "--address",
        type=_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="the participant holding the branch, reached at this address directly (not "
        "looked up in the coordinator's registry)",
    )
    locks = commands.add_parser(
        "locks", parents=[as_json, target], help="locks held and waited for, per participant"
    )
    locks.set_defaults(handler=cmd_locks)
    branches = commands.add_parser(
        "branches", parents=[as_json, target], help="every participant's branches"
    )
    branch_filter = branches.add_mutually_exclusive_group()
    branch_filter.add_argument(
        "--in-doubt", action="store_true", help="only prepared branches waiting for a decision"
    )
    branch_filter.add_argument(
        "--awaiting",
        action="store_true",
        help="only forced branches kept until their coordinator decides them (to forget)",
    )
    branch_filter.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help=f"only these states (repeatable): {', '.join(BRANCH_STATE_NAMES)}",
    )
    _add_limit(branches, "the newest N per participant")
    branches.set_defaults(handler=cmd_branches)
    branches_commands = branches.add_subparsers(
        dest="branches_command", metavar="COMMAND", required=False
    )
    forget_branch = branches_commands.add_parser(
        "forget",
        parents=[as_json, holder],
        help="stop keeping a forced branch for its coordinator, once reconciled (durable)",
        description="A forced branch is kept until its coordinator sends a decision for it. "
        "A coordinator that never logged the transaction, or lost its log, never will: once "
        "you have reconciled the branch, forget it here.",
    )
    forget_branch.add_argument("id", type=_utf8, metavar="ID", help="the transaction")
    forget_branch.add_argument("branch", type=_branch_index, metavar="BRANCH", help="its index")
    forget_branch.set_defaults(handler=cmd_branches_forget)

    # In its own module, which reads the processes' log files as well as asking them.
    from dtm import trace

    trace.register(commands, as_json, target)

    force = commands.add_parser(
        "force",
        parents=[as_json, holder],
        help="heuristically commit or roll back an in-doubt branch (dangerous)",
        description=FORCE_WARNING.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    force.add_argument("id", type=_utf8, metavar="ID", help="the transaction")
    force.add_argument("branch", type=_branch_index, metavar="BRANCH", help="its index")
    decision = force.add_mutually_exclusive_group(required=True)
    decision.add_argument(
        "--commit", action="store_true", dest="commit", default=None, help="commit the branch"
    )
    decision.add_argument(
        "--rollback", action="store_false", dest="commit", help="roll the branch back"
    )
    force.add_argument(
        "--i-understand", action="store_true", help="confirm: this may break atomicity"
    )
    force.add_argument(
        "--coordinator-lost",
        action="store_true",
        help="the coordinator lost its log: force --commit even though it has no record of "
        "the transaction (which otherwise means it aborted, by presumed abort)",
    )
    force.set_defaults(handler=cmd_force)

    heuristics = commands.add_parser(
        "heuristics",
        parents=[as_json],
        help="heuristic outcomes the coordinator keeps (branches that did not follow the "
        "decision), until forgotten",
    )
    _add_limit(heuristics, "the oldest N")
    heuristics.set_defaults(handler=cmd_heuristics)
    heuristics_commands = heuristics.add_subparsers(
        dest="heuristics_command", metavar="COMMAND", required=False
    )
    forget = heuristics_commands.add_parser(
        "forget",
        parents=[as_json],
        help="stop reporting a heuristic outcome once it is reconciled (durable)",
    )
    forget.add_argument("id", type=_utf8, metavar="ID", help="the transaction")
    forget.add_argument("branch", type=_branch_index, metavar="BRANCH", help="its index")
    forget.set_defaults(handler=cmd_heuristics_forget)

    log = commands.add_parser("log", help="write-ahead log tools")
    log_commands = log.add_subparsers(dest="log_command", metavar="COMMAND", required=True)
    dump = log_commands.add_parser(
        "dump",
        parents=[as_json],
        help="print every record of a log (read-only)",
        description="Exit status 1 when the log is corrupted.",
    )
    dump.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help="a log directory (DATA_DIR/<process>/wal) or segment",
    )
    dump.set_defaults(handler=cmd_log_dump)

    crash = commands.add_parser("crashpoints", parents=[as_json], help="list the crash points")
    crash.set_defaults(handler=cmd_crashpoints)
    show_config = commands.add_parser(
        "config",
        parents=[as_json],
        help="print the configuration in effect (file, DTM_* variables, defaults)",
    )
    show_config.set_defaults(handler=cmd_config)
    return parser


def _bounded_int(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is out of range {minimum}..{maximum}")
        return value

    return parse


#: A branch's index within its transaction: a usage error beyond the last one there can be,
#: before anything is asked (the coordinator's answer to it would be about something else).
_branch_index = _bounded_int(0, limits.BRANCHES_PER_TRANSACTION_MAX - 1)


def main(argv: Sequence[str] | None = None) -> int:
    """The `dtm` console script. Returns the exit status (see EXIT_*)."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        options, extra = parser.parse_known_args(arguments)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    try:
        if options.command in ("coordinator", "service"):
            # Everything after the command is the server's own command line.
            return run_server(options, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        session = Session(options, sys.stdout)
        with session.channels:
            status: int = options.handler(session)
        # Flushed here, so that a reader gone away is caught below rather than at exit.
        session.out.flush()
        return status
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    except CliError as error:
        print(f"dtm: error: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        return 130


def _stdout_to_devnull() -> None:
    """After a BrokenPipeError: point standard output at /dev/null, so that Python's flush at
    exit does not fail again ("Exception ignored ... BrokenPipeError"). The standard recipe
    (see the signal module's documentation on SIGPIPE)."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor: a test's StringIO
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
