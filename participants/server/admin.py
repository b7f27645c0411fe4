"""dtm.v1.ParticipantAdmin: an operator's view of branches and locks, forcing and forgetting.

Part of `participants.server`: see its docstring."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from dtm import grpc_edge, limits
from dtm.core.branch import BranchState
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc
from participants.branches import (
    STATE_TO_PB,
    BranchEngine,
    BranchError,
    BranchInfo,
)
from participants.locks import LockSnapshot
from participants.server.wire import (
    ERROR_TO_CODE,
    refuse_misdirected,
)

if TYPE_CHECKING:  # the process serves these; they only call back into it
    from participants.server.process import CoordinatorAnswer, ParticipantServer

#: How a refusal names the override, for a caller of the RPC and for the dtm command.
_OVERRIDE = "set coordinator_lost (`--coordinator-lost`)"


def branch_info_pb(info: BranchInfo, engine: BranchEngine) -> participant_pb2.BranchInfo:
    branch = info.branch
    return participant_pb2.BranchInfo(
        transaction_id=branch.transaction_id,
        branch=branch.index,
        state=STATE_TO_PB[branch.state],
        reason=branch.reason,
        updated_at_unix_ms=info.updated_at_ms,
        heuristic=branch.heuristic,
        awaiting_coordinator=engine.awaiting_coordinator(branch.key),
        forgotten=info.forgotten,
        transaction_fingerprint=info.fingerprint,
    )


def newest_that_fit(
    branches: list[participant_pb2.BranchInfo],
) -> tuple[list[participant_pb2.BranchInfo], bool]:
    """The newest of `branches` (listed oldest first) that fit one answer, oldest first, and
    whether some were left out. A reason is kept up to REASON_CHARS_MAX characters, of up to 4
    bytes each: 1,000 such branches took 4.3 MB, and the call failed (RESOURCE_EXHAUSTED)."""
    newest, cut = grpc_edge.that_fit(reversed(branches))
    newest.reverse()
    return newest, cut


def force_refusal(
    answer: CoordinatorAnswer, commit: bool, txn: str, where: str, coordinator_lost: bool
) -> str | None:
    """Why forcing a branch of `txn` to `commit` is refused, given its coordinator's (at
    `where`) `answer` about the branch's attempt; None when it may go on. Only a coordinator
    that cannot be reached lets it go on unchecked (the case forcing is for); any other
    failure to ask refuses, so that the check never fails open. `coordinator_lost`, the
    operator's word that the coordinator lost its log, lets a commit go past an abort presumed
    for want of a record (that "no record" decides nothing then), and past nothing else: an
    answer from a record shows that the coordinator did not lose it."""
    if answer.outcome is None:
        if answer.unreachable:
            return None
        return (
            f"could not ask the coordinator at {where} for its decision on {txn} "
            f"({answer.problem}): refusing to force without knowing it (a coordinator that "
            "cannot be reached at all does not stop a force)"
        )
    if coordinator_lost and answer.presumed_abort:
        return None
    not_lost = (
        " (it has the attempt on record: it did not lose its log, so coordinator_lost does "
        "not apply)"
        if coordinator_lost
        else ""
    )
    if answer.outcome == coordinator_pb2.OUTCOME_UNSPECIFIED:
        return (
            f"the coordinator at {where} is still deciding {txn}{not_lost}: forcing now could "
            f"contradict its decision. Wait for it (`dtm txn show {txn}`); it comes within the "
            "transaction's timeout"
        )
    decided_commit = answer.outcome == coordinator_pb2.OUTCOME_COMMITTED
    if decided_commit == commit:
        return None
    if decided_commit:
        return (
            f"the coordinator at {where} decided commit for {txn}{not_lost}: forcing rollback "
            "would break atomicity. The branch learns the decision without you: it asks its "
            f"coordinator (`dtm txn show {txn}`; while it is committing, `dtm txn retry "
            f"{txn}` delivers its Commits now)"
        )
    if coordinator_lost:
        return (
            f"the coordinator at {where} keeps a record of its abort of the attempt of {txn} "
            "this branch belongs to: it did not lose its log, so coordinator_lost does not "
            "apply, and forcing commit would break atomicity. Force rollback instead (a "
            "coordinator from before QueryOutcomeResponse.presumed_abort answers so for a "
            "presumed abort too, as it cannot tell them apart: upgrade it)"
        )
    return (
        f"the coordinator at {where} answers ABORTED for the attempt of {txn} this branch "
        "belongs to (decided, or presumed abort: no record of it): forcing commit would break "
        "atomicity. Force rollback instead; only if that "
        "coordinator lost its log (or never ran this transaction) and the transaction may "
        f"have committed, {_OVERRIDE}"
    )


def lock_info_pb(lock: LockSnapshot) -> participant_pb2.LockInfo:
    """A lock as ListLocks answers it: its first holders and waiters, and how many in all (a
    hot resource's queue holds up to WAITERS_PER_RESOURCE_MAX)."""
    listed = limits.LOCK_OWNERS_LISTED_MAX
    return participant_pb2.LockInfo(
        resource=lock.resource,
        mode=lock.mode,
        holders=lock.holders[:listed],
        held_since_unix_ms=int(lock.held_since * 1000),
        waiters=[f"{owner} ({mode})" for owner, mode, _ in lock.waiters[:listed]],
        holders_total=len(lock.holders),
        waiters_total=len(lock.waiters),
    )


class AdminServicer(participant_pb2_grpc.ParticipantAdminServicer):
    def __init__(self, server: ParticipantServer) -> None:
        self.server = server

    async def _gate(
        self, context: grpc.aio.ServicerContext[Any, Any], participant: str, incarnation: str
    ) -> None:
        """An operator's call for another participant or incarnation (a stale registry: the
        address now serves another one) is refused before anything is read or changed: its
        branches and locks would be listed, or a branch of it forced, under the wrong name."""
        await refuse_misdirected(self.server, context, [(participant, incarnation)])

    async def _refuse_unsafe(self, context: grpc.aio.ServicerContext[Any, Any], why: str) -> None:
        """Refuse a force or forget the coordinator's answer forbids, marked so (the dtm
        command exits EXIT_UNSAFE on it), and say so in the log: someone tried."""
        self.server.log_.warning("operator's call refused: unsafe", reason=why)
        context.set_trailing_metadata(((grpc_edge.UNSAFE_METADATA_KEY, "1"),))
        await grpc_edge.abort(context, grpc.StatusCode.FAILED_PRECONDITION, why)

    async def _check_force(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        key: tuple[str, int],
        commit: bool,
        coordinator_lost: bool,
    ) -> None:
        """Refuse to force in-doubt branch `key` against its coordinator's answer. Checked
        here, not only by `dtm force`, so that any caller of the RPC is held to it. A branch
        not in doubt is not asked about: the engine says why it cannot be forced. A decision
        that arrives after the answer finds the branch forced (a decision never changes, so it
        is the one answered), or the force finds the branch decided, and is refused. Asked
        with `coordinator_lost` too: the operator's word cannot be checked, but a coordinator
        that answers from a record of the attempt did not lose its log (`force_refusal`)."""
        info = self.server.engine.open.get(key)
        if info is None or info.branch.state is not BranchState.PREPARED:
            return
        answer = await self.server.ask_outcome(key)
        where = self.server.config.coordinator
        why = force_refusal(answer, commit, key[0], where, coordinator_lost)
        if why is not None:
            await self._refuse_unsafe(context, f"branch {key[0]}/{key[1]}: {why}")

    async def _check_forget(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        key: tuple[str, int],
        coordinator_lost: bool,
    ) -> None:
        """Refuse to forget forced branch `key` while it awaits its coordinator and asking
        the coordinator now (as the next inquiry would: a contradiction is reported) does not
        settle it: forgotten, the branch could no longer tell the coordinator of its forced
        outcome (its answer to a late Commit or Rollback, or its inquiry's report). Asked
        with `coordinator_lost` too: the override passes only what a lost coordinator cannot
        answer (`settle_forced`); one that answers from a record did not lose its log, and
        forgetting unreported would lose the one record of a contradiction it has not heard."""
        if not self.server.engine.awaiting_coordinator(key):
            return
        unsettled = await self.server.settle_forced(key, coordinator_lost)
        if unsettled is None:
            return
        text = f"{key[0]}/{key[1]}"
        if unsettled.on_record:
            override = (
                "The coordinator answered from its record of the branch's attempt: it did not lose "
                "its log, so coordinator_lost does not apply"
            )
        elif coordinator_lost:
            override = (
                "coordinator_lost passes a coordinator that cannot be reached or has no record "
                "of the branch's attempt, not a failure to ask it for another reason"
            )
        else:
            override = f"Only if that coordinator is gone for good (or lost its log), {_OVERRIDE}"
        await self._refuse_unsafe(
            context,
            f"forced branch {text} still awaits its coordinator at "
            f"{self.server.config.coordinator or '(none configured)'}: asked now, it did not "
            f"settle the branch ({unsettled.reason}). The branch is how the coordinator hears "
            "of its forced outcome, and the participant keeps asking: forget it once `dtm "
            f"branches --awaiting` no longer lists it. {override}",
        )

    async def SetFault(
        self, request: participant_pb2.SetFaultRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.SetFaultResponse:
        if not self.server.config.test_control:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "fault injection is disabled; start the service with --test-control to allow it",
            )
        problem = grpc_edge.enum_problem([request.mode], participant_pb2.FaultMode, "fault mode")
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.mode == participant_pb2.FAULT_MODE_SLOW and request.delay_ms == 0:
            await grpc_edge.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "FAULT_MODE_SLOW needs delay_ms"
            )
        self.server.fault.mode = request.mode
        self.server.fault.delay_ms = request.delay_ms
        self.server.log_.warning(
            "fault set",
            mode=participant_pb2.FaultMode.Name(request.mode),
            delay_ms=request.delay_ms,
        )
        return participant_pb2.SetFaultResponse()

    async def ListBranches(
        self,
        request: participant_pb2.ListBranchesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.ListBranchesResponse:
        await self._gate(context, request.participant, request.incarnation)
        problem = grpc_edge.enum_problem(
            request.states, participant_pb2.BranchState, "branch state(s)"
        )
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        wanted = {state for state in BranchState if STATE_TO_PB[state] in request.states}
        if request.states and not wanted:  # BRANCH_STATE_UNSPECIFIED only: no branch has it
            return participant_pb2.ListBranchesResponse()
        engine = self.server.engine
        limit = min(
            request.limit or limits.LIST_TRANSACTIONS_LIMIT_MAX, limits.LIST_TRANSACTIONS_LIMIT_MAX
        )
        if request.transaction_id:
            # One transaction's branches (`dtm trace`): looked up by key, so that one older
            # than the newest listed is found too.
            problem = limits.transaction_id_problem(request.transaction_id)
            if problem:
                await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            infos = engine.of_transaction(request.transaction_id, wanted)
            if request.awaiting_coordinator:
                infos = [i for i in infos if engine.awaiting_coordinator(i.branch.key)]
        else:
            # One more than are listed is looked for: whether the list is cut (`more_kept`).
            if request.awaiting_coordinator:
                infos = engine.awaiting(wanted, limit + 1)
            else:
                infos = engine.listed(wanted, limit + 1)
        # Oldest first: the newest `limit` are the last.
        listed, cut = newest_that_fit([branch_info_pb(info, engine) for info in infos[-limit:]])
        more_kept = cut or len(infos) > limit
        return participant_pb2.ListBranchesResponse(branches=listed, more_kept=more_kept)

    async def ListLocks(
        self, request: participant_pb2.ListLocksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.ListLocksResponse:
        await self._gate(context, request.participant, request.incarnation)
        locks = self.server.engine.locks
        listed = min(request.limit or limits.LOCKS_LISTED_MAX, limits.LOCKS_LISTED_MAX)
        return participant_pb2.ListLocksResponse(
            locks=[lock_info_pb(lock) for lock in locks.snapshot(listed)],
            locks_total=locks.lock_count,
        )

    async def ForceOutcome(
        self,
        request: participant_pb2.ForceOutcomeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.ForceOutcomeResponse:
        await self._gate(context, request.participant, request.incarnation)
        if not request.i_understand_this_is_heuristic:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "forcing a prepared branch is a heuristic decision that may break atomicity; "
                "set i_understand_this_is_heuristic to confirm",
            )
        problem = limits.branch_ids_problem(request.transaction_id, request.branch)
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        key = (request.transaction_id, request.branch)
        await self._check_force(context, key, request.commit, request.coordinator_lost)
        try:
            forced = await self.server.engine.force(key, request.commit)
        except BranchError as error:
            await grpc_edge.abort(context, ERROR_TO_CODE[error.kind], str(error))
        self.server.log_.warning(
            "heuristic outcome forced by an operator",
            txn=request.transaction_id,
            branch=request.branch,
            commit=request.commit,
            coordinator_lost=request.coordinator_lost,
        )
        return participant_pb2.ForceOutcomeResponse(
            branch=branch_info_pb(forced, self.server.engine)
        )

    async def Describe(
        self, request: participant_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.DescribeResponse:
        await self._gate(context, request.participant, request.incarnation)
        server = self.server
        return participant_pb2.DescribeResponse(
            name=server.service.name,
            incarnation=server.engine.incarnation,
            address=server.advertise,
            capabilities=server.capabilities(),
            coordinator=server.config.coordinator,
            registered=server.registered.is_set(),
        )

    async def ForgetBranch(
        self,
        request: participant_pb2.ForgetBranchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.ForgetBranchResponse:
        await self._gate(context, request.participant, request.incarnation)
        problem = limits.branch_ids_problem(request.transaction_id, request.branch)
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        key = (request.transaction_id, request.branch)
        await self._check_forget(context, key, request.coordinator_lost)
        try:
            forgotten = await self.server.engine.forget(key)
        except BranchError as error:
            await grpc_edge.abort(context, ERROR_TO_CODE[error.kind], str(error))
        self.server.log_.warning(
            "forced branch forgotten by an operator",
            txn=request.transaction_id,
            branch=request.branch,
            heuristic=forgotten.branch.heuristic,
            coordinator_lost=request.coordinator_lost,
        )
        return participant_pb2.ForgetBranchResponse(
            branch=branch_info_pb(forgotten, self.server.engine)
        )
