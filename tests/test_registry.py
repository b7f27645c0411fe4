"""The coordinator's registry over a participant's life: an operator unregisters a decommissioned
one, never while the coordinator still owes it phase 2, and durably; a port the registry no
longer uses is closed once what it carries is sent."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli, logs
from dtm.coordinator.registry import Registry
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, shop_pb2
from participants.server import ParticipantConfig, ParticipantServer, process
from participants.services.notification import NotificationService
from tests.cli_runner import dtm
from tests.harness import InProcessCluster, eventually, order_branches, pack


def names(response: coordinator_pb2.ListParticipantsResponse) -> list[str]:
    return [p.name for p in response.participants]


def test_removing_a_participant_that_still_runs_warns_that_it_will_come_back(
    tmp_path: Path,
) -> None:
    """`dtm participants remove` of a running participant succeeded without a word, though
    it registers again at its next start (found by a bug hunt)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            status, out, err = await dtm(*at, "participants", "remove", "notification")
            assert cli.EXIT_OK == status and "unregistered notification" in out, err
            incarnation = cluster.participants["notification"].engine.incarnation
            assert f"incarnation {incarnation}" in out, out
            # (The in-process coordinator logs to the same stderr.)
            [warning] = [line for line in err.splitlines() if line.startswith("dtm: warning")]
            assert "notification at" in warning and "still running" in warning, err
            assert "registers again at its next start" in warning

    asyncio.run(scenario())


