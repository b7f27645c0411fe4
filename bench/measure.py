"""The dtm measurement: the coordinator and the services as deployed, under closed-loop load.

Starts `dtm.cluster.Cluster` (the coordinator and the four services as separate processes on
loopback, durable logs with real fsyncs) in a fresh data directory, plus extra service
instances for N > 4; drives the clients; waits until everything settled; checks the invariants
over the final state; stops everything.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import checks, footprint, hooks
from bench.checks import ClientView, InvariantResult
from bench.harness import LoadSpec, channel_of, close_channels, drive, open_channels
from bench.procs import Processes
from bench.stats import Outcome, Tally
from bench.workload import UNITS_PER_ORDER, Participant, Workload, initial_state
from dtm import invariants
from dtm.cluster import COORDINATOR, MODULES, PROCESSES, Cluster, FreePorts, free_ports
from dtm.orderflow import ORDERS, OrderClient
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc

HOST = "127.0.0.1"
EXTRA_START_TIMEOUT_S = 20.0
POLL_S = 0.1
# A transaction's own timeout is 10 s by default; a call gets that plus a margin, so a slow
# decision is counted as slow, not as lost.
SUBMIT_TIMEOUT_S = 15.0
SETTLE_TIMEOUT_S = 30.0
# The services' flag (config key `batch`) that leaves the batch capability out of their
# registration: the coordinator then sends them unary Prepare, Commit and Rollback.
UNARY_FLAG = "--no-batch"
# Refusal reasons kept for the report when orders end otherwise than the workload intended.
REASONS_KEPT = 5


@dataclass
class DtmResult:
    participants: list[Participant]
    tally: Tally
    invariants: InvariantResult
    #: Orders that ended otherwise than the workload made them to (e.g. refused by a lock
    #: timeout although stock and money were plentiful), and the commonest reasons.
    unexpected: int = 0
    unexpected_reasons: list[str] = field(default_factory=list)
    #: fsyncs and messages per transaction, from the servers' counters (when they have them).
    costs: hooks.Costs = field(default_factory=hooks.Costs)
    settle_s: float | None = None
    confirmed_orders: int | None = None
    #: The coordinator's memory and log size, sampled during the run.
    footprint: list[footprint.Sample] = field(default_factory=list)
    #: With --submit-batch: (SubmitBatch calls, transactions they carried) over the run.
    submit_batches: tuple[int, int] | None = None
    #: How the coordinator reaches the participants, from their registered capabilities:
    #: "batched" (Exchange), "unary" (Prepare, Commit, Rollback) or "mixed"; None: not read.
    participant_path: str | None = None

    @property
    def transactions_total(self) -> int:
        """Every Submit the clients made over the whole run (warmup and drain included)."""
        return sum(self.tally.total.values())


class _Recorder:
    """What the clients were told, for the client-view invariants."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.aborted: list[str] = []
        self.uncertain = 0
        self.unexpected = 0
        self.reasons: Counter[str] = Counter()

    def view(self) -> ClientView:
        return ClientView(
            committed=set(self.committed),
            aborted=set(self.aborted),
            uncertain=self.uncertain,
            units_per_order=UNITS_PER_ORDER,
        )


