"""The results document of a run, its JSON files, and the summary table.

`build_results` turns measurements into one flat JSON-able dict (the keys `REQUIRED_KEYS`
lists, plus context); `write_results` stores it as bench/results/latest.json and a copy named
by its UTC timestamp; `format_table` is what a person reads.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import footprint, hooks
from bench.baselines import BaselineResult
from bench.hooks import LOAD_GENERATOR
from bench.measure import DtmResult
from bench.procs import PROJECT_ROOT
from bench.stats import Outcome

RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
# Names of the timestamped copies: at most one per second, with a bounded suffix on collision.
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
SAME_SECOND_COPIES_MAX = 100

#: Every key a results file has, with the types its value may take (None: not measured).
REQUIRED_KEYS: Mapping[str, tuple[type, ...]] = {
    "timestamp": (str,),
    "participants": (int,),
    "clients": (int,),
    "duration_s": (float,),
    "txn_per_s": (float,),
    "aborted_per_s": (float,),
    "p50_ms": (float, type(None)),
    "p95_ms": (float, type(None)),
    "p99_ms": (float, type(None)),
    "max_ms": (float, type(None)),
    "unary_rpc_per_s": (float, type(None)),
    "unary_p50_ms": (float, type(None)),
    "naive_txn_per_s": (float, type(None)),
    "naive_p50_ms": (float, type(None)),
    "ratio_vs_unary": (float, type(None)),
    "ratio_vs_naive": (float, type(None)),
    "fsyncs_per_txn": (float, type(None)),
    "messages_per_txn": (float, type(None)),
    "violations": (int, type(None)),
}


@dataclass(frozen=True)
class RunConfig:
    participants: int
    clients: int
    duration_s: float
    warmup_s: float
    baseline_duration_s: float
    baseline_warmup_s: float
    abort_ratio: float
    hot_sku: bool
    mode: str
    # > 0: clients submit through SubmitBatch, this many calls in flight per channel.
    submit_batch: int = 0
    # The services register without the batch capability: the coordinator sends them unary
    # Prepare, Commit and Rollback (the plain contract's path), not Exchange calls.
    unary_participants: bool = False


def environment() -> dict[str, Any]:
    """Where the figures come from: they only compare within one run on one box."""
    commit = _git("rev-parse", "HEAD")
    # --no-optional-locks: status must not refresh (write) the index of a tree others use.
    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status.strip()),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "event_loop": loop,
        "argv": sys.argv[1:],
    }


def _git(*args: str) -> str | None:
    # Read-only git commands; no git (or not a checkout) simply leaves the field null.
    try:
        completed = subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def _rate(value: float) -> float:
    return round(value, 1)


def targets(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The targets of design/performance.md that this run's configuration can speak to."""
    found: dict[str, dict[str, Any]] = {}

    batched = bool(results.get("submit_batch"))

    def add(name: str, goal: str, value: float | None, met: bool | None) -> None:
        found[name] = {"goal": goal, "value": value, "met": met}
        if batched:
            # The targets and the baselines describe one client call per transaction.
            found[name].update(met=None, note="not judged: the clients batched their Submits")

    # design/performance.md states every target for 4 participants, every log durable, and
    # the workload's own orders (none made to abort, no hot SKU); the throughput, p99 and
    # ratio targets at 64 clients, the p50 one at one client.
    standard = (
        results["participants"] == 4 and not results["abort_ratio"] and not results["hot_sku"]
    )
    at_target_load = standard and results["clients"] == 64
    elsewhere = (
        "not judged: the target is for 4 participants, {}, no orders made to abort, no hot SKU"
    )

    def add_where(
        name: str, goal: str, value: float, met: bool, judged: bool, clients: str
    ) -> None:
        add(name, goal, value, met if judged else None)
        if not judged and not batched:
            found[name]["note"] = elsewhere.format(clients)

    if at_target_load:
        txn = results["txn_per_s"]
        add("throughput", ">= 1000 committed txn/s (64 clients, 4 participants)", txn, txn >= 1000)
        p99 = results["p99_ms"]
        # Committed calls only, but the calls the window left open must meet it too.
        all_p99 = results.get("all_calls_p99_ms")
        add(
            "p99",
            "<= 100 ms (64 clients, 4 participants)",
            p99,
            None if p99 is None else p99 <= 100 and (all_p99 is None or all_p99 <= 100),
        )
        if p99 is not None and p99 <= 100 and all_p99 is not None and all_p99 > 100:
            # The row shows the committed p99: say which figure missed.
            found["p99"]["note"] = f"NOT met: the p99 of all calls is {all_p99:,.1f} ms"
    vs_unary = results["ratio_vs_unary"]
    if vs_unary is not None:
        add_where(
            "ratio_vs_unary", ">= 0.4", vs_unary, vs_unary >= 0.4, at_target_load, "64 clients"
        )
    vs_naive = results["ratio_vs_naive"]
    if vs_naive is not None:
        add_where("ratio_vs_naive", ">= 4", vs_naive, vs_naive >= 4, at_target_load, "64 clients")
    p50_ratio = results["p50_vs_unary_p50"]
    if results["clients"] == 1 and p50_ratio is not None:
        add_where(
            "p50_one_client",
            "p50 <= 2.5 x unary p50 (1 client, 4 participants)",
            p50_ratio,
            p50_ratio <= 2.5,
            standard,
            "one client",
        )
    own, baselines = troubles(results)
    against = {"ratio_vs_unary": "unary", "ratio_vs_naive": "naive", "p50_one_client": "unary"}
    for name, target in found.items():
        reasons = own + (baselines[against[name]] if name in against else [])
        if reasons and not batched:
            target.update(met=None, note="not judged: " + ", ".join(reasons))
    return found


