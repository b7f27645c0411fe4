"""dtm.metrics: an in-process coordinator and three participants with their /metrics endpoints
on, real transactions, and scrapes over HTTP showing the metrics move."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from dtm import limits, logs, metrics
from dtm.coordinator.engine import CoordinatorConfig, Engine
from dtm.coordinator.server import CoordinatorServer, ServerConfig
from dtm.core.branch import BranchState
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2
from participants.server import ParticipantConfig, ParticipantServer
from participants.services.inventory import InventoryService
from participants.services.orders import OrdersService
from participants.services.payment import PaymentService
from tests.doubles import AnsweringRegistry
from tests.harness import ACCOUNTS, STOCK, eventually, order_branches

#: How long a test waits for the server to close a connection before it counts as never.
TIMEOUT_GUARD_S = 5.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint: (name, labels) -> value, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


class Servers:
    coordinator: CoordinatorServer
    client: coordinator_pb2_grpc.CoordinatorStub

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.participants: dict[str, ParticipantServer] = {}

    async def scrape(self, name: str) -> Samples:
        server = self.participants.get(name) or self.coordinator
        # urllib blocks; the servers run on this thread's event loop.
        return await asyncio.to_thread(scrape, server.metrics_port)

    async def submit(self, request: coordinator_pb2.SubmitRequest) -> Any:
        return await self.client.Submit(request, timeout=30)


@asynccontextmanager
async def servers(data_dir: Path) -> AsyncIterator[Servers]:
    running = Servers(data_dir)
    running.coordinator = CoordinatorServer(
        ServerConfig(
            data_dir=data_dir,
            listen="127.0.0.1:0",
            engine=CoordinatorConfig(prepare_timeout_ms=5_000, transaction_timeout_ms=10_000),
            metrics_listen="127.0.0.1:0",
        )
    )
    port = await running.coordinator.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    running.client = coordinator_pb2_grpc.CoordinatorStub(channel)
    try:
        for service in (InventoryService(dict(STOCK)), OrdersService(), PaymentService(ACCOUNTS)):
            config = ParticipantConfig(
                data_dir=data_dir,
                listen="127.0.0.1:0",
                coordinator=address,
                test_control=True,
                metrics_listen="127.0.0.1:0",
            )
            server = ParticipantServer(service, config)
            running.participants[service.name] = server
            await server.start()
            await asyncio.wait_for(server.registered.wait(), 10)
        yield running
    finally:
        await channel.close(None)
        for server in running.participants.values():
            await server.stop(0.1)
        await running.coordinator.stop(0.1)


def three_branches(order_id: str, sku: str = "sku-apple", quantity: int = 1) -> list[Any]:
    return order_branches(order_id, [(sku, quantity)])[:3]  # inventory, orders, payment


def test_metrics_move_with_transactions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with servers(tmp_path) as running:
            before = await running.scrape("coordinator")
            assert 0 == value(before, "dtm_transactions_total", outcome="committed")
            assert 3 == value(before, "dtm_participants_registered")
            # Labelled counters exist at 0 for every participant before their first event:
            # one that first appears at 1 gives increase() nothing, and an alert on the
            # first heuristic of a participant would miss it.
            for participant in ("inventory", "orders", "payment"):
                assert 0 == value(before, "dtm_phase_two_retries_total", participant=participant)
                for outcome in ("heuristic commit", "heuristic rollback", "heuristic hazard"):
                    heuristics = "dtm_heuristic_outcomes_total"
                    assert 0 == value(before, heuristics, participant=participant, outcome=outcome)

            committed = await running.submit(
                coordinator_pb2.SubmitRequest(transaction_id="t-1", branches=three_branches("o-1"))
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome, committed.reason
            # Out of stock: inventory refuses, the transaction aborts.
            aborted = await running.submit(
                coordinator_pb2.SubmitRequest(
                    transaction_id="t-2", branches=three_branches("o-2", "sku-scarce", 10)
                )
            )
            assert coordinator_pb2.OUTCOME_ABORTED == aborted.outcome
            # A Submit refused before it starts is handled time too (the handler's `finally`).
            try:
                await running.submit(coordinator_pb2.SubmitRequest(transaction_id="t-3"))
            except grpc.aio.AioRpcError as error:
                assert grpc.StatusCode.INVALID_ARGUMENT == error.code()
            else:
                raise AssertionError("a Submit without branches was accepted")

            async def both_finished() -> bool:
                samples = await running.scrape("coordinator")
                return 1 == value(samples, "dtm_transactions_total", outcome="committed") and 1 == (
                    value(samples, "dtm_transactions_total", outcome="aborted")
                )

            await eventually(both_finished)
            samples = await running.scrape("coordinator")
            for outcome in ("committed", "aborted"):
                count = "dtm_decision_latency_seconds_count"
                assert 1 == value(samples, count, outcome=outcome)
                assert 1 == value(samples, "dtm_end_to_end_latency_seconds_count", outcome=outcome)
            assert 0 < value(samples, "dtm_decision_latency_seconds_sum", outcome="committed")
            assert 3 == value(samples, "dtm_submit_handling_seconds_count")
            assert 0 < value(samples, "dtm_submit_handling_seconds_sum")
            prepares = "dtm_participant_call_latency_seconds_count"
            assert 2 == value(samples, prepares, participant="inventory", rpc="Prepare")
            assert 1 == value(samples, prepares, participant="orders", rpc="Commit")
            assert 0 == value(
                samples,
                "dtm_participant_call_failures_total",
                participant="inventory",
                rpc="Prepare",
            )
            assert 0 == value(samples, "dtm_transactions_in_flight")
            assert 0 == value(samples, "dtm_transactions_in_doubt")
            # The three registrations, and the one commit decision (an abort logs nothing).
            assert 3 + 1 == value(samples, "dtm_log_writes_total", kind="forced")
            assert 1 <= value(samples, "dtm_wal_fsyncs_total")
            assert 1 <= value(samples, "dtm_wal_batch_records_count")
            assert 1 <= value(samples, "dtm_wal_batch_records_max")
            assert 0 < value(samples, "dtm_protocol_messages_total", kind="requests")
            assert "process_cpu_seconds_total" in {name for name, _ in samples}

            inventory = await running.scrape("inventory")
            assert 1 == value(inventory, "dtm_branches_total", state="prepared")
            assert 1 == value(inventory, "dtm_branches_total", state="committed")
            assert 1 == value(inventory, "dtm_branches_total", state="refused")
            assert 0 == value(inventory, "dtm_branches_in_doubt")
            assert 1 <= value(inventory, "dtm_wal_fsyncs_total")
            assert 1 <= value(inventory, "dtm_log_writes_total", kind="forced")
            for name in ("waits", "timeouts", "deadlocks", "queue_full", "grants"):
                assert 0 <= value(inventory, f"dtm_lock_{name}_total")
            orders = await running.scrape("orders")
            assert 1 <= value(orders, "dtm_lock_grants_total")  # the order id's lock

            # Garbage collections are timed, by generation: a full one forced here shows.
            full = value(samples, "dtm_gc_pause_seconds_count", generation="2")
            gc.collect()
            after = await running.scrape("inventory")  # one process: every endpoint sees it
            assert full + 1 <= value(after, "dtm_gc_pause_seconds_count", generation="2")
            assert 0 < value(after, "dtm_gc_pause_seconds_sum", generation="2")
            longest = value(after, "dtm_gc_pause_seconds_max", generation="2")
            assert 0 < longest <= value(after, "dtm_gc_pause_seconds_sum", generation="2")

    asyncio.run(scenario())


def test_retries_in_doubt_and_lock_waits_are_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with servers(tmp_path) as running:
            admin = running.participants["payment"]
            # Payment votes, then rejects the Commit: the transaction stays committing (in
            # doubt) and phase 2 is retried.
            admin.fault.mode = participant_pb2.FAULT_MODE_REJECT_DECISIONS
            response = await running.submit(
                coordinator_pb2.SubmitRequest(transaction_id="t-1", branches=three_branches("o-1"))
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome

            async def retried() -> bool:
                samples = await running.scrape("coordinator")
                key = ("dtm_phase_two_retries_total", frozenset({("participant", "payment")}))
                return samples.get(key, 0) >= 1

            await eventually(retried)
            samples = await running.scrape("coordinator")
            assert 1 == value(samples, "dtm_transactions_in_doubt")
            assert 1 == value(samples, "dtm_transactions_in_flight")
            failures = "dtm_participant_call_failures_total"
            assert 1 <= value(samples, failures, participant="payment", rpc="Commit")
            assert 0 == value(samples, "dtm_transactions_total", outcome="committed")
            payment = await running.scrape("payment")
            assert 1 == value(payment, "dtm_branches_in_doubt")

            # A second transaction for the same order id waits for the first's order lock.
            admin.fault.mode = participant_pb2.FAULT_MODE_SLOW
            admin.fault.delay_ms = 1_000
            first = asyncio.ensure_future(
                running.submit(
                    coordinator_pb2.SubmitRequest(
                        transaction_id="t-2", branches=three_branches("o-2")
                    )
                )
            )

            async def orders_holds_o2() -> bool:  # t-2's orders branch (1) is prepared
                info = running.participants["orders"].engine.branch(("t-2", 1))
                return info is not None and info.branch.state is BranchState.PREPARED

            await eventually(orders_holds_o2)
            second = await running.submit(
                coordinator_pb2.SubmitRequest(transaction_id="t-3", branches=three_branches("o-2"))
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == (await first).outcome
            assert coordinator_pb2.OUTCOME_ABORTED == second.outcome
            orders = await running.scrape("orders")
            assert 1 <= value(orders, "dtm_lock_waits_total")

            admin.fault.mode = participant_pb2.FAULT_MODE_NONE

            async def all_committed() -> bool:
                samples = await running.scrape("coordinator")
                return 2 == value(samples, "dtm_transactions_total", outcome="committed")

            await eventually(all_committed)
            samples = await running.scrape("coordinator")
            assert 0 == value(samples, "dtm_transactions_in_doubt")

    asyncio.run(scenario())


def test_the_series_of_an_unregistered_participant_go_with_it(tmp_path: Path) -> None:
    """Before, a participant's labelled series stayed after it was unregistered, for the life
    of the process: 50 register/unregister cycles under new names left 400 of them."""

    def ghostly(samples: Samples, name: str) -> list[str]:
        return [
            series
            for series, labels in samples
            if ("participant", name) in labels or any("ghost" in v for _, v in labels)
        ]

    async def scenario() -> None:
        async with servers(tmp_path) as running:
            coordinator = running.coordinator.engine
            stock = coordinator_pb2.Capabilities(operation_types=["dtm.v1.ReserveStock"])

            async def register(name: str) -> None:
                await running.client.RegisterParticipant(
                    coordinator_pb2.RegisterParticipantRequest(
                        name=name, address="127.0.0.1:1", capabilities=stock
                    )
                )

            async def unregister(name: str) -> bool:
                try:
                    await running.client.UnregisterParticipant(
                        coordinator_pb2.UnregisterParticipantRequest(name=name)
                    )
                except grpc.aio.AioRpcError as error:  # a transaction still there: again
                    assert grpc.StatusCode.FAILED_PRECONDITION == error.code()
                    return False
                return True

            for n in range(50):
                await register(f"ghost-{n}")
                assert ghostly(await running.scrape("coordinator"), f"ghost-{n}")
                assert await unregister(f"ghost-{n}")
            assert [] == ghostly(await running.scrape("coordinator"), "ghost-0")

            # One that was called (its Prepare fails: nobody listens there), then removed.
            await register("ghost-x")
            inventory = three_branches("o-g")[0]
            ghost = coordinator_pb2.BranchRequest()
            ghost.CopyFrom(inventory)
            ghost.participant = "ghost-x"
            response = await running.submit(
                coordinator_pb2.SubmitRequest(transaction_id="t-g", branches=[inventory, ghost])
            )
            assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
            samples = await running.scrape("coordinator")
            failures = "dtm_participant_call_failures_total"
            assert 1 <= value(samples, failures, participant="ghost-x", rpc="Prepare")

            async def unregistered() -> bool:
                return await unregister("ghost-x")

            await eventually(unregistered)
            assert [] == ghostly(await running.scrape("coordinator"), "ghost-x")
            # A Rollback its retired port still carried, answered now, or retried: they do not
            # come back.
            coordinator.observer.call_finished("ghost-x", "Rollback", time.perf_counter(), False)
            coordinator.observer.phase_two_retry("ghost-x")
            assert [] == ghostly(await running.scrape("coordinator"), "ghost-x")
            registered = await running.scrape("coordinator")
            assert 3 == value(registered, "dtm_participants_registered")
            assert ghostly(registered, "inventory")  # the others' stay

    asyncio.run(scenario())


def test_heuristic_reports_naming_unregistered_participants_share_one_series(
    tmp_path: Path,
) -> None:
    """Before, every participant name a ReportHeuristic gave (anyone may send one in plaintext
    mode, about a transaction id the coordinator never saw) added three series that were never
    removed: 20 reports under new names left 60. They are counted under one label now; the
    outcome is still recorded, and a registered participant's is still counted under its name."""

    def report(txn: str, participant: str) -> coordinator_pb2.ReportHeuristicRequest:
        return coordinator_pb2.ReportHeuristicRequest(
            transaction_id=txn,
            branch=0,
            participant=participant,
            forced=coordinator_pb2.OUTCOME_COMMITTED,
            decision=coordinator_pb2.OUTCOME_ABORTED,  # presumed abort: no record of txn
        )

    async def scenario() -> None:
        async with servers(tmp_path) as running:
            heuristics = "dtm_heuristic_outcomes_total"
            before = await running.scrape("coordinator")
            for outcome in ("heuristic commit", "heuristic rollback", "heuristic hazard"):
                labels = {"participant": metrics.UNREGISTERED, "outcome": outcome}
                assert 0 == value(before, heuristics, **labels)  # there to alert on at once
            for n in range(20):
                await running.client.ReportHeuristic(report(f"t-s{n}", f"stranger-{n}"))
            await running.client.ReportHeuristic(report("t-i", "inventory"))
            samples = await running.scrape("coordinator")
            strangers = [
                labels for name, labels in samples if any("stranger" in v for _, v in labels)
            ]
            assert [] == strangers
            commit = "heuristic commit"
            assert 20 == value(
                samples, heuristics, participant=metrics.UNREGISTERED, outcome=commit
            )
            assert 1 == value(samples, heuristics, participant="inventory", outcome=commit)
            kept = running.coordinator.engine.heuristics.get(("t-s7", 0, b""))
            assert kept is not None and "stranger-7" == kept.participant

    asyncio.run(scenario())


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = CoordinatorServer(ServerConfig(data_dir=tmp_path, listen="127.0.0.1:0"))
        await server.start()
        try:
            assert server.metrics is None
            assert 0 == server.metrics_port
            assert metrics.NO_OBSERVER is server.engine.observer
        finally:
            await server.stop(0.1)

    asyncio.run(scenario())


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path / "a", listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"
            )
        )
        await first.start()
        try:
            taken = f"127.0.0.1:{first.metrics_port}"
            second = CoordinatorServer(
                ServerConfig(data_dir=tmp_path / "b", listen="127.0.0.1:0", metrics_listen=taken)
            )
            try:
                await second.start()
            except OSError as error:
                assert f"cannot serve metrics on {taken}" in str(error)
                assert "is the port already in use?" in str(error)
            else:
                raise AssertionError("a second endpoint on the same port started")
            finally:
                await second.stop(0.1)
            # An address this machine does not have (TEST-NET-1) is not a port in use.
            foreign = CoordinatorServer(
                ServerConfig(
                    data_dir=tmp_path / "c", listen="127.0.0.1:0", metrics_listen="192.0.2.1:0"
                )
            )
            try:
                await foreign.start()
            except OSError as error:
                assert "cannot serve metrics on 192.0.2.1:0" in str(error)
                assert "already in use" not in str(error), str(error)
            else:
                raise AssertionError("an endpoint on a foreign address started")
            finally:
                await foreign.stop(0.1)
        finally:
            await first.stop(0.1)

    asyncio.run(scenario())


