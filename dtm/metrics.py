"""Prometheus metrics of the coordinator and the participants, served on `metrics_listen`.

Off by default (``metrics_listen = ""``): every process of a machine would otherwise need its
own fixed port, and tests and chaos runs start many clusters side by side. Suggested ports:
coordinator 127.0.0.1:9100, inventory 9101, orders 9102, payment 9103, notification 9104.
Port 0 picks a free port (the server's ``metrics_port`` says which). A server with TLS
serves them over HTTPS with its own certificate and requires a client certificate of its CA,
as its gRPC port does (`MetricsEndpoint`); without TLS, plain HTTP.

The hot path stays cheap:

- Most metrics are read at scrape time from counters the engines keep anyway (transactions by
  outcome, protocol messages, log writes, lock waits, fsyncs, group-commit batches), by custom
  collectors; a transaction pays nothing for them.
- Per event there is one histogram observation per participant call and two per finished
  transaction, and only when metrics are on: with them off, the engine calls the no-op
  `EngineObserver` and prometheus_client is not even imported (~40 ms less at start).
- Each process has its own `CollectorRegistry` (never the global one), so several servers in
  one test process do not mix their metrics.

Scrapes run on the HTTP server's thread while the event loop mutates the engines. Counters are
plain ints (reading one is atomic); dictionaries are copied with one ``list(...)`` call, which
CPython runs without releasing the GIL, before they are looked at.

Metric names (all ``dtm_``):

coordinator
    dtm_transactions_total{outcome}                       counter   committed | aborted |
                                                                    unknown (for good: a
                                                                    one-phase commit whose
                                                                    log was lost)
    dtm_decision_latency_seconds{outcome}                 histogram begin -> decision (*)
    dtm_end_to_end_latency_seconds{outcome}               histogram begin -> finished (*)
    dtm_submit_handling_seconds                           histogram Submit handler, start
                                                                    to answer
    dtm_transactions_in_flight                            gauge     not finished yet
    dtm_transactions_in_doubt                             gauge     deciding/committing/unknown
    dtm_phase_two_retries_total{participant}              counter
    dtm_heuristic_outcomes_total{participant,outcome}     counter   heuristic commit | rollback
                                                                    | hazard: alert on any;
                                                                    participant="(unregistered)"
                                                                    for a report naming no
                                                                    registered participant
    dtm_participant_call_latency_seconds{participant,rpc} histogram Prepare | Commit | Rollback
    dtm_participant_call_failures_total{participant,rpc}  counter
    dtm_participant_batch_calls_total{participant}        counter   Exchange calls sent
    dtm_participant_batch_items_total{participant}        counter   items they carried
    dtm_participants_registered                           gauge
    dtm_protocol_messages_total{kind}                     counter   requests | replies | ...
    dtm_log_writes_total{kind}                            counter   forced | lazy
    (*) from the transaction's own timestamps, which the engine keeps in milliseconds;
        "finished" is every phase-2 call acknowledged (commit) or the abort answered (presumed
        abort sends its rollbacks without waiting; the answer waits for a Prepare still out, at
        most until the deadline)
participant
    dtm_branches_total{state}                 counter prepared | committed | rolled_back
                                                      (prepared work undone) | refused
                                                      (an invalid operation included)
    dtm_branches_open                         gauge   preparing or prepared
    dtm_branches_in_doubt                     gauge   prepared, waiting for the decision
    dtm_forced_branches_awaiting              gauge   forced by an operator, not yet
                                                      reconciled with their coordinator
    dtm_forced_outcomes_total{result}         counter agreed | contradicted: forced branches
                                                      reconciled (their coordinator's decision
                                                      came, or its answer to an inquiry), by
                                                      whether it matched the forced outcome;
                                                      contradicted by an inquiry's answer, the
                                                      coordinator may never list it
    dtm_lock_waits_total, dtm_lock_timeouts_total, dtm_lock_deadlocks_total,
    dtm_lock_queue_full_total, dtm_lock_grants_total
                                              counters of the lock manager
    dtm_log_writes_total{kind="forced"}       counter
both
    dtm_wal_fsyncs_total                      counter file fsyncs of the write-ahead log
    dtm_wal_records_total                     counter records appended
    dtm_wal_batch_records                     summary records per group-commit fsync
                                                      (_count: fsyncs of batches, _sum: records)
    dtm_wal_batch_records_max                 gauge   the largest batch so far
    dtm_checkpoint_seconds                    summary checkpoints, building to fsync
    dtm_checkpoint_seconds_max                gauge   the longest so far
    dtm_checkpoint_building_seconds(_max)     summary building the snapshot on the event loop
    dtm_checkpoint_bytes                      gauge   the last checkpoint's size
    dtm_gc_pause_seconds{generation}          summary garbage collections and their pauses
    dtm_gc_pause_seconds_max{generation}      gauge   the longest so far (see GcPauses)
    process_*, python_*                       the standard process and runtime collectors
"""

