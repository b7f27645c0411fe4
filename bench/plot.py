"""`make bench-plot`: a small sweep, drawn: latency distributions, and throughput against
clients and against participants, each next to the baselines measured at the same point.

    python -m bench.plot [--clients 1,8,32,64] [--participants 2,4,8] [--duration S]
                         [--warmup S] [--no-baselines] [--results-dir DIR]
    python -m bench.plot --from-json bench/results/sweep.json     # redraw, no run

Writes DIR/sweep.json (every point as the results document bench.run writes for a run of that
point alone: each baseline's failed and stuck calls, dtm's unknown and unfinished ones, the
targets and their verdicts; with a sample of its latencies), then DIR/latency.png,
DIR/throughput_clients.png and DIR/throughput_participants.png. Drawing needs matplotlib
(not a project dependency); without it the sweep is still written and the exit status is 3.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.baselines import BaselineResult, fsync_p50_ms, measure_naive, measure_unary
from bench.harness import LoadSpec
from bench.measure import measure_dtm
from bench.report import RunConfig
from bench.run import (
    CLIENTS_MAX,
    PARTICIPANTS_MAX,
    count_problem,
    directory_problem,
    positive_seconds,
    seconds,
    until_stopped,
)
from bench.stats import Outcome, Tally
from bench.workload import Workload, participants_for
from dtm import grpc_edge

# Quick by default: the sweep has 6-7 points, each starting its own servers.
DURATION_S = 3.0
WARMUP_S = 1.0
# A CDF needs far fewer points than a run has calls; evenly spaced order statistics keep its
# shape and keep sweep.json small.
CDF_POINTS_MAX = 1_000
#: Clients of the participants sweep (the target load of design/performance.md).
PARTICIPANTS_SWEEP_CLIENTS = 64
EXIT_NO_MATPLOTLIB = 3


def _counts(most: int) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of counts, each 1..most (bench.run's limits:
    a point out of them would crash after minutes of sweeping)."""

    def parse(text: str) -> list[int]:
        try:
            values = sorted({int(part) for part in text.split(",") if part.strip()})
        except ValueError:
            message = f"not a comma-separated list of integers: {text}"
            raise argparse.ArgumentTypeError(message) from None
        if not values or values[0] < 1 or values[-1] > most:
            raise argparse.ArgumentTypeError(f"give integers 1..{most}, got {text}")
        return values

    return parse


def latency_sample_ms(tally: Tally) -> list[float]:
    """At most CDF_POINTS_MAX evenly spaced order statistics of the committed latencies."""
    ordered = sorted(tally.latencies[Outcome.COMMITTED])
    if len(ordered) > CDF_POINTS_MAX:
        step = (len(ordered) - 1) / (CDF_POINTS_MAX - 1)
        ordered = [ordered[round(index * step)] for index in range(CDF_POINTS_MAX)]
    return [round(value * 1000.0, 3) for value in ordered]


def _baseline_point(result: BaselineResult | None) -> dict[str, Any] | None:
    """What the drawing reads of a baseline (its rate and latencies; the results document
    of the point has every figure of it)."""
    if result is None:
        return None
    latency = result.latency
    return {
        "per_s": round(result.per_s, 1),
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
        "errors": result.errors,
        "in_flight_at_close": result.in_flight_at_close,
        "failed_after_close": result.failed_after_close,
        "latencies_ms": latency_sample_ms(result.tally),
    }


async def measure_point(
    clients: int,
    participants: int,
    spec_times: tuple[float, float],
    *,
    unary: bool,
    naive: bool,
    fsync_ms: float | None = None,
) -> dict[str, Any]:
    """One point: the results document bench.run writes for a run of this point alone
    (every figure its verdicts read: failed, unknown and unfinished calls, each baseline's
    failed and stuck calls, the targets with their verdicts), plus latency samples."""
    warmup_s, duration_s = spec_times
    spec = LoadSpec(clients, warmup_s, duration_s)
    members = participants_for(participants)
    workload = Workload(members, run_id=f"p{uuid.uuid4().hex[:8]}")
    payload = workload.order(0, 0).request.SerializeToString()
    unary_result = await measure_unary(spec, payload) if unary else None
    naive_result = await measure_naive(participants, spec, payload) if naive else None
    dtm = await measure_dtm(members, spec, workload)
    config = RunConfig(
        participants=participants,
        clients=clients,
        duration_s=duration_s,
        warmup_s=warmup_s,
        baseline_duration_s=duration_s,
        baseline_warmup_s=warmup_s,
        abort_ratio=0.0,
        hot_sku=False,
        mode="sweep",
    )
    results = report.build_results(
        config,
        dtm,
        unary_result,
        naive_result,
        fsync_p50_ms=fsync_ms,
        now=datetime.now(UTC),
        context={},  # the sweep's, once for every point
    )
    return {
        **results,
        "latencies_ms": latency_sample_ms(dtm.tally),
        "unary": _baseline_point(unary_result),
        "naive": _baseline_point(naive_result),
    }


