"""Two baselines measured in the same run as dtm, with the same client harness and concurrency.

(a) Raw unary gRPC echo: one trivial grpc.aio server process; each client call is one unary
    RPC. The upper limit of any transaction manager here: a transaction costs at least the
    client's one call.
(b) Naive two-phase-commit shape: client -> a coordinator process -> N echo "participant"
    processes; per transaction one unary call per participant per phase (prepare fan-out in
    parallel, then commit fan-out), nothing logged, nothing batched. As dtm's coordinator
    does, it reads the client's SubmitRequest, sends each participant only its own branch
    (a dtm PrepareRequest) and then only the transaction's id (a dtm CommitRequest).
(c) The disk's forced write: fdatasync of a 100-byte append, as the logs do it. With (a) it
    gives the floor of a durable 2PC with one client in flight (bench.report).

The servers carry raw bytes through gRPC generic handlers (no serializer: gRPC passes bytes
through untouched); only the naive coordinator decodes and encodes messages, dtm's own, as
dtm's coordinator must. They run the same event loop as the project's servers (uvloop when
installed), so the comparison is of designs, not of loops.

Server processes (port 0: the server binds a free one itself, and says which on its first
line, `listening on HOST:PORT`: what the measurements below use, so no port they chose can
be taken before the server binds it):
    python -m bench.baselines echo --listen HOST:PORT
    python -m bench.baselines naive --listen HOST:PORT --participant HOST:PORT [...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.harness import LoadSpec, channel_of, close_channels, drive, open_channels
from bench.procs import Processes
from bench.stats import LatencySummary, Outcome, Tally, percentile
from dtm import grpc_edge
from dtmpb.v1 import coordinator_pb2, participant_pb2

ECHO_SERVICE = "bench.Echo"
NAIVE_SERVICE = "bench.Naive"
ECHO = f"/{ECHO_SERVICE}/Echo"
PREPARE = f"/{ECHO_SERVICE}/Prepare"
COMMIT = f"/{ECHO_SERVICE}/Commit"
SUBMIT = f"/{NAIVE_SERVICE}/Submit"
HOST = "127.0.0.1"
#: What a server prints once it has bound, followed by HOST:PORT.
LISTENING = "listening on "
#: That line, HOST:PORT its group.
ANNOUNCED = re.compile(rf"^{LISTENING}(\S+)$", re.MULTILINE)
START_TIMEOUT_S = 20.0
# (request_serializer, response_deserializer) of a raw-bytes call: None makes gRPC pass the
# bytes through untouched, cheaper than an identity function called on every message.
RAW = (None, None)
# Per call: far above any latency of a healthy run, so only a stuck server trips it.
CALL_TIMEOUT_S = 10.0
#: Forced writes timed by fsync_p50_ms: about 0.1 s on the build machine.
FSYNC_SAMPLES = 300
#: The size of a typical decision or prepare record with its frame.
FSYNC_APPEND_BYTES = 100

Context = grpc.aio.ServicerContext[Any, Any]


# ---- the servers ----


async def _echo(request: bytes, context: Context) -> bytes:
    return request


def echo_handler() -> grpc.GenericRpcHandler[bytes, bytes]:
    """Echo, Prepare and Commit, all identity: a participant that does nothing at all."""
    # No request_deserializer / response_serializer: gRPC then hands over and sends raw bytes.
    method = grpc.unary_unary_rpc_method_handler(_echo)
    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE, {"Echo": method, "Prepare": method, "Commit": method}
    )


def naive_handler(channels: Sequence[grpc.aio.Channel]) -> grpc.GenericRpcHandler[bytes, bytes]:
    """Submit (a SubmitRequest with a branch per participant, in the participants' order):
    prepare each participant's own branch on it, all in parallel, then commit the transaction
    on every one, all in parallel."""
    prepares = [channel.unary_unary(PREPARE, *RAW) for channel in channels]
    commits = [channel.unary_unary(COMMIT, *RAW) for channel in channels]

    async def submit(request: bytes, context: Context) -> bytes:
        submitted = coordinator_pb2.SubmitRequest.FromString(request)
        if len(submitted.branches) != len(channels):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(submitted.branches)} branches for {len(channels)} participants",
            )
        transaction = submitted.transaction_id
        await asyncio.gather(
            *(
                call(
                    participant_pb2.PrepareRequest(
                        transaction_id=transaction, branch=index, operation=branch.operation
                    ).SerializeToString(),
                    timeout=CALL_TIMEOUT_S,
                )
                for index, (call, branch) in enumerate(
                    zip(prepares, submitted.branches, strict=True)
                )
            )
        )
        await asyncio.gather(
            *(
                call(
                    participant_pb2.CommitRequest(
                        transaction_id=transaction, branch=index
                    ).SerializeToString(),
                    timeout=CALL_TIMEOUT_S,
                )
                for index, call in enumerate(commits)
            )
        )
        return b"committed"

    return grpc.method_handlers_generic_handler(
        NAIVE_SERVICE, {"Submit": grpc.unary_unary_rpc_method_handler(submit)}
    )


async def serve(role: str, listen: str, participants: Sequence[str]) -> None:
    server = grpc_edge.new_server()
    channels: list[grpc.aio.Channel] = []
    if role == "echo":
        server.add_generic_rpc_handlers((echo_handler(),))
    else:
        # One channel per participant, as a coordinator keeps one client per participant.
        channels = [
            grpc.aio.insecure_channel(address, options=grpc_edge.CHANNEL_OPTIONS)
            for address in participants
        ]
        server.add_generic_rpc_handlers((naive_handler(channels),))
    port = grpc_edge.bind(server, listen)
    stop = asyncio.Event()
    grpc_edge.install_stop_signals(stop)
    await server.start()
    # The port it bound (the one asked for, or the kernel's choice for port 0), for the
    # launcher that reads this process's output (Processes.announced).
    print(f"{LISTENING}{listen.rpartition(':')[0]}:{port}", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)
    await close_channels(channels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", allow_abbrev=False)
    parser.add_argument("role", choices=("echo", "naive"))
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument(
        "--participant", action="append", default=[], help="naive: a participant's host:port"
    )
    options = parser.parse_args(argv)
    if options.role == "naive" and not options.participant:
        parser.error("naive needs at least one --participant")
    grpc_edge.use_fast_event_loop()
    asyncio.run(serve(options.role, options.listen, options.participant))


# ---- the measurements ----


@dataclass(frozen=True)
class BaselineResult:
    name: str
    participants: int
    tally: Tally

    @property
    def per_s(self) -> float:
        """Successful calls (unary) or transactions (naive) per second in the window."""
        return self.tally.rate(Outcome.COMMITTED)

    @property
    def latency(self) -> LatencySummary:
        return self.tally.latency(Outcome.COMMITTED)

    @property
    def errors(self) -> int:
        """Calls that failed in the window."""
        return self.tally.counts[Outcome.ERROR]

    @property
    def in_flight_at_close(self) -> int:
        """Calls in flight when the window closed (in a closed loop, about one per client)."""
        return len(self.tally.open_at_close)

    @property
    def failed_after_close(self) -> int:
        """Of those, the calls that failed in the end: stuck past the window (until their
        deadline, say), they cost the window a client's calls but not one of its errors."""
        return self.tally.open_at_close_ended(Outcome.ERROR)


def fsync_p50_ms(directory: Path | None = None, samples: int = FSYNC_SAMPLES) -> float:
    """Median time of one forced append (write of FSYNC_APPEND_BYTES, then fdatasync, as
    dtm.wal does it) to a scratch file under `directory` (the system's temporary directory
    when None), in milliseconds. Run alone, before the servers start."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    record = b"x" * FSYNC_APPEND_BYTES
    sync = getattr(os, "fdatasync", os.fsync)
    timings: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dtm-bench-fsync-", dir=directory) as scratch:
        fd = os.open(Path(scratch) / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(samples):
                started = time.perf_counter()
                os.write(fd, record)
                sync(fd)
                timings.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return round(percentile(sorted(timings), 0.5) * 1000, 3)


async def _wait_ready(
    target: str, method: str, processes: Processes, probe: bytes = b"ready?"
) -> None:
    """One call (of `probe`) that waits for the server to listen (wait_for_ready), up to
    START_TIMEOUT_S."""
    async with grpc.aio.insecure_channel(target, options=grpc_edge.CHANNEL_OPTIONS) as channel:
        try:
            await channel.unary_unary(method, *RAW)(
                probe, timeout=START_TIMEOUT_S, wait_for_ready=True
            )
        except grpc.aio.AioRpcError:
            processes.check_alive()  # an exit says more than the deadline
            raise


async def _measure(
    name: str,
    target: str,
    method: str,
    participants: int,
    payload: bytes,
    spec: LoadSpec,
    processes: Processes,
    progress: bool,
) -> BaselineResult:
    channels = open_channels(target, spec.clients)
    try:
        calls = [channel.unary_unary(method, *RAW) for channel in channels]
        # The payload itself: the naive coordinator reads it (a transaction).
        await _wait_ready(target, method, processes, payload)

        async def call(client: int, number: int) -> Outcome:
            try:
                await channel_of(calls, client)(payload, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return Outcome.ERROR
            return Outcome.COMMITTED

        tally = await drive(call, spec, label=name, progress=progress)
    finally:
        await close_channels(channels)
    processes.check_alive()
    return BaselineResult(name=name, participants=participants, tally=tally)


async def measure_unary(
    spec: LoadSpec, payload: bytes, *, log_dir: Path | None = None, progress: bool = True
) -> BaselineResult:
    """Baseline (a): the same clients calling one echo server process."""
    with (
        tempfile.TemporaryDirectory(prefix="dtm-bench-echo-") as scratch,
        Processes(log_dir or Path(scratch)) as processes,
    ):
        _spawn(processes, "echo", ["echo"])
        target = await processes.announced("echo", ANNOUNCED, START_TIMEOUT_S)
        return await _measure("unary echo", target, ECHO, 0, payload, spec, processes, progress)


def _spawn(processes: Processes, name: str, args: Sequence[str]) -> None:
    """Start server `name` (`python -m bench.baselines ARGS`) on a port it binds itself
    (port 0), which it announces (ANNOUNCED): a port chosen here and passed on could be
    bound by another program before the server did (nothing moves a baseline server)."""
    processes.spawn(name, ["bench.baselines", *args, "--listen", f"{HOST}:0"])


async def measure_naive(
    participants: int,
    spec: LoadSpec,
    payload: bytes,
    *,
    log_dir: Path | None = None,
    progress: bool = True,
) -> BaselineResult:
    """Baseline (b): the same clients calling a naive coordinator over N echo participants."""
    if participants < 1:
        raise ValueError(f"participants must be >= 1, got {participants}")
    with (
        tempfile.TemporaryDirectory(prefix="dtm-bench-naive-") as scratch,
        Processes(log_dir or Path(scratch)) as processes,
    ):
        names = [f"naive-p{index}" for index in range(participants)]
        for name in names:
            _spawn(processes, name, ["echo"])
        args = ["naive"]
        # The participants first, listening: the coordinator does not wait for them on
        # each call.
        for name in names:
            args += ["--participant", await processes.announced(name, ANNOUNCED, START_TIMEOUT_S)]
        _spawn(processes, "naive-coordinator", args)
        target = await processes.announced("naive-coordinator", ANNOUNCED, START_TIMEOUT_S)
        return await _measure(
            "naive 2PC", target, SUBMIT, participants, payload, spec, processes, progress
        )


if __name__ == "__main__":
    main()