from __future__ import annotations

import asyncio
import errno
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dtm import limits, logs
from dtm.core.branch import HEURISTIC_OUTCOMES
from dtm.core.transaction import Transaction, TxnState
from dtm.records import log_format_record
from dtm.wal import CheckpointPayload, payload_size

if TYPE_CHECKING:
    import ssl
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

    from dtm.coordinator.engine import Engine
    from dtm.security import TlsConfig
    from dtm.wal import Log
    from participants.branches import BranchEngine
    from participants.locks import LockManager

#: Latency buckets (seconds): from a sub-millisecond call on loopback to a transaction that ran
#: into the longest timeouts.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Coordinator states in which a transaction is in doubt: a commit may be decided (or, for
#: UNKNOWN, may have happened) while some participant does not know it yet. Same as
#: `dtm txn list --in-doubt`.
IN_DOUBT_STATES = frozenset({TxnState.DECIDING, TxnState.COMMITTING, TxnState.UNKNOWN})
#: The participant label of a heuristic outcome whose participant is not registered (a report
#: naming it): one series for all of them. No participant name can be it (PARTICIPANT_NAME_PATTERN).
UNREGISTERED = "(unregistered)"
#: Copying a dict another thread mutates is retried this often before a scrape gives up.
_COPY_ATTEMPTS = 3

Item = TypeVar("Item")


def _snapshot(values: Callable[[], Iterable[Item]]) -> list[Item]:
    """`list(values())`, retried if the event loop thread resized the dict meanwhile."""
    for _ in range(_COPY_ATTEMPTS - 1):
        try:
            return list(values())
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return list(values())


# ---- hooks the engines call (cheap, and importable without prometheus_client) ----


class EngineObserver:
    """What the coordinator's engine reports per event. This base does nothing: it is the
    engine's default, so that with metrics off a hook costs one no-op method call."""

    __slots__ = ()

    def call_finished(self, participant: str, rpc: str, started: float, ok: bool) -> None:
        """A Prepare/Commit/Rollback answered (or failed); `started` is a perf_counter()."""

    def phase_two_retry(self, participant: str) -> None:
        """Phase 2 of a branch is being retried after a failure."""

    def submit_handled(self, started: float) -> None:
        """A Submit handler returned or failed; `started` is a perf_counter() at its start."""

    def heuristic_recorded(self, participant: str, outcome: str) -> None:
        """A branch's heuristic outcome was recorded (forced, contradicted, or unknown)."""

    def participant_registered(self, participant: str) -> None:
        """A participant joined the registry (registered, or replayed from the log)."""

    def participant_unregistered(self, participant: str) -> None:
        """An operator removed a participant from the registry."""

    def transaction_finished(self, txn: Transaction, elapsed_ms: float) -> None:
        """The transaction is finished (committed and acknowledged, or aborted), `elapsed_ms`
        after its start (by the monotonic clock, unless it was recovered)."""


NO_OBSERVER = EngineObserver()


