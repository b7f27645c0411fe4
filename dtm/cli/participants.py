"""Commands on participants: participants (and remove), locks, branches (and forget), force.

Part of `dtm.cli`: see its docstring."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtm import grpc_edge, limits
from dtm.cli import tables as fmt
from dtm.cli.session import (
    BRANCH_STATE_NAMES,
    EXIT_ERROR,
    EXIT_NO,
    EXIT_OK,
    EXIT_UNSAFE,
    EXIT_USAGE,
    FORCE_WARNING,
    CliError,
    Session,
    Target,
    _tls_hint,
    parse_states,
    rpc_error,
)
from dtmpb.v1 import (
    coordinator_pb2,
    participant_pb2,
    participant_pb2_grpc,
)

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
        if unreachable_hint and _cannot_reach(error, session):
            problem = CliError(f"{problem}; {unreachable_hint}", problem.status)
        raise problem from None
    return list(response.participants)


def _cannot_reach(error: grpc.RpcError, session: Session) -> bool:
    """Whether a call to the coordinator failed for want of an answer (UNAVAILABLE, or none
    within --timeout), not because it refused. A failed TLS handshake is reported as
    UNAVAILABLE too, but that is a coordinator that answers, with other TLS settings."""
    if not isinstance(error, grpc.Call):
        return False
    unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    details = error.details() or ""
    return error.code() in unreachable and _tls_hint(details, "the coordinator", session) is None


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
        # participant and incarnation, for something it refuses to another's caller. One
        # lock at most: the answer is not shown, and a whole list takes up to about 2.4 MB.
        target = Target(info.name, info.address, info.name, info.incarnation)
        identities.append(
            session.admin(target).ListLocks.future(
                target.addressed(participant_pb2.ListLocksRequest(limit=1)),
                timeout=session.timeout,
            )
        )
    rows: list[dict[str, Any]] = []
    for info, probe, identity in zip(registry, probes, identities, strict=True):
        health = _health(probe)
        other = _another_process(identity)
        if other is not None and health == SERVING:
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
    healthy = all(row["health"] in (SERVING, NO_HEALTH_SERVICE) for row in rows)
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


SERVING = "SERVING"
#: A server that answered the health check UNIMPLEMENTED: reached, and without the service,
#: which a participant outside the SDK need not serve (the contract is the Participant
#: service), so not counted as unhealthy; whether it serves is not known.
NO_HEALTH_SERVICE = "NO HEALTH SERVICE"


def _health(probe: Any) -> str:
    """A registered participant's health as `dtm participants` shows it, from its probe."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(probe.result().status))
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return NO_HEALTH_SERVICE
        return f"UNREACHABLE ({code.name if code is not None else 'error'})"


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
    for name, response in answers:
        _note_locks_cut(name, len(response.locks), response.locks_total)
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
                    fmt.owners(lock.holders, lock.holders_total),
                    fmt.duration(fmt.age_s(lock.held_since_unix_ms)),
                    fmt.owners(lock.waiters, lock.waiters_total) or "-",
                ]
                for name, lock in found
            ],
            session.out,
        )
    return EXIT_ERROR if session.failures else EXIT_OK


def _note_locks_cut(name: str, listed: int, total: int) -> None:
    """Say on stderr that a participant listed only its longest-held locks (LOCKS_LISTED_MAX),
    so that the table is not read as all it holds."""
    if total <= listed:  # 0 from a participant older than the count
        return
    print(
        f"dtm: note: {name}: the {listed} longest-held of {total} locks listed",
        file=sys.stderr,
    )


