"""One run's result: what it did, what it found, and its latency summary.

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from dtm.chaos.checks import (
    LATE_ABORTED,
    LATE_COMMITTED,
    LATE_RERUN,
)
from dtm.chaos.matrix import (
    Cell,
    participants_text,
)
from dtm.chaos.orders import (
    ClientRecord,
)
from dtm.chaos.settings import (
    _TITLES,
    ABORTED,
    COMMITTED,
    SOAK,
)


@dataclass
class RunResult:
    index: int
    kind: str  # "matrix", "kill", "late" or "soak"
    seed: int
    cell: Cell | None = None
    crash_at: str = ""
    #: The crash point also dropped the target's unsynced log writes, as a power loss would
    #: (dtm.wal.LOSE_UNSYNCED_VARIABLE): half the runs, drawn per (cell, seed).
    loses_unsynced: bool = False
    #: The target's group commit while armed (dtm.wal.async_log): "loop", or "thread".
    wal_sync: str = "loop"
    #: The services started with `[participant] batch = false` (`unary_services`): the
    #: coordinator called them unary; empty: every one batched.
    unary: frozenset[str] = frozenset()
    #: "crashed" (status 86), "not reached", or what else happened to the target.
    target: str = ""
    kills: Counter[str] = field(default_factory=Counter)
    records: list[ClientRecord] = field(default_factory=list)
    #: Late-retry runs: the orders that pushed the run's out of the coordinator's memory
    #: (checked, not retried), the wave's faults ("stop payment": 2), and how many late
    #: retries were under way while a fault was on.
    pushers: list[ClientRecord] = field(default_factory=list)
    late_faults: Counter[str] = field(default_factory=Counter)
    late_during_faults: int = 0
    #: The known-limit reruns (LATE_RERUN), each with what the services showed of it.
    reruns: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    #: What stopped the run that was the machine's doing, not dtm's (another program took a
    #: restarted process's port: PortTakenError): not violations, but the run checked less.
    environment: list[str] = field(default_factory=list)
    #: Fault soaks: how long, and each Submit's latency at its client, ms (any outcome).
    soak_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    #: Process name -> tail of its log, kept when the run has violations.
    logs: dict[str, str] = field(default_factory=dict)
    data_dir: str = ""
    elapsed_s: float = 0.0
    #: (phase, seconds) in order: where a run's time went (printed with --verbose).
    phases: list[tuple[str, float]] = field(default_factory=list)
    _last_mark: float = field(default_factory=time.perf_counter, repr=False)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self._last_mark))
        self._last_mark = now

    def count(self, outcome: str) -> int:
        return sum(record.outcome == outcome for record in self.records)

    @property
    def committed(self) -> int:
        return self.count(COMMITTED)

    @property
    def aborted(self) -> int:
        return self.count(ABORTED)

    @property
    def unknown(self) -> int:
        return sum(not record.known for record in self.records)

    @property
    def retried(self) -> Counter[str]:
        return Counter(r.retry_outcome for r in self.records if r.retry_outcome)

    @property
    def late(self) -> Counter[str]:
        """Late retries by what they found (LATE_COMMITTED...; "" when told no outcome)."""
        return Counter(r.late_kind for r in self.records if r.late_outcome)

    @property
    def replay(self) -> str:
        if self.cell is not None:
            return f"python -m dtm.chaos --replay {self.cell}:{self.seed}"
        if self.kind == SOAK:
            return (
                "python -m dtm.chaos --runs 0 --kill-runs 0 --late-runs 0 "
                f"--soak {self.soak_s:g} --seed {self.seed}"
            )
        return f"python -m dtm.chaos --replay {self.kind}:{self.seed}"

    def line(self, total: int) -> str:
        width = len(str(total))
        head = f"[{self.index:>{width}}/{total}]"
        if self.cell is not None:
            what = f"{self.crash_at:<40} {self.cell.component:<12} seed {self.seed:<6}"
            target = self.target
            if self.loses_unsynced and target == "crashed":
                target += f", unsynced writes lost (wal_sync {self.wal_sync})"
            what += f" {target:<11}"
        else:
            kills = ", ".join(f"{n} {name}" for name, n in sorted(self.kills.items()))
            title = _TITLES.get(self.kind, "random SIGKILL under load")
            what = f"{title:<40} {'-':<12} seed {self.seed:<6}"
            what += f" kills: {kills or 'none'};"
        if self.unary:
            what += f" participants {participants_text(self.unary)};"
        retried = self.retried
        retry = ""
        if retried:
            retry = " (retried: " + ", ".join(f"{n} {o}" for o, n in sorted(retried.items())) + ")"
        orders = (
            f"orders {len(self.records)}: {self.committed} committed, {self.aborted} aborted, "
            f"{self.unknown} unknown{retry}"
        )
        late = self.late
        if late:
            faults = ", ".join(f"{n} {f}" for f, n in sorted(self.late_faults.items()))
            orders += (
                f"; late retries {sum(late.values())}: {late[LATE_COMMITTED]} committed, "
                f"{late[LATE_ABORTED]} aborted, {late[LATE_RERUN]} reruns (known limit)"
                + (f", {late['']} without an outcome" if late[""] else "")
                + f", {self.late_during_faults} during faults ({faults or 'none'})"
            )
        if self.kind == SOAK and self.latencies_ms:
            orders += f"; {latency_summary(self.latencies_ms)}"
        result = "ok" if not self.violations else f"VIOLATIONS: {len(self.violations)}"
        if self.environment:
            # Not "ok": the run did not check all it should have.
            stopped = f"STOPPED by the environment ({len(self.environment)}, not a violation)"
            result = f"{result}; {stopped}" if self.violations else stopped
        return f"{head} {what} {orders}  {self.elapsed_s:.1f} s  {result}"


def latency_summary(latencies_ms: Sequence[float]) -> str:
    """p50, p99 and max of every Submit at its client, whatever its outcome (a Submit that
    meets a killed process waits for it, so the tail is the faults')."""
    ordered = sorted(latencies_ms)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return (
        f"latency of {len(ordered)} Submits: p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, "
        f"max {ordered[-1]:.1f} ms"
    )