HOUR_MS = 3_600_000


@pytest.mark.parametrize("wall_step_ms", [HOUR_MS, -HOUR_MS], ids=["forward", "back"])
def test_transaction_latencies_are_timed_by_the_monotonic_clock(
    wall_step_ms: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """The decision and end-to-end latencies (and the "transaction finished" line's ms) were
    the wall clock's now less the transaction's start: with the wall clock stepped an hour
    forward while a transaction ran, it was an hour long in the histograms; stepped back, 0.
    Here 250 ms pass on the monotonic clock while the wall clock steps, during a prepare."""
    logs.configure("coordinator", "INFO")

    async def scenario() -> None:
        wall_ms, loop_s = [1_800_000_000_000], [100.0]
        registry = AnsweringRegistry()
        engine = Engine(
            MemoryLog(),
            registry,
            CoordinatorConfig(),
            clock_ms=lambda: wall_ms[0],
            monotonic_s=lambda: loop_s[0],
        )
        observed = metrics.CoordinatorMetrics(engine, MemoryLog())
        answering = registry.answering["yes-a"]
        answer = answering.prepare

        def prepare_while_the_clock_steps(item: Any) -> None:
            wall_ms[0] += 250 + wall_step_ms
            loop_s[0] += 0.25
            answer(item)

        answering.prepare = prepare_while_the_clock_steps  # type: ignore[method-assign]
        branches = [(name, any_pb2.Any()) for name in ("yes-a", "yes-b")]
        await engine.submit("t-step", branches, 5_000, b"t-step")

        async def finished() -> bool:
            return "t-step" not in engine.active

        await eventually(finished)
        sample = observed.registry.get_sample_value
        labels = {"outcome": "committed"}
        assert 0.25 == sample("dtm_end_to_end_latency_seconds_sum", labels)
        assert 0 <= (sample("dtm_decision_latency_seconds_sum", labels) or 0) <= 0.25

    asyncio.run(scenario())
    [line] = [line for line in capsys.readouterr().err.splitlines() if "finished" in line]
    assert " ms=250 " in f"{line} ", line


def test_the_endpoint_serves_a_bounded_number_of_connections_and_drops_silent_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection to /metrics took a thread (and a file descriptor) of the process for as
    long as its client kept it open, with no bound: under TLS 10 s per connection that never
    finished its handshake, over plain HTTP for good. Anyone who could reach the port took
    the process's threads and descriptors (the WAL's and gRPC's too) with silent
    connections. Now at most METRICS_CONNECTIONS_MAX are served at once (one more is closed
    at once), and a client silent for HANDSHAKE_TIMEOUT_S loses its connection."""
    monkeypatch.setattr(limits, "METRICS_CONNECTIONS_MAX", 2)
    monkeypatch.setattr(metrics, "HANDSHAKE_TIMEOUT_S", 60.0)

    def closed_by_server(connection: socket.socket) -> bool:
        connection.settimeout(TIMEOUT_GUARD_S)  # only if the server never closes it
        try:
            return b"" == connection.recv(1)
        except TimeoutError:
            return False

    async def scenario() -> None:
        registry = CollectorRegistry()
        Counter("dtm_test", "A sample to scrape.", registry=registry).inc()
        endpoint = metrics.MetricsEndpoint(registry, "127.0.0.1:0", "test")
        port = endpoint.start()
        address = ("127.0.0.1", port)
        try:
            # Accepted in the order they connect: the third finds both slots taken.
            silent = [socket.create_connection(address) for _ in range(2)]
            with socket.create_connection(address) as third:
                assert await asyncio.to_thread(closed_by_server, third)
            for connection in silent:
                connection.close()

            async def scraped() -> bool:  # once the silent ones' threads gave their slots back
                try:
                    samples = await asyncio.to_thread(scrape, port)
                except OSError:
                    return False
                return 1.0 == value(samples, "dtm_test_total")

            await eventually(scraped)
        finally:
            await endpoint.stop()

    asyncio.run(scenario())


def test_a_silent_client_of_the_plain_endpoint_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded connections need this: one that never sends its request held its slot for good."""
    monkeypatch.setattr(metrics, "HANDSHAKE_TIMEOUT_S", 0.2)

    async def scenario() -> None:
        endpoint = metrics.MetricsEndpoint(CollectorRegistry(), "127.0.0.1:0", "test")
        port = endpoint.start()
        try:
            with socket.create_connection(("127.0.0.1", port)) as silent:
                silent.settimeout(TIMEOUT_GUARD_S)  # only if the server never closes it
                assert b"" == await asyncio.to_thread(silent.recv, 1)
        finally:
            await endpoint.stop()

    asyncio.run(scenario())
