"""dtm.v1.Participant: Prepare, Commit, Rollback and the batched calls, around the branch engine.

Part of `participants.server`: see its docstring."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from dtm import crashpoints, grpc_edge, limits, logs
from dtm.core.branch import BranchVote
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc
from participants.branches import (
    BranchError,
    IdReused,
)
from participants.server.wire import (
    _INVALID_ARGUMENT_CODE,
    ERROR_TO_CODE,
    HEURISTIC_METADATA_KEY,
    _check_ids,
    _check_prepare,
    _id_reused,
    _vote_pb,
    refuse_misdirected,
)
from participants.service import InvalidOperation

if TYPE_CHECKING:  # the process serves these; they only call back into it
    from participants.server.process import ParticipantServer


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
        if logs.debug_enabled():  # the unary path's every call: no arguments built for nothing
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
        if logs.debug_enabled():
            self.log.debug(
                "commit applied" if commit else "rollback applied",
                txn=transaction_id,
                branch=branch,
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
