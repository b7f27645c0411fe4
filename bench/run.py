"""`make bench`: dtm's throughput and latency against two baselines measured in the same run.

    python -m bench.run [--participants N] [--clients C] [--duration S] [--warmup S]
                        [--abort-ratio R] [--hot-sku] [--unary-participants] [--quick | --full]
                        [--no-baselines] ...

In order: (a) a raw unary gRPC echo, (b) a naive 2PC shape (client -> coordinator -> N echo
participants, nothing logged), then dtm itself (the coordinator and N participants as separate
processes with durable logs); every one driven by the same C closed-loop clients. Then the
summary table on stdout, bench/results/latest.json and a timestamped copy. Absolute figures
drift on shared machines: compare the ratios, which come from one run on one box.

Exit status: 0 when the final state passed the invariant check, 1 when it had violations or
could not be checked, 2 when the run itself failed or an option was wrong (checked before
anything runs).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench import report
from bench.baselines import BaselineResult, fsync_p50_ms, measure_naive, measure_unary
from bench.harness import LoadSpec
from bench.measure import DtmResult, measure_dtm
from bench.report import RunConfig
from bench.workload import Workload, participants_for
from dtm import grpc_edge, limits


@dataclass(frozen=True)
class Preset:
    duration_s: float
    warmup_s: float
    baseline_duration_s: float
    baseline_warmup_s: float


# quick: ~30 s in all on a 2-core box (about 4 s to start the cluster, 1-2 s per baseline's
# servers, 1-2 s to settle and check); full: windows long enough for stable p99s.
PRESETS = {
    "quick": Preset(duration_s=8.0, warmup_s=2.0, baseline_duration_s=4.0, baseline_warmup_s=1.0),
    "full": Preset(duration_s=30.0, warmup_s=5.0, baseline_duration_s=15.0, baseline_warmup_s=3.0),
}
DURATION_S_MAX = 3_600.0
PARTICIPANTS_MAX = limits.BRANCHES_PER_TRANSACTION_MAX
CLIENTS_MAX = limits.TRANSACTIONS_IN_FLIGHT_MAX
SUBMIT_BATCH_IN_FLIGHT_MAX = 64
T = TypeVar("T")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a warmup, 0..DURATION_S_MAX seconds (no NaN, no infinity)."""
    value = float(text)
    if not 0.0 <= value <= DURATION_S_MAX:
        raise argparse.ArgumentTypeError(f"must be within [0, {DURATION_S_MAX:g}] s, got {value}")
    return value


#: The shortest measured window. Any positive number passed once, but the window's bounds are
#: float sums of a clock reading (`start + warmup + duration`): 1e-13 s added nothing to it,
#: the window was empty and the run failed after it had started (found by a bug hunt).
WINDOW_S_MIN = 0.001


def positive_seconds(text: str) -> float:
    """An argparse type: a measured window, WINDOW_S_MIN..DURATION_S_MAX seconds."""
    value = seconds(text)
    if value < WINDOW_S_MIN:
        raise argparse.ArgumentTypeError(f"must be at least {WINDOW_S_MIN:g} s, got {value:g}")
    return value


def count_problem(name: str, value: int, most: int) -> str | None:
    """What is wrong with `value` as a count of `name` (1..most), or None."""
    return None if 1 <= value <= most else f"{name} must be 1..{most}, got {value}"


def directory_problem(path: Path, *, empty: bool = False) -> str | None:
    """What keeps `path` from being a directory the bench writes into (created when missing;
    `empty`: it must hold nothing yet), or None. Checked before the run, not after it."""
    return directories_problem([("", path, empty)])