@dataclass(slots=True)
class CheckpointStats:
    """Checkpoints an engine wrote, timed from the start of their building to their fsync, and
    the building alone: the snapshot is taken on the event loop, which serves nothing
    meanwhile (a stall), while the log joins, writes and fsyncs it on a thread (LoopCommitLog),
    during which only the waiters for durability wait."""

    count: int = 0
    seconds: float = 0.0
    longest_s: float = 0.0
    last_s: float = 0.0
    last_bytes: int = 0
    building_seconds: float = 0.0
    longest_building_s: float = 0.0

    async def write(
        self, log: Log, record_type: int, build: Callable[[], list[CheckpointPayload]]
    ) -> None:
        """Build a checkpoint's records (on the event loop), have `log` write them, and record
        how long both took and how long the building alone did."""
        started = time.perf_counter()
        records = build()
        built = time.perf_counter()
        # First, the format its records are in: the segments that said so before are deleted
        # once the checkpoint is durable (dtm.records.LOG_FORMAT).
        framed: list[tuple[int, CheckpointPayload]] = [log_format_record()]
        framed.extend((record_type, payload) for payload in records)
        await log.checkpoint(framed)
        self.record(time.perf_counter() - started, sum(map(payload_size, records)), built - started)

    def record(self, seconds: float, size: int, building_s: float) -> None:
        self.count += 1
        self.seconds += seconds
        self.longest_s = max(self.longest_s, seconds)
        self.last_s = seconds
        self.last_bytes = size
        self.building_seconds += building_s
        self.longest_building_s = max(self.longest_building_s, building_s)

    @property
    def last_ms(self) -> float:
        """The last checkpoint's duration, as the "checkpoint written" log lines give it."""
        return round(self.last_s * 1000, 1)


@dataclass(slots=True)
class BranchCounters:
    """Branch events of a participant, counted by the branch engine, read at scrape time."""

    prepared: int = 0
    committed: int = 0
    rolled_back: int = 0
    refused: int = 0
    # Forced branches reconciled with their coordinator (its decision arrived, or it answered
    # an inquiry about them): its outcome agreed with the forced one, or contradicted it.
    forced_agreed: int = 0
    forced_contradicted: int = 0


class GcPauses:
    """How long this process's garbage collections took, by generation (gc.callbacks).

    A collection holds the GIL from start to end, so the event loop, and every transaction in
    flight with it, waits for it: a tail-latency source that the standard collectors count
    but do not time. Measured on the build machine under `make bench` load: the coordinator's
    young collections took 25-50 ms at first and 120-175 ms once its window of finished
    transactions had filled (docs/architecture.md, section 12). One per process, installed
    with the first metrics registry; a collection costs it two clock reads."""

    GENERATIONS = 3

    def __init__(self) -> None:
        self.count = [0] * self.GENERATIONS
        self.seconds = [0.0] * self.GENERATIONS
        self.longest_s = [0.0] * self.GENERATIONS
        self._started = 0.0

    def on_collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._started
        generation = info["generation"]
        self.count[generation] += 1
        self.seconds[generation] += elapsed
        self.longest_s[generation] = max(self.longest_s[generation], elapsed)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily, SummaryMetricFamily

        pauses = SummaryMetricFamily(
            "dtm_gc_pause_seconds",
            "Garbage collections, and how long each held the process (its event loop waits)",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "dtm_gc_pause_seconds_max",
            "The longest garbage collection so far, by generation",
            labels=["generation"],
        )
        for generation in range(self.GENERATIONS):
            label = [str(generation)]
            pauses.add_metric(label, self.count[generation], self.seconds[generation])
            longest.add_metric(label, self.longest_s[generation])
        yield pauses
        yield longest


_gc_pauses: GcPauses | None = None


def gc_pauses() -> GcPauses:
    """This process's GcPauses, hooked into the collector on first use."""
    global _gc_pauses
    if _gc_pauses is None:
        import gc

        _gc_pauses = GcPauses()
        gc.callbacks.append(_gc_pauses.on_collection)
    return _gc_pauses