async def measure_dtm(
    participants: list[Participant],
    spec: LoadSpec,
    workload: Workload,
    *,
    data_dir: Path | None = None,
    keep_data: bool = False,
    progress: bool = True,
    metrics: bool = True,
    submit_batch: int = 0,
    unary_participants: bool = False,
) -> DtmResult:
    """`submit_batch` > 0: the clients' transactions travel in SubmitBatch calls, at most that
    many in flight per channel (OrderClient's batch_in_flight); 0: one Submit each.
    `unary_participants`: the services register without the batch capability (--no-batch),
    so the coordinator speaks the plain unary contract to them."""
    owned = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="dtm-bench-")) if data_dir is None else data_dir
    extras = [participant for participant in participants if participant.extra]
    missing = f"{hooks.HOOK_MISSING} (the servers have no {hooks.METRICS_FLAG})"
    if not metrics:
        missing = "not measured (--no-metrics)"
    with_metrics = metrics and await hooks.flag_supported(
        [MODULES[COORDINATOR], MODULES["inventory"]]
    )
    # The cluster's ports in one call, so that all are distinct: its gRPC ports, then each
    # process's /metrics endpoint (bench/hooks.py) when available. FreePorts: its start moves
    # a process whose port another program bound before it did, instead of failing the run.
    # The extra instances bind port 0 themselves (_start_extras).
    ports = free_ports(len(PROCESSES) * (2 if with_metrics else 1), HOST)
    service_args = [UNARY_FLAG] if unary_participants else []
    cluster = Cluster(
        directory,
        FreePorts(*ports[: len(PROCESSES)]),
        initial=initial_state(),
        metrics_ports=FreePorts(*ports[len(PROCESSES) :]) if with_metrics else None,
        extra_args={name: service_args for name in PROCESSES if name != COORDINATOR}
        if unary_participants
        else None,
    )
    metric_addresses: dict[str, str] = {}
    try:
        with Processes(cluster.logs_dir) as processes:
            try:
                await cluster.start_async()
                # Where each serves /metrics now: the start may have moved one.
                for name in PROCESSES:
                    address = cluster.metrics_address(name)
                    if address is not None:
                        metric_addresses[name] = address
                extra_addresses = await _start_extras(
                    cluster, extras, processes, metric_addresses, with_metrics, service_args
                )
                path = await _participant_path(cluster.coordinator_address)
                result = await _load_and_check(
                    cluster,
                    participants,
                    extra_addresses,
                    spec,
                    workload,
                    processes,
                    progress,
                    metric_addresses,
                    submit_batch,
                )
                result.participant_path = path
            finally:
                processes.stop()
                await cluster.stop_async()
        if not metric_addresses:
            result.costs = hooks.Costs(note=missing)
        return result
    finally:
        if owned and not keep_data:
            shutil.rmtree(directory, ignore_errors=True)


async def _start_extras(
    cluster: Cluster,
    extras: list[Participant],
    processes: Processes,
    metric_addresses: dict[str, str],
    with_metrics: bool,
    service_args: list[str],
) -> dict[str, str]:
    """Start the extra instances, each on ports it binds itself (port 0: a port chosen here
    could be bound by another program before the instance did), and add their /metrics
    addresses to `metric_addresses`; return their gRPC addresses once each serves and is
    registered at it."""
    for participant in extras:
        processes.spawn(
            participant.name,
            [
                "bench.instance",
                *("--kind", participant.kind, "--name", participant.name),
                *("--listen", f"{HOST}:0"),
                *("--data-dir", str(cluster.data_dir)),
                *("--coordinator", cluster.coordinator_address),
                *("--initial", str(cluster.initial_path)),
                *((hooks.METRICS_FLAG, f"{HOST}:0") if with_metrics else ()),
                *service_args,
            ],
        )
    addresses: dict[str, str] = {}
    for participant in extras:
        name = participant.name
        # As the SDK logs them ("NAME: participant serving port=N ..."), /metrics first.
        serving = re.compile(rf" {re.escape(name)}: participant serving port=(\d+)")
        port = await processes.announced(name, serving, EXTRA_START_TIMEOUT_S)
        addresses[name] = f"{HOST}:{port}"
        if with_metrics:
            metrics = re.compile(rf" {re.escape(name)}: metrics serving address=(\S+)")
            metric_addresses[name] = await processes.announced(name, metrics, 0.0)
    deadline = time.monotonic() + EXTRA_START_TIMEOUT_S
    pending = dict(addresses)
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as coordinator:
        registry = coordinator_pb2_grpc.CoordinatorStub(coordinator)
        # Bounded by the deadline; readiness is polled because a process exposes no event.
        while pending:
            processes.check_alive()
            response = await registry.ListParticipants(
                coordinator_pb2.ListParticipantsRequest(), timeout=1.0
            )
            registered = {info.name: info.address for info in response.participants}
            for name, address in list(pending.items()):
                if registered.get(name) == address and await _serving(address):
                    del pending[name]
            if pending and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"extra participants not ready in {EXTRA_START_TIMEOUT_S:g} s: "
                    f"{', '.join(sorted(pending))}"
                )
            if pending:
                await asyncio.sleep(POLL_S)
    return addresses


