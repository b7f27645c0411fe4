"""Latency statistics and the outcome tally of one measurement window.

Pure code with an injectable clock, so that tests can check every figure on known data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """What one client call ended with, as the bench counts it."""

    COMMITTED = "committed"  # for a baseline: the call succeeded
    ABORTED = "aborted"
    #: The coordinator answered UNKNOWN: the transaction may land either way.
    UNKNOWN = "unknown"
    #: The call itself failed (deadline, unavailable...): the outcome is not known either.
    ERROR = "error"


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest sample such that at least `fraction` of all
    samples are <= it.

    Nearest rank (not interpolation) so that every reported figure is a latency that some call
    actually had, as HdrHistogram and most load tools report them. `sorted_values` must be
    sorted ascending and not empty.
    """
    if not sorted_values:
        raise ValueError("percentile of no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    # The rank is 1-based; the small epsilon keeps 0.95 * 100 = 95.00000000000001 at rank 95.
    rank = max(1, math.ceil(fraction * len(sorted_values) - 1e-9))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LatencySummary:
    """Latency figures in milliseconds; all None when there were no samples."""

    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        if not seconds:
            return cls(0, None, None, None, None, None)
        ordered = sorted(seconds)

        def ms(value: float) -> float:
            return round(value * 1000.0, 3)

        return cls(
            count=len(ordered),
            p50_ms=ms(percentile(ordered, 0.50)),
            p95_ms=ms(percentile(ordered, 0.95)),
            p99_ms=ms(percentile(ordered, 0.99)),
            max_ms=ms(ordered[-1]),
            mean_ms=ms(sum(ordered) / len(ordered)),
        )


@dataclass
class Tally:
    """Outcomes of a closed-loop run, split into the measurement window and the rest.

    A call counts in the window when it *finished* inside [window_start, window_end]: the
    usual throughput definition (completions per second), which neither drops the calls that
    were in flight when the window opened nor waits for those still in flight when it closes.
    Calls outside the window (warmup, drain) are still counted in `total`, because servers'
    cumulative counters (fsyncs, messages) cover them too.

    The calls still in flight when the window closes are the slow ones a closed-loop run
    hides from its finished-in-window latencies (a call may wait for its deadline, 15 s, far
    past the window): `open_at_close` keeps how long each had been running at the close (it
    lasted at least that long), `open_at_close_took` how long it took in the end,
    `open_at_close_outcomes` what it ended with (a call stuck until its deadline fails after
    the window, where the window's error count never sees it), and `all_calls` counts them
    with every answer in the window, whatever its outcome.
    """

    window_start: float
    window_end: float
    counts: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    total: dict[Outcome, int] = field(default_factory=lambda: dict.fromkeys(Outcome, 0))
    #: Seconds per call, inside the window, per outcome.
    latencies: dict[Outcome, list[float]] = field(
        default_factory=lambda: {outcome: [] for outcome in Outcome}
    )
    #: Seconds each call in flight at the window's close had run by then (any outcome).
    open_at_close: list[float] = field(default_factory=list)
    #: Seconds those same calls took in the end (they are awaited after the close).
    open_at_close_took: list[float] = field(default_factory=list)
    #: What those same calls ended with.
    open_at_close_outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_start) and math.isfinite(self.window_end)):
            raise ValueError("the measurement window must have finite bounds")
        if self.window_end <= self.window_start:
            raise ValueError("the measurement window must have a positive length")

    @property
    def window_s(self) -> float:
        return self.window_end - self.window_start

    def in_window(self, finished: float) -> bool:
        return self.window_start <= finished <= self.window_end

    def record(self, outcome: Outcome, started: float, finished: float) -> None:
        self.total[outcome] += 1
        if self.in_window(finished):
            self.counts[outcome] += 1
            self.latencies[outcome].append(finished - started)
        elif started < self.window_end < finished:
            self.open_at_close.append(self.window_end - started)
            self.open_at_close_took.append(finished - started)
            self.open_at_close_outcomes.append(outcome)

    def open_at_close_ended(self, outcome: Outcome) -> int:
        """How many of the calls in flight at the window's close ended with `outcome`."""
        return self.open_at_close_outcomes.count(outcome)

    def rate(self, outcome: Outcome) -> float:
        """Calls per second with this outcome, inside the window."""
        return self.counts[outcome] / self.window_s

    def latency(self, *outcomes: Outcome) -> LatencySummary:
        samples: list[float] = []
        for outcome in outcomes:
            samples += self.latencies[outcome]
        return LatencySummary.of(samples)

    def all_calls(self) -> LatencySummary:
        """Every call the window saw: each one answered inside it, whatever its outcome
        (unknown and failed calls too), and each one still in flight when it closed, counted
        as lasting until the close (a lower bound of its latency)."""
        samples: list[float] = list(self.open_at_close)
        for outcome in Outcome:
            samples += self.latencies[outcome]
        return LatencySummary.of(samples)