async def sweep(
    clients: list[int],
    participants: list[int],
    times: tuple[float, float],
    baselines: bool,
    participants_clients: int = PARTICIPANTS_SWEEP_CLIENTS,
) -> list[dict[str, Any]]:
    """Clients sweep at 4 participants, then participants sweep at `participants_clients`
    clients; a point both sweeps share is measured once."""
    # As bench.run does, alone before any server starts: the one-client floor needs it.
    fsync_ms = await asyncio.to_thread(fsync_p50_ms) if baselines else None
    points: list[dict[str, Any]] = []
    done: set[tuple[int, int]] = set()
    for count in clients:
        points.append(
            await measure_point(
                count, 4, times, unary=baselines, naive=baselines, fsync_ms=fsync_ms
            )
        )
        done.add((count, 4))
    for count in participants:
        if (participants_clients, count) in done:
            continue
        # The echo baseline does not depend on participants: measured in the clients sweep.
        points.append(
            await measure_point(participants_clients, count, times, unary=False, naive=baselines)
        )
    return points


def scaling(points: list[dict[str, Any]], clients: int) -> float | None:
    """Throughput at the most participants over that at the fewest, at `clients` clients
    (the target: 8 participants keep >= 0.6 x the throughput of 2)."""
    chosen: list[tuple[int, float]] = sorted(
        (int(point["participants"]), float(point["txn_per_s"]))
        for point in points
        if point["clients"] == clients
    )
    if len(chosen) < 2 or chosen[0][1] <= 0:
        return None
    return round(chosen[-1][1] / chosen[0][1], 3)


def draw(document: dict[str, Any], directory: Path) -> list[Path]:
    """The three PNGs; ImportError when matplotlib is missing."""
    # Imported by name at run time: matplotlib is optional, and a static import would make
    # type checking depend on whether this venv happens to have it.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # files only, no display
    plt: Any = importlib.import_module("matplotlib.pyplot")
    points: list[dict[str, Any]] = document["points"]
    sweep_clients: int = document["participants_sweep_clients"]
    by_clients = sorted(
        (point for point in points if point["participants"] == 4), key=lambda p: p["clients"]
    )
    by_participants = sorted(
        (point for point in points if point["clients"] == sweep_clients),
        key=lambda p: p["participants"],
    )
    written: list[Path] = []

    def cdf(axes: Any, latencies: list[float], label: str) -> None:
        if latencies:
            fractions = [(index + 1) / len(latencies) for index in range(len(latencies))]
            axes.plot(latencies, fractions, label=label)

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for point in by_clients:
        count = point["clients"]
        cdf(left, point["latencies_ms"], f"{count} client{'' if count == 1 else 's'}")
    left.set(title="dtm latency, 4 participants", xlabel="latency (ms)", ylabel="fraction <=")
    left.set_xscale("log")
    if by_clients:
        top = by_clients[-1]
        cdf(right, top["latencies_ms"], "dtm")
        for name in ("naive", "unary"):
            if top[name] is not None:
                cdf(right, top[name]["latencies_ms"], {"naive": "naive 2PC", "unary": "echo"}[name])
        right.set(title=f"4 participants, {top['clients']} clients", xlabel="latency (ms)")
        right.set_xscale("log")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    written.append(_save(plt, figure, directory / "latency.png", document))

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [point["clients"] for point in by_clients]
    left.plot(xs, [point["txn_per_s"] for point in by_clients], "o-", label="dtm txn/s")
    for name, label in (("naive", "naive 2PC txn/s"), ("unary", "echo RPC/s")):
        series = [(p["clients"], p[name]["per_s"]) for p in by_clients if p[name] is not None]
        if series:
            left.plot(*zip(*series, strict=True), "s--", label=label)
    left.set(title="throughput, 4 participants", xlabel="clients", ylabel="per second")
    right.plot(xs, [point["p99_ms"] for point in by_clients], "o-", label="dtm p99")
    right.plot(xs, [point["p50_ms"] for point in by_clients], "o:", label="dtm p50")
    right.set(title="latency, 4 participants", xlabel="clients", ylabel="ms")
    left.set_yscale("log")  # the echo runs an order of magnitude above the rest
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        if xs:
            axes.set_xticks(xs, [str(x) for x in xs])
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    written.append(_save(plt, figure, directory / "throughput_clients.png", document))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    xs = [point["participants"] for point in by_participants]
    axes.plot(xs, [point["txn_per_s"] for point in by_participants], "o-", label="dtm txn/s")
    series = [(p["participants"], p["naive"]["per_s"]) for p in by_participants if p["naive"]]
    if series:
        axes.plot(*zip(*series, strict=True), "s--", label="naive 2PC txn/s")
    ratio = scaling(points, sweep_clients)
    title = f"throughput, {sweep_clients} clients"
    if ratio is not None:
        title += f" (most/fewest participants: {ratio:g})"
    axes.set(title=title, xlabel="participants", ylabel="per second")
    if xs:
        axes.set_xticks(xs, [str(x) for x in xs])
    axes.grid(True, alpha=0.3)
    axes.legend()
    written.append(_save(plt, figure, directory / "throughput_participants.png", document))
    return written


