"""The closed-loop client driver every measurement shares (dtm and both baselines).

C client tasks in one process, each submitting back to back: a new call starts as soon as the
previous one returns, so the concurrency (calls in flight) is C at every moment. Using the same
driver, the same channels per client and the same event loop for the baselines and for dtm is
what makes their ratios meaningful.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from tqdm import tqdm

from bench.stats import Outcome, Tally
from dtm import grpc_edge

#: (client index, call number of that client) -> outcome of one call.
Call = Callable[[int, int], Awaitable[Outcome]]
Clock = Callable[[], float]
T = TypeVar("T")

# One channel (one TCP connection, one HTTP/2 session) per few clients: every client on one
# connection would serialize them on one socket and one completion queue, a channel per client
# would make C connections; real clients sit somewhere between.
CLIENTS_PER_CHANNEL = 8
# Bound on the calls of one client in one run: far above what a box can do in the longest run
# (10 minutes at 100,000 calls/s), so it only ever stops a runaway fake clock.
CALLS_PER_CLIENT_MAX = 60_000_000
PROGRESS_TICK_S = 0.25


@dataclass(frozen=True)
class LoadSpec:
    clients: int
    warmup_s: float
    duration_s: float

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        # Finite too: a NaN or infinite window never closes, and `drive` would never return.
        if not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise ValueError(f"warmup must be >= 0 s and finite, got {self.warmup_s}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration must be > 0 s and finite, got {self.duration_s}")


def open_channels(target: str, clients: int) -> list[grpc.aio.Channel]:
    """ceil(clients / CLIENTS_PER_CHANNEL) channels to `target`, each on its own connection."""
    count = -(-clients // CLIENTS_PER_CHANNEL)
    # A local subchannel pool per channel: otherwise gRPC shares one connection between all
    # channels with the same target and options, and the extra channels would change nothing.
    options = [*grpc_edge.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


def channel_of(per_channel: Sequence[T], client: int) -> T:
    """What client `client` uses of a list with one item per channel (channels, stubs...)."""
    return per_channel[client // CLIENTS_PER_CHANNEL]


async def close_channels(channels: Sequence[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(channel.close(None) for channel in channels))


async def drive(
    call: Call,
    spec: LoadSpec,
    *,
    clock: Clock = time.perf_counter,
    label: str = "",
    progress: bool = True,
    companions: Sequence[Callable[[Tally], Awaitable[None]]] = (),
) -> Tally:
    """Run `spec.clients` closed-loop clients for warmup + duration; the tally of their calls.

    No call starts after the window closes; the calls in flight then are awaited (each call
    bounds itself with its own gRPC deadline) and counted outside the window, except in the
    tally's `open_at_close` and `all_calls` latencies (they lasted at least until the close).
    `companions` run beside the clients with the live tally (e.g. to scrape server counters as
    the window opens and closes), and are awaited too.
    """
    start = clock()
    tally = Tally(
        window_start=start + spec.warmup_s, window_end=start + spec.warmup_s + spec.duration_s
    )

    async def client(index: int) -> None:
        for number in range(CALLS_PER_CLIENT_MAX):
            started = clock()
            if started >= tally.window_end:
                return
            outcome = await call(index, number)
            tally.record(outcome, started, clock())

    ticker = asyncio.create_task(_show_progress(tally, clock, label)) if progress else None
    try:
        await asyncio.gather(
            *(client(index) for index in range(spec.clients)),
            *(companion(tally) for companion in companions),
        )
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    return tally


async def _show_progress(tally: Tally, clock: Clock, label: str) -> None:
    """A tqdm bar on stderr over the run's seconds, with the window's rate so far."""
    total_s = tally.window_end - clock()
    start = clock()
    shown = 0.0
    with tqdm(
        total=round(total_s, 1),
        desc=label,
        unit="s",
        file=sys.stderr,
        bar_format="{desc} {bar} {n:.1f}/{total:.1f} s{postfix}",
        leave=False,
        # None: no bar when stderr is not a terminal (CI logs, pipes), where it would be noise.
        disable=None,
    ) as bar:
        # Bounded by the run: the driver cancels this task when the clients are done.
        while True:
            await asyncio.sleep(PROGRESS_TICK_S)
            now = clock()
            elapsed = min(now - start, total_s)
            bar.update(round(elapsed - shown, 2))
            shown = elapsed
            if now < tally.window_start:
                bar.set_postfix_str("warming up")
            else:
                window = min(now, tally.window_end) - tally.window_start
                done = tally.counts[Outcome.COMMITTED]
                rate = done / window if window > 0 else 0.0
                bar.set_postfix_str(f"{done} ok, {rate:,.0f}/s")
