"""The coordinator's registry over a participant's life: an operator unregisters a decommissioned
one, never while the coordinator still owes it phase 2, and durably; a port the registry no
longer uses is closed once what it carries is sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli, logs
from dtmpb.v1 import coordinator_pb2, participant_pb2
from tests.harness import InProcessCluster, eventually, order_branches
from tests.test_cli import dtm


def names(response: coordinator_pb2.ListParticipantsResponse) -> list[str]:
    return [p.name for p in response.participants]


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
            assert "not yet finished, e.g. t-1" in err and "dtm txn retry" in err
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
            await cluster.participants.pop("orders").stop(0)
            status, out, _ = await dtm(*at, "participants", "remove", "orders", "--json")
            assert cli.EXIT_OK == status, out
            assert "orders" == json.loads(out)["name"]
            registry = cluster.coordinator.engine.registry

            async def port_closed() -> bool:
                return registry.retired == 0

            await eventually(port_closed)
            status, _, err = await dtm(*at, "participants", "remove", "orders")
            assert cli.EXIT_ERROR == status and "'orders' is not registered" in err

            # A Submit that names it is refused as for any unknown participant.
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


def test_a_port_for_an_old_address_is_closed_once_idle(tmp_path: Path) -> None:
    """A participant that comes back at a new address (a new pod at each restart) leaves its
    old port behind: it is closed, not kept open until the coordinator stops."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            for n in range(3):
                response = await cluster.submit(
                    order_branches(f"o-{n}", [("sku-apple", 1)]), f"t-{n}"
                )
                assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
                service = type(cluster.participants["inventory"].service)()
                await cluster.restart_participant("inventory", service)
            registry = cluster.coordinator.engine.registry

            async def closed() -> bool:
                return registry.retired == 0

            await eventually(closed)

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
