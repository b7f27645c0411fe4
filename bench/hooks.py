"""Per-transaction costs (fsyncs, messages) from the servers' own Prometheus counters.

The servers grow a `--metrics-listen HOST:PORT` flag (dtm.metrics). When the installed servers
have it, the bench gives every process its own loopback port, scrapes every /metrics endpoint
when the measurement window opens and when it closes, and divides the growth of the counters by
the transactions completed in between:

    fsyncs_per_txn    sum over all processes of dtm_wal_fsyncs_total
    messages_per_txn  the coordinator's dtm_protocol_messages_total (requests it sent, replies
                      it acted on, transport-level Rollback answers), plus the client's Submit
                      and its reply (2)
    cpu_ms_per_txn    process_cpu_seconds_total (user + system) of every server, plus the
                      load generator's own CPU time over the same window (a Sample carries it)
    submit_handling   the mean of the coordinator's dtm_submit_handling_seconds over the
                      window: the server's share of a client's latency
    checkpoints       per process, dtm_checkpoint_seconds' growth (how many, how long in all),
                      dtm_checkpoint_seconds_max (the longest since the process started) and
                      dtm_checkpoint_building_seconds_max (the longest building of a snapshot,
                      which holds the event loop; the log writes it on a thread)
    gc_pauses         per process, dtm_gc_pause_seconds' growth (garbage collections in the
                      window, how long in all) and the longest since the process started,
                      any generation: a collection holds the event loop too

When the servers do not have the flag, every figure is None and the report says
"n/a: hook missing": nothing is estimated.
"""

from __future__ import annotations

import asyncio
import re
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from bench.procs import PROJECT_ROOT

METRICS_FLAG = "--metrics-listen"
HOOK_MISSING = "n/a: hook missing"
FSYNCS = "dtm_wal_fsyncs_total"
MESSAGES = "dtm_protocol_messages_total"
BATCH_SUM = "dtm_wal_batch_records_sum"
BATCH_COUNT = "dtm_wal_batch_records_count"
CPU_SECONDS = "process_cpu_seconds_total"
BATCH_CALLS = "dtm_participant_batch_calls_total"
BATCH_ITEMS = "dtm_participant_batch_items_total"
HANDLING_SUM = "dtm_submit_handling_seconds_sum"
HANDLING_COUNT = "dtm_submit_handling_seconds_count"
CHECKPOINT_COUNT = "dtm_checkpoint_seconds_count"
CHECKPOINT_SUM = "dtm_checkpoint_seconds_sum"
CHECKPOINT_MAX = "dtm_checkpoint_seconds_max"
CHECKPOINT_BUILDING_MAX = "dtm_checkpoint_building_seconds_max"
GC_PAUSE_COUNT = "dtm_gc_pause_seconds_count"
GC_PAUSE_SUM = "dtm_gc_pause_seconds_sum"
GC_PAUSE_MAX = "dtm_gc_pause_seconds_max"
#: The name under which the bench's own process (the clients) appears in cpu_ms_by_process.
LOAD_GENERATOR = "load generator"
#: Transport-level protocol overhead the coordinator does not count: the client's own call.
CLIENT_MESSAGES_PER_TXN = 2
SCRAPE_TIMEOUT_S = 5.0
HELP_TIMEOUT_S = 30.0
# A scrape is a few kB; this bounds what a misbehaving endpoint can make us read.
SCRAPE_BYTES_MAX = 4 * 1024 * 1024

#: Sample name with labels, e.g. 'dtm_protocol_messages_total{kind="requests"}' -> value.
Counters = dict[str, float]


# Module -> whether it accepts the flag: asked once per bench process (a sweep asks often).
_SUPPORTED: dict[str, bool] = {}


async def flag_supported(modules: list[str]) -> bool:
    """Whether every one of these server modules accepts --metrics-listen (asked via --help,
    because passing an unknown flag would make the server exit at start)."""

    async def accepts(module: str) -> bool:
        if module not in _SUPPORTED:
            _SUPPORTED[module] = await ask(module)
        return _SUPPORTED[module]

    async def ask(module: str) -> bool:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            "--help",
            cwd=PROJECT_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), HELP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            return False
        return process.returncode == 0 and METRICS_FLAG.encode() in output

    return all(await asyncio.gather(*(accepts(module) for module in modules)))


def parse(text: str) -> Counters:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    counters: Counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            counters[key] = float(sample.value)
    return counters


def total(counters: Counters, name: str) -> float:
    """The sum of a metric over all its label sets."""
    return sum(value for key, value in counters.items() if key.split("{", 1)[0] == name)


def largest(counters: Counters, name: str) -> float:
    """The largest value of a metric over its label sets (0 when it has none)."""
    return max(
        (value for key, value in counters.items() if key.split("{", 1)[0] == name), default=0.0
    )