async def _participant_path(coordinator: str) -> str:
    """How the coordinator reaches the registered participants: "batched" when every one
    declared the batch capability, "unary" when none did, else "mixed". Read from the
    coordinator, so the results say what the run used, not what it asked for."""
    async with grpc.aio.insecure_channel(coordinator) as channel:
        response = await coordinator_pb2_grpc.CoordinatorStub(channel).ListParticipants(
            coordinator_pb2.ListParticipantsRequest(), timeout=5.0
        )
    batching = {info.capabilities.batch for info in response.participants}
    if batching == {True}:
        return "batched"
    return "unary" if batching == {False} else "mixed"


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def _load_and_check(
    cluster: Cluster,
    participants: list[Participant],
    extra_addresses: dict[str, str],
    spec: LoadSpec,
    workload: Workload,
    processes: Processes,
    progress: bool,
    metric_addresses: dict[str, str],
    submit_batch: int,
) -> DtmResult:
    recorder = _Recorder()
    samples: list[hooks.Sample] = []
    footprints: list[footprint.Sample] = []
    sample_footprint = footprint.sampler(
        lambda: cluster.pid(COORDINATOR),
        cluster.data_dir / COORDINATOR / "wal",
        footprints,
        footprint.interval_s(spec.warmup_s, spec.duration_s),
    )
    scrape_errors: list[str] = []

    async def sample_counters(tally: Tally) -> None:
        """Scrape every process as the window opens and as it closes (same clock as drive)."""
        for instant in (tally.window_start, tally.window_end):
            await asyncio.sleep(max(0.0, instant - time.perf_counter()))
            before = sum(tally.total.values())
            try:
                counters = await hooks.scrape(metric_addresses)
            except (OSError, ValueError) as error:
                scrape_errors.append(f"scrape failed: {type(error).__name__}: {error}")
                return
            # The scrape takes a few ms under load: count the transactions at its midpoint.
            samples.append(
                hooks.Sample(
                    (before + sum(tally.total.values())) / 2, counters, time.process_time()
                )
            )

    channels = open_channels(cluster.coordinator_address, spec.clients)
    try:
        stubs = [coordinator_pb2_grpc.CoordinatorStub(channel) for channel in channels]
        # --submit-batch: one batching client per channel, shared by its clients.
        batching = (
            [OrderClient(channel, batch_in_flight=submit_batch) for channel in channels]
            if submit_batch
            else []
        )

        def failed(code: grpc.StatusCode) -> Outcome:
            recorder.uncertain += 1
            recorder.unexpected += 1
            recorder.reasons[f"call failed: {code.name}"] += 1
            return Outcome.ERROR

        async def call(client: int, number: int) -> Outcome:
            order = workload.order(client, number)
            if batching:
                result = await channel_of(batching, client).submit(
                    order.request, timeout_s=SUBMIT_TIMEOUT_S
                )
                if result.response is None:
                    return failed(result.code)
                response = result.response
            else:
                try:
                    response = await channel_of(stubs, client).Submit(
                        order.request, timeout=SUBMIT_TIMEOUT_S
                    )
                except grpc.aio.AioRpcError as error:
                    return failed(error.code())
            if response.outcome == coordinator_pb2.OUTCOME_COMMITTED:
                recorder.committed.append(order.order_id)
                outcome = Outcome.COMMITTED
            elif response.outcome == coordinator_pb2.OUTCOME_ABORTED:
                recorder.aborted.append(order.order_id)
                outcome = Outcome.ABORTED
            else:
                recorder.uncertain += 1
                outcome = Outcome.UNKNOWN
            if (outcome is Outcome.ABORTED) != order.abort_expected or outcome is Outcome.UNKNOWN:
                recorder.unexpected += 1
                recorder.reasons[f"{outcome.value}: {response.reason[:120]}"] += 1
            return outcome

        tally = await drive(
            call,
            spec,
            label=f"dtm N={len(participants)}",
            progress=progress,
            companions=[sample_footprint, *([sample_counters] if metric_addresses else [])],
        )
        calls = sum(client.batches[0] for client in batching)
        carried = sum(client.batches[1] for client in batching)
    finally:
        for order_client in batching:
            await order_client.close()
        await close_channels(channels)
    processes.check_alive()

    kinds = workload.kinds
    started = time.monotonic()
    primary: dict[str, str] = cluster.service_addresses
    # The first instances' view, then one per extra instance in place of its kind's first.
    views: list[tuple[Participant | None, dict[str, str]]] = [(None, primary)] + [
        (participant, {**primary, participant.kind: extra_addresses[participant.name]})
        for participant in participants
        if participant.extra
    ]
    read, notes = await _final_states(views)
    note = "; ".join(notes)
    settle_s = time.monotonic() - started
    # Extra instances start from the same initial document as the first ones.
    initial = None if cluster.initial is None else invariants.InitialState.of(cluster.initial)
    result = checks.check_all(
        [snapshot for _, snapshot in read],
        recorder.view(),
        kinds,
        note,
        initial,
        swapped=[extra for extra, _ in read],
    )
    if len(read) < len(views) and not result.violations:
        # Part of the state went unchecked: "0 violations" would claim more than was checked.
        result = InvariantResult(None, result.samples, result.scope, note, result.views)
    first = [snapshot for extra, snapshot in read if extra is None]
    confirmed = (
        sum(order.state == invariants.CONFIRMED for order in first[0].orders)
        if first and ORDERS in kinds
        else None
    )
    if len(samples) == 2:
        costs = hooks.costs(samples[0], samples[1])
    else:
        costs = hooks.Costs(note="; ".join(scrape_errors) or "not measured: no scrape")
    return DtmResult(
        costs=costs,
        participants=participants,
        tally=tally,
        invariants=result,
        unexpected=recorder.unexpected,
        unexpected_reasons=[
            f"{count} x {reason}" for reason, count in recorder.reasons.most_common(REASONS_KEPT)
        ],
        settle_s=round(settle_s, 3),
        confirmed_orders=confirmed,
        footprint=footprints,
        submit_batches=(calls, carried) if batching else None,
    )


