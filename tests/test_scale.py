"""What broke, or degraded without a clear error, as the system grew (a bug hunt on scale):
each case failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc._cython import cygrpc  # channelz, as the grpcio-channelz package reads it

from dtm import grpc_edge
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc

# ---- 1. a burst of calls beyond gRPC's own queue: cancelled unseen, not answered ----

# More calls than gRPC core queues for a server by default (1,000, and 3,000 at most) before
# the server's code takes them: beyond, it cancelled them itself (CANCELLED "CANCELLED"). A
# burst of 3,000 Submits from 16 connections lost 763 of them that way, nothing run and no
# bound of the coordinator's reached (10,000 transactions in flight).
BURST = 3_100


class _Frozen(participant_pb2_grpc.ParticipantServicer):
    """Its first call blocks the server's event loop until released: the calls that arrive
    meanwhile wait in gRPC core, as they do while a busy server's loop runs other work."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(30)  # blocks the loop on purpose
        return participant_pb2.PrepareResponse(vote=coordinator_pb2.VOTE_READ_ONLY)


@pytest.fixture
def frozen_server() -> Iterator[tuple[_Frozen, int]]:
    """A server with the project's options (grpc_edge.new_server) on its own thread and loop."""
    servicer = _Frozen()
    bound: list[int] = []
    started = threading.Event()
    stopping: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        server = grpc_edge.new_server()
        participant_pb2_grpc.add_ParticipantServicer_to_server(servicer, server)
        bound.append(grpc_edge.bind(server, "127.0.0.1:0"))
        await server.start()
        stop = asyncio.Event()
        stopping.append((asyncio.get_running_loop(), stop))
        started.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield servicer, bound[0]
    finally:
        servicer.release.set()
        loop, stop = stopping[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def _calls_arrived() -> int:
    """Calls that reached the gRPC core of this process's servers (channelz): a listener's
    channelz entry does not name the port it bound, so the test counts what its burst adds."""
    servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
    return sum(int(server.get("data", {}).get("callsStarted", 0)) for server in servers)


def test_a_burst_of_calls_waits_for_the_server_instead_of_being_cancelled_by_grpc(
    frozen_server: tuple[_Frozen, int],
) -> None:
    outcomes = asyncio.run(_burst(*frozen_server))
    assert outcomes == {"OK": BURST + 1}, outcomes


async def _burst(servicer: _Frozen, port: int) -> Counter[str]:
    before = _calls_arrived()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = participant_pb2_grpc.ParticipantStub(channel)
        request = participant_pb2.PrepareRequest(transaction_id="t")
        first = asyncio.ensure_future(stub.Prepare(request, timeout=60))
        assert await asyncio.to_thread(servicer.entered.wait, 10)
        burst = [asyncio.ensure_future(stub.Prepare(request, timeout=60)) for _ in range(BURST)]
        # Every call of the burst has reached the server's gRPC core while its loop is frozen.
        for _ in range(6_000):
            if _calls_arrived() >= before + BURST + 1:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"only {_calls_arrived() - before} calls arrived")
        servicer.release.set()
        answers = await asyncio.gather(first, *burst, return_exceptions=True)
    return Counter(
        answer.code().name if isinstance(answer, grpc.aio.AioRpcError) else "OK"
        for answer in answers
    )