def test_an_operator_unregisters_a_participant_once_nothing_is_owed_to_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            unregister = cluster.client.UnregisterParticipant
            for request, code, words in [
                ("Bad Name", grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
                ("ghost", grpc.StatusCode.NOT_FOUND, "registered: inventory, notification"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await unregister(coordinator_pb2.UnregisterParticipantRequest(name=request))
                assert code == refused.value.code() and words in (refused.value.details() or "")

            # Orders votes, then rejects its Commit: the coordinator owes it phase 2.
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            response = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            status, _, err = await dtm(*at, "participants", "remove", "orders")
            assert cli.EXIT_ERROR == status
            assert "not yet finished: the coordinator must" in err and "e.g. t-1" in err
            assert "dtm txn retry" in err
            listed = await cluster.client.ListParticipants(
                coordinator_pb2.ListParticipantsRequest()
            )
            assert "orders" in names(listed)

            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_NONE)
            await cluster.client.RetryTransaction(
                coordinator_pb2.RetryTransactionRequest(transaction_id="t-1")
            )

            async def finished() -> bool:
                txn = await cluster.client.GetTransaction(
                    coordinator_pb2.GetTransactionRequest(transaction_id="t-1")
                )
                return txn.state == coordinator_pb2.TRANSACTION_STATE_COMMITTED

            await eventually(finished)
            # Decommissioned: stopped first (it would register again when it starts).
            stopped = cluster.participants.pop("orders")
            await stopped.stop(0)
            status, out, err = await dtm(*at, "participants", "remove", "orders", "--json")
            assert cli.EXIT_OK == status, out
            removed = json.loads(out)
            assert "orders" == removed["name"]
            # Which process was removed, as `dtm participants --json` names it.
            assert stopped.engine.incarnation == removed["incarnation"], removed
            assert "dtm: warning" not in err  # stopped: nothing to warn about
            registry = cluster.coordinator.engine.registry

            async def port_closed() -> bool:
                return registry.retired == 0

            await eventually(port_closed)
            status, _, err = await dtm(*at, "participants", "remove", "orders")
            assert cli.EXIT_ERROR == status and "'orders' is not registered" in err

            # A retry of a transaction that ran there still gets its outcome; a new Submit
            # that names it is refused as for any unknown participant.
            again = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == again.outcome
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await cluster.submit(order_branches("o-2", [("sku-apple", 1)]), "t-2")
            assert grpc.StatusCode.NOT_FOUND == unknown.value.code()
            assert "'orders' is not registered" in (unknown.value.details() or "")

            # Durable: after a restart from the log, then from a checkpoint.
            for checkpoint in (False, True):
                if checkpoint:
                    engine = cluster.coordinator.engine
                    engine.records_since_checkpoint = engine.config.checkpoint_every_records
                    assert await engine.checkpoint_if_due()
                await cluster.restart_coordinator()
                listed = await cluster.client.ListParticipants(
                    coordinator_pb2.ListParticipantsRequest()
                )
                assert ["inventory", "notification", "payment"] == names(listed)

    asyncio.run(scenario())


def test_a_probe_in_flight_on_a_retired_port_still_resolves_its_transaction(
    tmp_path: Path,
) -> None:
    """A one-phase commit's answer is lost, and the Rollback that probes it hangs on a dead
    address when the participant comes back at a new one. The old port waits for the probe
    before it closes its channel; the transaction is resolved, never left UNKNOWN."""

    async def scenario() -> None:
        black_hole = socket.socket()  # accepts connections, never speaks HTTP/2
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)
        try:
            async with InProcessCluster(tmp_path) as cluster:
                register = cluster.client.RegisterParticipant
                capabilities = coordinator_pb2.Capabilities(one_phase=True, batch=True)
                dead = f"127.0.0.1:{black_hole.getsockname()[1]}"
                await register(
                    coordinator_pb2.RegisterParticipantRequest(
                        name="inventory", address=dead, capabilities=capabilities
                    )
                )
                lines = [shop_pb2.StockLine(sku="sku-apple", quantity=1)]
                branch = coordinator_pb2.BranchRequest(
                    participant="inventory", operation=pack(shop_pb2.ReserveStock(lines=lines))
                )
                await cluster.submit([branch], "t-1p", timeout_ms=300)
                get = coordinator_pb2.GetTransactionRequest(transaction_id="t-1p")

                async def probing() -> bool:
                    txn = await cluster.client.GetTransaction(get)
                    return txn.state == coordinator_pb2.TRANSACTION_STATE_UNKNOWN

                await eventually(probing)
                engine = cluster.coordinator.engine
                registry = engine.registry
                sent = engine.counters.requests

                async def probe_in_flight() -> bool:  # a probe sent from now on hangs for 2 s
                    return engine.counters.requests > sent

                await eventually(probe_in_flight)
                port = cluster.address("inventory").rsplit(":", 1)[1]
                await register(
                    coordinator_pb2.RegisterParticipantRequest(
                        name="inventory", address=f"localhost:{port}", capabilities=capabilities
                    )
                )
                assert 1 == registry.retired  # the old port, waiting for its probe

                async def resolved() -> bool:
                    txn = await cluster.client.GetTransaction(get)
                    return txn.state == coordinator_pb2.TRANSACTION_STATE_ABORTED

                await eventually(resolved)
                assert 0 == registry.retired
        finally:
            black_hole.close()

    asyncio.run(scenario())


def test_a_port_for_an_old_address_is_closed_once_idle(tmp_path: Path) -> None:
    """A participant that comes back at a new address (a new pod at each restart) leaves its
    old port behind: its channel is closed, not kept open until the coordinator stops, and
    the transactions after it run through the new one."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            registry = cluster.coordinator.engine.registry
            old_channels = []
            for n in range(3):
                response = await cluster.submit(
                    order_branches(f"o-{n}", [("sku-apple", 1)]), f"t-{n}"
                )
                assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
                old_channels.append(registry.ports()["inventory"].client.channel)
                service = type(cluster.participants["inventory"].service)()
                await cluster.restart_participant("inventory", service)
            response = await cluster.submit(order_branches("o-3", [("sku-apple", 1)]), "t-3")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            assert len({id(channel) for channel in old_channels}) == 3

            async def closed() -> bool:
                return registry.retired == 0 and all(
                    channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
                    for channel in old_channels
                )

            await eventually(closed)
            current = registry.ports()["inventory"].client.channel
            assert current.get_state() is not grpc.ChannelConnectivity.SHUTDOWN

    asyncio.run(scenario())


def test_a_late_rollback_to_an_unregistered_participant_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aborted transaction has ended, so it does not stop the unregistering; its rollback
    retries then find no participant, and stop without an error (presumed abort: the
    participant, if it ever asks, hears ABORTED from QueryOutcome)."""
    failures: list[str] = []
    report = logs.report_failure

    def record(task: asyncio.Task[None], component: str, what: str) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.append(f"{what}: {task.exception()!r}")
        report(task, component, what)

    monkeypatch.setattr(logs, "report_failure", record)

    async def scenario() -> None:
        overrides = {"backoff_ms_min": 100, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path, coordinator_overrides=overrides) as cluster:
            engine = cluster.coordinator.engine
            retried: list[tuple[int, bool]] = []
            phase_two = engine._phase_two

            def counted(run: Any, index: int, commit: bool) -> None:
                retried.append((index, commit))
                phase_two(run, index, commit)

            monkeypatch.setattr(engine, "_phase_two", counted)
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-3", [("sku-apple", 1)], account="acct-blocked")
            response = await cluster.submit(branches, "t-3")
            assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
            await cluster.client.UnregisterParticipant(
                coordinator_pb2.UnregisterParticipantRequest(name="orders")
            )

            async def retried_after() -> bool:  # the first rollback, then its retry
                return retried.count((1, False)) >= 2

            await eventually(retried_after)
            await asyncio.sleep(0.5)  # time for another retry, that must not come
            assert 2 == retried.count((1, False))
        assert [] == failures

    asyncio.run(scenario())


def test_a_registration_that_changes_nothing_is_answered_once_the_first_is_durable(
    tmp_path: Path,
) -> None:
    """A participant retrying its registration while the first one waits for its fsync was
    told at once that nothing changed; a crash before that fsync then lost a registration the
    participant believed made (persist before you speak; found by a bug hunt)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            log = cluster.coordinator.engine.log
            real_wait = log.wait_durable
            fsync_done = asyncio.Event()
            fsync_started = asyncio.Event()

            async def slow_fsync(lsn: int) -> None:
                fsync_started.set()
                await fsync_done.wait()
                await real_wait(lsn)

            log.wait_durable = slow_fsync  # type: ignore[method-assign]
            request = coordinator_pb2.RegisterParticipantRequest(
                name="inventory-2",
                address=cluster.address("inventory"),
                capabilities=coordinator_pb2.Capabilities(batch=True),
            )
            first = asyncio.ensure_future(cluster.client.RegisterParticipant(request))
            await fsync_started.wait()  # the first registration is written, not yet durable
            again = asyncio.ensure_future(cluster.client.RegisterParticipant(request))
            await asyncio.sleep(0.2)  # time to be answered, which it must not be yet
            assert not first.done() and not again.done()
            fsync_done.set()
            assert (await first).changed and not (await again).changed

    asyncio.run(scenario())


def test_a_submit_that_waited_for_an_attempt_under_its_id_checks_its_participants(
    tmp_path: Path,
) -> None:
    """The server skips its registry checks for an id the engine knows, but the Submit may
    then run a fresh attempt: here it waits for a running reuse of the id, which notification
    refuses and which is not kept. Before, its unknown participant was a KeyError (UNKNOWN to
    the client); now NOT_FOUND, as for any Submit (a bug hunt)."""

    def note(body: str, participant: str = "notification") -> list[coordinator_pb2.BranchRequest]:
        notify = shop_pb2.SendNotification(order_id="o-1", recipient="a@b.test", body=body)
        return [coordinator_pb2.BranchRequest(participant=participant, operation=pack(notify))]

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 1}
        ) as cluster:
            engine = cluster.coordinator.engine
            first = await cluster.submit(note("one"), "t-x")
            assert coordinator_pb2.OUTCOME_COMMITTED == first.outcome
            await cluster.submit(note("two"), "t-y")  # pushes t-x out of the window
            assert not engine.knows("t-x")
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_SLOW, 300)
            reuse = asyncio.create_task(cluster.submit(note("other"), "t-x"))

            async def running() -> bool:
                return engine.knows("t-x")

            await eventually(running)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await cluster.submit(note("third", participant="nope"), "t-x")
            assert grpc.StatusCode.NOT_FOUND == raised.value.code()
            assert "participant 'nope' is not registered" in (raised.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await reuse
            assert grpc.StatusCode.ALREADY_EXISTS == refused.value.code()
            assert "t-x" not in engine.active

    asyncio.run(scenario())


def registration(incarnation: str, address: str = "127.0.0.1:1") -> coordinator_pb2.ParticipantInfo:
    return coordinator_pb2.ParticipantInfo(
        name="inventory", address=address, incarnation=incarnation
    )


def test_another_incarnation_at_the_same_address_gets_a_port_of_its_own() -> None:
    """Mutation: Registry.put kept the port when only the incarnation changed (registry.py,
    the retire condition). The port's calls name the incarnation they are for: every call
    then went to the new process addressed to the old one, which it refuses as misdirected,
    so each transaction with a branch there failed until the coordinator restarted."""

    async def scenario() -> None:
        registry = Registry()
        registry.put(registration("first"))
        assert "first" == registry.port("inventory").client.incarnation
        registry.put(registration("second"))  # a participant restarted on a new log
        assert "second" == registry.port("inventory").client.incarnation
        await registry.close()

    asyncio.run(scenario())


def test_an_empty_registered_incarnation_never_marks_an_asker_replaced() -> None:
    """Mutation: Registry.replacing took an empty registered incarnation (a participant from
    before incarnations, or in another language) for another process (registry.py). Every
    inquiry of the registered participant, which names its incarnation, was then refused and
    the SDK stopped the process, its branches left in doubt. Empty is never checked."""
    registry = Registry()
    registry.put(registration(""))
    assert registry.replacing("inventory", "some-incarnation") is None
    registry.put(registration("first"))
    assert registry.replacing("inventory", "first") is None
    replaced_by = registry.replacing("inventory", "earlier")
    assert replaced_by is not None and "first" == replaced_by.incarnation


class _RegistersAfter(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator that answers RegisterParticipant UNAVAILABLE `failures` times first."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def RegisterParticipant(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return coordinator_pb2.RegisterParticipantResponse()


def test_a_registration_failing_for_long_warns_ever_less_often(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A participant retries its registration every second for as long as it fails, and
    each failure was a WARNING: a day's outage wrote 86,400 of them. Attempts 1, 2, 4, 8...
    warn now, the others are DEBUG, as the coordinator's retried Commits."""
    monkeypatch.setattr(process, "registration_delay_s", lambda attempt: 0.0)  # no waits

    async def scenario() -> None:
        coordinator = _RegistersAfter(failures=20)
        server = grpc.aio.server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        participant = ParticipantServer(
            NotificationService(),
            ParticipantConfig(data_dir=tmp_path, coordinator=f"127.0.0.1:{port}"),
        )
        try:
            await participant.start()
            await asyncio.wait_for(participant.registered.wait(), 30)
        finally:
            await participant.stop(0.1)
            await server.stop(0)
        assert 21 == coordinator.calls

    capsys.readouterr()
    asyncio.run(scenario())
    warnings = [
        line.partition(" attempt=")[2].split()[0]
        for line in capsys.readouterr().err.splitlines()
        if " WARNING " in line and "registration failed; retrying" in line
    ]
    assert ["1", "2", "4", "8", "16"] == warnings


def test_a_registration_again_unchanged_is_shown_as_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dtm participants` REGISTERED showed when a registration was first made: a participant
    restarted on its log, at its address, registers again unchanged, and read as if it had run
    since then (found by a bug hunt). It shows the last registration, and still does after a
    coordinator restart before its next checkpoint (that time was kept in memory only; it is
    logged, as any registration)."""
    from dtm.coordinator import server

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            request = coordinator_pb2.RegisterParticipantRequest(
                name="inventory-2",
                address=cluster.address("inventory"),
                capabilities=coordinator_pb2.Capabilities(batch=True),
                incarnation="i-1",
            )

            async def registered_at() -> int:
                listed = await cluster.client.ListParticipants(
                    coordinator_pb2.ListParticipantsRequest()
                )
                [info] = [p for p in listed.participants if p.name == "inventory-2"]
                return info.registered_at_unix_ms

            registered = []
            for now_ms in (1_800_000_000_000, 1_800_000_360_000):  # the restart, 6 min on
                monkeypatch.setattr(server, "wall_ms", lambda now_ms=now_ms: now_ms)
                answer = await cluster.client.RegisterParticipant(request)
                registered.append((answer.changed, await registered_at()))
            assert [(True, 1_800_000_000_000), (False, 1_800_000_360_000)] == registered
            await cluster.restart_coordinator()  # no checkpoint since
            assert 1_800_000_360_000 == await registered_at()

    asyncio.run(scenario())
