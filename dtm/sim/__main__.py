"""python -m dtm.sim: run many seeds, or replay one with its trace.

    python -m dtm.sim --seeds 500 [--start N] [--verbose]
    python -m dtm.sim --seed N --trace
    python -m dtm.sim --seeds 500 --forgetful   # small windows of finished transactions

With --forgetful, the coordinator keeps only its last few finished transactions (and the
participants, in some seeds, their last few decided branches), so late retries run new
attempts. Outcomes README documents as limits of such retries are not violations; how often
each happened is printed ("sim: documented limits").

The last line is always "sim: <n> seeds, <violations> violations"; the exit status is 1 when
there was any violation.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from dtm.sim.world import STEPS_MAX_DEFAULT, InvariantViolation, NodeModel, RunResult, run_seed

PROGRESS_EVERY = 100


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtm.sim", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--trace", action="store_true", help="print every step (with --seed)")
    parser.add_argument("--verbose", action="store_true", help="one line per seed")
    parser.add_argument("--steps-max", type=int, default=STEPS_MAX_DEFAULT)
    parser.add_argument(
        "--coverage", action="store_true", help="count how often each protocol path ran"
    )
    parser.add_argument(
        "--stale-delivery",
        action="store_true",
        help="let a request sent before a crash reach the restarted node (harsher than gRPC)",
    )
    parser.add_argument(
        "--sdk-error-replies",
        action="store_true",
        help="reproduce a fixed SDK bug: answer errors (such as 'already committed') before the "
        "record they reveal is durable, as participants/branches.py once did",
    )
    parser.add_argument(
        "--wall-clock-timers",
        action="store_true",
        help="reproduce fixed engine and SDK bugs: the transaction timer, the prepares' "
        "timeouts, leases and inquiry delays compare the wall clock, which steps",
    )
    parser.add_argument(
        "--forgetful",
        action="store_true",
        help="the coordinator forgets finished transactions beyond a small window (and, in "
        "some seeds, participants their decided branches): late retries run new attempts",
    )
    options = parser.parse_args(argv)
    model = NodeModel(
        error_reply_waits_for_durability=not options.sdk_error_replies,
        intervals_on_monotonic_clock=not options.wall_clock_timers,
    )
    if options.seed is not None:
        seeds = range(options.seed, options.seed + 1)
    else:
        seeds = range(options.start, options.start + options.seeds)
    trace = print if options.trace else None

    started = time.perf_counter()
    violations: list[InvariantViolation] = []
    totals: dict[str, int] = {}
    coverage: dict[str, int] = {}
    limits: dict[str, int] = {}
    for n, seed in enumerate(seeds, 1):
        try:
            result = run_seed(
                seed,
                steps_max=options.steps_max,
                model=model,
                stale_delivery=options.stale_delivery,
                trace=trace,
                forgetful=options.forgetful,
            )
        except InvariantViolation as violation:
            violations.append(violation)
            print(violation.report() if not options.trace else str(violation), flush=True)
            continue
        _add(totals, result)
        for path, count in result.coverage:
            coverage[path] = coverage.get(path, 0) + count
        for what, count in result.limits:
            limits[what] = limits.get(what, 0) + count
        if options.verbose or options.seed is not None:
            print(result, flush=True)
        elif n % PROGRESS_EVERY == 0:
            elapsed = time.perf_counter() - started
            print(f"sim: {n} seeds in {elapsed:.1f} s, {len(violations)} violations", flush=True)
    elapsed = time.perf_counter() - started
    if totals:
        summary = ", ".join(f"{name} {value}" for name, value in totals.items())
        print(f"sim: totals: {summary}; {elapsed:.1f} s")
    if limits:
        for what, count in sorted(limits.items()):
            print(f"sim: documented limits: {count:>7}  {what}")
    elif totals:
        print("sim: documented limits: none reached")
    if options.coverage:
        for path, count in sorted(coverage.items()):
            print(f"sim: coverage: {count:>7}  {path}")
    if violations:
        print("sim: failing seeds: " + " ".join(str(v.seed) for v in violations))
    print(f"sim: {len(seeds)} seeds, {len(violations)} violations")
    return 1 if violations else 0


def _add(totals: dict[str, int], result: RunResult) -> None:
    for name in (
        "transactions",
        "committed",
        "aborted",
        "unknown",
        "unanswered",
        "resubmits",
        "crashes",
        "clock_steps",
        "drops",
        "duplicates",
        "messages",
        "steps",
    ):
        totals[name] = totals.get(name, 0) + getattr(result, name)


if __name__ == "__main__":
    sys.exit(main())