# ---- the coordinator ----


def _new_registry() -> CollectorRegistry:
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(gc_pauses())
    return registry


def _checkpoint_metrics(stats: CheckpointStats) -> Iterator[Metric]:
    from prometheus_client.metrics_core import GaugeMetricFamily, SummaryMetricFamily

    yield SummaryMetricFamily(
        "dtm_checkpoint_seconds",
        "Checkpoints written, and the time from building each to its fsync (records waiting "
        "to be durable wait for it)",
        count_value=stats.count,
        sum_value=stats.seconds,
    )
    yield GaugeMetricFamily(
        "dtm_checkpoint_seconds_max", "The longest checkpoint so far", value=stats.longest_s
    )
    yield SummaryMetricFamily(
        "dtm_checkpoint_building_seconds",
        "The time spent building each checkpoint's snapshot on the event loop (it serves "
        "nothing meanwhile)",
        count_value=stats.count,
        sum_value=stats.building_seconds,
    )
    yield GaugeMetricFamily(
        "dtm_checkpoint_building_seconds_max",
        "The longest a checkpoint's building held the event loop so far",
        value=stats.longest_building_s,
    )
    yield GaugeMetricFamily(
        "dtm_checkpoint_bytes", "The size of the last checkpoint written", value=stats.last_bytes
    )


def _wal_metrics(wal: Log) -> Iterator[Metric]:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )

    batches = wal.batch_sizes
    yield CounterMetricFamily(
        "dtm_wal_fsyncs", "File fsyncs of the write-ahead log", value=wal.fsync_count
    )
    yield CounterMetricFamily(
        "dtm_wal_records", "Records appended to the write-ahead log", value=wal.records_appended
    )
    yield SummaryMetricFamily(
        "dtm_wal_batch_records",
        "Records made durable per group-commit fsync (sum / count = mean batch size)",
        count_value=batches.syncs,
        sum_value=batches.records,
    )
    yield GaugeMetricFamily(
        "dtm_wal_batch_records_max",
        "The largest group-commit batch so far, in records",
        value=batches.largest,
    )


