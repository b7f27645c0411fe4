"""Reporting: a violation with its replay line, the summary table, and the simulator's seeds.

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import importlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from dtm.chaos.checks import (
    LATE_ABORTED,
    LATE_COMMITTED,
    LATE_RERUN,
)
from dtm.chaos.matrix import (
    participants_text,
)
from dtm.chaos.result import (
    RunResult,
)
from dtm.chaos.settings import (
    _TITLES,
    EXIT_ENVIRONMENT,
    EXIT_PASSED,
    EXIT_VIOLATIONS,
    LATE,
    LATE_FINISHED_KEPT,
)


def print_violation(result: RunResult) -> None:
    what = f"point {result.crash_at} in {result.cell.component}" if result.cell else "kill run"
    if result.kind == LATE:
        what = "late-retry run"
    if result.unary:
        what += f", participants {participants_text(result.unary)}"
    print(f"  !! run {result.index}: {what}, seed {result.seed}")
    for violation in result.violations:
        print(f"     VIOLATION {violation}")
    for problem in result.environment:
        print(f"     ENVIRONMENT (not a violation; the run stopped there) {problem}")
    mentioned = " ".join(result.violations)
    for record in result.records:
        if any(f"order {record.order_id}{end}" in mentioned for end in " :"):
            print(
                f"     order {record.order_id}: first answered {record.outcome} "
                f"({record.reason[:100]}); retry answered {record.retry_outcome or '-'}"
                + (f"; late retry answered {record.late_outcome}" if record.late_outcome else "")
            )
    for name, tail in result.logs.items():
        print(f"     --- {name}: last lines of its log ---")
        print(tail)
    if result.data_dir:
        print(f"     data dir and full logs: {result.data_dir}")
    print(f"     replay: {result.replay}")


def print_summary(results: Sequence[RunResult], elapsed_s: float) -> None:
    if not results:
        return
    print()
    print("summary (crash matrix: point x component)")
    rows: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    for result in results:
        key = (
            str(result.cell)
            if result.cell
            else _TITLES.get(result.kind, "random SIGKILL under load")
        )
        row = rows[key]
        row[0] += 1
        row[1] += int(result.target == "crashed") if result.cell else sum(result.kills.values())
        row[2] += result.committed
        row[3] += result.aborted
        row[4] += result.unknown
        row[5] += len(result.violations)
    headers = (
        "point:component",
        "runs",
        "crashed",
        "committed",
        "aborted",
        "unknown",
        "violations",
    )
    width = max(len(headers[0]), *(len(key) for key in rows))
    print(f"  {headers[0]:<{width}} " + " ".join(f"{h:>10}" for h in headers[1:]))
    for key, row in rows.items():
        print(f"  {key:<{width}} " + " ".join(f"{value:>10}" for value in row[:6]))
    cut = sum(r.loses_unsynced and r.target == "crashed" for r in results)
    print(f"  crashes that also lost their unsynced log writes (as a power loss): {cut}")
    print_participant_modes(results)
    late_runs = [r for r in results if r.kind == LATE]
    if late_runs:
        late: Counter[str] = Counter()
        faults: Counter[str] = Counter()
        for result in late_runs:
            late.update(result.late)
            faults.update(result.late_faults)
        print(
            f"  late retries (every order again once the coordinator forgot it, "
            f"finished_kept {LATE_FINISHED_KEPT}): {sum(late.values())}: "
            f"{late[LATE_COMMITTED]} answered COMMITTED, {late[LATE_ABORTED]} ABORTED, "
            f"{late[LATE_RERUN]} aborted orders rerun and committed (the known limit), "
            f"{late['']} without an outcome; "
            f"{sum(r.late_during_faults for r in late_runs)} under way during a fault ("
            + ", ".join(f"{n} {fault}" for fault, n in sorted(faults.items()))
            + ")"
        )
    kill_runs = [r for r in results if r.cell is None]
    if kill_runs:
        kills: Counter[str] = Counter()
        for result in kill_runs:
            kills.update(result.kills)
        print(
            f"  random SIGKILLs: {sum(kills.values())} kills ("
            + ", ".join(f"{n} {name}" for name, n in sorted(kills.items()))
            + ")"
        )
    committed = sum(r.committed for r in results)
    aborted = sum(r.aborted for r in results)
    unknown = sum(r.unknown for r in results)
    print(
        f"  orders: {committed} committed, {aborted} aborted, {unknown} unknown (each retried); "
        f"{len(results)} runs in {elapsed_s:.0f} s ({elapsed_s / max(1, len(results)):.1f} s/run)"
    )


def print_participant_modes(results: Sequence[RunResult]) -> None:
    """How many runs called some services unary (`unary_services`), and what came of them."""
    unary = [r for r in results if participants_text(r.unary) == "unary"]
    mixed = [r for r in results if participants_text(r.unary).startswith("mixed")]
    both = unary + mixed
    crashed = sum(r.target == "crashed" for r in both)
    kills = sum(sum(r.kills.values()) for r in both if r.cell is None)
    print(
        f"  participants unary (batch = false: one Prepare, Commit or Rollback call per "
        f"branch, fsync on a sync thread): {len(unary)} runs, and {len(mixed)} mixed runs "
        f"(one service unary); in them {crashed} crashes at a point, {kills} random SIGKILLs, "
        f"{sum(r.committed for r in both)} orders committed, "
        f"{sum(len(r.violations) for r in both)} violations"
    )


#: A cell run this often without one crash is a crash point that no longer fires (a call to
#: `crashpoints.hit` removed, or never reached): a test that did not run, so a failure.
NEVER_REACHED_RUNS = 2


def never_reached(results: Sequence[RunResult]) -> list[str]:
    """The crash-matrix cells that ran NEVER_REACHED_RUNS times or more and never crashed."""
    runs: Counter[str] = Counter()
    crashed: Counter[str] = Counter()
    for result in results:
        if result.cell is not None:
            runs[str(result.cell)] += 1
            crashed[str(result.cell)] += result.target == "crashed"
    return [
        f"{cell}: {count} runs and not one crash (its crash point is never reached)"
        for cell, count in runs.items()
        if count >= NEVER_REACHED_RUNS and crashed[cell] == 0
    ]


def verdict(runs: int, violations: int, environment: int) -> tuple[str, int]:
    """The last line of a chaos session, and its exit status: EXIT_VIOLATIONS with any
    violation, else EXIT_ENVIRONMENT with any environment problem, else EXIT_PASSED."""
    line = f"chaos: {runs} runs, {violations} violations"
    if violations:
        status = EXIT_VIOLATIONS
    elif environment:
        status = EXIT_ENVIRONMENT
    else:
        status = EXIT_PASSED
    if environment:
        # The status is said where it is not 1: a script that sees 3 reads why here.
        why = "" if violations else f"; exit status {EXIT_ENVIRONMENT}: replay those runs"
        line += f", {environment} environment problems (not violations{why})"
    return line, status


def checkpoints_written(root: Path) -> Counter[str]:
    """Per process, the "checkpoint written" lines in the logs of every cluster of the session
    (the logs are appended across restarts, so crashed processes' checkpoints count too)."""
    written: Counter[str] = Counter()
    for log in sorted(root.glob("cluster-*/logs/*.log")):
        with log.open("rb") as lines:
            written[log.stem] += sum(b"checkpoint written" in line for line in lines)
    return written


def run_simulator(seeds: int, base_seed: int) -> tuple[int, int, str]:
    """(seeds run, violations, note) from the deterministic simulator, if it is there."""
    try:
        module = importlib.import_module("dtm.sim")
    except ImportError as error:
        return 0, 0, f"skipped: dtm.sim cannot be imported ({error})"
    run_seed: Callable[[int], object] | None = getattr(module, "run_seed", None)
    if run_seed is None:
        return 0, 0, "skipped: dtm.sim exposes no run_seed(seed)"
    violations = 0
    for seed in range(base_seed, base_seed + seeds):
        try:
            run_seed(seed)
        except Exception as error:
            violations += 1
            print(f"  !! simulator seed {seed}: {error}")
    return seeds, violations, ""