def _fetch(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as answer:
        body: bytes = answer.read(SCRAPE_BYTES_MAX)
    return body.decode("utf-8", errors="replace")


async def scrape(addresses: Mapping[str, str]) -> dict[str, Counters]:
    """Process name -> its counters, all endpoints at once (urllib on worker threads)."""
    names = list(addresses)
    texts = await asyncio.gather(*(asyncio.to_thread(_fetch, addresses[name]) for name in names))
    return {name: parse(text) for name, text in zip(names, texts, strict=True)}


@dataclass(frozen=True)
class Sample:
    """Every process's counters at one instant, and how many transactions had completed."""

    transactions: float
    counters: Mapping[str, Counters]
    #: CPU seconds the load generator itself had used (time.process_time()) at that instant.
    load_cpu_s: float | None = None


@dataclass(frozen=True)
class Costs:
    fsyncs_per_txn: float | None = None
    messages_per_txn: float | None = None
    #: Process -> its fsyncs per transaction.
    fsyncs_by_process: Mapping[str, float] | None = None
    #: Process -> records per group-commit fsync over the window (None: no fsync then).
    wal_batch_mean: Mapping[str, float | None] | None = None
    #: Protocol message kind (the coordinator's label) -> messages per transaction.
    messages_by_kind: Mapping[str, float] | None = None
    #: Process -> milliseconds of CPU (user + system) per transaction; the total is where the
    #: two cores go, the figure every optimization is judged by.
    cpu_ms_by_process: Mapping[str, float] | None = None
    #: Items (prepares and decisions) per batched call the coordinator sent, over the window.
    items_per_call: float | None = None
    #: Mean time in the coordinator's Submit handler, over the Submits answered in the window.
    submit_handling_ms_mean: float | None = None
    #: Process -> its checkpoints in the window: count, ms_total, ms_longest (the longest
    #: since the process started) and ms_longest_building (its event loop's longest stall for
    #: one). Only processes that wrote one.
    checkpoints: Mapping[str, Mapping[str, float]] | None = None
    #: Process -> its garbage collections in the window: count, ms_total, and ms_longest (the
    #: longest since the process started, any generation). Only processes that export them.
    gc_pauses: Mapping[str, Mapping[str, float]] | None = None
    note: str = HOOK_MISSING

    @property
    def cpu_ms_per_txn(self) -> float | None:
        if self.cpu_ms_by_process is None:
            return None
        return round(sum(self.cpu_ms_by_process.values()), 3)


def costs(first: Sample, last: Sample, coordinator: str = "coordinator") -> Costs:
    """Counter growth between two samples, per transaction completed between them."""
    transactions = last.transactions - first.transactions
    if transactions <= 0:
        return Costs(note="no transaction completed between the two scrapes")

    def growth(process: str, name: str) -> float:
        return total(last.counters[process], name) - total(first.counters[process], name)

    fsyncs = {name: growth(name, FSYNCS) / transactions for name in last.counters}
    batches: dict[str, float | None] = {}
    for name in last.counters:
        synced = growth(name, BATCH_COUNT)
        batches[name] = round(growth(name, BATCH_SUM) / synced, 2) if synced > 0 else None
    by_kind: dict[str, float] = {}
    for key, value in last.counters[coordinator].items():
        if key.startswith(MESSAGES + "{"):
            before = first.counters[coordinator].get(key, 0.0)
            kind = ",".join(re.findall(r'="([^"]*)"', key))  # '...{kind="requests"}' -> requests
            by_kind[kind] = round((value - before) / transactions, 3)
    messages = growth(coordinator, MESSAGES) / transactions + CLIENT_MESSAGES_PER_TXN
    cpu: dict[str, float] = {
        name: round(growth(name, CPU_SECONDS) * 1000 / transactions, 3)
        for name in last.counters
        if CPU_SECONDS in last.counters[name]
    }
    calls = growth(coordinator, BATCH_CALLS)
    items_per_call = round(growth(coordinator, BATCH_ITEMS) / calls, 2) if calls > 0 else None
    handled = growth(coordinator, HANDLING_COUNT)
    handling_ms = (
        round(growth(coordinator, HANDLING_SUM) * 1000 / handled, 2) if handled > 0 else None
    )
    checkpoints = {
        name: {
            "count": growth(name, CHECKPOINT_COUNT),
            "ms_total": round(growth(name, CHECKPOINT_SUM) * 1000, 1),
            "ms_longest": round(total(last.counters[name], CHECKPOINT_MAX) * 1000, 1),
            "ms_longest_building": round(
                total(last.counters[name], CHECKPOINT_BUILDING_MAX) * 1000, 1
            ),
        }
        for name in last.counters
        if growth(name, CHECKPOINT_COUNT) > 0
    }
    gc_pauses = {
        name: {
            "count": growth(name, GC_PAUSE_COUNT),
            "ms_total": round(growth(name, GC_PAUSE_SUM) * 1000, 1),
            "ms_longest": round(largest(last.counters[name], GC_PAUSE_MAX) * 1000, 1),
        }
        for name in last.counters
        if any(key.startswith(GC_PAUSE_COUNT) for key in last.counters[name])
    }
    if first.load_cpu_s is not None and last.load_cpu_s is not None:
        cpu[LOAD_GENERATOR] = round((last.load_cpu_s - first.load_cpu_s) * 1000 / transactions, 3)
    return Costs(
        fsyncs_per_txn=round(sum(fsyncs.values()), 3),
        messages_per_txn=round(messages, 3),
        fsyncs_by_process={name: round(value, 3) for name, value in fsyncs.items()},
        wal_batch_mean=batches,
        messages_by_kind=by_kind,
        cpu_ms_by_process=cpu or None,
        items_per_call=items_per_call,
        submit_handling_ms_mean=handling_ms,
        checkpoints=checkpoints,
        gc_pauses=gc_pauses or None,
        note=(
            f"measured: growth of the servers' /metrics counters over "
            f"{transactions:,.0f} transactions of the window"
        ),
    )