class CoordinatorMetrics(EngineObserver):
    """The coordinator's metrics; installs itself as the engine's observer."""

    __slots__ = (
        "_call_failures",
        "_call_latency",
        "_calls",
        "_decision",
        "_end_to_end",
        "_heuristics",
        "_retries",
        "_submit_handling",
        "engine",
        "registry",
        "wal",
    )

    def __init__(self, engine: Engine, wal: Log) -> None:
        from prometheus_client import Counter, Histogram

        self.engine = engine
        self.wal = wal
        self.registry = _new_registry()
        self._decision = Histogram(
            "dtm_decision_latency_seconds",
            "From the start of a transaction to its commit or abort decision",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._end_to_end = Histogram(
            "dtm_end_to_end_latency_seconds",
            "From the start of a transaction until it is finished (phase 2 acknowledged)",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # The server's side of a client's latency: the rest is transport and gRPC's queue of
        # calls the coordinator has not accepted yet (the bench reports the split).
        self._submit_handling = Histogram(
            "dtm_submit_handling_seconds",
            "Time in the coordinator's Submit handler, from its start to its answer",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._retries = Counter(
            "dtm_phase_two_retries",
            "Phase-2 calls (Commit or Rollback) retried after a failure",
            ["participant"],
            registry=self.registry,
        )
        # Each one is a branch whose outcome may differ from the decision: worth an alert.
        self._heuristics = Counter(
            "dtm_heuristic_outcomes",
            "Heuristic outcomes recorded: a branch forced by an operator, contradicted by the "
            "participant's record, or unknown to it (heuristic commit, rollback or hazard)",
            ["participant", "outcome"],
            registry=self.registry,
        )
        self._call_latency = Histogram(
            "dtm_participant_call_latency_seconds",
            "Time from sending a call to a participant to its answer (batching included)",
            ["participant", "rpc"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._call_failures = Counter(
            "dtm_participant_call_failures",
            "Calls to a participant that failed (unreachable, deadline, error, refusal to act)",
            ["participant", "rpc"],
            registry=self.registry,
        )
        # (participant, rpc) -> the labelled children: `labels()` takes a lock and builds a
        # tuple on every call, which the hot path does not need to pay.
        self._calls: dict[tuple[str, str], tuple[Histogram, Counter]] = {}
        # Registered as a custom collector too: `collect` runs on every scrape.
        self.registry.register(self)
        engine.observer = self
        for participant in engine.registry.participants:  # replayed from the log
            self.participant_registered(participant)
        for outcome in HEURISTIC_OUTCOMES:  # at 0 from the start, as a registered name's
            self._heuristics.labels(UNREGISTERED, outcome)

    # ---- EngineObserver ----

    def call_finished(self, participant: str, rpc: str, started: float, ok: bool) -> None:
        children = self._calls.get((participant, rpc))
        if children is None:
            if participant not in self.engine.registry.participants:
                # A call of a participant unregistered meanwhile (a Rollback its retired port
                # still carried): its series are gone, and are not made again.
                return
            children = (
                self._call_latency.labels(participant, rpc),
                self._call_failures.labels(participant, rpc),
            )
            self._calls[participant, rpc] = children
        children[0].observe(time.perf_counter() - started)
        if not ok:
            children[1].inc()

    def phase_two_retry(self, participant: str) -> None:
        if participant in self.engine.registry.participants:  # else unregistered meanwhile
            self._retries.labels(participant).inc()

    def submit_handled(self, started: float) -> None:
        self._submit_handling.observe(time.perf_counter() - started)

    def heuristic_recorded(self, participant: str, outcome: str) -> None:
        if participant not in self.engine.registry.participants:
            # A report (Coordinator.ReportHeuristic) may name any well-formed participant,
            # and anyone may send one in plaintext mode: a series per name would grow without
            # bound (three per new name, never removed). Counted, not refused: a participant
            # unregistered while its forced branch awaited still has a real heuristic outcome
            # to report, and an alert on any increase must see it.
            participant = UNREGISTERED
        self._heuristics.labels(participant, outcome).inc()

    def participant_registered(self, participant: str) -> None:
        # Each series exists at 0 from the start: a counter that first appears at 1 has no
        # increase() to alert on, so the first heuristic of a participant would go unseen.
        self._retries.labels(participant)
        for outcome in HEURISTIC_OUTCOMES:
            self._heuristics.labels(participant, outcome)

    def participant_unregistered(self, participant: str) -> None:
        # Its labelled series go with it: otherwise every name ever registered keeps its own
        # series (and memory) for the life of the process (50 register/unregister cycles
        # under new names left 400). Registered again, it starts again at 0.
        self._retries.remove(participant)
        for outcome in HEURISTIC_OUTCOMES:
            self._heuristics.remove(participant, outcome)
        for key in [key for key in self._calls if key[0] == participant]:
            del self._calls[key]
            self._call_latency.remove(*key)
            self._call_failures.remove(*key)

    def transaction_finished(self, txn: Transaction, elapsed_ms: float) -> None:
        outcome = txn.answer
        if outcome is None or txn.recovered:
            # Recovered after a restart: it did not start in this process, so its latency
            # would count the downtime.
            return
        # A one-phase commit decides when the participant answers: decided_at stays 0. The
        # decision's time is the wall clock's (the core's, and the log's): a step between
        # start and decision is bounded by the whole, timed on the monotonic clock.
        decided_ms = txn.decided_at_ms - txn.created_at_ms if txn.decided_at_ms else elapsed_ms
        label = outcome.value
        self._decision.labels(label).observe(min(max(0, decided_ms), elapsed_ms) / 1000)
        self._end_to_end.labels(label).observe(elapsed_ms / 1000)

    # ---- read at scrape time ----

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        counters = self.engine.counters
        outcomes = CounterMetricFamily(
            "dtm_transactions", "Finished transactions by outcome", labels=["outcome"]
        )
        outcomes.add_metric(["committed"], counters.committed)
        outcomes.add_metric(["aborted"], counters.aborted)
        # Finished, but neither: the histograms count these under "unknown" too, and a sum
        # of this counter must equal every transaction finished.
        outcomes.add_metric(["unknown"], counters.unknown)
        yield outcomes
        active = _snapshot(self.engine.active.values)
        yield GaugeMetricFamily(
            "dtm_transactions_in_flight", "Transactions not finished yet", value=len(active)
        )
        yield GaugeMetricFamily(
            "dtm_transactions_in_doubt",
            "Transactions deciding, committing (phase 2 not fully acknowledged) or unknown",
            value=sum(1 for run in active if run.txn.state in IN_DOUBT_STATES),
        )
        yield GaugeMetricFamily(
            "dtm_participants_registered",
            "Participants in the registry",
            value=len(self.engine.registry.participants),
        )
        messages = CounterMetricFamily(
            "dtm_protocol_messages",
            "Protocol messages: requests sent (Prepare, Commit, Rollback), replies acted on, "
            "transport-level Rollback answers",
            labels=["kind"],
        )
        messages.add_metric(["requests"], counters.requests)
        messages.add_metric(["replies"], counters.replies)
        messages.add_metric(["rollback_replies"], counters.rollback_replies)
        yield messages
        writes = CounterMetricFamily(
            "dtm_log_writes", "Log records written, forced (fsync awaited) or lazy", labels=["kind"]
        )
        writes.add_metric(["forced"], counters.forced_writes)
        writes.add_metric(["lazy"], counters.lazy_writes)
        yield writes
        ports = self.engine.registry.ports()
        calls = CounterMetricFamily(
            "dtm_participant_batch_calls",
            "Batched calls (Exchange) sent to each participant",
            labels=["participant"],
        )
        items = CounterMetricFamily(
            "dtm_participant_batch_items",
            "Prepares and decisions those batched calls carried",
            labels=["participant"],
        )
        for name, port in sorted(ports.items()):
            calls.add_metric([name], port.calls)
            items.add_metric([name], port.items)
        yield calls
        yield items
        yield from _checkpoint_metrics(self.engine.checkpoints)
        yield from _wal_metrics(self.wal)


# ---- a participant ----


class ParticipantMetrics:
    """A participant's metrics, all read at scrape time from the engine's own counters."""

    def __init__(self, engine: BranchEngine, locks: LockManager, wal: Log) -> None:
        self.engine = engine
        self.locks = locks
        self.wal = wal
        self.registry = _new_registry()
        # A custom collector: `collect` runs on every scrape.
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        from dtm.core.branch import BranchState

        counters = self.engine.counters
        branches = CounterMetricFamily(
            "dtm_branches",
            "Branch events: prepared, committed, rolled back, refused",
            labels=["state"],
        )
        branches.add_metric(["prepared"], counters.prepared)
        branches.add_metric(["committed"], counters.committed)
        branches.add_metric(["rolled_back"], counters.rolled_back)
        branches.add_metric(["refused"], counters.refused)
        yield branches
        open_branches = _snapshot(self.engine.open.values)
        yield GaugeMetricFamily(
            "dtm_branches_open", "Branches preparing or prepared", value=len(open_branches)
        )
        yield GaugeMetricFamily(
            "dtm_branches_in_doubt",
            "Prepared branches waiting for the decision",
            value=sum(1 for i in open_branches if i.branch.state is BranchState.PREPARED),
        )
        yield GaugeMetricFamily(
            "dtm_forced_branches_awaiting",
            "Branches forced by an operator whose coordinator has neither sent its decision "
            "nor answered an inquiry about them yet",
            value=self.engine.forced_awaiting_count,
        )
        forced = CounterMetricFamily(
            "dtm_forced_outcomes",
            "Forced branches reconciled with their coordinator (its decision arrived, or it "
            "answered an inquiry), by whether its outcome agreed with the forced one or "
            "contradicted it (a heuristic outcome)",
            labels=["result"],
        )
        forced.add_metric(["agreed"], counters.forced_agreed)
        forced.add_metric(["contradicted"], counters.forced_contradicted)
        yield forced
        locks = self.locks
        for name, value, text in (
            ("dtm_lock_waits", locks.waits, "Lock requests that had to wait"),
            ("dtm_lock_timeouts", locks.timeouts, "Lock waits that timed out"),
            ("dtm_lock_deadlocks", locks.deadlocks, "Lock requests refused as deadlocks"),
            (
                "dtm_lock_queue_full",
                locks.queue_full,
                "Lock requests refused at once: the resource's wait queue was full",
            ),
            ("dtm_lock_grants", locks.grants, "Locks granted"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        writes = CounterMetricFamily(
            "dtm_log_writes", "Log records written, forced (fsync awaited)", labels=["kind"]
        )
        writes.add_metric(["forced"], self.engine.forced_writes)
        yield writes
        yield from _checkpoint_metrics(self.engine.checkpoints)
        yield from _wal_metrics(self.wal)


# ---- the HTTP endpoint ----

#: How long a client of a TLS /metrics endpoint may take over its handshake, and any client
#: silent while its request is read: one that connects and says nothing holds one thread of
#: the endpoint (of limits.METRICS_CONNECTIONS_MAX) until then, never the others.
HANDSHAKE_TIMEOUT_S = 10.0
#: What is read of a plain HTTP request before it is refused (a scrape's is a few hundred bytes).
_PLAIN_REQUEST_BYTES_MAX = 64 * 1024
#: The first byte of every TLS connection (a handshake record); anything else is plaintext.
_TLS_HANDSHAKE_RECORD = b"\x16"
_PLAIN_HTTP_BODY = (
    b"This /metrics endpoint speaks HTTPS only, and requires a client certificate signed by "
    b"the server's CA (mutual TLS, as its gRPC port): scrape https:// with that CA, a "
    b"certificate and its key.\n"
)
#: The answer to a plain HTTP request on a TLS endpoint: a scraper then says why, where a
#: closed connection would read as a network fault.
_PLAIN_HTTP_REFUSED = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


class MetricsEndpoint:
    """`prometheus_client.start_http_server` on `listen`, for one registry: over HTTPS with
    `tls` (this process's certificate, and a client certificate of its CA required, as its
    gRPC port requires one), plain HTTP without."""

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        component: str,
        tls: TlsConfig | None = None,
    ) -> None:
        self.registry = registry
        self.listen = listen
        self.component = component
        self.tls = tls
        self.port = 0
        self._server: WSGIServer | None = None

    def start(self) -> int:
        """Serve /metrics; returns the bound port. OSError (clear) when it cannot bind, or
        cannot load the TLS files."""
        context = self._tls_context()
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")  # an IPv6 literal comes bracketed in host:port
        try:
            server = _serve(host, int(port), self.registry, context)
        except (OSError, UnicodeError) as error:  # UnicodeError: a host IDNA refuses
            in_use = getattr(error, "errno", None) == errno.EADDRINUSE
            hint = "is the port already in use? " if in_use else ""
            raise OSError(
                f"cannot serve metrics on {self.listen}: "
                f"{getattr(error, 'strerror', None) or error}; {hint}"
                'Choose another metrics_listen ("" turns metrics off)'
            ) from None
        self._server = server
        self.port = int(server.server_address[1])
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address, as in a URL
        logs.get(self.component).info(
            "metrics serving",
            address=f"{shown}:{self.port}",
            scheme="http" if context is None else "https",
        )
        return self.port

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        from dtm import security

        try:
            return security.https_server_context(self.tls)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise OSError(
                f"cannot serve metrics over TLS: {self.tls.cert} and {self.tls.key} (CA "
                f"{self.tls.ca_cert}) do not load: {error}"
            ) from None

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # shutdown() waits for the serving thread's poll (up to 0.5 s): not on the event loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()


def _serve(
    host: str, port: int, registry: CollectorRegistry, context: ssl.SSLContext | None
) -> WSGIServer:
    """`prometheus_client.start_http_server(port, host, registry)`, its TLS (with `context`)
    done differently: it wraps the listening socket, so that every handshake runs in its one
    accepting thread, and a client that connects and sends nothing holds every scrape after
    it, and shutdown() too, for good. Here each connection shakes hands on its own thread,
    within HANDSHAKE_TIMEOUT_S."""
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    class QuietHandler(WSGIRequestHandler):
        # A client silent this long loses its connection (and its slot): prometheus_client's
        # handler waited for a request for good.
        timeout = HANDSHAKE_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes are not logged (no more than prometheus_client's own handler does)."""

    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    # One thread and one descriptor per connection: at most this many, so that whoever
    # reaches the port cannot take the process's (the log's and gRPC's) with silent ones.
    slots = threading.BoundedSemaphore(limits.METRICS_CONNECTIONS_MAX)

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        # Threads not kept for server_close() to join (one a connection, for the process's
        # life otherwise); a scrape under way does not hold the process's exit either.
        daemon_threads = True

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                self.shutdown_request(request)  # closed at once: the scraper retries
                return
            try:
                super().process_request(request, client_address)  # its thread releases it
            except BaseException:
                slots.release()  # no thread started
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            """A client gone silent (QuietHandler.timeout) or away is no traceback on stderr;
            anything else is, as before."""
            if not isinstance(sys.exc_info()[1], OSError):
                super().handle_error(request, client_address)

        def finish_request(self, request: Any, client_address: Any) -> None:
            if context is None:
                super().finish_request(request, client_address)
                return
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                first = request.recv(1, socket.MSG_PEEK)
                if first and first != _TLS_HANDSHAKE_RECORD:
                    # Plain HTTP: read its request (closing with it unread would reset the
                    # connection before the answer is read), then say what is wanted.
                    request.recv(_PLAIN_REQUEST_BYTES_MAX)
                    request.sendall(_PLAIN_HTTP_REFUSED)
                    return
                secured = context.wrap_socket(request, server_side=True)
            except OSError:
                # No certificate or one of another CA, silence, or a peer gone: refused,
                # the connection closed (by wrap_socket, or by the server after this).
                return
            try:
                secured.settimeout(None)  # then as over plain HTTP
                super().finish_request(secured, client_address)
            finally:
                secured.close()

    server = make_server(
        str(address[0]), port, make_wsgi_app(registry), Server, handler_class=QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def for_coordinator(
    engine: Engine, wal: Log, listen: str, tls: TlsConfig | None = None
) -> MetricsEndpoint | None:
    """The coordinator's endpoint (metrics installed on the engine), or None when off."""
    if not listen:
        return None
    return MetricsEndpoint(CoordinatorMetrics(engine, wal).registry, listen, "coordinator", tls)


def for_participant(
    name: str,
    engine: BranchEngine,
    locks: LockManager,
    wal: Log,
    listen: str,
    tls: TlsConfig | None = None,
) -> MetricsEndpoint | None:
    """A participant's endpoint, or None when off."""
    if not listen:
        return None
    return MetricsEndpoint(ParticipantMetrics(engine, locks, wal).registry, listen, name, tls)


__all__ = [
    "IN_DOUBT_STATES",
    "NO_OBSERVER",
    "UNREGISTERED",
    "BranchCounters",
    "CheckpointStats",
    "CoordinatorMetrics",
    "EngineObserver",
    "GcPauses",
    "MetricsEndpoint",
    "ParticipantMetrics",
    "for_coordinator",
    "for_participant",
    "gc_pauses",
]
