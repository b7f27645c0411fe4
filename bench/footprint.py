"""The coordinator's footprint over a run: its resident memory and the size of its log, sampled
while the load runs, so that "flat over 100,000 transactions" is a measured claim
(`make bench-soak`), not a guess.

Memory is VmRSS from /proc (Linux); the log is the total size of the files under its
directory, checkpoints and segment deletion included. Both are read from outside the process,
so sampling costs the coordinator nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import Tally

# Samples per run, whatever its length; and bounds on the interval between two of them.
SAMPLES_PER_RUN = 20
INTERVAL_S_MIN = 0.5
INTERVAL_S_MAX = 10.0
MB = 1_000_000


@dataclass(frozen=True)
class Sample:
    #: Seconds since the measured window opened (negative during the warmup).
    at_s: float
    #: Submits answered so far, warmup included.
    transactions: int
    rss_bytes: int | None
    log_bytes: int


def rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid`, or None when it cannot be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError):
        return None
    return None


def directory_bytes(path: Path) -> int:
    """Total size of the regular files under `path`; 0 when it does not exist. Files that
    vanish while being counted (a checkpoint deletes old segments) count as 0."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return total


def interval_s(warmup_s: float, duration_s: float) -> float:
    return min(INTERVAL_S_MAX, max(INTERVAL_S_MIN, (warmup_s + duration_s) / SAMPLES_PER_RUN))


def sampler(
    pid_of: Callable[[], int | None],
    log_dir: Path,
    samples: list[Sample],
    every_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[Tally], Any]:
    """A companion for `bench.harness.drive`: appends a Sample every `every_s` seconds until
    the window closes, and one as it closes."""

    async def run(tally: Tally) -> None:
        # Bounded: the loop ends when the window does (clock-driven, at most
        # (warmup + duration) / every_s + 1 iterations).
        while True:
            now = clock()
            pid = pid_of()
            samples.append(
                Sample(
                    at_s=round(now - tally.window_start, 3),
                    transactions=sum(tally.total.values()),
                    rss_bytes=rss_bytes(pid) if pid is not None else None,
                    log_bytes=directory_bytes(log_dir),
                )
            )
            if now >= tally.window_end:
                return
            await asyncio.sleep(min(every_s, max(0.0, tally.window_end - now)))

    return run


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


def summary(samples: list[Sample]) -> dict[str, Any]:
    """The results' footprint keys. "Flat" is for the reader to judge from the figures: the
    growth over the second half of the run's transactions (`..._growth_mb_second_half`) is
    the one that says whether memory or the log keeps growing once windows and checkpoints
    are in their steady state."""
    if not samples:
        return {"footprint_samples": []}
    last = samples[-1]
    half = last.transactions / 2
    middle = min(samples, key=lambda sample: abs(sample.transactions - half))
    rss = [sample.rss_bytes for sample in samples if sample.rss_bytes is not None]

    def growth(first: int | None, second: int | None) -> float | None:
        return None if first is None or second is None else round((second - first) / MB, 1)

    return {
        "coordinator_rss_mb_first": _mb(samples[0].rss_bytes),
        "coordinator_rss_mb_middle": _mb(middle.rss_bytes),
        "coordinator_rss_mb_last": _mb(last.rss_bytes),
        "coordinator_rss_mb_max": _mb(max(rss)) if rss else None,
        "coordinator_rss_growth_mb_second_half": growth(middle.rss_bytes, last.rss_bytes),
        "coordinator_log_mb_last": _mb(last.log_bytes),
        "coordinator_log_mb_max": _mb(max(sample.log_bytes for sample in samples)),
        "coordinator_log_growth_mb_second_half": growth(middle.log_bytes, last.log_bytes),
        "footprint_transactions": last.transactions,
        "footprint_samples": [
            {
                "at_s": sample.at_s,
                "transactions": sample.transactions,
                "rss_mb": _mb(sample.rss_bytes),
                "log_mb": _mb(sample.log_bytes),
            }
            for sample in samples
        ],
    }
