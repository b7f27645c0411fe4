"""Commands on transactions: submit, txn list, txn show, txn retry.

Part of `dtm.cli`: see its docstring."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import (
    any_pb2,
    descriptor_database,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
)
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dtm import config, limits
from dtm.cli import tables as fmt
from dtm.cli.session import (
    BRANCH_KEYS,
    EXIT_NO,
    EXIT_OK,
    EXIT_UNKNOWN,
    IN_DOUBT_STATES,
    STATE_NAMES,
    SUBMIT_KEYS,
    CliError,
    Session,
    parse_states,
    rpc_error,
)
from dtm.orderflow import named
from dtmpb.v1 import (
    coordinator_pb2,
)

# ---- transactions ----


def cmd_submit(session: Session) -> int:
    request = load_submission(session.options.file, session)
    # No id in the file: one is made up here (`txn-` and a random hex, as
    # OrderClient.submit does), so that it can be named, looked up and retried.
    generated = not request.transaction_id
    request = named(request)
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
    except KeyboardInterrupt:
        # Ctrl-C while the Submit was out: it may have reached the coordinator and still
        # commit, and an id made up here was known nowhere else (exit 130, without a word).
        print(f"dtm: {_unknown_outcome(request, generated, 'interrupted')}", file=sys.stderr)
        raise
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
    return _unknown_outcome(request, generated, failure)


def _unknown_outcome(request: coordinator_pb2.SubmitRequest, generated: bool, failure: str) -> str:
    """The transaction whose outcome is unknown (`failure`: why), and how to learn it."""
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
    # (participant, type) -> the type as that participant described it: asked once a file.
    described: dict[tuple[str, str], Descriptor] = {}
    for index, branch in enumerate(branches):
        request.branches.append(
            _branch_request(f"{where}: branch {index}", branch, session, described)
        )
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


def _branch_request(
    where: str,
    branch: object,
    session: Session,
    described: dict[tuple[str, str], Descriptor],
) -> coordinator_pb2.BranchRequest:
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
        descriptor = described.get((participant, type_name)) or _described_by(
            where, participant, type_name, session
        )
        described[participant, type_name] = descriptor
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


def _described_by(where: str, participant: str, type_name: str, session: Session) -> Descriptor:
    """The message type `type_name`, not compiled into dtm (a service of one's own, such as
    examples/loyalty), as the registered `participant` that takes it describes it by server
    reflection, which the SDK serves. CliError when no registered participant of that name
    takes it, or when it cannot describe it."""
    try:
        registry = session.coordinator.ListParticipants(
            coordinator_pb2.ListParticipantsRequest(), timeout=session.timeout
        )
    except grpc.RpcError as error:
        # Not "unknown message type": the type may well be known, to a participant that only
        # the coordinator's registry can name.
        unreached = rpc_error(error, "the coordinator", session.coordinator_address, session)
        raise CliError(
            f"{where}: {type_name} is not compiled into dtm, and the coordinator, whose registry "
            f"names the participant to ask for it, was not reached: {unreached}",
            unreached.status,
        ) from None
    taker = next(
        (
            p
            for p in registry.participants
            if p.name == participant and type_name in p.capabilities.operation_types
        ),
        None,
    )
    if taker is None:
        taken = any(type_name in p.capabilities.operation_types for p in registry.participants)
        what = f"{participant} does not take" if taken else "unknown"
        raise CliError(f"{where}: {what} message type {type_name!r}{_types_taken(registry)}")
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=type_name)
    stub = reflection_pb2_grpc.ServerReflectionStub(session.channel(taker.address, participant))
    files = descriptor_database.DescriptorDatabase()
    try:
        # The file and every file it imports (grpcio-reflection sends them all).
        for answer in stub.ServerReflectionInfo(iter([request]), timeout=session.timeout):
            if answer.HasField("error_response"):
                raise KeyError(answer.error_response.error_message)
            for file in answer.file_descriptor_response.file_descriptor_proto:
                files.Add(descriptor_pb2.FileDescriptorProto.FromString(file))
        return descriptor_pool.DescriptorPool(files).FindMessageTypeByName(type_name)
    except (grpc.RpcError, KeyError, TypeError) as error:
        problem = error.details() if isinstance(error, grpc.Call) else str(error)
        raise CliError(
            f"{where}: {type_name} is not compiled into dtm, and {participant} at "
            f"{taker.address} did not describe it by server reflection ({problem}): submit "
            "it from a program that imports its generated module"
        ) from None


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
    """A HOST:PORT given on the command line (argparse type), checked as the settings check
    [participant] coordinator (config.ADDRESS), with their messages: the flag and the setting
    it stands in for accept the same addresses. An empty one is an error: read as "not
    given", it would quietly send the commands to the default address instead."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; expected HOST:PORT")
    try:
        config.ADDRESS.parse(text, True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: {error}") from None
    return text


def _utf8(text: str) -> str:
    """Text from argv or a JSON file that protobuf can carry (argv's undecodable bytes and a
    JSON "\\ud800" are lone surrogates); argparse type, and a check."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


def _transaction_id(text: str) -> str:
    """A well-formed transaction id (argparse type): anything else is a usage error, before
    any call (every server would refuse it, and no log line could name it)."""
    problem = limits.transaction_id_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _participant_name(text: str) -> str:
    """A well-formed participant name (argparse type), as for `_transaction_id`: an empty
    --participant listed every participant, as if none had been given."""
    problem = limits.participant_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _call_seconds(text: str) -> float:
    """--timeout: _seconds, at most a day (far larger ones overflow gRPC's deadline clock and
    every call fails at once with DEADLINE_EXCEEDED)."""
    value = _seconds(text)
    if value > 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: at most 86400 seconds (a day)")
    return value


def _types_taken(registry: coordinator_pb2.ListParticipantsResponse) -> str:
    """' (inventory takes dtm.v1.ReserveStock; ...)' from the registry, if it answered."""
    takes = [
        f"{p.name} takes {', '.join(p.capabilities.operation_types) or 'any type'}"
        for p in registry.participants
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
    states += parse_states(options.state, STATE_NAMES)
    # Stuck is decided here, after the listing: asked for only --limit in-doubt transactions,
    # the newest (still on their first try) hid an older stuck one. So ask for all the
    # coordinator lists, and cut to --limit after the filter.
    asked = limits.LIST_TRANSACTIONS_LIMIT_MAX if options.stuck else options.limit
    response = session.call_coordinator(
        "ListTransactions",
        coordinator_pb2.ListTransactionsRequest(states=states, limit=asked),
    )
    _note_list_cut(response, options.stuck, asked)
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


def _note_list_cut(
    response: coordinator_pb2.ListTransactionsResponse, stuck: bool, limit: int
) -> None:
    """Say on stderr that the coordinator listed only some of the transactions that match (as
    many as fit one answer, or --limit), so that the table is not read as all that match."""
    listed = len(response.transactions)
    if response.cut_at_message_limit:
        size = f"{limits.MESSAGE_BYTES_MAX // (1024 * 1024)} MiB"
        if stuck:
            what = f"only the newest {listed} in-doubt transactions fit one answer ({size}) and "
            print(f"dtm: note: {what}were looked at for stuck ones", file=sys.stderr)
            return
        print(
            f"dtm: note: only the newest {listed} matching transactions fit one answer ({size}); "
            "more match: ask for fewer (--limit), or name the states wanted (--state)",
            file=sys.stderr,
        )
        return
    if not response.more_match:
        return
    if stuck:
        # The oldest in doubt are the likeliest stuck: say they were not looked at.
        print(
            f"dtm: note: more than {listed} transactions are in doubt: only the newest {listed} "
            "were looked at for stuck ones; name one state at a time (--state deciding, "
            "committing or unknown) to look at older ones",
            file=sys.stderr,
        )
        return
    how = (
        "--limit for more"
        if limit < limits.LIST_TRANSACTIONS_LIMIT_MAX
        else f"{limits.LIST_TRANSACTIONS_LIMIT_MAX:,} are the most listed at once: name the "
        "states wanted (--state), or look one up (dtm txn show ID)"
    )
    print(
        f"dtm: note: the newest {listed} matching transactions listed; more match: {how}",
        file=sys.stderr,
    )


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