def troubles(results: Mapping[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """What voids a run's verdicts: its own troubles, and each baseline's (by prefix, "unary"
    and "naive"), each as "N what". Keys a results document lacks count as none."""
    # Errors, unknown outcomes and unexpected aborts are calls the committed figures leave
    # out: a run that had them cannot claim its throughput or its latency met a target. Nor
    # can a run whose final state broke the invariants, or was never checked: its figures
    # may be of transactions that did not do what they claimed.
    own = [
        f"{results[key]:,} {what}"
        for key, what in (
            ("errors", "failed calls in the window"),
            ("unknown", "unknown outcomes in the window"),
            ("unexpected_outcomes", "unexpected outcomes in the run"),
            ("violations", "invariant violations"),
        )
        if results.get(key)
    ]
    if "violations" in results and results["violations"] is None:
        own.append("final state not checked")
    # A baseline's failed calls are missing from its rate (and its latencies), so the ratio to
    # it comes out larger than it is: its failures void the verdicts measured against it.
    # Calls in flight at its close are normal in a closed loop (one per client, about), but
    # one that failed in the end was stuck past the window, where its error count misses it.
    baselines = {
        prefix: [
            f"{results[key]:,} {what}"
            for key, what in (
                (f"{prefix}_errors", f"failed calls in the {name} baseline's window"),
                (
                    f"{prefix}_failed_after_close",
                    f"calls of the {name} baseline stuck past its window (failed after it)",
                ),
            )
            if results.get(key)
        ]
        for prefix, name in (("unary", "unary echo"), ("naive", "naive 2PC"))
    }
    return own, baselines


def cpu_vs_load_generator(cpu_ms: Mapping[str, float] | None) -> dict[str, float] | None:
    """Each server's CPU per transaction divided by the load generator's, in the same run.

    The load generator does the same work for every transaction in every run, so the ratio
    cancels the machine's speed, which drifts between runs on a shared box by more than most
    changes of the code move throughput. A change that makes a server cheaper shows here."""
    if not cpu_ms:
        return None
    load = cpu_ms.get(LOAD_GENERATOR)
    if not load:
        return None
    return {name: round(ms / load, 2) for name, ms in cpu_ms.items() if name != LOAD_GENERATOR}


def one_client_floor(
    clients: int, unary_p50_ms: float | None, fsync_p50_ms: float | None
) -> dict[str, float | None]:
    """What a durable two-phase commit cannot beat with one client in flight, from this run's
    baselines: two round trips (the client's call, then the prepare fan-out) and two forced
    writes (the participant's prepare record before its vote, the coordinator's decision
    before its answer), one after the other. Phase 2 is off the client's path."""
    if clients != 1 or unary_p50_ms is None or fsync_p50_ms is None:
        return {"one_client_floor_ms": None, "one_client_floor_vs_unary_p50": None}
    floor = round(2 * unary_p50_ms + 2 * fsync_p50_ms, 3)
    return {
        "one_client_floor_ms": floor,
        "one_client_floor_vs_unary_p50": ratio(floor, unary_p50_ms),
    }


def build_results(
    config: RunConfig,
    dtm: DtmResult,
    unary: BaselineResult | None,
    naive: BaselineResult | None,
    *,
    now: datetime,
    context: Mapping[str, Any],
    fsync_p50_ms: float | None = None,
) -> dict[str, Any]:
    tally = dtm.tally
    committed = tally.latency(Outcome.COMMITTED)
    aborted = tally.latency(Outcome.ABORTED)
    any_outcome = tally.latency(*Outcome)
    all_calls = tally.all_calls()
    answered = tally.latency(Outcome.COMMITTED, Outcome.ABORTED)
    handling = dtm.costs.submit_handling_ms_mean
    txn_per_s = _rate(tally.rate(Outcome.COMMITTED))
    unary_per_s = _rate(unary.per_s) if unary is not None else None
    naive_per_s = _rate(naive.per_s) if naive is not None else None
    unary_p50 = unary.latency.p50_ms if unary is not None else None
    transactions = dtm.transactions_total
    results: dict[str, Any] = {
        "timestamp": now.astimezone(UTC).isoformat(timespec="seconds"),
        "mode": config.mode,
        "participants": config.participants,
        "participant_names": [participant.name for participant in dtm.participants],
        "clients": config.clients,
        "duration_s": round(tally.window_s, 3),
        "warmup_s": float(config.warmup_s),
        "abort_ratio": config.abort_ratio,
        "hot_sku": config.hot_sku,
        "submit_batch": config.submit_batch,
        # How the coordinator reached the participants, as they registered (measure.py
        # reads it from the coordinator): "batched", "unary", "mixed"; None when not read.
        "participant_path": dtm.participant_path,
        "txn_per_s": txn_per_s,
        "aborted_per_s": _rate(tally.rate(Outcome.ABORTED)),
        "unknown_per_s": _rate(tally.rate(Outcome.UNKNOWN)),
        "errors_per_s": _rate(tally.rate(Outcome.ERROR)),
        "committed": tally.counts[Outcome.COMMITTED],
        "aborted": tally.counts[Outcome.ABORTED],
        "unknown": tally.counts[Outcome.UNKNOWN],
        "errors": tally.counts[Outcome.ERROR],
        "transactions_total": transactions,
        "p50_ms": committed.p50_ms,
        "p95_ms": committed.p95_ms,
        "p99_ms": committed.p99_ms,
        "max_ms": committed.max_ms,
        "mean_ms": committed.mean_ms,
        "answered_mean_ms": answered.mean_ms,
        "submit_handling_ms_mean": handling,
        "before_handler_ms_mean": (
            round(answered.mean_ms - handling, 2)
            if answered.mean_ms is not None and handling is not None
            else None
        ),
        # The p50..max above are of committed calls answered in the window. These are of
        # every call answered in it, whatever its outcome (aborted, unknown, failed)...
        "any_outcome_p99_ms": any_outcome.p99_ms,
        "any_outcome_max_ms": any_outcome.max_ms,
        # ...and of those plus the calls still in flight when it closed, counted until then.
        "all_calls": all_calls.count,
        "all_calls_p50_ms": all_calls.p50_ms,
        "all_calls_p99_ms": all_calls.p99_ms,
        "all_calls_max_ms": all_calls.max_ms,
        "in_flight_at_close": len(tally.open_at_close),
        "in_flight_at_close_took_max_ms": (
            round(max(tally.open_at_close_took) * 1000.0, 3) if tally.open_at_close_took else None
        ),
        "aborted_p50_ms": aborted.p50_ms,
        "aborted_p99_ms": aborted.p99_ms,
        "unexpected_outcomes": dtm.unexpected,
        "unexpected_reasons": dtm.unexpected_reasons,
        "fsyncs_per_txn": dtm.costs.fsyncs_per_txn,
        "messages_per_txn": dtm.costs.messages_per_txn,
        "server_counters": dtm.costs.note,
        "fsyncs_per_txn_by_process": dtm.costs.fsyncs_by_process,
        "wal_batch_mean_by_process": dtm.costs.wal_batch_mean,
        "coordinator_messages_per_txn_by_kind": dtm.costs.messages_by_kind,
        "cpu_ms_per_txn": dtm.costs.cpu_ms_per_txn,
        "cpu_ms_per_txn_by_process": dtm.costs.cpu_ms_by_process,
        "cpu_vs_load_generator": cpu_vs_load_generator(dtm.costs.cpu_ms_by_process),
        "batch_items_per_call": dtm.costs.items_per_call,
        "checkpoints_by_process": dtm.costs.checkpoints,
        "gc_pauses_by_process": dtm.costs.gc_pauses,
        "baseline_duration_s": (round(unary.tally.window_s, 3) if unary is not None else None),
        "unary_rpc_per_s": unary_per_s,
        "unary_p50_ms": unary_p50,
        "unary_p95_ms": unary.latency.p95_ms if unary is not None else None,
        "unary_p99_ms": unary.latency.p99_ms if unary is not None else None,
        "unary_max_ms": unary.latency.max_ms if unary is not None else None,
        "unary_errors": unary.errors if unary is not None else None,
        "unary_in_flight_at_close": unary.in_flight_at_close if unary is not None else None,
        "unary_failed_after_close": unary.failed_after_close if unary is not None else None,
        "naive_txn_per_s": naive_per_s,
        "naive_p50_ms": naive.latency.p50_ms if naive is not None else None,
        "naive_p95_ms": naive.latency.p95_ms if naive is not None else None,
        "naive_p99_ms": naive.latency.p99_ms if naive is not None else None,
        "naive_max_ms": naive.latency.max_ms if naive is not None else None,
        "naive_errors": naive.errors if naive is not None else None,
        "naive_in_flight_at_close": naive.in_flight_at_close if naive is not None else None,
        "naive_failed_after_close": naive.failed_after_close if naive is not None else None,
        "ratio_vs_unary": ratio(txn_per_s, unary_per_s),
        "ratio_vs_naive": ratio(txn_per_s, naive_per_s),
        "p50_vs_unary_p50": ratio(committed.p50_ms, unary_p50),
        "fsync_p50_ms": fsync_p50_ms,
        **one_client_floor(config.clients, unary_p50, fsync_p50_ms),
        "violations": dtm.invariants.violations,
        "violation_samples": dtm.invariants.samples,
        "invariants_scope": dtm.invariants.scope,
        "invariants_note": dtm.invariants.note,
        "invariants_views": dtm.invariants.views,
        "confirmed_orders": dtm.confirmed_orders,
        "settle_s": dtm.settle_s,
        **footprint.summary(dtm.footprint),
        **context,
    }
    if dtm.submit_batches is not None:
        # The clients' own messages: two per SubmitBatch call, shared by what it carried.
        calls, carried = dtm.submit_batches
        client_messages = 2 * calls / carried if carried else None
        results["submit_batch_items_per_call"] = round(carried / calls, 2) if calls else None
        if results["messages_per_txn"] is not None and client_messages is not None:
            results["messages_per_txn"] = round(
                results["messages_per_txn"] - hooks.CLIENT_MESSAGES_PER_TXN + client_messages, 3
            )
        results["client_messages_per_txn"] = (
            round(client_messages, 3) if client_messages is not None else None
        )
    results["targets"] = targets(results)
    return results


def write_results(results: Mapping[str, Any], directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write latest.json and <UTC timestamp>.json; both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False) + "\n"
    stamp = datetime.fromisoformat(str(results["timestamp"])).strftime(TIMESTAMP_FORMAT)
    copy = directory / f"{stamp}.json"
    for suffix in range(2, SAME_SECOND_COPIES_MAX + 2):
        if not copy.exists():
            break
        copy = directory / f"{stamp}-{suffix}.json"
    else:
        raise FileExistsError(f"{SAME_SECOND_COPIES_MAX} results already named {stamp}")
    latest = directory / "latest.json"
    for path in (copy, latest):
        # Write then rename: a reader (bench.plot, CI) never sees half a file.
        partial = path.with_suffix(".json.partial")
        partial.write_text(text)
        partial.replace(path)
    return latest, copy


def _verdict(target: Mapping[str, Any]) -> str:
    met = target["met"]
    if target.get("note") and met is not True:
        return str(target["note"])
    return {True: "met", False: "NOT met", None: "not judged"}[met]


def _number(value: float | int | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value:,.{digits}f}{unit}"


def format_table(results: Mapping[str, Any]) -> str:
    r = results
    title = (
        f"dtm benchmark: {r['participants']} participants, {r['clients']} clients, "
        f"{r['duration_s']:g} s window after {r['warmup_s']:g} s warmup"
        f"{', abort ratio ' + format(r['abort_ratio'], 'g') if r['abort_ratio'] else ''}"
        f"{', one hot SKU' if r['hot_sku'] else ''} ({r['mode']} mode)"
    )
    rows: list[tuple[str, str, str, str]] = [
        ("", "dtm", "naive 2PC", "unary echo"),
        (
            "throughput (/s)",
            _number(r["txn_per_s"]),
            _number(r["naive_txn_per_s"]),
            _number(r["unary_rpc_per_s"]),
        ),
        ("aborted (/s)", _number(r["aborted_per_s"]), "", ""),
        # Calls that failed in the window: left out of every other row.
        (
            "failed calls",
            _number(r["errors"]),
            _number(r.get("naive_errors")),
            _number(r.get("unary_errors")),
        ),
        # In a closed loop, about one per client; those that failed in the end were stuck.
        (
            "in flight at close",
            _number(r["in_flight_at_close"]),
            _open_at_close(r, "naive"),
            _open_at_close(r, "unary"),
        ),
        *(
            (
                f"latency {name} (ms)",
                _number(r[f"{name}_ms"], digits=2),
                _number(r[f"naive_{name}_ms"], digits=2),
                _number(r[f"unary_{name}_ms"], digits=2),
            )
            for name in ("p50", "p95", "p99", "max")
        ),
        # Every call of the window, whatever its outcome, those left in flight included.
        *(
            (f"all calls {name} (ms)", _number(r.get(f"all_calls_{name}_ms"), digits=2), "", "")
            for name in ("p99", "max")
        ),
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [title, ""]
    for row in rows:
        lines.append(
            "  "
            + row[0].ljust(widths[0])
            + "".join(
                "  " + cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            )
        )
    lines.append("")
    target_notes = {name: target for name, target in r["targets"].items()}

    def with_target(name: str, text: str) -> str:
        target = target_notes.get(name)
        if target is None:
            return text
        return f"{text}   (target {target['goal']}: {_verdict(target)})"

    hook = r["server_counters"] if r["fsyncs_per_txn"] is None else ""
    by_process = r.get("fsyncs_per_txn_by_process") or {}
    fsync_detail = ", ".join(f"{name} {value:g}" for name, value in by_process.items())
    batches = r.get("wal_batch_mean_by_process") or {}
    batch_detail = ", ".join(
        f"{name} {value:g}" for name, value in batches.items() if value is not None
    )
    by_kind = r.get("coordinator_messages_per_txn_by_kind") or {}
    message_detail = ", ".join(f"{kind} {value:g}" for kind, value in by_kind.items())
    facts = [
        ("ratio_vs_unary", with_target("ratio_vs_unary", _number(r["ratio_vs_unary"], digits=3))),
        ("ratio_vs_naive", with_target("ratio_vs_naive", _number(r["ratio_vs_naive"], digits=3))),
        (
            "fsyncs per txn",
            hook or f"{_number(r['fsyncs_per_txn'], digits=2)} ({fsync_detail})",
        ),
        (
            "messages per txn",
            hook
            or f"{_number(r['messages_per_txn'], digits=2)} (client "
            f"{_number(r.get('client_messages_per_txn', 2), digits=2)}; coordinator "
            f"{message_detail or 'none'})",
        ),
        ("latency scope", _latency_scope(r)),
        (
            "unexpected outcomes",
            f"{r['unexpected_outcomes']:,}"
            + (f" ({'; '.join(r['unexpected_reasons'])})" if r["unexpected_reasons"] else ""),
        ),
        ("invariants", _invariants_line(r)),
    ]
    if batch_detail:
        facts.append(("records per fsync", batch_detail))
    if r.get("submit_batch"):
        facts.append(
            (
                "submit batching",
                f"SubmitBatch, at most {r['submit_batch']} in flight per channel, "
                f"{_number(r.get('submit_batch_items_per_call'), digits=2)} transactions per "
                "call (the targets assume one call per transaction: not judged)",
            )
        )
    if r.get("participant_path") is not None:
        facts.append(("participant calls", _participant_path_line(r["participant_path"])))
    if r.get("batch_items_per_call") is not None:
        facts.append(("items per batched call", _number(r["batch_items_per_call"], digits=2)))
    cpu = r.get("cpu_ms_per_txn_by_process") or {}
    if cpu:
        cpu_detail = ", ".join(f"{name} {value:g}" for name, value in cpu.items())
        facts.append(
            ("cpu ms per txn", f"{_number(r.get('cpu_ms_per_txn'), digits=3)} ({cpu_detail})")
        )
    relative = r.get("cpu_vs_load_generator") or {}
    if relative:
        facts.append(
            (
                "cpu vs load generator",
                ", ".join(f"{name} {value:g}" for name, value in relative.items())
                + (
                    " (the load generator batches here: compare with batched runs only)"
                    if r.get("submit_batch")
                    else " (each process's CPU per txn / the load generator's: cancels machine "
                    "speed)"
                ),
            )
        )
    if r.get("before_handler_ms_mean") is not None:
        facts.append(
            (
                "latency split",
                f"mean {_number(r['answered_mean_ms'], ' ms', 2)} at the client = "
                f"{_number(r['submit_handling_ms_mean'], digits=2)} in the coordinator's Submit "
                f"handler + {_number(r['before_handler_ms_mean'], digits=2)} before it "
                "(transport, and gRPC's queue of calls the coordinator has not taken yet)",
            )
        )
    checkpoints = r.get("checkpoints_by_process") or {}
    if checkpoints:
        facts.append(
            (
                "checkpoints",
                ", ".join(
                    f"{name} {c['count']:g} ({c['ms_total']:,.0f} ms in all, the longest "
                    f"{c['ms_longest']:,.0f}, building held its loop "
                    f"{c.get('ms_longest_building', 0):,.0f})"
                    for name, c in checkpoints.items()
                )
                + " (building the snapshot holds the process's event loop; the log writes and"
                " fsyncs it on a thread, with wal_sync = loop or thread, and only records"
                " waiting to be durable wait for that)",
            )
        )
    gc_pauses = r.get("gc_pauses_by_process") or {}
    if gc_pauses:
        facts.append(
            (
                "gc pauses",
                ", ".join(
                    f"{name} {g['count']:g} ({g['ms_total']:,.0f} ms in all, the longest "
                    f"{g['ms_longest']:,.0f})"
                    for name, g in gc_pauses.items()
                )
                + " (garbage collections; each holds the process's event loop)",
            )
        )
    if r.get("coordinator_rss_mb_last") is not None:
        facts.append(("coordinator footprint", _footprint_line(r)))
    for name in ("throughput", "p99", "p50_one_client"):
        target = target_notes.get(name)
        if target is not None:
            facts.append(
                (
                    f"target {name}",
                    f"{target['goal']}: {_number(target['value'])}, {_verdict(target)}",
                )
            )
    if r.get("one_client_floor_ms") is not None:
        facts.append(
            (
                "one-client floor",
                f"2 x unary p50 + 2 x fsync p50 ({_number(r['fsync_p50_ms'], digits=3)} ms) = "
                f"{_number(r['one_client_floor_ms'], ' ms', 2)} = "
                f"{_number(r['one_client_floor_vs_unary_p50'], digits=2)} x unary p50: two round "
                "trips and two forced writes, in sequence, before a durable commit is answered",
            )
        )
    width = max(len(name) for name, _ in facts)
    lines += [f"  {name.ljust(width)}  {value}" for name, value in facts]
    return "\n".join(lines)


def _open_at_close(r: Mapping[str, Any], prefix: str) -> str:
    """A baseline's calls in flight at its close, and how many of them failed after it."""
    text = _number(r.get(f"{prefix}_in_flight_at_close"))
    failed = r.get(f"{prefix}_failed_after_close")
    return f"{text} ({failed:,} failed)" if failed else text


PARTICIPANT_PATHS = {
    "batched": "batched (Exchange: prepares and decisions share calls)",
    "unary": "unary (one Prepare, Commit or Rollback each: no participant declared batch)",
    "mixed": "mixed (some participants declared batch, some did not)",
}


def _participant_path_line(path: str) -> str:
    return PARTICIPANT_PATHS.get(path, path)


def _latency_scope(r: Mapping[str, Any]) -> str:
    """What the latency rows count, and what the committed ones leave out."""
    if "all_calls" not in r:
        return "committed calls answered in the window"
    text = (
        f"p50..max: the {r['committed']:,} committed calls answered in the window; all calls: "
        f"those, {r['aborted']:,} aborted, {r['unknown']:,} unknown, {r['errors']:,} failed "
        f"(any outcome: p99 {_number(r['any_outcome_p99_ms'], ' ms', 2)}, max "
        f"{_number(r['any_outcome_max_ms'], ' ms', 2)}), and {r['in_flight_at_close']:,} "
        "still in flight when it closed, counted until then"
    )
    if r.get("in_flight_at_close_took_max_ms") is not None:
        text += f" (they took up to {_number(r['in_flight_at_close_took_max_ms'], ' ms', 2)})"
    return text


def _footprint_line(r: Mapping[str, Any]) -> str:
    return (
        f"RSS {_number(r['coordinator_rss_mb_first'])} MB at the first sample, "
        f"{_number(r['coordinator_rss_mb_middle'])} at half the transactions, "
        f"{_number(r['coordinator_rss_mb_last'])} at the end (max "
        f"{_number(r['coordinator_rss_mb_max'])}); log {_number(r['coordinator_log_mb_last'])} MB "
        f"at the end (max {_number(r['coordinator_log_mb_max'])}); over "
        f"{_number(r['footprint_transactions'])} transactions"
    )


def _invariants_line(r: Mapping[str, Any]) -> str:
    violations = r["violations"]
    if violations is None:
        text = f"NOT CHECKED: {r['invariants_note']}"
    else:
        text = f"{violations:,} violations ({r['invariants_scope']})"
        if r["invariants_views"] > 1:
            text += f" over {r['invariants_views']} views (the first instances, then each extra)"
        if r["confirmed_orders"] is not None:
            text += f"; {r['confirmed_orders']:,} orders confirmed"
        if r["invariants_note"]:
            text += f"; {r['invariants_note']}"
    for sample in r["violation_samples"]:
        text += f"\n      - {sample}"
    return text
