"""Test doubles shared by several test modules: a log whose fsyncs can be held back,
participant ports that answer at once, a read-only participant service, and a plain unary
gRPC participant that answers phase 2 as scripted."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc

from dtm import grpc_edge
from dtm.coordinator.ports import DecideItem, DecideResult, PrepareItem, PrepareResult
from dtm.coordinator.registry import Registry
from dtm.core.transaction import Vote
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc, shop_pb2
from participants.locks import LockMode
from participants.service import LockRequest, ReadOnly
from participants.service import PrepareResult as ServicePrepareResult
from tests.harness import InProcessCluster, eventually, pack

Code = grpc.StatusCode


class HeldLog(MemoryLog):
    """A MemoryLog whose records are durable only once a wait_durable syncs them (every one
    appended so far, as one fsync does), and whose syncs can be held back. Says which LSNs
    callers waited for."""

    def __init__(self) -> None:
        super().__init__()
        self.synced = 0
        self.waited: list[int] = []
        self._released: asyncio.Event | None = None  # set while syncs are held back

    @property
    def durable_lsn(self) -> int:
        return self.synced

    def hold(self) -> None:
        self._released = asyncio.Event()

    def release(self) -> None:
        assert self._released is not None
        self._released.set()
        self._released = None

    async def wait_durable(self, lsn: int) -> None:
        await super().wait_durable(lsn)  # raises for an LSN never appended
        self.waited.append(lsn)
        if lsn <= self.synced:
            return
        covered = self.appended_lsn  # what the fsync covers: what is appended when it starts
        if self._released is not None:
            await self._released.wait()
        self.synced = max(self.synced, covered)


class Answering:
    """A participant's port that answers at once: its vote, and every Commit and Rollback."""

    def __init__(self, vote: Vote, sent: list[str]) -> None:
        self.vote = vote
        self.sent = sent

    def prepare(self, item: PrepareItem) -> None:
        self.sent.append(f"prepare {item.transaction_id}")
        result = PrepareResult(self.vote, "no stock" if self.vote is Vote.REFUSED else "")
        asyncio.get_running_loop().call_soon(item.done, result)

    def decide(self, item: DecideItem) -> None:
        asyncio.get_running_loop().call_soon(item.done, DecideResult(ok=True))


class AnsweringRegistry(Registry):
    """Participants "yes-a" and "yes-b" vote PREPARED, "no" refuses; no gRPC."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []
        self.answering = {
            "yes-a": Answering(Vote.PREPARED, self.sent),
            "yes-b": Answering(Vote.PREPARED, self.sent),
            "no": Answering(Vote.REFUSED, self.sent),
        }
        for name in self.answering:
            self.put(coordinator_pb2.ParticipantInfo(name=name, address="127.0.0.1:1"))

    def port(self, name: str) -> Any:
        return self.answering[name]


async def answered_only_after_the_held_fsync(log: HeldLog, answer: Awaitable[object]) -> bool:
    """Start `answer` while the log's fsyncs are held: whether it is still unanswered once it
    asked for an fsync (False if it was answered without one). Then releases the log."""
    task = asyncio.ensure_future(answer)
    asked = len(log.waited)

    async def fsync_asked_or_answered() -> bool:
        return task.done() or len(log.waited) > asked

    await eventually(fsync_asked_or_answered)
    waited = not task.done()
    log.release()
    await task
    return waited


class StockCheck:
    """A read-only participant: it validates but never changes anything (votes READ_ONLY)."""

    operation_type = shop_pb2.GetStockRequest

    def __init__(self, name: str) -> None:
        self.name = name

    def validate(self, operation: shop_pb2.GetStockRequest) -> None:
        pass

    def locks(self, operation: shop_pb2.GetStockRequest) -> Sequence[LockRequest]:
        return [LockRequest(f"sku:{sku}", LockMode.SHARED) for sku in operation.skus]

    def prepare(self, key: str, operation: shop_pb2.GetStockRequest) -> ServicePrepareResult:
        return ReadOnly()

    def commit(self, key: str, operation: shop_pb2.GetStockRequest) -> None:
        raise AssertionError("a read-only branch gets no phase 2")

    def rollback(self, key: str, operation: shop_pb2.GetStockRequest) -> None:
        raise AssertionError("a read-only branch gets no phase 2")

    def snapshot(self) -> bytes:
        return b""

    def restore(self, state: bytes) -> None:
        pass

    def add_read_api(self, server: grpc.aio.Server) -> list[str]:
        return []


class ScriptedParticipant(participant_pb2_grpc.ParticipantServicer):
    """A plain unary participant, as one in another language would be: it votes PREPARED and
    answers phase 2 with the status it was given (OK when None)."""

    def __init__(self, commit: Code | None = None, rollback: Code | None = None) -> None:
        self.answers = {"Commit": commit, "Rollback": rollback}
        self.calls = {"Commit": 0, "Rollback": 0}

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:
        return participant_pb2.PrepareResponse(vote=coordinator_pb2.VOTE_PREPARED)

    async def _decide(self, rpc: str, context: Any) -> None:
        self.calls[rpc] += 1
        code = self.answers[rpc]
        if code is not None:
            await context.abort(code, f"scripted: {rpc} answered {code.name}")

    async def Commit(self, request: Any, context: Any) -> participant_pb2.CommitResponse:
        await self._decide("Commit", context)
        return participant_pb2.CommitResponse()

    async def Rollback(self, request: Any, context: Any) -> participant_pb2.RollbackResponse:
        await self._decide("Rollback", context)
        return participant_pb2.RollbackResponse()


@asynccontextmanager
async def scripted_cluster(
    tmp_path: Path,
    scripted: ScriptedParticipant,
    capabilities: coordinator_pb2.Capabilities | None = None,
    prepare_timeout_ms: int = 1_000,
) -> AsyncIterator[InProcessCluster]:
    """The in-process cluster (metrics on, for the heuristics counter) with `scripted`
    registered beside the four services as "scripted"."""
    cluster = InProcessCluster(tmp_path, prepare_timeout_ms=prepare_timeout_ms)
    cluster.coordinator_config = dataclasses.replace(
        cluster.coordinator_config, metrics_listen="127.0.0.1:0"
    )
    async with cluster:
        server = grpc.aio.server()
        participant_pb2_grpc.add_ParticipantServicer_to_server(scripted, server)
        port = grpc_edge.bind(server, "127.0.0.1:0")
        await server.start()
        try:
            address = f"127.0.0.1:{port}"
            await cluster.client.RegisterParticipant(
                coordinator_pb2.RegisterParticipantRequest(
                    name="scripted", address=address, capabilities=capabilities
                )
            )
            yield cluster
        finally:
            await server.stop(0)


def scripted_branch() -> coordinator_pb2.BranchRequest:
    return coordinator_pb2.BranchRequest(
        participant="scripted", operation=pack(shop_pb2.StockLine(sku="x", quantity=1))
    )
