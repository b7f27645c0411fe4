"""dtm.v1.ParticipantAdmin: an operator's view of branches and locks, forcing and forgetting.

Part of `participants.server`: see its docstring."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from dtm import grpc_edge, limits
from dtm.core.branch import BranchState
from dtmpb.v1 import participant_pb2, participant_pb2_grpc
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
    from participants.server.process import ParticipantServer


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
        if request.transaction_id:
            # One transaction's branches (`dtm trace`): looked up by key, so that one older
            # than the newest listed is found too.
            problem = limits.transaction_id_problem(request.transaction_id)
            if problem:
                await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
            infos = engine.of_transaction(request.transaction_id, wanted)
            if request.awaiting_coordinator:
                infos = [i for i in infos if engine.awaiting_coordinator(i.branch.key)]
        elif request.awaiting_coordinator:
            infos = engine.awaiting(wanted, limits.LIST_TRANSACTIONS_LIMIT_MAX)
        else:
            infos = engine.listed(wanted, limits.LIST_TRANSACTIONS_LIMIT_MAX)
        return participant_pb2.ListBranchesResponse(
            branches=[branch_info_pb(info, engine) for info in infos]
        )

    async def ListLocks(
        self, request: participant_pb2.ListLocksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.ListLocksResponse:
        await self._gate(context, request.participant, request.incarnation)
        locks = self.server.engine.locks
        return participant_pb2.ListLocksResponse(
            locks=[lock_info_pb(lock) for lock in locks.snapshot(limits.LOCKS_LISTED_MAX)],
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
        try:
            forced = await self.server.engine.force(key, request.commit)
        except BranchError as error:
            await grpc_edge.abort(context, ERROR_TO_CODE[error.kind], str(error))
        self.server.log_.warning(
            "heuristic outcome forced by an operator",
            txn=request.transaction_id,
            branch=request.branch,
            commit=request.commit,
        )
        return participant_pb2.ForceOutcomeResponse(
            branch=branch_info_pb(forced, self.server.engine)
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
        try:
            forgotten = await self.server.engine.forget((request.transaction_id, request.branch))
        except BranchError as error:
            await grpc_edge.abort(context, ERROR_TO_CODE[error.kind], str(error))
        self.server.log_.warning(
            "forced branch forgotten by an operator",
            txn=request.transaction_id,
            branch=request.branch,
            heuristic=forgotten.branch.heuristic,
        )
        return participant_pb2.ForgetBranchResponse(
            branch=branch_info_pb(forgotten, self.server.engine)
        )
