"""The command: `python -m dtm.chaos` plans the runs, runs them and reports.

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dtm import config
from dtm.chaos.matrix import (
    Cell,
    matrix,
    unary_services,
    wal_points_wired,
)
from dtm.chaos.report import (
    checkpoints_written,
    never_reached,
    print_summary,
    print_violation,
    run_simulator,
    verdict,
)
from dtm.chaos.result import (
    RunResult,
)
from dtm.chaos.session import (
    Session,
)
from dtm.chaos.settings import (
    CHECKPOINT_EVERY_RECORDS,
    EXIT_ENVIRONMENT,
    EXIT_VIOLATIONS,
    LATE,
    LATE_RUNS_PER_KILL_RUNS,
    SLOW_RUN_S,
    SOAK,
    SOAK_CLIENTS,
    SOAK_FAULT_EVERY_S,
)

#: A planned run: its cell (a crash-matrix run), None (a random-kill run) or LATE, and its seed.
Planned = tuple[Cell | str | None, int]


def plan(
    runs: int,
    kill_runs: int,
    seed: int,
    cells: Sequence[Cell],
    late_runs: int = 0,
    soaks: int = 0,
) -> list[Planned]:
    """The runs in order: matrix runs round-robin over the cells (run i has seed + i), then
    the random-kill runs, then the late-retry runs (on a cluster of their own), then the
    fault soak; the matrix runs and the random-kill runs each grouped by how their services
    start (`by_participants`)."""
    matrix_runs: list[Planned] = [
        (cells[number % len(cells)], seed + number) for number in range(runs)
    ]
    kill_runs_planned: list[Planned] = [(None, seed + runs + number) for number in range(kill_runs)]
    # The matrix ends with its unary runs, and the random-kill runs start with theirs: one
    # switch fewer.
    planned = by_participants(matrix_runs) + by_participants(kill_runs_planned, reverse=True)
    for number in range(late_runs):
        planned.append((LATE, seed + runs + kill_runs + number))
    for number in range(soaks):
        planned.append((SOAK, seed + runs + kill_runs + late_runs + number))
    return planned


def by_participants(planned: Sequence[Planned], reverse: bool = False) -> list[Planned]:
    """`planned` in its order, except that runs whose services start alike (`unary_services`)
    come together: batched, then mixed, then unary (`reverse`: the other way round). Switching
    restarts services (2 to 3 s on a busy machine); drawn per run, they would switch every
    third run or so."""

    def mode(item: Planned) -> tuple[int, list[str]]:
        unary = unary_services(*item)
        return len(unary), sorted(unary)

    return sorted(planned, key=mode, reverse=reverse)


def parse_replay(text: str, cells: Sequence[Cell]) -> Planned:
    head, _, seed_text = text.rpartition(":")
    if not seed_text.isdigit():
        raise argparse.ArgumentTypeError(f"--replay {text!r}: end with :SEED")
    if head == "kill":
        return None, int(seed_text)
    if head == LATE:
        return LATE, int(seed_text)
    point, _, component = head.partition(":")
    cell = Cell(point, component)
    if cell not in matrix(include_wal=True):
        known = ", ".join(str(c) for c in cells[:3])
        raise argparse.ArgumentTypeError(
            f"--replay {text!r}: no such point:component (e.g. {known}, ...)"
        )
    return cell, int(seed_text)


async def run_all(
    planned: Sequence[Planned], root: Path, verbose: bool, soak_s: float = 0.0
) -> list[RunResult]:
    session = Session(root)
    session.soak_s = soak_s
    results: list[RunResult] = []
    try:
        for index, (cell, seed) in enumerate(planned, start=1):
            result = await session.run(index, cell, seed)
            results.append(result)
            print(result.line(len(planned)), flush=True)
            if verbose or result.elapsed_s > SLOW_RUN_S:
                print("      " + ", ".join(f"{name} {s:.2f} s" for name, s in result.phases))
            if verbose:
                for record in result.records:
                    retry = f" -> retry {record.retry_outcome}" if record.retry_outcome else ""
                    if record.late_outcome:
                        retry += f" -> late retry {record.late_outcome}"
                    print(f"      {record.order_id}: {record.outcome}{retry} {record.reason[:90]}")
            for rerun in result.reruns:
                print(f"      known limit, not a violation: {rerun}")
            if result.violations or result.environment:
                print_violation(result)
    finally:
        await session.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dtm.chaos",
        description=(
            "Crash matrix, random SIGKILLs and late retries over real processes, with every check."
        ),
        epilog=(
            f"Exit status: 0 when every run passed; {EXIT_VIOLATIONS} with any violation (of "
            "dtm's guarantees, a crash point never reached, a simulator seed failing); "
            f"{EXIT_ENVIRONMENT} with no violation but runs stopped by the environment, not "
            "by dtm (another program took a port a restarted process needed: those runs "
            "checked less, and each replays alone); 2 for a usage error."
        ),
    )
    parser.add_argument("--runs", type=int, default=200, help="crash-matrix runs (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="run i uses seed S + i")
    parser.add_argument(
        "--kill-runs",
        type=int,
        default=None,
        help="random-SIGKILL-under-load runs, after the matrix (default: runs / 10)",
    )
    parser.add_argument(
        "--late-runs",
        type=int,
        default=None,
        help="late-retry runs, after the random-kill runs (default: kill runs / "
        f"{LATE_RUNS_PER_KILL_RUNS})",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"then one fault soak this long: {SOAK_CLIENTS} clients, a SIGKILL every "
        f"{SOAK_FAULT_EVERY_S:g} s, every check after it, Submit latencies reported",
    )
    parser.add_argument("--sim-seeds", type=int, default=0, help="also run the simulator")
    parser.add_argument(
        "--only", action="append", default=[], help="only cells whose point:component contains it"
    )
    parser.add_argument(
        "--replay", default=None, help="POINT:COMPONENT:SEED, kill:SEED or late:SEED"
    )
    parser.add_argument(
        "--data-dir", type=config.path_argument, default=None, help="default: a temp dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    parser.add_argument("--verbose", action="store_true", help="print every order")
    options = parser.parse_args(argv)

    include_wal = wal_points_wired()
    cells = matrix(include_wal)
    if options.only:
        cells = [c for c in cells if any(part in str(c) for part in options.only)]
        if not cells:
            parser.error(f"--only {options.only}: no cell matches")
    if options.replay is not None:
        try:
            planned = [parse_replay(options.replay, cells)]
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    else:
        kill_runs = options.runs // 10 if options.kill_runs is None else options.kill_runs
        late_runs = options.late_runs
        if late_runs is None:
            late_runs = kill_runs // LATE_RUNS_PER_KILL_RUNS
        if options.runs < 0 or kill_runs < 0 or late_runs < 0 or options.soak < 0:
            parser.error("--runs, --kill-runs, --late-runs and --soak must be >= 0")
        soaks = 1 if options.soak > 0 else 0
        runs = options.runs if cells else 0
        planned = plan(runs, kill_runs, options.seed, cells, late_runs, soaks)

    root = options.data_dir or Path(tempfile.mkdtemp(prefix="dtm-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    points = sorted({c.point for c in cells})
    print(
        f"dtm chaos: {len(planned)} real-process runs over {len(cells)} (point, component) "
        f"cells of {len(points)} crash points; data in {root}"
    )
    if not include_wal:
        print("  (wal.* crash points are not wired into dtm/wal/ yet: left out of the matrix)")
    started = time.perf_counter()
    results = asyncio.run(run_all(planned, root, options.verbose, options.soak))
    elapsed = time.perf_counter() - started
    print_summary(results, elapsed)
    written = checkpoints_written(root)
    print(
        f"  checkpoints written: {sum(written.values())} ("
        + ", ".join(f"{n} {name}" for name, n in sorted(written.items()))
        + f"; one every {CHECKPOINT_EVERY_RECORDS} records, so kills meet them)"
    )
    violations = sum(len(result.violations) for result in results)
    unreached = never_reached(results)
    for line in unreached:
        print(f"  NOT TESTED: {line}")
    violations += len(unreached)
    failed_runs = [result for result in results if result.violations]
    if failed_runs:
        print(f"  runs with violations ({len(failed_runs)}), each replays alone:")
        for result in failed_runs:
            print(f"    run {result.index}: {result.replay}")
    # Not dtm's failures, but not passes either: those runs did not check all they should.
    stopped_runs = [result for result in results if result.environment]
    if stopped_runs:
        print(
            f"  runs stopped by the environment, not by dtm ({len(stopped_runs)}; "
            "what to do is above), each replays alone:"
        )
        for result in stopped_runs:
            print(f"    run {result.index}: {result.replay}")
    if options.sim_seeds:
        sim_started = time.perf_counter()
        seeds, sim_violations, note = run_simulator(options.sim_seeds, options.seed)
        if note:
            print(f"simulator: {note}")
        else:
            print(
                f"simulator: {seeds} seeds, {sim_violations} violations "
                f"({time.perf_counter() - sim_started:.0f} s; "
                "its violations are added to the line below)"
            )
        violations += sim_violations
    if not failed_runs and not stopped_runs and not options.keep and options.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    elif failed_runs or stopped_runs:
        print(f"logs kept in {root}")
    environment = sum(len(result.environment) for result in results)
    line, status = verdict(len(results), violations, environment)
    print(line)
    return status
