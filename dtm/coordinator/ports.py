"""How the engine's messages reach one participant: batched when the participant declared the
`batch` capability, plain unary calls otherwise (any participant in any language).

Per-call overhead dominates Python gRPC (performance.md: ~0.4 ms of CPU per unary call, while
one call carrying 32 items moves thirty times more). So each participant gets two batchers,
one for prepares and one for decisions: items queue while the participant's calls are in
flight and leave together as one PrepareBatch / DecideBatch when a call slot frees. No timer
is involved by default, so a lone transaction pays no extra latency; under load, batches grow
by themselves because calls take longer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import any_pb2

from dtm import limits
from dtm.coordinator.clients import PB_TO_VOTE, ParticipantClient
from dtm.core.transaction import Vote
from dtmpb.v1 import participant_pb2

HEURISTIC_METADATA_KEY = "dtm-heuristic"


@dataclass(frozen=True, slots=True)
class PrepareResult:
    vote: Vote | None  # None: the call failed; the branch may or may not have prepared
    reason: str
    invalid_argument: str = ""


@dataclass(frozen=True, slots=True)
class DecideResult:
    ok: bool
    error: str = ""
    heuristic: str = ""


@dataclass(slots=True)
class PrepareItem:
    transaction_id: str
    branch: int
    operation: any_pb2.Any
    one_phase: bool
    deadline: float  # loop time
    timeout_s: float
    done: Callable[[PrepareResult], None]


@dataclass(slots=True)
class DecideItem:
    transaction_id: str
    branch: int
    commit: bool
    done: Callable[[DecideResult], None]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    enabled: bool = True
    # Calls in flight per participant and kind. 1 makes batches largest; 2 hides a round trip.
    in_flight_max: int = 2
    items_max: int = limits.BATCH_ITEMS_MAX
    # Optional wait for more items before sending a small batch (0: none).
    linger_ms: float = 0.0


Item = TypeVar("Item")


class Batcher(Generic[Item]):
    """Queue items; send them in bounded batches through at most `in_flight_max` calls."""

    def __init__(
        self,
        send: Callable[[list[Item]], Coroutine[Any, Any, None]],
        policy: BatchPolicy,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._send = send
        self._policy = policy
        self._queue: deque[Item] = deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks = tasks
        self.calls = 0
        self.items = 0

    def add(self, item: Item) -> None:
        self._queue.append(item)
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled or self._in_flight >= self._policy.in_flight_max:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        if self._policy.linger_ms > 0 and self._in_flight > 0:
            loop.call_later(self._policy.linger_ms / 1000, self._flush)
        else:
            # call_soon: everything queued in this loop iteration leaves together.
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._in_flight < self._policy.in_flight_max:
            count = min(len(self._queue), self._policy.items_max)
            batch = [self._queue.popleft() for _ in range(count)]
            self._in_flight += 1
            self.calls += 1
            self.items += count
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Item]) -> None:
        try:
            await self._send(batch)
        finally:
            self._in_flight -= 1
            if self._queue:
                self._schedule()


class ParticipantPort:
    def __init__(self, client: ParticipantClient, batch: bool, policy: BatchPolicy) -> None:
        self.client = client
        self.batch = batch and policy.enabled
        self._tasks: set[asyncio.Task[None]] = set()
        self._prepares: Batcher[PrepareItem] = Batcher(self._send_prepares, policy, self._tasks)
        self._decisions: Batcher[DecideItem] = Batcher(self._send_decisions, policy, self._tasks)

    @property
    def calls(self) -> int:
        return self._prepares.calls + self._decisions.calls

    @property
    def items(self) -> int:
        return self._prepares.items + self._decisions.items

    def prepare(self, item: PrepareItem) -> None:
        if self.batch:
            self._prepares.add(item)
        else:
            self._spawn(self._unary_prepare(item))

    def decide(self, item: DecideItem) -> None:
        if self.batch:
            self._decisions.add(item)
        else:
            self._spawn(self._unary_decide(item))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- unary: the plain contract ----

    async def _unary_prepare(self, item: PrepareItem) -> None:
        try:
            vote, reason = await self.client.prepare(
                item.transaction_id, item.branch, item.operation, item.one_phase, item.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            invalid = (
                error.details() or "" if error.code() is grpc.StatusCode.INVALID_ARGUMENT else ""
            )
            item.done(PrepareResult(None, rpc_failure(error, item.timeout_s), invalid))
            return
        item.done(PrepareResult(vote, reason))

    async def _unary_decide(self, item: DecideItem) -> None:
        timeout_s = limits.PHASE_TWO_CALL_TIMEOUT_MS / 1000
        try:
            if item.commit:
                await self.client.commit(item.transaction_id, item.branch, timeout_s)
            else:
                await self.client.rollback(item.transaction_id, item.branch, timeout_s)
        except grpc.aio.AioRpcError as error:
            item.done(DecideResult(False, rpc_failure(error, timeout_s), heuristic_of(error)))
            return
        item.done(DecideResult(True))

    # ---- batched ----

    async def _send_prepares(self, batch: list[PrepareItem]) -> None:
        loop = asyncio.get_running_loop()
        # One deadline for the call: the earliest of its items'. An item failed by it early is
        # aborted, which is always safe.
        timeout_s = max(0.001, min(item.deadline for item in batch) - loop.time())
        request = participant_pb2.PrepareBatchRequest(
            prepares=[
                participant_pb2.PrepareRequest(
                    transaction_id=item.transaction_id,
                    branch=item.branch,
                    operation=item.operation,
                    one_phase=item.one_phase,
                )
                for item in batch
            ]
        )
        try:
            response = await self.client.stub.PrepareBatch(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            reason = rpc_failure(error, timeout_s)
            for item in batch:
                item.done(PrepareResult(None, reason))
            return
        if len(response.votes) != len(batch):
            reason = f"{self.client.name} answered {len(response.votes)} votes for {len(batch)}"
            for item in batch:
                item.done(PrepareResult(None, reason))
            return
        for item, answer in zip(batch, response.votes, strict=True):
            if answer.invalid_argument:
                item.done(PrepareResult(None, answer.invalid_argument, answer.invalid_argument))
            else:
                item.done(PrepareResult(PB_TO_VOTE.get(answer.vote), answer.reason))

    async def _send_decisions(self, batch: list[DecideItem]) -> None:
        timeout_s = limits.PHASE_TWO_CALL_TIMEOUT_MS / 1000
        request = participant_pb2.DecideBatchRequest(
            decisions=[
                participant_pb2.Decision(
                    transaction_id=item.transaction_id, branch=item.branch, commit=item.commit
                )
                for item in batch
            ]
        )
        try:
            response = await self.client.stub.DecideBatch(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            reason = rpc_failure(error, timeout_s)
            for item in batch:
                item.done(DecideResult(False, reason))
            return
        if len(response.results) != len(batch):
            reason = f"{self.client.name} answered {len(response.results)} results for {len(batch)}"
            for item in batch:
                item.done(DecideResult(False, reason))
            return
        for item, result in zip(batch, response.results, strict=True):
            item.done(DecideResult(result.ok, result.error, result.heuristic))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def heuristic_of(error: grpc.aio.AioRpcError) -> str:
    """The heuristic outcome a participant reports in trailing metadata, if any."""
    metadata: Any = error.trailing_metadata() or ()  # grpc-stubs types it too narrowly
    for key, value in metadata:
        if key == HEURISTIC_METADATA_KEY:
            return str(value if isinstance(value, str) else value.decode())
    return ""


def rpc_failure(error: grpc.aio.AioRpcError, timeout_s: float) -> str:
    code = error.code()
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within the {round(timeout_s * 1000)} ms deadline"
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"unavailable ({error.details()})"
    return f"{code.name}: {error.details()}"