def directories_problem(directories: Sequence[tuple[str, Path, bool]]) -> str | None:
    """What keeps one of `directories` ((flag, path, empty) each) from being a directory the
    bench writes into, as "FLAG: problem" (the flag empty: no prefix), or None. All are
    checked before any is created: --data-dir was made before --results-dir was found
    unusable (found by a bug hunt); the directories made here are removed again when a later
    one cannot be made."""
    for flag, path, empty in directories:
        problem = _directory_problem_now(path, empty)
        if problem:
            return f"{flag}: {problem}" if flag else problem
    made: list[tuple[Path, Path]] = []
    for flag, path, _ in directories:
        top = _first_missing(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if top is not None:
                made.append((top, path))
            with tempfile.NamedTemporaryFile(dir=path, prefix=".dtm-bench-check-"):
                pass
        except OSError as error:
            for top_made, deepest in reversed(made):
                _remove_empty(top_made, deepest)
            problem = f"cannot write in {path}: {error.strerror or error}"
            return f"{flag}: {problem}" if flag else problem
    return None


def _directory_problem_now(path: Path, empty: bool) -> str | None:
    """What is wrong with `path` as it is now, creating nothing."""
    try:
        if path.exists() and not path.is_dir():
            return f"{path} is not a directory"
        if empty and path.is_dir() and any(path.iterdir()):
            return f"{path} is not empty"
        existing = path.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"cannot write in {path}: {existing} is not a directory"
    except OSError as error:
        return f"cannot write in {path}: {error.strerror or error}"
    return None


def _first_missing(path: Path) -> Path | None:
    """The topmost directory of `path` that does not exist yet (what mkdir makes), or None."""
    missing = None
    for candidate in [path.absolute(), *path.absolute().parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_empty(top: Path, deepest: Path) -> None:
    """Remove the (empty) directories from `deepest` up to `top`, which this check made."""
    current = deepest.absolute()
    while True:
        try:
            current.rmdir()
        except OSError:
            return
        if current == top or current == current.parent:
            return
        current = current.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark dtm against a unary echo and a naive 2PC, in the same run.",
    )
    parser.add_argument(
        "--participants",
        type=int,
        default=4,
        help=f"branches per transaction, 1..{limits.BRANCHES_PER_TRANSACTION_MAX} (default 4: "
        "inventory, orders, payment, notification; fewer keeps the first N; more adds extra "
        "instances of the services, inventory-2, orders-2, ...)",
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="mode", action="store_const", const="quick", help="~30 s (default)"
    )
    mode.add_argument(
        "--full", dest="mode", action="store_const", const="full", help="longer windows"
    )
    parser.set_defaults(mode="quick")
    parser.add_argument("--duration", type=positive_seconds, help="measured window of dtm, seconds")
    parser.add_argument("--warmup", type=seconds, help="seconds before the window opens")
    parser.add_argument("--baseline-duration", type=positive_seconds, help="each baseline's window")
    parser.add_argument("--baseline-warmup", type=seconds, help="each baseline's warmup")
    parser.add_argument(
        "--abort-ratio",
        type=_fraction,
        default=0.0,
        help="fraction of orders made to abort (declining card, or an empty SKU without "
        "payment); default 0",
    )
    parser.add_argument(
        "--hot-sku", action="store_true", help="every order on one SKU (contention scenario)"
    )
    parser.add_argument(
        "--submit-batch",
        type=int,
        default=0,
        metavar="K",
        help="clients submit through SubmitBatch (a gateway's shape: the clients of a channel "
        "share its calls), at most K calls in flight per channel; default 0: one Submit per "
        "transaction, the shape the targets and the baselines describe",
    )
    parser.add_argument(
        "--unary-participants",
        action="store_true",
        help="the services register without the batch capability (their --no-batch), so the "
        "coordinator sends them one unary Prepare, Commit or Rollback each, as to a "
        "participant outside the SDK; default: batched Exchange calls",
    )
    parser.add_argument("--no-baselines", action="store_true", help="measure dtm only")
    parser.add_argument(
        "--results-dir", type=Path, default=report.RESULTS_DIR, help="where the JSON goes"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="servers' data (default: a fresh temporary directory)"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-metrics",
        action="store_true",
        help="do not scrape the servers' /metrics (fsyncs and messages per txn then n/a)",
    )
    options = parser.parse_args(argv)
    for problem in (
        count_problem("--participants", options.participants, PARTICIPANTS_MAX),
        count_problem("--clients", options.clients, CLIENTS_MAX),
    ):
        if problem:
            parser.error(problem)
    if not 0 <= options.submit_batch <= SUBMIT_BATCH_IN_FLIGHT_MAX:
        parser.error(
            f"--submit-batch must be 0..{SUBMIT_BATCH_IN_FLIGHT_MAX}, got {options.submit_batch}"
        )
    # Both before anything runs: a bad directory would otherwise fail the run after the
    # baselines (--data-dir), or after all of it, losing its results (--results-dir).
    # --data-dir must be empty: old logs would be recovered into the run and their orders
    # checked with it.
    directories = [("--results-dir", options.results_dir, False)]
    if options.data_dir is not None:
        directories.insert(0, ("--data-dir", options.data_dir, True))
    problem = directories_problem(directories)
    if problem:
        parser.error(problem)
    return options


def run_config(options: argparse.Namespace) -> RunConfig:
    preset = PRESETS[options.mode]

    def pick(value: float | None, default: float) -> float:
        return default if value is None else value

    return RunConfig(
        participants=options.participants,
        clients=options.clients,
        # parse_args rejects a window of 0 s (and the presets have none).
        duration_s=pick(options.duration, preset.duration_s),
        warmup_s=pick(options.warmup, preset.warmup_s),
        baseline_duration_s=pick(options.baseline_duration, preset.baseline_duration_s),
        baseline_warmup_s=pick(options.baseline_warmup, preset.baseline_warmup_s),
        abort_ratio=options.abort_ratio,
        hot_sku=options.hot_sku,
        submit_batch=options.submit_batch,
        unary_participants=options.unary_participants,
        # A preset's name no longer describes the run once its windows are overridden.
        mode=options.mode if options.duration is None and options.warmup is None else "custom",
    )


@dataclass
class Measurements:
    dtm: DtmResult
    unary: BaselineResult | None
    naive: BaselineResult | None
    fsync_p50_ms: float | None = None


async def measure(
    config: RunConfig,
    *,
    baselines: bool = True,
    data_dir: Path | None = None,
    keep_data: bool = False,
    progress: bool = True,
    metrics: bool = True,
) -> Measurements:
    """The three measurements, one after the other, each with its own processes stopped before
    the next starts, so they never share the CPU with one another."""
    participants = participants_for(config.participants)
    # Run-unique order ids: two runs never collide, even on a kept data directory.
    workload = Workload(
        participants,
        run_id=f"b{uuid.uuid4().hex[:8]}",
        abort_ratio=config.abort_ratio,
        hot_sku=config.hot_sku,
    )
    baseline_spec = LoadSpec(config.clients, config.baseline_warmup_s, config.baseline_duration_s)
    # The baselines carry a real order's bytes, so their payloads match dtm's.
    payload = workload.order(0, 0).request.SerializeToString()
    unary = naive = None
    fsync_ms = None
    if baselines:
        # On the file system of the servers' logs (the default data dir is a temporary one).
        scratch = data_dir.parent if data_dir is not None and data_dir.parent.is_dir() else None
        fsync_ms = await asyncio.to_thread(fsync_p50_ms, scratch)
        unary = await measure_unary(baseline_spec, payload, progress=progress)
        naive = await measure_naive(config.participants, baseline_spec, payload, progress=progress)
    dtm = await measure_dtm(
        participants,
        LoadSpec(config.clients, config.warmup_s, config.duration_s),
        workload,
        data_dir=data_dir,
        keep_data=keep_data,
        progress=progress,
        metrics=metrics,
        submit_batch=config.submit_batch,
        unary_participants=config.unary_participants,
    )
    return Measurements(dtm=dtm, unary=unary, naive=naive, fsync_p50_ms=fsync_ms)


async def until_stopped(work: Awaitable[T]) -> T:
    """Await `work`, cancelling it on SIGTERM or SIGINT, so that its `finally` blocks stop
    every server it started (they run in their own sessions: no signal reaches them)."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def results_of(config: RunConfig, measured: Measurements) -> dict[str, Any]:
    return report.build_results(
        config,
        measured.dtm,
        measured.unary,
        measured.naive,
        fsync_p50_ms=measured.fsync_p50_ms,
        now=datetime.now(UTC),
        context=report.environment(),
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    config = run_config(options)
    # The servers run uvloop when it is installed; so do the clients, for the same reason.
    grpc_edge.use_fast_event_loop()
    started = time.monotonic()
    try:
        measured = asyncio.run(
            until_stopped(
                measure(
                    config,
                    baselines=not options.no_baselines,
                    data_dir=options.data_dir,
                    keep_data=options.keep_data,
                    progress=not options.no_progress,
                    metrics=not options.no_metrics,
                )
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process the bench started was stopped", file=sys.stderr)
        return 2
    except Exception as error:  # the run failed: say why, in one place, and exit 2
        print(f"bench failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    results = results_of(config, measured)
    results["wall_s"] = round(time.monotonic() - started, 1)
    # The table first: should the disk fail the JSON now, the run is still on the screen.
    print(report.format_table(results))
    try:
        latest, copy = report.write_results(results, options.results_dir)
    except OSError as error:
        print(
            f"bench: could not write the results to {options.results_dir}: {error}", file=sys.stderr
        )
        return 2
    print(f"\nresults: {latest} (and {copy.name}); wall time {results['wall_s']:g} s")
    violations = results["violations"]
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