def _save(plt: Any, figure: Any, path: Path, document: dict[str, Any]) -> Path:
    commit = (document.get("git_commit") or "?")[:10]
    figure.suptitle(
        f"dtm bench sweep {document['timestamp']} (commit {commit}, "
        f"{document.get('cpu_count')} CPUs, {document['duration_s']:g} s per point)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def read_sweep(path: Path) -> dict[str, Any]:
    """The sweep.json at `path`, for --from-json; ValueError saying what it is not (a file
    that is not JSON, or another document, ended in a traceback once the options were taken)."""
    try:
        document: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read it as JSON: {error}") from None
    points = document.get("points") if isinstance(document, dict) else None
    if (
        not isinstance(points, list)
        or not all(isinstance(point, dict) for point in points)
        or "scaling_most_vs_fewest_participants" not in document
    ):
        raise ValueError(
            'not a sweep of bench.plot (a JSON object with its "points"; the latest.json of '
            "bench.run is one run, not a sweep)"
        )
    checked: dict[str, Any] = document
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plot", description="Sweep clients and participants; draw PNGs."
    )
    parser.add_argument(
        "--clients",
        type=_counts(CLIENTS_MAX),
        default=[1, 8, 32, 64],
        help="client counts of the clients sweep, comma-separated (default: 1,8,32,64; "
        "4 participants)",
    )
    parser.add_argument(
        "--participants",
        type=_counts(PARTICIPANTS_MAX),
        default=[2, 4, 8],
        help="participant counts of the participants sweep, comma-separated (default: 2,4,8)",
    )
    parser.add_argument(
        "--participants-clients",
        type=int,
        default=PARTICIPANTS_SWEEP_CLIENTS,
        help=f"clients of the participants sweep (default: {PARTICIPANTS_SWEEP_CLIENTS})",
    )
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        default=DURATION_S,
        help=f"measured window of each point, seconds (default: {DURATION_S:g})",
    )
    parser.add_argument(
        "--warmup",
        type=seconds,
        default=WARMUP_S,
        help=f"seconds before each point's window opens (default: {WARMUP_S:g})",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="measure dtm only at each point (no unary echo or naive 2PC)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=report.RESULTS_DIR,
        help=f"where sweep.json and the PNGs go (default: {report.RESULTS_DIR})",
    )
    parser.add_argument("--from-json", type=Path, help="redraw a sweep.json without running")
    options = parser.parse_args(argv)
    # Every option before any point is measured: a sweep takes minutes.
    problem = count_problem("--participants-clients", options.participants_clients, CLIENTS_MAX)
    if problem:
        parser.error(problem)
    directory: Path = options.results_dir
    problem = directory_problem(directory)
    if problem:
        parser.error(f"--results-dir: {problem}")
    if options.from_json is not None and not options.from_json.is_file():
        parser.error(f"--from-json: no such file: {options.from_json}")
    if options.from_json is not None:
        try:
            document = read_sweep(options.from_json)
        except ValueError as problem:
            parser.error(f"--from-json: {options.from_json}: {problem}")
    else:
        grpc_edge.use_fast_event_loop()
        try:
            points = asyncio.run(
                until_stopped(
                    sweep(
                        options.clients,
                        options.participants,
                        (options.warmup, options.duration),
                        not options.no_baselines,
                        options.participants_clients,
                    )
                )
            )
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; every process the sweep started was stopped", file=sys.stderr)
            return 2
        document = {
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "participants_sweep_clients": options.participants_clients,
            "points": points,
            "scaling_most_vs_fewest_participants": scaling(points, options.participants_clients),
            **report.environment(),
        }
        (directory / "sweep.json").write_text(json.dumps(document, indent=1) + "\n")
    for point in document["points"]:
        unary = point["unary"]["per_s"] if point["unary"] else None
        naive = point["naive"]["per_s"] if point["naive"] else None
        # What voids the point's verdicts, as latest.json's notes say it.
        own, baselines = report.troubles(point)
        troubles = ", ".join(own + baselines["naive"] + baselines["unary"])
        print(
            f"clients {point['clients']:>4}  participants {point['participants']:>2}  "
            f"txn/s {point['txn_per_s']:>8,.1f}  p50 {point['p50_ms']} ms  p99 {point['p99_ms']} ms"
            f"  naive {naive}  echo {unary}  violations {point['violations']}"
            + (f"  (troubles: {troubles})" if troubles else "")
        )
    ratio = document["scaling_most_vs_fewest_participants"]
    print(f"throughput at the most participants / at the fewest: {ratio}")
    try:
        written = draw(document, directory)
    except ImportError:
        print(
            f"matplotlib is not installed: the sweep is in {directory / 'sweep.json'}; "
            "pip install matplotlib, then: python -m bench.plot --from-json "
            f"{directory / 'sweep.json'}",
            file=sys.stderr,
        )
        return EXIT_NO_MATPLOTLIB
    for path in written:
        print(f"wrote {path}")
    violations = [point["violations"] for point in document["points"]]
    return 0 if all(count == 0 for count in violations) else 1


if __name__ == "__main__":
    sys.exit(main())