def cmd_branches(session: Session) -> int:
    options = session.options
    states = [participant_pb2.BRANCH_STATE_PREPARED] if options.in_doubt else []
    states += parse_states(options.state, BRANCH_STATE_NAMES)
    answers = list(
        _ask_all(
            session,
            lambda admin, target: admin.ListBranches.future(
                target.addressed(
                    participant_pb2.ListBranchesRequest(
                        states=states, awaiting_coordinator=options.awaiting, limit=options.limit
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
        # The participant lists oldest first; keep the newest `limit` of each (one from
        # before ListBranchesRequest.limit lists up to 1,000 whatever was asked).
        for info in list(response.branches)[-options.limit :]
    ]
    for name, response in answers:
        _note_cut(name, response, options.limit)
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


def _note_cut(name: str, response: participant_pb2.ListBranchesResponse, limit: int) -> None:
    """Say on stderr that some of a participant's branches were left out (the forced ones
    awaiting reconciliation among them, with --awaiting): by --limit (here, or by the
    participant, which lists at most the limit asked), or by the participant's own bounds: at
    most LIST_TRANSACTIONS_LIMIT_MAX, and as many as fit one answer."""
    listed = len(response.branches)
    if listed <= limit and not response.more_kept:
        return
    shown = min(listed, limit)
    # A participant from before `more_kept` that lists the most it answers may keep more.
    maybe_more = listed >= limits.LIST_TRANSACTIONS_LIMIT_MAX and not response.more_kept
    kept = f"more than {listed}" if response.more_kept else f"{listed}"
    # Cut at --limit, a larger one lists more; cut at the participant's own bounds (fewer
    # than --limit listed, or --limit the most), only a narrower question.
    how = (
        "--limit for more"
        if shown == limit < limits.LIST_TRANSACTIONS_LIMIT_MAX
        else "the most one answer holds: name the states wanted (--state, --in-doubt, "
        "--awaiting), or one transaction's (dtm trace ID)"
    )
    print(
        f"dtm: note: {name}: the newest {shown} of {kept}{' or more' if maybe_more else ''} "
        f"branches listed: {how}",
        file=sys.stderr,
    )


def cmd_force(session: Session) -> int:
    options = session.options
    if not options.i_understand:
        print(f"dtm: {FORCE_WARNING}", file=sys.stderr)
        return EXIT_USAGE
    target = _with_its_coordinator(session, _one_target(session), "force")
    _refuse_contradiction(session, target)
    request = participant_pb2.ForceOutcomeRequest(
        transaction_id=options.id,
        branch=options.branch,
        commit=options.commit,
        i_understand_this_is_heuristic=True,
        # The participant checks too (against a decision that came since, or for a caller
        # without these checks), unless told its coordinator is gone.
        coordinator_lost=options.coordinator_lost,
    )
    return _act_on_branch(
        session,
        target,
        lambda admin, target: admin.ForceOutcome(
            target.addressed(request), timeout=_checked_call_timeout(session)
        ),
        lambda name, info: (
            f"{name}: branch {info.transaction_id}/{info.branch} forced to "
            f"{fmt.branch_state_name(info.state)} (heuristic: {info.heuristic or '-'})"
        ),
    )


def cmd_branches_forget(session: Session) -> int:
    options = session.options
    target = _with_its_coordinator(session, _one_target(session), "forget")
    _refuse_early_forget(session, target)
    request = participant_pb2.ForgetBranchRequest(
        transaction_id=options.id, branch=options.branch, coordinator_lost=options.coordinator_lost
    )
    return _act_on_branch(
        session,
        target,
        lambda admin, target: admin.ForgetBranch(
            target.addressed(request), timeout=_checked_call_timeout(session)
        ),
        lambda name, info: (
            f"{name}: forgot forced branch {info.transaction_id}/{info.branch} "
            f"({fmt.branch_state_name(info.state)}, heuristic: {info.heuristic}); it is no "
            "longer kept for its coordinator"
        ),
    )


def _checked_call_timeout(session: Session) -> float:
    """The deadline of a ForceOutcome or ForgetBranch call, whatever --timeout: the participant
    asks its coordinator first, for up to FORCE_CHECK_TIMEOUT_S (and a forget may then report
    a contradiction to it), so a shorter deadline would end the call while it waits, leaving
    the operator unsure whether the branch was forced or forgotten."""
    return max(session.timeout, limits.FORCE_CHECK_TIMEOUT_S + limits.FORCE_CALL_MARGIN_S)


def _act_on_branch(
    session: Session,
    target: Target,
    call: Callable[[participant_pb2_grpc.ParticipantAdminStub, Target], Any],
    done: Callable[[str, participant_pb2.BranchInfo], str],
) -> int:
    """One admin call about one branch of `target`, the participant the options name
    (`_one_target`); prints the branch it answers with (JSON, or the line `done` makes of
    it)."""
    try:
        response = call(session.admin(target), target)
    except grpc.RpcError as error:
        if _unsafe(error):  # the participant's own check: the same rules as the command's
            raise CliError(f"{target.name}: {error.details()}", EXIT_UNSAFE) from None
        raise rpc_error(error, target.what, target.address, session) from None
    if session.json:
        fmt.emit_json(fmt.branch_info_dict(target.name, response.branch), session.out)
    else:
        print(done(target.name, response.branch), file=session.out)
    return EXIT_OK


def _unsafe(error: grpc.RpcError) -> bool:
    """Whether a participant refused a force or forget because its coordinator's answer
    forbids it (the dtm-unsafe metadata), as `dtm force` and `dtm branches forget` refuse."""
    if not isinstance(error, grpc.Call):
        return False
    metadata = error.trailing_metadata() or ()
    return any(key == grpc_edge.UNSAFE_METADATA_KEY for key, _ in metadata)


def _one_target(session: Session) -> Target:
    """The one participant a command acts on: --participant (through the registry) or
    --address."""
    options = session.options
    if not options.participant and not options.address:
        raise CliError(
            "say which participant: --participant NAME or --address HOST:PORT", EXIT_USAGE
        )
    return _targets(session)[0]


def _with_its_coordinator(session: Session, target: Target, action: str) -> Target:
    """`target` as a force or forget must address it, after making the coordinator it uses
    the one the check before the call asks. Through --participant that is the coordinator
    whose registry found it. A participant reached by --address is asked (Describe), and its
    answer pins the call to the incarnation that gave it; --coordinator, when given, must be
    the same one (by address, or by its registry: `_not_registered_with`): another's "no
    record" or "unreachable" says nothing of the branch, yet let a force go (found by an
    operator hunt, when the CLI's default coordinator was asked)."""
    options = session.options
    if not options.address:
        return target
    described = _described(session, target, action)
    if described is None:
        return target  # a participant from before Describe: --coordinator, the operator's word
    own = described.coordinator
    if not options.coordinator:
        if not own:
            raise _coordinator_unknown(target, action, "it has none configured")
        session.use_coordinator(own)
        if described.registered:
            _refuse_another_at_that_address(session, target, described, action)
    elif own and options.coordinator != own:
        _refuse_another_coordinator(session, target, described, action)
    return replace(target, incarnation=described.incarnation)


def _described(
    session: Session, target: Target, action: str
) -> participant_pb2.DescribeResponse | None:
    """The participant at --address's Describe; None when it does not serve it and
    --coordinator names the coordinator to ask instead (else that is a usage error)."""
    try:
        described: participant_pb2.DescribeResponse = session.admin(target).Describe(
            target.addressed(participant_pb2.DescribeRequest()), timeout=session.timeout
        )
    except grpc.RpcError as error:
        if not _unimplemented(error):
            raise rpc_error(error, target.what, target.address, session) from None
        if session.options.coordinator:
            return None
        raise _coordinator_unknown(
            target,
            action,
            "it answers Describe UNIMPLEMENTED (a participant from before that call, or one "
            "outside the SDK)",
        ) from None
    return described


def _refuse_another_coordinator(
    session: Session, target: Target, described: participant_pb2.DescribeResponse, action: str
) -> None:
    """Refuse (usage) --coordinator naming another address than the one the participant
    `described` uses, unless it is that coordinator under another name (a port forward,
    another network's): then it has this very participant registered, as no other has."""
    unconfirmed = _not_registered_with(session, described)
    if unconfirmed is None:
        return
    own = described.coordinator
    raise CliError(
        f"--coordinator {session.options.coordinator}: {target.what} at {target.address} uses "
        f"the coordinator at {own}, and {unconfirmed}: `dtm` would ask another whether it is "
        f"safe to {action} the branch. Leave --coordinator out to ask {own}, or name that one "
        "as this machine reaches it",
        EXIT_USAGE,
    )


def _refuse_another_at_that_address(
    session: Session, target: Target, described: participant_pb2.DescribeResponse, action: str
) -> None:
    """Refuse (usage) when the coordinator this machine reaches at the address the participant
    `described` gives for its own (as its machine reaches it: 127.0.0.1:50050, say) answers
    without it registered: another coordinator, whose "no record" says nothing of the branch.
    One that cannot be reached is left to the check's own rule (a force for a coordinator
    gone is what forcing is for; the participant asks its own before it acts)."""
    try:
        registry = session.coordinator.ListParticipants(
            coordinator_pb2.ListParticipantsRequest(), timeout=session.timeout
        )
    except grpc.RpcError as error:
        if _cannot_reach(error, session):
            return
        raise rpc_error(error, "the coordinator", session.coordinator_address, session) from None
    if _lists(registry.participants, described):
        return
    raise CliError(
        f"{target.what} at {target.address} uses the coordinator at {described.coordinator}, "
        f"but the one this machine reaches at that address does not have it registered "
        f"({described.name} incarnation {described.incarnation}): another coordinator, which "
        f"`dtm` would ask whether it is safe to {action} the branch. Name the participant's "
        "coordinator as this machine reaches it with --coordinator HOST:PORT (that address "
        "itself, if it was unregistered since)",
        EXIT_USAGE,
    )


def _not_registered_with(
    session: Session, described: participant_pb2.DescribeResponse
) -> str | None:
    """Why the coordinator --coordinator names is not known to be the one the participant
    `described` uses, or None: it is, holding that participant and incarnation in its
    registry (a participant registers with its own coordinator only)."""
    try:
        registry = _registry(session)
    except CliError as problem:
        return f"whether that is the one at {session.coordinator_address} is not known ({problem})"
    if _lists(registry, described):
        return None
    return (
        f"the one at {session.coordinator_address} does not have it registered ("
        f"{described.name} incarnation {described.incarnation})"
    )


def _lists(
    registry: Iterable[coordinator_pb2.ParticipantInfo], described: participant_pb2.DescribeResponse
) -> bool:
    """Whether `registry` holds the participant `described`, that incarnation of it."""
    key = (described.name, described.incarnation)
    return any((p.name, p.incarnation) == key for p in registry)


def _unimplemented(error: grpc.RpcError) -> bool:
    """Whether a call failed because the server does not serve that method."""
    return isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.UNIMPLEMENTED


def _coordinator_unknown(target: Target, action: str, why: str) -> CliError:
    """A usage error: the coordinator to check a force or forget with must be named."""
    return CliError(
        f"--address {target.address}: name the coordinator that participant uses with "
        f"--coordinator HOST:PORT; `dtm` asks it whether it is safe to {action} the branch, "
        f"and the participant cannot tell: {why} (or use --participant NAME, found through "
        "the coordinator's registry)",
        EXIT_USAGE,
    )


def _refuse_early_forget(session: Session, target: Target) -> None:
    """Refuse (EXIT_UNSAFE) to forget a forced branch its coordinator may still need. While
    its participant keeps it awaiting, the branch is how the coordinator hears of the forced
    outcome: from the branch's answer to its Commit or Rollback, which finds nothing once the
    window of decided branches has moved past a forgotten branch (a Rollback is acknowledged
    as a tombstone, hiding a forced commit), or from the participant's inquiry, which reports
    a contradiction (ReportHeuristic). So it goes only when neither can bring anything: the
    coordinator is done with the transaction and decided as the branch was forced, or it
    keeps the heuristic outcome already. A branch no longer awaiting (its coordinator has
    spoken) goes without asking; one not forced, the participant refuses itself.
    --coordinator-lost, as for `force`: that coordinator's log is gone, so its "no record" is
    no decision, and nothing will be reported to it; it is also the only way past a
    coordinator that cannot be reached, which may only be down for now (a forget frees no
    lock: nothing presses). Any other failure to ask refuses: the check must not fail open.
    The coordinator is asked about the branch's attempt, not only its transaction id: a
    transaction on record under the id with another fingerprint is another attempt that
    reused the id, so the branch's own attempt has no record (presumed abort), as the
    participant's inquiry hears it (QueryOutcome answers ABORTED)."""
    options = session.options
    branch = _kept_branch(session, target)
    if branch is None or not branch.awaiting_coordinator:
        return
    text = f"{options.id}/{options.branch}"
    forced_commit = branch.state == participant_pb2.BRANCH_STATE_COMMITTED
    try:
        txn = session.coordinator.GetTransaction(
            coordinator_pb2.GetTransactionRequest(transaction_id=options.id),
            timeout=session.timeout,
        )
    except grpc.RpcError as error:
        _refuse_unanswered(session, target, error, forced_commit)
        return  # --coordinator-lost, or a forced rollback: what presumed abort decided
    if not _same_attempt(branch, txn):
        attempt = (
            f"the attempt of {options.id} that branch {text} belongs to (the transaction it "
            "has on record under that id has another fingerprint: the id was used again, for "
            "other content)"
        )
        _refuse_unreported_presumed_abort(session, target, forced_commit, attempt)
        return  # a forced rollback: what presumed abort decided for the branch's attempt
    _refuse_while_needed(session, target, txn, forced_commit)


def _refuse_unanswered(
    session: Session, target: Target, error: grpc.RpcError, forced_commit: bool
) -> None:
    """Refuse to forget when GetTransaction failed: unless --coordinator-lost, when the
    coordinator cannot be reached; when it has no record, as for another attempt on record
    (`_refuse_unreported_presumed_abort`); and whenever it failed for another reason, not
    knowing whether the coordinator still needs the branch."""
    options = session.options
    text = f"{options.id}/{options.branch}"
    if _cannot_reach(error, session):
        if options.coordinator_lost:
            return
        raise CliError(
            f"cannot reach the coordinator at {session.coordinator_address} to ask whether it "
            f"still needs forced branch {text}: {target.name} keeps the branch, and asks the "
            "coordinator about it itself, until the coordinator answers. If that coordinator "
            "is gone for good (or lost its log), re-run with --coordinator-lost",
            EXIT_UNSAFE,
        ) from None
    if _no_record(error):
        _refuse_unreported_presumed_abort(session, target, forced_commit, options.id)
        return
    problem = rpc_error(error, "the coordinator", session.coordinator_address, session)
    raise CliError(
        f"{problem}; refusing to forget {text} without knowing whether its coordinator still "
        "needs it"
    ) from None


def _same_attempt(branch: participant_pb2.BranchInfo, txn: coordinator_pb2.Transaction) -> bool:
    """Whether `txn`, on record under the branch's transaction id, is the attempt the branch
    was prepared for. An empty fingerprint on either side (a participant or coordinator from
    before the field, or a Prepare that carried none) cannot tell: taken as the same, which is
    what the check did before it compared them (and what QueryOutcome does)."""
    mine, on_record = branch.transaction_fingerprint, txn.transaction_fingerprint
    return not mine or not on_record or mine == on_record


def _refuse_unreported_presumed_abort(
    session: Session, target: Target, forced_commit: bool, unknown: str
) -> None:
    """Refuse to forget a branch forced to commit whose attempt the coordinator has no record
    of (`unknown` names it: the transaction, or the branch's attempt when another is on
    record): under presumed abort it aborted, a heuristic commit it has not recorded yet.
    --coordinator-lost passes: that coordinator's "no record" decides nothing."""
    options = session.options
    if not forced_commit or options.coordinator_lost:
        return
    text = f"{options.id}/{options.branch}"
    raise CliError(
        f"the coordinator at {session.coordinator_address} has no record of {unknown}: "
        f"under presumed abort it aborted, so branch {text}, forced to commit, is a "
        f"heuristic commit it has not recorded yet. {target.name} reports it at its next "
        "inquiry (`dtm heuristics` lists it then, and `dtm branches --awaiting` no longer "
        "lists the branch): forget the branch after that. Only if that coordinator lost its "
        "log (its 'aborted' then decides nothing), re-run with --coordinator-lost",
        EXIT_UNSAFE,
    )


def _listed_branches(
    session: Session, target: Target, awaiting: bool = False
) -> tuple[participant_pb2.BranchInfo | None, int]:
    """The branch the options name as `target` lists it (None: not listed), and how many
    branches it listed. Asked by transaction id (`awaiting`: only those awaiting their
    coordinator); filtered here too, as a participant from before the field lists every
    transaction's, its newest first."""
    options = session.options
    request = participant_pb2.ListBranchesRequest(
        transaction_id=options.id, awaiting_coordinator=awaiting
    )
    try:
        response = session.admin(target).ListBranches(
            target.addressed(request), timeout=session.timeout
        )
    except grpc.RpcError as error:
        raise rpc_error(error, target.what, target.address, session) from None
    branches: list[participant_pb2.BranchInfo] = list(response.branches)
    key = (options.id, options.branch)
    found = next((info for info in branches if (info.transaction_id, info.branch) == key), None)
    return found, len(branches)


def _kept_branch(session: Session, target: Target) -> participant_pb2.BranchInfo | None:
    """The branch the options name, as `target` keeps it awaiting its coordinator; None when
    it keeps no such branch awaiting (nothing to ask the coordinator: ForgetBranch goes on,
    or says why not)."""
    options = session.options
    # Only the awaiting ones: all the check needs, and all that a participant from before
    # `transaction_id` (which lists its newest branches, whatever the transaction) lists then.
    found, listed = _listed_branches(session, target, awaiting=True)
    if found is None and listed >= limits.LIST_TRANSACTIONS_LIMIT_MAX:
        # A list cut at its limit, of other transactions' branches: the branch may be among
        # those left out. Read as "not kept", the check would fail open.
        raise CliError(
            f"cannot tell whether {target.name} keeps branch {options.id}/{options.branch} "
            f"for its coordinator: it listed only its newest {listed} forced "
            "branches (a participant from before ListBranchesRequest.transaction_id), so the "
            "coordinator cannot be asked about it; upgrade the participant, then forget it",
            EXIT_UNSAFE,
        )
    return found


def _refuse_while_needed(
    session: Session, target: Target, txn: coordinator_pb2.Transaction, forced_commit: bool
) -> None:
    """Refuse to forget a branch forced to `forced_commit` while the coordinator, which has
    `txn` on record, may still send it a decision, or has a contradiction still to hear."""
    options = session.options
    text = f"{options.id}/{options.branch}"
    where = f"the coordinator at {session.coordinator_address}"
    # Not for a coordinator that has the transaction on record, as for `force`.
    not_lost = " (it has the transaction on record: not lost)" if options.coordinator_lost else ""
    if txn.state not in (
        coordinator_pb2.TRANSACTION_STATE_COMMITTED,
        coordinator_pb2.TRANSACTION_STATE_ABORTED,
    ):
        # Deciding, delivering its decision, or probing a one-phase outcome (UNKNOWN).
        state = fmt.state_name(txn.state)
        deliver = ""
        if txn.state == coordinator_pb2.TRANSACTION_STATE_COMMITTING:
            deliver = f" (`dtm txn retry {options.id}` delivers its Commits now)"
        raise CliError(
            f"{where} still runs {options.id} ({state}){not_lost}: its decision may still "
            f"reach branch {text}, which answers it with the forced outcome{deliver}. Forget "
            f"the branch once the transaction is over (`dtm txn show {options.id}`)",
            EXIT_UNSAFE,
        )
    decided_commit = _decided_commit(txn)
    if decided_commit == forced_commit:
        return  # nothing to report: the branch did what the coordinator decided
    if any(b.branch == options.branch and b.heuristic for b in txn.branches):
        return  # the coordinator keeps the heuristic outcome already
    decision = "commit" if decided_commit else "abort"
    forced = "commit" if forced_commit else "roll back"
    raise CliError(
        f"{where} decided {decision} for {options.id}, and branch {text} was forced to "
        f"{forced}: a heuristic outcome the coordinator has not recorded yet{not_lost}. "
        f"{target.name} reports it at its next inquiry (`dtm heuristics` lists it then, and "
        "`dtm branches --awaiting` no longer lists the branch): forget the branch after that",
        EXIT_UNSAFE,
    )


def _refuse_contradiction(session: Session, target: Target) -> None:
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
        if _cannot_reach(error, session):
            return
        if _no_record(error):
            _refuse_forced_commit_of_no_record(session, f"{options.id}")
            return
        problem = rpc_error(error, "the coordinator", session.coordinator_address, session)
        raise CliError(
            f"{problem}; refusing to force {options.id} without knowing the coordinator's "
            "decision (a coordinator that cannot be reached at all does not stop a force)"
        ) from None
    if txn.transaction_fingerprint and not _same_attempt(_branch_of(session, target), txn):
        # The record is of a later attempt under the id: the branch's own attempt has none,
        # so it aborted (presumed abort; the participant's inquiry, which sends the
        # fingerprint, hears ABORTED). Judged by the other attempt's record, a forced commit
        # went through and a forced rollback was refused (found by a bug hunt).
        _refuse_forced_commit_of_no_record(
            session, f"the attempt of {options.id} that branch {options.branch} belongs to"
        )
        return
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
            f"(`dtm txn show {options.id}`); it comes within the transaction's timeout",
            EXIT_UNSAFE,
        )
    decided_commit = _decided_commit(txn)
    if decided_commit is not None and decided_commit != options.commit:
        decision = "commit" if decided_commit else "abort"
        raise CliError(
            f"the coordinator at {session.coordinator_address} decided {decision} for "
            f"{options.id}: forcing {'commit' if options.commit else 'rollback'} would break "
            f"atomicity. {_deliver_instead(txn)}",
            EXIT_UNSAFE,
        )


def _refuse_forced_commit_of_no_record(session: Session, unknown: str) -> None:
    """Refuse to force commit what the coordinator has no record of (`unknown` names it: the
    transaction, or the branch's attempt when another is on record): under presumed abort it
    aborted. --coordinator-lost passes: that coordinator's "no record" decides nothing."""
    options = session.options
    if not options.commit or options.coordinator_lost:
        return
    raise CliError(
        f"the coordinator at {session.coordinator_address} has no record of {unknown}: under "
        "presumed abort that means it aborted (its participants are told ABORTED), so forcing "
        "commit would break atomicity. Force --rollback instead; only if that coordinator lost "
        "its log (or never ran this transaction) and the transaction may have committed, "
        "re-run with --coordinator-lost",
        EXIT_UNSAFE,
    )


def _branch_of(session: Session, target: Target) -> participant_pb2.BranchInfo:
    """The branch the options name, as `target` lists it; an empty one (no fingerprint: taken
    for the attempt on record, as before the field) when it lists none such. ForceOutcome, to
    the same participant next, says what is wrong with a branch it does not keep."""
    found, _ = _listed_branches(session, target)
    return found if found is not None else participant_pb2.BranchInfo()


def _no_record(error: grpc.RpcError) -> bool:
    """Whether GetTransaction failed because the coordinator has no record of the transaction:
    under presumed abort, it aborted (QueryOutcome answers ABORTED)."""
    return isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.NOT_FOUND


def _decided_commit(txn: coordinator_pb2.Transaction) -> bool | None:
    """The decision of this attempt, which its branches are told: True commit, False abort,
    None undecided (or unknown, a one-phase commit's lost reply). A transaction committed by an
    earlier attempt reads COMMITTED, but this attempt decided abort (a branch of it in doubt
    is one a participant that forgot the earlier commit prepared again); ABORTING has decided
    abort, only its client's answer waits."""
    if txn.committed_earlier or txn.state in (
        coordinator_pb2.TRANSACTION_STATE_ABORTING,
        coordinator_pb2.TRANSACTION_STATE_ABORTED,
    ):
        return False
    if txn.state in (
        coordinator_pb2.TRANSACTION_STATE_COMMITTING,
        coordinator_pb2.TRANSACTION_STATE_COMMITTED,
    ):
        return True
    return None


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