async def _final_states(
    views: list[tuple[Participant | None, dict[str, str]]],
) -> tuple[list[tuple[Participant | None, invariants.Snapshot]], list[str]]:
    """The settled state seen through each view's targets, with the view's extra instance (a
    view that could not be read is left out), and notes on what went wrong."""
    snapshots: list[tuple[Participant | None, invariants.Snapshot]] = []
    notes: list[str] = []
    for extra, targets in views:
        try:
            snapshots.append(
                (extra, await invariants.wait_until_settled(targets, timeout_s=SETTLE_TIMEOUT_S))
            )
        except TimeoutError as error:
            # Not settling is itself a finding: check the state as it is, with the `settled`
            # rules counting whatever is still reserved or pending as a violation.
            notes.append(str(error))
            try:
                snapshots.append((extra, await invariants.read_snapshot(targets)))
            except grpc.aio.AioRpcError as read_error:
                notes.append(f"unreadable: {read_error.code().name}: {read_error.details()}")
        except grpc.aio.AioRpcError as error:
            # E.g. RESOURCE_EXHAUSTED: the read APIs have no pagination, and a long run's lists
            # can outgrow one message. Then the state is not checked, and the report says so.
            notes.append(f"final state unreadable: {error.code().name}: {error.details()}")
    return snapshots, notes
