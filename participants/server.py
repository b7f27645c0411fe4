"""The participant SDK's server: gRPC edge, registration, recovery, leases and inquiries.

A service author calls `run(service, argv)` (or builds a `ParticipantServer`) and gets a gRPC
server that implements dtm.v1.Participant and dtm.v1.ParticipantAdmin around their business
logic, plus the service's own read API, health checking and reflection.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from dtm import config, crashpoints, grpc_edge, limits, logs, metrics, security
from dtm.core import branch as core
from dtm.core.branch import BranchState, BranchVote
from dtm.wal import WriteAheadLog, async_log
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc
from participants.branches import (
    STATE_TO_PB,
    BranchEngine,
    BranchError,
    BranchInfo,
    IdReused,
    branch_key_text,
)
from participants.locks import LockManager
from participants.service import InvalidOperation, Service

VOTE_TO_PB = {
    BranchVote.PREPARED: coordinator_pb2.VOTE_PREPARED,
    BranchVote.READ_ONLY: coordinator_pb2.VOTE_READ_ONLY,
    BranchVote.REFUSED: coordinator_pb2.VOTE_REFUSED,
    BranchVote.COMMITTED: coordinator_pb2.VOTE_COMMITTED,
}
ERROR_TO_CODE = {
    core.ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    core.ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    core.ErrorKind.HEURISTIC: grpc.StatusCode.FAILED_PRECONDITION,
}
_INVALID_ARGUMENT_CODE = grpc.StatusCode.INVALID_ARGUMENT.value[0]
# Trailing metadata key that tells the coordinator a branch was forced heuristically.
HEURISTIC_METADATA_KEY = "dtm-heuristic"
# Trailing metadata key of a call refused because it was meant for another participant (another
# name, or another incarnation of this one): the coordinator reads it as "not reached".
MISDIRECTED_METADATA_KEY = "dtm-misdirected"
# Trailing metadata of an inquiry the coordinator refused because another incarnation of this
# participant is registered now (its value): this process was replaced, and stops.
REPLACED_METADATA_KEY = "dtm-replaced"
# RegisterParticipant answers that no retry can change: the process stops (exit status 1).
REGISTRATION_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ParticipantConfig:
    data_dir: Path
    listen: str = "127.0.0.1:0"
    # Address the coordinator should dial; defaults to the bound listen address.
    advertise: str = ""
    coordinator: str = ""
    test_control: bool = False
    # Lock wait: long enough to ride out a normal commit of the holder (a few ms on loopback),
    # short enough that a deadlock costs less than a client's patience.
    lock_wait_ms: int = 500
    # Lock wait of a prepare that arrived in a PrepareBatch. One answer carries the whole
    # batch, so a long wait for one item would hold every other item's vote back (and an item
    # waiting for a lock held by an earlier item of the same batch would wait for a decision
    # that cannot come before the batch is answered). Batched prepares wait this long at most,
    # then are refused as "lock timeout"; unary prepares wait lock_wait_ms.
    batch_lock_wait_ms: int = 50
    # An unvoted branch holding locks longer than this is aborted and its locks reclaimed.
    lease_unvoted_ms: int = 5_000
    # A prepared branch waiting longer than this starts asking the coordinator.
    in_doubt_after_ms: int = 2_000
    inquiry_backoff_ms_max: int = 5_000
    checkpoint_every_records: int = 20_000
    tick_ms: int = 100
    # None: plaintext and no authorization (local development only); see dtm.security.
    tls: security.TlsConfig | None = None
    # host:port of the Prometheus endpoint; "" = off (see dtm.metrics).
    metrics_listen: str = ""
    # None: DTM_LOG_LEVEL, else INFO (see dtm.logs).
    log_level: str | None = None
    # "loop" or "thread": see dtm.wal.LoopCommitLog.
    wal_sync: str = "loop"
    # An operator's override for this start only (--replace-registration; deliberately not a
    # configuration key, which would outlive the start): register with
    # RegisterParticipantRequest.replace, taking the name even while the coordinator owes the
    # registered incarnation decisions. For a participant whose log was lost: each owed Commit
    # then becomes a heuristic hazard.
    replace_registration: bool = False


class FaultState:
    def __init__(self) -> None:
        self.mode = participant_pb2.FAULT_MODE_NONE
        self.delay_ms = 0


def _check_ids(transaction_id: str, branch: int, fingerprint: bytes) -> str | None:
    """What is wrong with the ids any Prepare, Commit or Rollback carries, or None."""
    if len(fingerprint) > limits.TRANSACTION_FINGERPRINT_BYTES_MAX:
        return (
            f"transaction_fingerprint is {len(fingerprint)} bytes; at most "
            f"{limits.TRANSACTION_FINGERPRINT_BYTES_MAX}"
        )
    return limits.branch_ids_problem(transaction_id, branch)


def _check_prepare(item: participant_pb2.PrepareRequest) -> str | None:
    return _check_ids(item.transaction_id, item.branch, item.transaction_fingerprint)


def _vote_pb(vote: BranchVote, reason: str, one_phase: bool) -> participant_pb2.PrepareResponse:
    if vote is BranchVote.COMMITTED and not one_phase:  # committed by an earlier attempt
        return participant_pb2.PrepareResponse(
            vote=coordinator_pb2.VOTE_COMMITTED, reason=reason, committed_earlier=True
        )
    return participant_pb2.PrepareResponse(vote=VOTE_TO_PB[vote], reason=reason)


def _id_reused(error: IdReused) -> participant_pb2.PrepareResponse:
    return participant_pb2.PrepareResponse(
        vote=coordinator_pb2.VOTE_REFUSED, reason=str(error), id_reused=str(error)
    )


def misdirected(
    name: str, incarnation: str, participant: str, wanted_incarnation: str
) -> str | None:
    """Why a call addressed to (`participant`, `wanted_incarnation`) is not for this participant
    (`name`, `incarnation`), or None. Empty fields are not checked (an older coordinator, or a
    caller that does not know)."""
    if participant and participant != name:
        return (
            f"this is participant {name!r}, not {participant[:80]!r}: the coordinator's registry "
            f"is stale (another participant now listens at the address registered for "
            f"{participant[:80]!r}); nothing was changed"
        )
    if wanted_incarnation and incarnation and wanted_incarnation != incarnation:
        return (
            f"this is participant {name!r} incarnation {incarnation!r}, not incarnation "
            f"{wanted_incarnation[:80]!r}: another process registered under this name, or this "
            "one's log was replaced; nothing was changed"
        )
    return None


def _replacement(error: grpc.aio.AioRpcError) -> str | None:
    """The incarnation registered instead of this one, when `error` is the coordinator's
    refusal of an inquiry from a replaced incarnation, else None."""
    if error.code() is not grpc.StatusCode.FAILED_PRECONDITION:
        return None
    metadata: Any = error.trailing_metadata() or ()
    return next((str(value) for key, value in metadata if key == REPLACED_METADATA_KEY), None)


async def refuse_misdirected(
    server: ParticipantServer,
    context: grpc.aio.ServicerContext[Any, Any],
    addresses: Sequence[tuple[str, str]],
) -> None:
    """Refuse a call whose (participant, incarnation) addresses are malformed
    (INVALID_ARGUMENT) or name another participant or incarnation (FAILED_PRECONDITION, with
    the dtm-misdirected metadata), before it reads or changes anything."""
    # The fields' form first: a malformed name ("Inventory", "inventory ", control
    # characters, megabytes) was answered as misdirected, blaming a stale registry, with
    # the dtm-misdirected metadata the coordinator acts on (found by a bug hunt).
    for who, which in addresses:
        malformed = limits.addressing_problem(who, which)
        if malformed is not None:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, malformed)
    name, mine = server.service.name, server.engine.incarnation
    problem = next(
        (p for who, which in addresses if (p := misdirected(name, mine, who, which))), None
    )
    if problem is not None:
        server.log_.warning("call for another participant refused", reason=problem)
        context.set_trailing_metadata(((MISDIRECTED_METADATA_KEY, name),))
        await grpc_edge.abort(context, grpc.StatusCode.FAILED_PRECONDITION, problem)


class ParticipantServicer(participant_pb2_grpc.ParticipantServicer):
    def __init__(self, server: ParticipantServer) -> None:
        self.server = server
        self.engine = server.engine
        self.log = server.log_

    async def _gate(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        participant: str = "",
        incarnation: str = "",
        items: Sequence[participant_pb2.PrepareRequest] = (),
    ) -> None:
        """Refuse a call this process must not answer: down (fault injection), addressed in a
        malformed way (INVALID_ARGUMENT), or addressed to another participant (before any
        branch is touched)."""
        if self.server.fault.mode == participant_pb2.FAULT_MODE_DOWN:
            await grpc_edge.abort(
                context, grpc.StatusCode.UNAVAILABLE, "participant is down (fault injection)"
            )
        # The call's address, and those a batch's prepares carry of their own (the
        # coordinator's do not: the loop costs an attribute check per item).
        addresses = [(participant, incarnation)]
        addresses += (
            (i.participant, i.incarnation) for i in items if i.participant or i.incarnation
        )
        await refuse_misdirected(self.server, context, addresses)

    async def _prepare_one(
        self, request: participant_pb2.PrepareRequest
    ) -> participant_pb2.PrepareResponse:
        """One prepare; raises ValueError/InvalidOperation for bad input."""
        problem = _check_prepare(request)
        if problem:
            raise InvalidOperation(problem)
        fault = self.server.fault
        if fault.mode == participant_pb2.FAULT_MODE_SLOW:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.mode == participant_pb2.FAULT_MODE_REFUSE:
            return participant_pb2.PrepareResponse(
                vote=coordinator_pb2.VOTE_REFUSED,
                reason=f"{self.server.service.name} refuses (fault injection)",
            )
        started = time.perf_counter()
        try:
            vote, reason = await self.engine.prepare(
                request.transaction_id,
                request.branch,
                request.operation,
                request.one_phase,
                request.transaction_fingerprint,
            )
        except IdReused as error:
            return _id_reused(error)
        self.log.debug(
            "prepare answered",
            txn=request.transaction_id,
            branch=request.branch,
            vote=vote.value,
            reason=reason,
            one_phase=request.one_phase,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return _vote_pb(vote, reason, request.one_phase)

    async def Prepare(
        self,
        request: participant_pb2.PrepareRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.PrepareResponse:
        await self._gate(context, request.participant, request.incarnation)
        try:
            return await self._prepare_one(request)
        except InvalidOperation as error:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise  # unreachable: abort raises

    async def _decide_one(
        self, transaction_id: str, branch: int, commit: bool, fingerprint: bytes
    ) -> None:
        problem = _check_ids(transaction_id, branch, fingerprint)
        if problem:
            raise InvalidOperation(problem)
        if commit:
            await self.engine.commit(transaction_id, branch, fingerprint)
        else:
            await self.engine.rollback(transaction_id, branch, fingerprint)
        self.log.debug(
            "commit applied" if commit else "rollback applied", txn=transaction_id, branch=branch
        )

    async def _decide(
        self,
        transaction_id: str,
        branch: int,
        commit: bool,
        fingerprint: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        participant: str,
        incarnation: str,
    ) -> None:
        await self._gate(context, participant, incarnation)
        if self.server.fault.mode == participant_pb2.FAULT_MODE_REJECT_DECISIONS:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "participant rejects decisions (fault injection)",
            )
        try:
            await self._decide_one(transaction_id, branch, commit, fingerprint)
        except InvalidOperation as error:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except BranchError as error:
            if error.heuristic:
                context.set_trailing_metadata(((HEURISTIC_METADATA_KEY, error.heuristic),))
            await grpc_edge.abort(context, ERROR_TO_CODE[error.kind], str(error))

    async def Commit(
        self, request: participant_pb2.CommitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.CommitResponse:
        await self._decide(
            request.transaction_id,
            request.branch,
            True,
            request.transaction_fingerprint,
            context,
            request.participant,
            request.incarnation,
        )
        return participant_pb2.CommitResponse()

    async def Rollback(
        self, request: participant_pb2.RollbackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.RollbackResponse:
        await self._decide(
            request.transaction_id,
            request.branch,
            False,
            request.transaction_fingerprint,
            context,
            request.participant,
            request.incarnation,
        )
        return participant_pb2.RollbackResponse()

    async def Recover(
        self, request: participant_pb2.RecoverRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> participant_pb2.RecoverResponse:
        await self._gate(context)
        return participant_pb2.RecoverResponse(
            branches=[
                participant_pb2.PreparedBranch(
                    transaction_id=info.branch.transaction_id,
                    branch=info.branch.index,
                    prepared_at_unix_ms=info.prepared_at_ms,
                )
                for info in self.engine.in_doubt()
            ]
        )

    def _check_batch(self, count: int, what: str) -> str | None:
        if count > limits.BATCH_ITEMS_MAX:
            return f"{count} {what} in one batch; at most {limits.BATCH_ITEMS_MAX}"
        return None

    async def _prepare_items(
        self, items: Sequence[participant_pb2.PrepareRequest]
    ) -> tuple[list[participant_pb2.PrepareResponse], list[tuple[str, int]]]:
        """Run every prepare up to its answer; the caller waits once for the records of all
        the returned keys to be durable before answering (persist before you speak)."""
        fault = self.server.fault
        lock_wait_ms = min(self.server.config.batch_lock_wait_ms, self.server.config.lock_wait_ms)
        answers: list[participant_pb2.PrepareResponse | None] = []
        waiting: list[tuple[int, Awaitable[tuple[BranchVote, str]]]] = []
        keys: list[tuple[str, int]] = []
        for item in items:
            problem = _check_prepare(item)
            if fault.mode == participant_pb2.FAULT_MODE_REFUSE and not problem:
                answers.append(
                    participant_pb2.PrepareResponse(
                        vote=coordinator_pb2.VOTE_REFUSED,
                        reason=f"{self.server.service.name} refuses (fault injection)",
                    )
                )
                continue
            try:
                if problem:
                    raise InvalidOperation(problem)
                answer = self.engine.begin_prepare(
                    item.transaction_id,
                    item.branch,
                    item.operation,
                    item.one_phase,
                    lock_wait_ms / 1000,
                    item.transaction_fingerprint,
                )
            except IdReused as error:
                answers.append(_id_reused(error))
                continue
            except InvalidOperation as error:
                answers.append(
                    participant_pb2.PrepareResponse(
                        vote=coordinator_pb2.VOTE_REFUSED,
                        reason=f"invalid: {error}",
                        invalid_argument=str(error),
                    )
                )
                continue
            keys.append((item.transaction_id, item.branch))
            if isinstance(answer, tuple):
                answers.append(_vote_pb(answer[0], answer[1], item.one_phase))
            else:
                waiting.append((len(answers), answer))
                answers.append(None)
        for position, pending in waiting:
            vote, reason = await pending
            answers[position] = _vote_pb(vote, reason, items[position].one_phase)
        votes = [answer for answer in answers if answer is not None]
        assert len(votes) == len(items)
        return votes, keys

    def _apply_decisions(
        self, items: Sequence[participant_pb2.Decision]
    ) -> tuple[list[participant_pb2.DecisionResult], list[tuple[str, int]]]:
        """Apply every decision; the caller waits once for the returned keys' records."""
        if self.server.fault.mode == participant_pb2.FAULT_MODE_REJECT_DECISIONS:
            error = "participant rejects decisions (fault injection)"
            return [participant_pb2.DecisionResult(ok=False, error=error) for _ in items], []
        results: list[participant_pb2.DecisionResult] = []
        keys: list[tuple[str, int]] = []
        for item in items:
            try:
                problem = _check_ids(item.transaction_id, item.branch, item.transaction_fingerprint)
                if problem:
                    raise InvalidOperation(problem)
                self.engine.decide_now(
                    item.transaction_id, item.branch, item.commit, item.transaction_fingerprint
                )
            except InvalidOperation as error:
                results.append(
                    participant_pb2.DecisionResult(
                        ok=False, error=str(error), code=_INVALID_ARGUMENT_CODE
                    )
                )
                continue
            except BranchError as error:
                # Its answer waits for the branch's records like any other (see _decide).
                keys.append((item.transaction_id, item.branch))
                results.append(
                    participant_pb2.DecisionResult(
                        ok=False,
                        error=str(error),
                        heuristic=error.heuristic,
                        code=ERROR_TO_CODE[error.kind].value[0],
                    )
                )
                continue
            keys.append((item.transaction_id, item.branch))
            results.append(participant_pb2.DecisionResult(ok=True))
        return results, keys

    def _trace(
        self,
        prepares: Sequence[participant_pb2.PrepareRequest],
        votes: Sequence[participant_pb2.PrepareResponse],
        decisions: Sequence[participant_pb2.Decision],
        results: Sequence[participant_pb2.DecisionResult],
    ) -> None:
        """A batched call's DEBUG lines, one per item as on the unary path, so that
        `grep txn=<id>` finds each branch's vote and decision here too."""
        if not logs.debug_enabled():
            return
        for prepare, answer in zip(prepares, votes, strict=True):
            self.log.debug(
                "prepare answered",
                txn=prepare.transaction_id,
                branch=prepare.branch,
                vote=coordinator_pb2.Vote.Name(answer.vote).removeprefix("VOTE_").lower(),
                reason=answer.reason or None,
                one_phase=prepare.one_phase,
                batched=True,
            )
        for decision, result in zip(decisions, results, strict=True):
            verb = "commit" if decision.commit else "rollback"
            self.log.debug(
                f"{verb} applied" if result.ok else f"{verb} refused",
                txn=decision.transaction_id,
                branch=decision.branch,
                error=result.error or None,
                batched=True,
            )

    def _after_durable(
        self,
        votes: Sequence[participant_pb2.PrepareResponse],
        decisions: Sequence[participant_pb2.Decision],
    ) -> None:
        if any(v.vote == coordinator_pb2.VOTE_PREPARED for v in votes):
            crashpoints.hit("participant.after_prepare_durable")
        if any(d.commit for d in decisions):
            crashpoints.hit("participant.after_commit_durable")
        if not all(d.commit for d in decisions):
            crashpoints.hit("participant.after_rollback_applied")

    async def PrepareBatch(
        self,
        request: participant_pb2.PrepareBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.PrepareBatchResponse:
        await self._gate(context, request.participant, request.incarnation, request.prepares)
        problem = self._check_batch(len(request.prepares), "prepares")
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.server.fault.mode == participant_pb2.FAULT_MODE_SLOW:
            await asyncio.sleep(self.server.fault.delay_ms / 1000)
        votes, keys = await self._prepare_items(request.prepares)
        await self.engine.wait_durable(keys)
        self._trace(request.prepares, votes, (), ())
        self._after_durable(votes, ())
        return participant_pb2.PrepareBatchResponse(votes=votes)

    async def DecideBatch(
        self,
        request: participant_pb2.DecideBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.DecideBatchResponse:
        await self._gate(context, request.participant, request.incarnation)
        if self.server.fault.mode == participant_pb2.FAULT_MODE_REJECT_DECISIONS:
            await grpc_edge.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "participant rejects decisions (fault injection)",
            )
        problem = self._check_batch(len(request.decisions), "decisions")
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        results, keys = self._apply_decisions(request.decisions)
        await self.engine.wait_durable(keys)
        self._trace((), (), request.decisions, results)
        self._after_durable((), request.decisions)
        return participant_pb2.DecideBatchResponse(results=results)

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> participant_pb2.ExchangeResponse:
        await self._gate(context, request.participant, request.incarnation, request.prepares)
        problem = self._check_batch(len(request.prepares) + len(request.decisions), "items")
        if problem:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        # Decisions first: they release locks and reservations the prepares may need.
        results, decided = self._apply_decisions(request.decisions)
        if request.prepares and self.server.fault.mode == participant_pb2.FAULT_MODE_SLOW:
            await asyncio.sleep(self.server.fault.delay_ms / 1000)
        votes, prepared = await self._prepare_items(request.prepares)
        await self.engine.wait_durable([*decided, *prepared])
        self._trace(request.prepares, votes, request.decisions, results)
        self._after_durable(votes, request.decisions)
        return participant_pb2.ExchangeResponse(votes=votes, results=results)


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
        return participant_pb2.ListLocksResponse(
            locks=[
                participant_pb2.LockInfo(
                    resource=lock.resource,
                    mode=lock.mode,
                    holders=list(lock.holders),
                    held_since_unix_ms=int(lock.held_since * 1000),
                    waiters=[f"{owner} ({mode})" for owner, mode, _ in lock.waiters],
                )
                for lock in self.server.engine.locks.snapshot()
            ]
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


class ParticipantServer:
    """One participant process: a service's business logic behind the SDK."""

    def __init__(self, service: Service[Any], config: ParticipantConfig) -> None:
        # The coordinator's own check: a name it would refuse could never register (and it
        # names the data directory).
        problem = limits.participant_name_problem(service.name)
        if problem:
            raise ValueError(f"service {type(service).__name__}: {problem}")
        self.service = service
        self.config = config
        self.log_ = logs.get(service.name)
        self.fault = FaultState()
        wal, records = WriteAheadLog.open(config.data_dir / service.name / "wal")
        self.wal = async_log(wal, config.wal_sync)
        self.locks = LockManager(wait_timeout_s=config.lock_wait_ms / 1000, clock=time.time)
        self.engine = BranchEngine(service, self.wal, self.locks, clock_ms=now_ms)
        self.engine.replay(records, wal.directory)
        # A new log starts with a checkpoint of the initial state (stock, accounts): until the
        # first periodic one, replay started from whatever initial state this process was
        # given, so a restart with another --initial file (or another DEFAULT_CATALOG)
        # rewrote committed stock and balances, or failed to replay a prepare at all.
        # That checkpoint also makes the incarnation durable, created here with the log (or
        # for a log written before incarnations: its checkpoint did not carry one).
        self._fresh_log = not records or not self.engine.incarnation
        if not self.engine.incarnation:
            self.engine.incarnation = secrets.token_hex(8)
        crashpoints.hit("participant.during_recovery")
        self.server = grpc_edge.new_server(security.server_interceptors(config.tls))
        self.port = 0
        self._background: list[asyncio.Task[None]] = []
        self._next_inquiry_ms: dict[tuple[str, int], tuple[int, int]] = {}
        # The INFO summary of outcomes still unknown (_summarize_unknown): when it was last
        # written, the inquiries made since, and the last reason one stayed unknown.
        self._summary_at_ms = 0
        self._asked_since_summary = 0
        self._last_unknown_reason = ""
        self.registered = asyncio.Event()
        # Set when the coordinator refused the registration for good (REGISTRATION_FATAL), or
        # an inquiry because another incarnation replaced this one (`_replaced`): `failure`
        # says why; run() then stops the process with exit status 1.
        self.failed = asyncio.Event()
        self.failure = ""
        self.metrics = metrics.for_participant(
            service.name, self.engine, self.locks, self.wal, config.metrics_listen
        )

    async def start(self) -> int:
        participant_pb2_grpc.add_ParticipantServicer_to_server(
            ParticipantServicer(self), self.server
        )
        participant_pb2_grpc.add_ParticipantAdminServicer_to_server(
            AdminServicer(self), self.server
        )
        names = [
            participant_pb2.DESCRIPTOR.services_by_name["Participant"].full_name,
            participant_pb2.DESCRIPTOR.services_by_name["ParticipantAdmin"].full_name,
            *self.service.add_read_api(self.server),
        ]
        grpc_edge.add_health_and_reflection(self.server, names)
        tls = self.config.tls
        credentials = security.server_credentials(tls) if tls is not None else None
        self.port = grpc_edge.bind(self.server, self.config.listen, credentials)
        self.metrics_port = self.metrics.start() if self.metrics is not None else 0
        if self._fresh_log:
            await self.engine.checkpoint()
            self._fresh_log = False
        await self.server.start()
        recovered = len(self.engine.in_doubt())
        self.log_.info(
            "participant serving",
            port=self.port,
            incarnation=self.engine.incarnation,
            in_doubt_recovered=recovered,
            data_dir=str(self.config.data_dir),
            security=security.describe(tls),
        )
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._housekeeping()))
        if self.config.coordinator:
            self._background.append(loop.create_task(self._register()))
        return self.port

    @property
    def advertise(self) -> str:
        if self.config.advertise:
            return self.config.advertise
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float = 1.0) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.metrics is not None:
            await self.metrics.stop()
        await self.server.stop(grace_s)
        await self.wal.close()

    # ---- background work ----

    def _coordinator_channel(self) -> grpc.aio.Channel:
        # With TLS the server must prove it is the coordinator: registration and inquiries
        # must not go to whatever process holds the coordinator's port.
        tls = self.config.tls
        return security.channel(self.config.coordinator, tls, security.coordinator_identity(tls))

    async def _register(self) -> None:
        """Register with the coordinator, retrying (capped backoff) until it answers; a refusal
        no retry can change (REGISTRATION_FATAL) sets `failed` instead."""
        request = coordinator_pb2.RegisterParticipantRequest(
            name=self.service.name,
            address=self.advertise,
            incarnation=self.engine.incarnation,
            replace=self.config.replace_registration,
            capabilities=coordinator_pb2.Capabilities(
                one_phase=True,
                batch=True,
                operation_types=[self.service.operation_type.DESCRIPTOR.full_name],
            ),
        )
        if request.replace:
            self.log_.warning(
                f"{limits.REPLACE_REGISTRATION_FLAG}: registering as a replacement; if the "
                "coordinator owes another incarnation of this participant decisions, this one "
                "takes them, and each owed Commit becomes a heuristic hazard",
                incarnation=self.engine.incarnation,
            )
        delay = 0.05
        async with self._coordinator_channel() as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while True:
                try:
                    await stub.RegisterParticipant(request, timeout=2.0)
                except grpc.aio.AioRpcError as error:
                    if error.code() in REGISTRATION_FATAL:
                        self.failure = (
                            f"the coordinator at {self.config.coordinator} refused to register "
                            f"participant {self.service.name!r}: {error.code().name}: "
                            f"{error.details()}"
                        )
                        self.log_.error(
                            "registration refused; stopping",
                            coordinator=self.config.coordinator,
                            code=error.code().name,
                            detail=error.details(),
                        )
                        self.failed.set()
                        return
                    # RESOURCE_EXHAUSTED (the registry is full) included: a slot may free up.
                    self.log_.warning(
                        "registration failed; retrying",
                        coordinator=self.config.coordinator,
                        code=error.code().name,
                        detail=error.details(),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self.log_.info(
                    "registered", coordinator=self.config.coordinator, address=self.advertise
                )
                self.registered.set()
                return

    async def _housekeeping(self) -> None:
        """Leases on unvoted branches, inquiries for in-doubt ones, and checkpoints."""
        channel = self._coordinator_channel() if self.config.coordinator else None
        stub = coordinator_pb2_grpc.CoordinatorStub(channel) if channel is not None else None
        try:
            while True:  # until stop() cancels it
                await asyncio.sleep(self.config.tick_ms / 1000)
                try:
                    await self._housekeeping_tick(stub)
                except Exception as error:  # a bug: say so loudly, and keep the loop alive
                    # A housekeeping loop that dies takes leases, inquiries and checkpoints
                    # with it, and nothing else would notice (a checkpoint bug did just that).
                    self.log_.error(
                        "housekeeping failed; it goes on at the next tick",
                        error=f"{type(error).__name__}: {error}",
                        exc_info=error,
                    )
        finally:
            if channel is not None:
                await channel.close(None)

    async def _housekeeping_tick(self, stub: coordinator_pb2_grpc.CoordinatorStub | None) -> None:
        now = now_ms()
        for info in self.engine.preparing():
            if now - info.updated_at_ms >= self.config.lease_unvoted_ms:
                self.log_.warning(
                    "lease expired before the vote: branch aborted, locks reclaimed",
                    txn=info.branch.transaction_id,
                    branch=info.branch.index,
                )
                self.engine.expire_lease(info.branch.key)
        if stub is not None:
            await self._ask_about_in_doubt(stub, now)
        if self.engine.records_since_checkpoint >= self.config.checkpoint_every_records:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        try:
            await self.engine.checkpoint()
        except Exception as error:  # leases and inquiries must go on regardless
            # Nothing is lost: the log keeps every record since the last checkpoint, it only
            # grows. A failed fsync never reaches here (the process stops); this is anything
            # else, a bug included, so it is retried only after as many records again.
            self.engine.records_since_checkpoint = 0
            self.log_.error(
                "checkpoint failed; the log grows until one succeeds",
                error=f"{type(error).__name__}: {error}",
                retry_after_records=self.config.checkpoint_every_records,
            )
            return
        # Built on the event loop (a stall of every call: dtm_checkpoint_building_seconds),
        # then written and fsynced on the log's thread with wal_sync = "loop".
        self.log_.info(
            "checkpoint written",
            in_doubt=len(self.engine.in_doubt()),
            ms=self.engine.checkpoints.last_ms,
        )

    async def _ask_about_in_doubt(
        self, stub: coordinator_pb2_grpc.CoordinatorStub, now: int
    ) -> None:
        """Ask the coordinator about every in-doubt branch, and every forced branch still
        awaiting its coordinator, due for it: `in_doubt_after_ms` after its prepare (after
        its forcing), then with a backoff while the answer stays unknown. A forced branch is
        asked too because a coordinator that has no record of its transaction (presumed
        abort) never sends a decision: without asking, a forced commit that contradicts it
        would never be reported (`_reconcile_forced`)."""
        if self.failed.is_set():  # stopping: replaced, or refused for good; ask nothing more
            return
        engine = self.engine
        # Forget the backoff of branches decided meanwhile (by a Commit or Rollback), and of
        # forced ones no longer awaiting (decided by their coordinator, or forgotten).
        for key in [
            k
            for k in self._next_inquiry_ms
            if k not in engine.open and not engine.awaiting_coordinator(k)
        ]:
            del self._next_inquiry_ms[key]
        after = self.config.in_doubt_after_ms
        due = [
            info.branch.key
            for info in engine.in_doubt()
            if now - info.prepared_at_ms >= after
            and self._next_inquiry_ms.get(info.branch.key, (0, 0))[0] <= now
        ][: limits.INQUIRIES_PER_TICK_MAX]
        if len(due) < limits.INQUIRIES_PER_TICK_MAX:
            due += [
                key
                for key, forced_at_ms in engine.forced_awaiting()
                if now - forced_at_ms >= after and self._next_inquiry_ms.get(key, (0, 0))[0] <= now
            ][: limits.INQUIRIES_PER_TICK_MAX - len(due)]
        if not due:
            return
        # Concurrently: with the coordinator down, one-by-one timeouts would stall this loop
        # (and the leases it also enforces) for minutes.
        await asyncio.gather(*(self._ask(stub, key, now) for key in due))
        self._asked_since_summary += len(due)
        self._summarize_unknown(now)

    def _summarize_unknown(self, now: int) -> None:
        """One INFO line for the branches whose outcome is still unknown, at most once per
        `inquiry_backoff_ms_max` (the longest a branch waits between two inquiries, so about
        one line per round of them), instead of one per branch per attempt (a coordinator
        down with 30 branches in doubt wrote 250 lines in 20 s). The per-branch lines are
        DEBUG."""
        unknown = self._next_inquiry_ms
        if not unknown or now - self._summary_at_ms < self.config.inquiry_backoff_ms_max:
            return
        oldest = next(iter(unknown))  # the first still unknown: kept in its place since
        in_doubt = sum(1 for key in unknown if key in self.engine.open)
        self.log_.info(
            "outcome of branches still unknown: will ask the coordinator again",
            txn=oldest[0],  # the oldest's, so that grep txn= finds the line
            branch=oldest[1],
            attempts=unknown[oldest][1],
            in_doubt=in_doubt,
            forced=len(unknown) - in_doubt,
            asked=self._asked_since_summary,
            reason=self._last_unknown_reason,
        )
        self._summary_at_ms = now
        self._asked_since_summary = 0

    async def _ask(
        self, stub: coordinator_pb2_grpc.CoordinatorStub, key: tuple[str, int], now: int
    ) -> None:
        info = self.engine.open.get(key)
        if info is None and self.engine.awaiting_coordinator(key):
            info = self.engine.branch(key)  # forced, awaiting its coordinator
        try:
            answer = await stub.QueryOutcome(
                coordinator_pb2.QueryOutcomeRequest(
                    transaction_id=key[0],
                    participant=self.service.name,
                    # So that a replaced process that still runs learns nothing.
                    incarnation=self.engine.incarnation,
                    # So that a branch of an attempt that reused the id is not answered with
                    # the outcome of the transaction the id belongs to.
                    transaction_fingerprint=info.fingerprint if info is not None else b"",
                ),
                timeout=1.0,
            )
        except grpc.aio.AioRpcError as error:
            replacement = _replacement(error)
            if replacement is not None:
                self._replaced(replacement, error.details() or "")
            # The branch stays in doubt either way: a refusal is no outcome to guess from.
            self._back_off(key, now, f"{error.code().name}: {error.details()}")
            return
        if answer.outcome not in (
            coordinator_pb2.OUTCOME_COMMITTED,
            coordinator_pb2.OUTCOME_ABORTED,
        ):
            self._back_off(key, now, "coordinator: still undecided")
            return
        commit = answer.outcome == coordinator_pb2.OUTCOME_COMMITTED
        if key not in self.engine.open and self.engine.awaiting_coordinator(key):
            await self._reconcile_forced(stub, key, commit, now)
            return
        self._next_inquiry_ms.pop(key, None)
        outcome = coordinator_pb2.Outcome.Name(answer.outcome)
        resolved = self.engine.learn_outcome(key, commit=commit)
        if resolved:
            self.log_.info(
                "in-doubt branch resolved by inquiry", txn=key[0], branch=key[1], outcome=outcome
            )
        else:  # its Commit or Rollback came while the inquiry was in flight
            self.log_.debug(
                "inquiry answered; the branch was decided meanwhile",
                txn=key[0],
                branch=key[1],
                outcome=outcome,
            )

    def _replaced(self, registered_incarnation: str, detail: str) -> None:
        """The coordinator refused an inquiry: another incarnation holds this name. Once this
        process's own registration was accepted, that can only be a later registration that
        replaced it (--replace-registration, or a second process while nothing was owed), so
        it stops, as on a registration refused for good: it will never hear a decision again,
        its locks would only block its data, and serving on would hide the misuse. Its prepared
        branches stay in doubt in its log, never guessed. Before its registration is answered
        (a restart on its own log while another incarnation is registered), that registration
        decides: refused, the process stops there; accepted, the next inquiry is answered."""
        if not self.registered.is_set() or self.failed.is_set():  # the latter: log it once
            return
        self.failure = (  # worded as the registration's refusal for good
            f"the coordinator at {self.config.coordinator} refused the inquiries of participant "
            f"{self.service.name!r} incarnation {self.engine.incarnation!r}: "
            f"FAILED_PRECONDITION: {detail}"
        )
        self.log_.error(
            "replaced by another incarnation: the coordinator refuses to tell this one any "
            "outcome; stopping, with branches in doubt",
            incarnation=self.engine.incarnation,
            registered_incarnation=registered_incarnation[:80],
            in_doubt=len(self.engine.in_doubt()),
            coordinator=self.config.coordinator,
            detail=detail,
        )
        self.failed.set()

    async def _reconcile_forced(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        key: tuple[str, int],
        commit: bool,
        now: int,
    ) -> None:
        """The coordinator's outcome for a forced branch: it stops awaiting, as when its
        decision arrives; a contradiction is a heuristic outcome, and said so (rule 17). The
        coordinator has not heard of it (its Commit or Rollback would have reconciled the
        branch), so it is first reported to it (`_report`), and the branch awaits until the
        coordinator has recorded it: reported again after a failure, and after a restart. The
        engine logs the reconciliation (BranchReconciled, lazily, but forced once reported:
        see `BranchEngine.reconcile_forced`), so that this line, the count and the report
        are not repeated after a restart."""
        info = self.engine.branch(key)
        if info is None or not self.engine.awaiting_coordinator(key):
            return  # decided by its coordinator, or forgotten, meanwhile
        forced_commit = info.branch.state is BranchState.COMMITTED
        reported = False
        if forced_commit != commit:
            acknowledged = await self._report(stub, key, info, commit, now)
            if acknowledged is None:  # asked and reported again after a backoff
                return
            reported = acknowledged
        self._next_inquiry_ms.pop(key, None)
        info = self.engine.reconcile_forced(key, commit, reported=reported)
        if info is None:  # decided by its coordinator, or forgotten, while reporting
            return
        forced = info.branch.state.value  # committed or rolled_back
        decided = "committed" if commit else "aborted"
        if forced_commit == commit:
            self.log_.info(
                "forced branch reconciled: its coordinator's outcome is the same",
                txn=key[0],
                branch=key[1],
                forced=forced,
                decided=decided,
            )
            return
        if reported:
            await self.engine.wait_durable([key])  # reported once: not again after a restart
        self.log_.warning(
            "forced branch contradicts its coordinator's outcome: a heuristic outcome, "
            "to be reconciled by hand"
            + (
                " (recorded by the coordinator: dtm heuristics)"
                if reported
                else " (the coordinator takes no reports: only this line and "
                "dtm_forced_outcomes_total show it)"
            ),
            txn=key[0],
            branch=key[1],
            forced=forced,
            decided=decided,
            heuristic=info.branch.heuristic,
        )

    async def _report(
        self,
        stub: coordinator_pb2_grpc.CoordinatorStub,
        key: tuple[str, int],
        info: BranchInfo,
        commit: bool,
        now: int,
    ) -> bool | None:
        """Report to the coordinator that a forced branch contradicts its outcome (`commit`),
        which it answered to an inquiry: it records it (ReportHeuristic), since neither a
        Commit nor a Rollback of its own reached the branch. True once it has recorded it;
        False when it cannot take reports (a coordinator from before the call); None when
        it did not answer, or refused, for now: backed off, so asked and reported again."""
        forced_commit = info.branch.state is BranchState.COMMITTED
        decision = coordinator_pb2.OUTCOME_COMMITTED if commit else coordinator_pb2.OUTCOME_ABORTED
        request = coordinator_pb2.ReportHeuristicRequest(
            transaction_id=key[0],
            branch=key[1],
            participant=self.service.name,
            incarnation=self.engine.incarnation,
            transaction_fingerprint=info.fingerprint,
            forced=coordinator_pb2.OUTCOME_COMMITTED
            if forced_commit
            else coordinator_pb2.OUTCOME_ABORTED,
            decision=decision,
            detail=(
                f"{info.branch.heuristic}, forced by an operator here; the coordinator "
                f"answered {coordinator_pb2.Outcome.Name(decision)} to an inquiry"
            ),
        )
        try:
            await stub.ReportHeuristic(request, timeout=1.0)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                return False
            replacement = _replacement(error)
            if replacement is not None:
                self._replaced(replacement, error.details() or "")
            self._back_off(key, now, f"report: {error.code().name}: {error.details()}")
            return None
        return True

    def _back_off(self, key: tuple[str, int], now: int, reason: str) -> None:
        _, attempts = self._next_inquiry_ms.get(key, (0, 0))
        delay = min(self.config.inquiry_backoff_ms_max, 100 * 2 ** min(attempts, 10))
        delay = int(delay * random.uniform(0.5, 1.0))  # jitter: no synchronized storms
        self._next_inquiry_ms[key] = (now + delay, attempts + 1)
        self._last_unknown_reason = reason
        self.log_.debug(
            "branch outcome unknown, will ask again",
            txn=key[0],
            branch=key[1],
            attempt=attempts + 1,
            forced=key not in self.engine.open,
            reason=reason,
        )


def parse_args(name: str, argv: list[str] | None) -> ParticipantConfig:
    parser = argparse.ArgumentParser(
        prog=f"dtm service {name}", description=f"The {name} participant. {config.PRECEDENCE_HELP}"
    )
    # The flags apply to the service's own section ([inventory]...), else to [participant].
    # --initial is the service main's: it takes it out of the command line (split_initial_arg)
    # and builds the service before the SDK runs. Declared here only so --help shows it.
    section = config.participant_section(name)
    config.add_flags(parser, section, exclude=("initial",))
    parser.add_argument(
        "--initial",
        metavar="PATH",
        default=None,
        help="initial stock (inventory) or accounts (payment) as JSON, see "
        "participants/services/catalog.py; read only while the service's log is empty, and "
        "accepted but ignored by orders and notification (default: initial of the "
        'configuration, else "": the built-in catalog)',
    )
    # Not a configuration key: a setting in a file or the environment would outlive the start
    # it is meant for, and turn off the guard against a second process under the name.
    parser.add_argument(
        limits.REPLACE_REGISTRATION_FLAG,
        action="store_true",
        help="for this start only: this process replaces the registered participant of this "
        "name, whose log was lost; the coordinator lets it register even while it owes the "
        "lost one decisions, and each owed commit becomes a heuristic hazard for an operator "
        "to reconcile (dtm heuristics). Never for a participant whose log is intact, nor as "
        "a default",
    )
    security.add_arguments(parser)
    options = parser.parse_args(argv)
    try:
        settings = config.from_options(options, section)
        tls = security.from_options(options, configured=config.tls_files(settings.service(name)))
    except security.TlsMaterialError as error:  # not a usage error: one line, status 1
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as error:  # config.ConfigError included: it names the key and the value
        parser.error(str(error))
    service = settings.service(name)
    return ParticipantConfig(
        data_dir=service.data_dir,
        listen=service.listen,
        advertise=service.advertise,
        coordinator=service.coordinator,
        test_control=service.test_control,
        lock_wait_ms=service.lock_wait_ms,
        batch_lock_wait_ms=service.batch_lock_wait_ms,
        lease_unvoted_ms=service.lease_unvoted_ms,
        in_doubt_after_ms=service.in_doubt_after_ms,
        tls=tls,
        metrics_listen=service.metrics_listen,
        log_level=settings.log.level,
        wal_sync=service.wal_sync,
        checkpoint_every_records=service.checkpoint_every_records,
        replace_registration=options.replace_registration,
    )


def run(service: Service[Any], argv: list[str] | None = None) -> None:
    """Entry point for a participant process. Exits with status 1 when it cannot start, or
    when the coordinator refuses its registration for good."""
    problem = limits.participant_name_problem(service.name)
    if problem:
        sys.exit(f"dtm service {service.name}: error: {problem}")
    participant_config = parse_args(service.name, argv)
    logs.configure(service.name, participant_config.log_level)
    grpc_edge.use_fast_event_loop()
    grpc_edge.run_server(lambda: ParticipantServer(service, participant_config))


__all__ = ["BranchState", "ParticipantConfig", "ParticipantServer", "branch_key_text", "run"]
