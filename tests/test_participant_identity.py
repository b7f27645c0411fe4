"""Who answers at a registered address: every call the coordinator sends names the participant
and incarnation it means to reach, and a participant that is not that one refuses it before
touching any branch; a second process under a registered name may not take it over while it is
owed answers; a registration refused for good stops the participant.

Adapted from a bug hunt's reproductions: another participant restarted on a registered one's old
(ephemeral) port was sent its Commit (a false heuristic hazard) and its Prepares (INVALID_ARGUMENT
for valid orders); a second inventory under the same name silently took over the first's
registration; a participant with a malformed name retried its registration forever."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from dtm import cli, grpc_edge, limits, metrics
from dtm.batcher import BatchPolicy
from dtm.coordinator import clients
from dtm.coordinator.engine import CoordinatorConfig, Engine, Refused, SubmitRejected
from dtm.coordinator.ports import DecideItem, DecideResult, ParticipantPort, call_code
from dtm.coordinator.registry import Registry, validate_registration
from dtm.coordinator.server import CoordinatorServicer
from dtm.core.branch import HEURISTIC_HAZARD, HEURISTIC_ROLLBACK, BranchState
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, log_pb2, participant_pb2, shop_pb2
from participants.server import MISDIRECTED_METADATA_KEY, ParticipantConfig, ParticipantServer
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService
from participants.services.orders import OrdersService
from tests.cli_runner import dtm
from tests.harness import STOCK, InProcessCluster, eventually, order_branches, pack

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("DTM_")},
    "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'generated'}",
}


def _misdirected(error: grpc.aio.AioRpcError) -> bool:
    metadata: Any = error.trailing_metadata() or ()
    return error.code() is grpc.StatusCode.FAILED_PRECONDITION and any(
        key == MISDIRECTED_METADATA_KEY for key, _ in metadata
    )


# ---- A: another participant at a registered participant's old address ----


async def orders_on_inventorys_port(cluster: InProcessCluster, tmp_path: Path) -> None:
    """The bug hunt's scenario: inventory stops, and orders restarts on inventory's old port,
    the address the coordinator's registry still holds for inventory."""
    inventory_port = cluster.participants["inventory"].port
    await cluster.participants.pop("inventory").stop(0)
    await cluster.participants.pop("orders").stop(0)
    orders = ParticipantServer(
        OrdersService(),
        ParticipantConfig(
            data_dir=tmp_path,
            listen=f"127.0.0.1:{inventory_port}",
            coordinator=cluster.coordinator_address,
            test_control=True,
        ),
    )
    await orders.start()
    await asyncio.wait_for(orders.registered.wait(), 10)
    cluster.participants["orders"] = orders


@pytest.mark.parametrize("batch", [True, False], ids=["exchange", "unary"])
def test_a_participant_restarted_on_another_ones_old_address_is_not_taken_for_it(
    tmp_path: Path, batch: bool
) -> None:
    async def scenario() -> None:
        overrides = {"backoff_ms_min": 50, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path, coordinator_overrides=overrides) as cluster:
            engine = cluster.coordinator.engine
            if not batch:  # the plain unary contract (ports are made at their first call)
                assert not engine.registry.ports()
                engine.registry.policy = BatchPolicy(enabled=False)
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-apple", 2)], amount_cents=1)
            first = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == first.outcome
            # Inventory down (owed t-1's Commit), orders on its old port.
            await orders_on_inventorys_port(cluster, tmp_path)
            # Commit retries of t-1's inventory branch now reach orders: refused as misdirected,
            # retried, never a heuristic outcome (it was a hazard: Commit answered NOT_FOUND).
            inventorys = engine.active["t-1"].txn.branch(0)

            async def refused_by_orders() -> bool:
                return "the wrong participant answered" in inventorys.last_error

            await eventually(refused_by_orders)
            refused_at = inventorys.phase_two_attempts

            async def retried() -> bool:
                return inventorys.phase_two_attempts > refused_at

            await eventually(retried)
            assert [] == list(engine.heuristics)
            assert "t-1" in engine.active
            # A new order's inventory Prepare reaches orders too: the transaction aborts as
            # "not reached", not as an invalid argument (it was INVALID_ARGUMENT to the client).
            branches = order_branches("o-2", [("sku-apple", 1)], amount_cents=1)
            second = await cluster.submit(branches, "t-2")
            assert coordinator_pb2.OUTCOME_ABORTED == second.outcome
            assert "not reached" in second.reason, second.reason
            assert "this is participant 'orders', not 'inventory'" in second.reason
            # Inventory comes back (same log, same incarnation) on a new port: t-1 commits.
            await cluster.start_participant(InventoryService(dict(STOCK)))

            async def sold() -> bool:
                return (await cluster.stock())["sku-apple"].sold == 2

            await eventually(sold, 15)

            async def over() -> bool:
                return "t-1" not in engine.active

            await eventually(over, 15)
            assert [] == list(engine.heuristics)

    asyncio.run(scenario())


@pytest.mark.parametrize("batch", [True, False], ids=["exchange", "unary"])
def test_a_one_phase_prepare_refused_as_misdirected_aborts_at_once(
    tmp_path: Path, batch: bool
) -> None:
    """A one-phase Prepare the wrong participant refused (before touching any branch) ran
    nowhere: the transaction is ABORTED at once, not UNKNOWN, probed and owed (it was: the
    client was told "one-phase answer lost", and the name stayed owed, which refused the right
    participant's new incarnation)."""

    async def scenario() -> None:
        overrides = {"backoff_ms_min": 50, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path, coordinator_overrides=overrides) as cluster:
            engine = cluster.coordinator.engine
            if not batch:
                engine.registry.policy = BatchPolicy(enabled=False)
            await orders_on_inventorys_port(cluster, tmp_path)
            assert engine.registry.participants["inventory"].capabilities.one_phase
            branch = coordinator_pb2.BranchRequest(
                participant="inventory",
                operation=pack(
                    shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
                ),
            )
            answer = await cluster.submit([branch], "t-1")
            assert coordinator_pb2.OUTCOME_ABORTED == answer.outcome, answer.reason
            assert answer.reason.startswith("not reached: the wrong participant answered")
            assert "one-phase answer lost" not in answer.reason
            assert "this is participant 'orders', not 'inventory'" in answer.reason
            assert "the address registered for 'inventory'" in answer.reason
            assert "t-1" not in engine.active  # not probed, not owed
            view = engine.lookup("t-1")
            assert view is not None
            assert coordinator_pb2.TRANSACTION_STATE_ABORTED == view.state
            assert 0 == view.branches[0].phase_two_attempts
            assert [] == list(engine.heuristics)

    asyncio.run(scenario())


def test_the_incarnation_survives_restarts_of_either_side(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            engine = cluster.coordinator.engine
            incarnation = cluster.participants["inventory"].engine.incarnation
            assert limits.INCARNATION_PATTERN.fullmatch(incarnation)
            assert incarnation == engine.registry.participants["inventory"].incarnation
            # Same log: same incarnation, also after a checkpoint trimmed the log's start.
            restarted = await cluster.restart_participant(
                "inventory", InventoryService(dict(STOCK))
            )
            assert incarnation == restarted.engine.incarnation
            await restarted.engine.checkpoint()
            restarted = await cluster.restart_participant(
                "inventory", InventoryService(dict(STOCK))
            )
            assert incarnation == restarted.engine.incarnation
            # The coordinator's registry keeps it across its restart (log and checkpoint).
            await cluster.restart_coordinator()
            replayed = cluster.coordinator.engine.registry.participants["inventory"]
            assert incarnation == replayed.incarnation
            assert await cluster.coordinator.engine.checkpoint_if_due() in (True, False)

    asyncio.run(scenario())


# ---- B: a second process under a registered name ----


def test_a_second_process_under_a_registered_name_is_refused_while_it_is_owed(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "a") as cluster:
            engine = cluster.coordinator.engine
            first = cluster.participants["inventory"]
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-scarce", 3)], amount_cents=1)
            committed = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome
            # A second inventory process (its own data directory: another incarnation).
            second = ParticipantServer(
                InventoryService(dict(STOCK)),
                ParticipantConfig(
                    data_dir=tmp_path / "b",
                    listen="127.0.0.1:0",
                    coordinator=cluster.coordinator_address,
                    test_control=True,
                ),
            )
            assert second.engine.incarnation != first.engine.incarnation
            await second.start()
            try:
                await asyncio.wait_for(second.failed.wait(), 10)
                assert not second.registered.is_set()
                assert "FAILED_PRECONDITION" in second.failure
                assert "t-1" in second.failure and "incarnation" in second.failure
                # It names the operator's way out, should the first's log be lost.
                assert "if this participant's log was lost, start it with" in second.failure
                assert "--replace-registration" in second.failure
                registered = engine.registry.participants["inventory"]
                assert cluster.address("inventory") == registered.address
                assert first.engine.incarnation == registered.incarnation
                # The Commit owed to the first goes to the first, once it takes decisions.
                await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

                async def over() -> bool:
                    return not engine.active

                await eventually(over, 15)
                assert [] == list(engine.heuristics)
                assert 3 == (await cluster.stock())["sku-scarce"].sold
                # The scarce stock is sold out: no second process sells it again.
                branches = order_branches("o-2", [("sku-scarce", 3)], amount_cents=1)
                again = await cluster.submit(branches, "t-2")
                assert coordinator_pb2.OUTCOME_ABORTED == again.outcome
            finally:
                await second.stop(0)

    asyncio.run(scenario())


def test_a_registration_without_incarnation_may_not_take_an_owed_name_at_another_address(
    tmp_path: Path,
) -> None:
    """Before, the guard compared two non-empty incarnations only: a registration with none
    (a participant outside the SDK, or one of another version) took inventory's name at
    another address while inventory was owed a Commit, which then went there (a process that
    never saw the branch: NOT_FOUND, a false heuristic hazard, while inventory held it)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            engine = cluster.coordinator.engine
            first = cluster.participants["inventory"]
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-scarce", 3)], amount_cents=1)
            committed = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome
            elsewhere = coordinator_pb2.RegisterParticipantRequest(
                name="inventory",
                address="127.0.0.1:1",
                capabilities=coordinator_pb2.Capabilities(one_phase=True),
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await cluster.client.RegisterParticipant(elsewhere, timeout=10)
            assert grpc.StatusCode.FAILED_PRECONDITION == refused.value.code()
            details = refused.value.details() or ""
            assert "a registration with no incarnation, at 127.0.0.1:1, is not" in details
            assert "t-1" in details and "--replace-registration" in details, details
            assert "may not be taken by a registration with no incarnation while it is" in details
            assert "register with the incarnation in the participant's log" in details
            registered = engine.registry.participants["inventory"]
            assert cluster.address("inventory") == registered.address
            assert first.engine.incarnation == registered.incarnation
            # The Commit owed to inventory reaches inventory once it takes decisions.
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

            async def over() -> bool:
                return not engine.active

            await eventually(over, 15)
            assert [] == list(engine.heuristics)
            assert 3 == (await cluster.stock())["sku-scarce"].sold

    asyncio.run(scenario())


class _Unanswered:
    """A participant's port whose Commits are never answered: they stay owed."""

    def decide(self, item: DecideItem) -> None:
        pass


class _UnansweredRegistry(Registry):
    def port(self, name: str) -> Any:
        return _Unanswered()


# The longest a well-formed registration allows (limits): name, incarnation, host:port.
LONGEST_NAME = "p" * 64
LONGEST_ADDRESS = "h" * (limits.ADDRESS_LENGTH_MAX - len(":65535")) + ":65535"
OTHER_LONGEST_ADDRESS = "g" * (limits.ADDRESS_LENGTH_MAX - len(":65535")) + ":65535"


def _longest(incarnation: str, address: str) -> coordinator_pb2.ParticipantInfo:
    request = coordinator_pb2.RegisterParticipantRequest(
        name=LONGEST_NAME, address=address, incarnation=incarnation
    )
    validate_registration(request)  # the coordinator would take it
    return coordinator_pb2.ParticipantInfo(
        name=request.name, address=request.address, incarnation=request.incarnation
    )


@pytest.mark.parametrize(
    ("incarnation", "way_out"),
    [
        (
            "B" * 64,
            f"log was lost, start it with {limits.REPLACE_REGISTRATION_FLAG} (the owed",
        ),
        ("", f"with replace ({limits.REPLACE_REGISTRATION_FLAG}: owed commits become heuristic"),
    ],
)
def test_a_takeover_refusal_keeps_its_way_out_within_a_status_at_the_longest_limits(
    incarnation: str, way_out: str
) -> None:
    """With the longest name, incarnations, addresses and transaction ids the limits allow,
    the refusal is cut to grpc_edge.STATUS_DETAILS_CHARS_MAX characters: the way out (and the
    busy reason's hint) must come before the cut. Before, the way out came after the
    registered incarnation's address, the other address and three 128-character ids (over
    1,000 characters), and was cut off."""

    async def scenario() -> None:
        engine = Engine(MemoryLog(), _UnansweredRegistry(), CoordinatorConfig())
        engine.registry.put(_longest("A" * 64, LONGEST_ADDRESS))
        owed = [
            log_pb2.CommitDecided(
                transaction_id=f"{n}".rjust(128, "t"),  # TRANSACTION_ID_PATTERN's longest
                branches=[log_pb2.DecisionBranch(branch=0, participant=LONGEST_NAME)],
                decided_at_unix_ms=1,
                fingerprint=b"fp",
            )
            for n in range(5)
        ]
        assert 5 == engine.resume(owed)
        with pytest.raises(Refused) as refused:
            await engine.register(_longest(incarnation, OTHER_LONGEST_ADDRESS))
        assert grpc.StatusCode.FAILED_PRECONDITION == refused.value.code
        assert len(str(refused.value)) > grpc_edge.STATUS_DETAILS_CHARS_MAX  # it is cut
        details = grpc_edge.status_details(str(refused.value))
        assert way_out in details, details
        assert "(dtm txn list --stuck; dtm txn retry ID once it is reachable)" in details
        assert "A" * 64 == engine.registry.participants[LONGEST_NAME].incarnation
        await engine.close()

    asyncio.run(scenario())


def test_an_unregistration_refusal_keeps_its_hint_within_a_status_at_the_longest_ids() -> None:
    """The same cut for an operator's `dtm participants remove` of a participant still owed:
    before, three 128-character ids came before the hint (what to do), which was cut off."""

    async def scenario() -> None:
        engine = Engine(MemoryLog(), _UnansweredRegistry(), CoordinatorConfig())
        engine.registry.put(_longest("A" * 64, LONGEST_ADDRESS))
        owed = [
            log_pb2.CommitDecided(
                transaction_id=f"{n}".rjust(128, "t"),
                branches=[log_pb2.DecisionBranch(branch=0, participant=LONGEST_NAME)],
                decided_at_unix_ms=1,
                fingerprint=b"fp",
            )
            for n in range(5)
        ]
        assert 5 == engine.resume(owed)
        with pytest.raises(Refused) as refused:
            await engine.unregister(LONGEST_NAME)
        assert len(str(refused.value)) > grpc_edge.STATUS_DETAILS_CHARS_MAX  # it is cut
        details = grpc_edge.status_details(str(refused.value))
        assert "(dtm txn list --stuck; dtm txn retry ID once it is reachable)" in details
        assert "has branches in 5 transaction(s) not yet finished" in details
        assert LONGEST_NAME in engine.registry.participants
        await engine.close()

    asyncio.run(scenario())


def _full_registry() -> Registry:
    """PARTICIPANTS_MAX participants under the longest names the limits allow."""
    registry = Registry()
    for n in range(limits.PARTICIPANTS_MAX):
        request = coordinator_pb2.RegisterParticipantRequest(
            name=f"{n:03d}".rjust(64, "p"), address=LONGEST_ADDRESS, incarnation="A" * 64
        )
        validate_registration(request)  # the coordinator would take it
        registry.put(
            coordinator_pb2.ParticipantInfo(
                name=request.name, address=request.address, incarnation=request.incarnation
            )
        )
    return registry


MORE = f"and {limits.PARTICIPANTS_MAX - 3} more: `dtm participants`"


@pytest.mark.parametrize(
    ("unknown", "quoted"),
    [("q" * 64, repr("q" * 64)), ("\U000e0001" * 1_000, repr("\U000e0001" * 64)[:77])],
    ids=["longest name", "unprintable name"],
)
def test_a_submit_to_an_unregistered_participant_keeps_its_way_out_within_a_status(
    unknown: str, quoted: str
) -> None:
    """A Submit naming a participant that is not registered is refused NOT_FOUND with the way
    out and a few of the registered names, whole within grpc_edge.STATUS_DETAILS_CHARS_MAX at
    the longest limits (the last of BRANCHES_PER_TRANSACTION_MAX branches; 256 names of 64
    characters). Before, every name came first: over 17,000 characters, cut at 600 after
    seven names, with nothing to say what to do. A name a caller sent is quoted at most
    NAME_QUOTED_CHARS_MAX characters long (64 unprintable characters escape to 640)."""

    async def scenario() -> None:
        engine = Engine(MemoryLog(), _full_registry(), CoordinatorConfig())
        servicer = CoordinatorServicer(SimpleNamespace(engine=engine))  # type: ignore[arg-type]
        known = coordinator_pb2.BranchRequest(
            participant=f"{0:03d}".rjust(64, "p"), operation=pack(shop_pb2.ReserveStock())
        )
        last = limits.BRANCHES_PER_TRANSACTION_MAX - 1
        branches = [known] * last + [
            coordinator_pb2.BranchRequest(
                participant=unknown, operation=pack(shop_pb2.ReserveStock())
            )
        ]
        refused = await servicer._submit(coordinator_pb2.SubmitRequest(branches=branches))
        assert grpc.StatusCode.NOT_FOUND.value[0] == refused.code
        message = refused.message
        assert message == grpc_edge.status_details(message), len(message)  # nothing cut
        assert message.startswith(f"branch {last}: participant {quoted}"), message
        assert "not registered: name a registered participant, or start that one" in message
        assert message.endswith(MORE), message
        # The engine's own check (an id it knows skips the servicer's) says the same.
        with pytest.raises(SubmitRejected) as rejected:
            await engine.submit("t-1", [(unknown, pack(shop_pb2.ReserveStock()))], 1_000, b"")
        assert grpc.StatusCode.NOT_FOUND == rejected.value.code
        assert str(rejected.value).startswith(f"branch 0: participant {quoted}")
        assert str(rejected.value).endswith(MORE)
        await engine.close()

    asyncio.run(scenario())


def test_a_retried_id_with_an_unprintable_name_keeps_the_problem_within_a_status() -> None:
    """An id the engine knows skips the registration check, so a branch's participant may be
    anything there: 64 unprintable characters quoted with [:64]!r escaped to 642 characters,
    and the status cut dropped the problem ("the operation is missing"). Quoted as the
    registry quotes a caller's name now (found by a hunt)."""

    async def scenario() -> None:
        engine = Engine(MemoryLog(), _full_registry(), CoordinatorConfig())
        engine.knows = lambda transaction_id: True  # type: ignore[method-assign]
        servicer = CoordinatorServicer(SimpleNamespace(engine=engine))  # type: ignore[arg-type]
        branch = coordinator_pb2.BranchRequest(participant="\U000e0001" * 64)
        request = coordinator_pb2.SubmitRequest(transaction_id="t-known", branches=[branch])
        refused = await servicer._submit(request)
        assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == refused.code
        message = refused.message
        assert "the operation is missing" in grpc_edge.status_details(message), message
        await engine.close()

    asyncio.run(scenario())


def test_an_unregistration_of_an_unregistered_name_keeps_its_way_out_within_a_status() -> None:
    """`dtm participants remove` of a name not registered: the way out and a few names, whole
    within a status at the longest limits. Before, every registered name came first (over
    17,000 characters, cut at 600)."""

    async def scenario() -> None:
        engine = Engine(MemoryLog(), _full_registry(), CoordinatorConfig())
        with pytest.raises(Refused) as refused:
            await engine.unregister("q" * 64)
        assert grpc.StatusCode.NOT_FOUND == refused.value.code
        message = str(refused.value)
        assert message == grpc_edge.status_details(message), len(message)  # nothing cut
        assert message.startswith(f"participant {'q' * 64!r} is not registered: nothing to")
        assert message.endswith(MORE), message
        assert limits.PARTICIPANTS_MAX == len(engine.registry.participants)
        await engine.close()

    asyncio.run(scenario())


def test_an_operation_of_another_type_keeps_what_to_send_within_a_status() -> None:
    """A Submit whose operation is of a type the participant does not take: the type sent and
    a few the participant takes, whole within a status, at the longest limits (OPERATION_TYPES_MAX
    names of OPERATION_TYPE_CHARS_MAX characters). Before, every type came first, in full, and
    the status cut at 600 kept none of the type sent."""

    async def scenario() -> None:
        registry = Registry()
        types = [f"x.T{n:02d}".ljust(limits.OPERATION_TYPE_CHARS_MAX, "y") for n in range(16)]
        assert limits.OPERATION_TYPES_MAX == len(types)
        request = coordinator_pb2.RegisterParticipantRequest(
            name=LONGEST_NAME,
            address=LONGEST_ADDRESS,
            capabilities=coordinator_pb2.Capabilities(operation_types=types),
        )
        validate_registration(request)  # the coordinator would take it
        registry.put(
            coordinator_pb2.ParticipantInfo(
                name=request.name, address=request.address, capabilities=request.capabilities
            )
        )
        engine = Engine(MemoryLog(), registry, CoordinatorConfig())
        servicer = CoordinatorServicer(SimpleNamespace(engine=engine))  # type: ignore[arg-type]
        operation = pack(shop_pb2.ReserveStock())
        operation.type_url = "type.googleapis.com/" + "z" * (limits.TYPE_URL_CHARS_MAX - 20)
        branch = coordinator_pb2.BranchRequest(participant=LONGEST_NAME, operation=operation)
        refused = await servicer._submit(coordinator_pb2.SubmitRequest(branches=[branch] * 32))
        assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == refused.code
        message = refused.message
        assert message == grpc_edge.status_details(message), len(message)  # nothing cut
        assert message.startswith(f"branch 0: participant {LONGEST_NAME} does not take 'zzz")
        assert f"it takes {types[0][:77]}..., {types[1][:77]}..., " in message, message
        assert message.endswith("and 13 more: `dtm participants`"), message
        await engine.close()

    asyncio.run(scenario())


def test_a_short_registry_is_named_whole_and_an_empty_one_says_so() -> None:
    registry = Registry()
    assert "none is registered yet" == registry.registered_names()
    for name in ("orders", "inventory", "payment"):
        registry.put(coordinator_pb2.ParticipantInfo(name=name, address="127.0.0.1:1"))
    assert "registered: inventory, orders, payment" == registry.registered_names()


def test_another_incarnation_replaces_a_registration_once_nothing_is_owed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "a") as cluster:
            engine = cluster.coordinator.engine
            first = cluster.participants["inventory"]
            old_address = cluster.address("inventory")
            second = ParticipantServer(
                InventoryService(dict(STOCK)),
                ParticipantConfig(
                    data_dir=tmp_path / "b",
                    listen="127.0.0.1:0",
                    coordinator=cluster.coordinator_address,
                ),
            )
            await second.start()
            try:
                await asyncio.wait_for(second.registered.wait(), 10)
                registered = engine.registry.participants["inventory"]
                assert second.engine.incarnation == registered.incarnation
                assert f"127.0.0.1:{second.port}" == registered.address
                err = capsys.readouterr().err
                replaced = [line for line in err.splitlines() if "replaced" in line]
                assert any(
                    f"incarnation {first.engine.incarnation} at {old_address}" in line
                    and second.engine.incarnation in line
                    for line in replaced
                ), replaced
                # The first process, still up, refuses a call meant for the second.
                stub = cluster.participant_stub("inventory")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Rollback(
                        participant_pb2.RollbackRequest(
                            transaction_id="t-x",
                            participant="inventory",
                            incarnation=second.engine.incarnation,
                        )
                    )
                assert _misdirected(refused.value)
                branches = order_branches("o-1", [("sku-apple", 1)], amount_cents=1)
                done = await cluster.submit(branches, "t-1")
                assert coordinator_pb2.OUTCOME_COMMITTED == done.outcome
                assert first.engine.branch(("t-1", 0)) is None
                info = second.engine.branch(("t-1", 0))
                assert info is not None
            finally:
                await second.stop(0)

    asyncio.run(scenario())


def test_a_replacement_registration_takes_an_owed_name_and_its_commits_become_hazards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator's override for a participant whose log was lost: RegisterParticipant with
    replace=true is accepted while the name is owed, and the owed Commit, which the replacement
    cannot know, is recorded as a heuristic hazard instead of waiting forever."""

    async def scenario() -> None:
        overrides = {"backoff_ms_min": 50, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path / "a", coordinator_overrides=overrides) as cluster:
            engine = cluster.coordinator.engine
            first = cluster.participants["inventory"]
            old_incarnation, old_address = first.engine.incarnation, cluster.address("inventory")
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-apple", 2)], amount_cents=1)
            committed = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome
            await cluster.participants.pop("inventory").stop(0)  # its log is lost with it
            # The replacement: an empty data directory, so another incarnation. It registers
            # by hand here (no coordinator configured), once as usual, once with replace.
            second = ParticipantServer(
                InventoryService(dict(STOCK)),
                ParticipantConfig(data_dir=tmp_path / "b", listen="127.0.0.1:0"),
            )
            await second.start()
            try:
                new_address = f"127.0.0.1:{second.port}"
                request = coordinator_pb2.RegisterParticipantRequest(
                    name="inventory",
                    address=new_address,
                    incarnation=second.engine.incarnation,
                    capabilities=coordinator_pb2.Capabilities(one_phase=True, batch=True),
                )
                stub = coordinator_pb2_grpc.CoordinatorStub(
                    cluster.channel(cluster.coordinator_address)
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.RegisterParticipant(request)
                assert grpc.StatusCode.FAILED_PRECONDITION is refused.value.code()
                details = refused.value.details() or ""
                assert "t-1" in details and "--replace-registration" in details, details
                assert old_incarnation == engine.registry.participants["inventory"].incarnation

                request.replace = True
                answer = await stub.RegisterParticipant(request)
                assert answer.changed
                registered = engine.registry.participants["inventory"]
                assert (second.engine.incarnation, new_address) == (
                    registered.incarnation,
                    registered.address,
                )
                err = capsys.readouterr().err
                warned = [line for line in err.splitlines() if "replaced while owed" in line]
                assert 1 == len(warned), err
                assert "WARNING" in warned[0] and "--replace-registration" in warned[0]
                assert f"incarnation {old_incarnation} at {old_address}" in warned[0]
                assert f"{second.engine.incarnation} at {new_address}" in warned[0]
                assert "1 transaction(s) not yet finished" in warned[0] and "t-1" in warned[0]
                assert "heuristic hazard" in warned[0]

                # The owed Commit goes to the replacement: NOT_FOUND, a heuristic hazard.
                async def over() -> bool:
                    return "t-1" not in engine.active

                await eventually(over, 15)
                hazards = [
                    (h.transaction_id, h.participant, h.outcome, h.committed)
                    for h in engine.heuristics
                ]
                assert [("t-1", "inventory", HEURISTIC_HAZARD, True)] == hazards
                assert second.engine.branch(("t-1", 0)) is None
                # The replacement takes new transactions.
                branches = order_branches("o-2", [("sku-apple", 1)], amount_cents=1)
                done = await cluster.submit(branches, "t-2")
                assert coordinator_pb2.OUTCOME_COMMITTED == done.outcome
            finally:
                await second.stop(0)

    asyncio.run(scenario())


def test_a_replacement_leaves_an_unknown_one_phase_commit_unknown_with_a_hazard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A one-phase commit whose answer was lost is UNKNOWN, probed with a Rollback; its
    participant's log is then lost and a replacement registers with replace. Only the lost log
    knew the outcome: the replacement's answer to the probe (it never saw the branch: a
    tombstone, "rolled back") must not settle it. It was settled ABORTED, with no hazard,
    though the lost log had committed it."""

    async def scenario() -> None:
        overrides = {"backoff_ms_min": 50, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path / "a", coordinator_overrides=overrides) as cluster:
            engine = cluster.coordinator.engine
            engine.registry.policy = BatchPolicy(enabled=False)  # unary: easy to intercept
            # Finished transactions by outcome: this one was counted nowhere, while the
            # latency histograms had an outcome="unknown" series (found by a bug hunt).
            registry = metrics.CoordinatorMetrics(engine, cluster.coordinator.wal).registry
            first = cluster.participants["inventory"]
            old_incarnation = first.engine.incarnation
            real_prepare = clients.ParticipantClient.prepare

            async def lossy_prepare(self: Any, txn: str, *args: Any, **kwargs: Any) -> Any:
                result = await real_prepare(self, txn, *args, **kwargs)
                if txn == "t-1":
                    # The answer is lost, and the participant goes dark (probes fail).
                    first.fault.mode = participant_pb2.FAULT_MODE_DOWN
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        "answer lost (test)",
                    )
                return result

            monkeypatch.setattr(clients.ParticipantClient, "prepare", lossy_prepare)
            branch = coordinator_pb2.BranchRequest(
                participant="inventory",
                operation=pack(
                    shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=2)])
                ),
            )
            answer = await cluster.submit([branch], "t-1")
            assert coordinator_pb2.OUTCOME_UNKNOWN == answer.outcome, answer.reason
            info = first.engine.branch(("t-1", 0))
            assert info is not None and BranchState.COMMITTED is info.branch.state
            await cluster.participants.pop("inventory").stop(0)  # its log is lost with it

            second = ParticipantServer(
                InventoryService(dict(STOCK)),
                ParticipantConfig(data_dir=tmp_path / "b", listen="127.0.0.1:0"),
            )
            await second.start()
            try:
                request = coordinator_pb2.RegisterParticipantRequest(
                    name="inventory",
                    address=f"127.0.0.1:{second.port}",
                    incarnation=second.engine.incarnation,
                    capabilities=coordinator_pb2.Capabilities(one_phase=True, batch=True),
                    replace=True,
                )
                stub = coordinator_pb2_grpc.CoordinatorStub(
                    cluster.channel(cluster.coordinator_address)
                )
                await stub.RegisterParticipant(request)

                async def over() -> bool:
                    return "t-1" not in engine.active

                await eventually(over, 15)
                view = engine.lookup("t-1")
                assert view is not None
                assert coordinator_pb2.TRANSACTION_STATE_UNKNOWN == view.state
                assert coordinator_pb2.OUTCOME_UNKNOWN == view.answer
                assert "log was replaced" in view.reason, view.reason
                assert f"incarnation {old_incarnation}" in view.reason
                assert "outcome is unknown" in view.reason
                finished = {
                    outcome: registry.get_sample_value(
                        "dtm_transactions_total", {"outcome": outcome}
                    )
                    for outcome in ("committed", "aborted", "unknown")
                }
                assert {"committed": 0, "aborted": 0, "unknown": 1} == finished
                hazards = [
                    (h.transaction_id, h.participant, h.outcome, h.committed, h.one_phase_unknown)
                    for h in engine.heuristics
                ]
                assert [("t-1", "inventory", HEURISTIC_HAZARD, False, True)] == hazards
                listed = await stub.ListHeuristics(coordinator_pb2.ListHeuristicsRequest())
                assert [coordinator_pb2.OUTCOME_UNKNOWN] == [h.decision for h in listed.heuristics]
                # No probe went to the replacement (it would have left a tombstone).
                assert second.engine.branch(("t-1", 0)) is None
                # A retried Submit hears the same: unknown.
                again = await cluster.submit([branch], "t-1")
                assert coordinator_pb2.OUTCOME_UNKNOWN == again.outcome
                err = capsys.readouterr().err
                warned = [line for line in err.splitlines() if "replaced while owed" in line]
                assert 1 == len(warned), err
                assert "1 of them one-phase commit(s) whose outcome is unknown" in warned[0]
                assert "e.g. t-1: only the lost log knew it" in warned[0]
            finally:
                await second.stop(0)

    asyncio.run(scenario())


# ---- 1: the SDK refuses a call for another participant before touching any branch ----


def test_a_call_for_another_participant_or_incarnation_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            server = cluster.participants["inventory"]
            mine = server.engine.incarnation
            stub = cluster.participant_stub("inventory")
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            )
            ids = {"transaction_id": "t-1", "branch": 0}
            # Prepared by a call without the fields (an older coordinator), and with the right
            # ones: both accepted.
            vote = await stub.Prepare(participant_pb2.PrepareRequest(**ids, operation=operation))
            assert coordinator_pb2.VOTE_PREPARED == vote.vote
            right = {"participant": "inventory", "incarnation": mine}
            vote = await stub.Prepare(
                participant_pb2.PrepareRequest(
                    transaction_id="t-0", branch=0, operation=operation, **right
                )
            )
            assert coordinator_pb2.VOTE_PREPARED == vote.vote
            wrong_name = {"participant": "orders", "incarnation": mine}
            wrong_incarnation = {"participant": "inventory", "incarnation": "0123456789abcdef"}
            other = {"transaction_id": "t-2", "branch": 0}
            for wrong in (wrong_name, wrong_incarnation):
                calls = [
                    stub.Prepare(
                        participant_pb2.PrepareRequest(**other, operation=operation, **wrong)
                    ),
                    stub.Commit(participant_pb2.CommitRequest(**ids, **wrong)),
                    stub.Rollback(participant_pb2.RollbackRequest(**ids, **wrong)),
                    stub.Exchange(
                        participant_pb2.ExchangeRequest(
                            decisions=[participant_pb2.Decision(**ids, commit=True)],
                            prepares=[participant_pb2.PrepareRequest(**other, operation=operation)],
                            **wrong,
                        )
                    ),
                    stub.PrepareBatch(
                        participant_pb2.PrepareBatchRequest(
                            prepares=[participant_pb2.PrepareRequest(**other, operation=operation)],
                            **wrong,
                        )
                    ),
                    stub.PrepareBatch(  # on an item: the whole call is refused
                        participant_pb2.PrepareBatchRequest(
                            prepares=[
                                participant_pb2.PrepareRequest(
                                    **other, operation=operation, **wrong
                                )
                            ],
                        )
                    ),
                    stub.DecideBatch(
                        participant_pb2.DecideBatchRequest(
                            decisions=[participant_pb2.Decision(**ids, commit=False)], **wrong
                        )
                    ),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert _misdirected(refused.value), refused.value
                    details = refused.value.details() or ""
                    assert "this is participant 'inventory'" in details
                    assert ("'orders'" if wrong is wrong_name else mine) in details
                    assert "nothing was changed" in details
                info = server.engine.branch(("t-1", 0))
                assert info is not None and BranchState.PREPARED is info.branch.state
                assert server.engine.branch(("t-2", 0)) is None
            # An old-style Commit (no fields) still commits.
            await stub.Commit(participant_pb2.CommitRequest(**ids))
            info = server.engine.branch(("t-1", 0))
            assert info is not None and BranchState.COMMITTED is info.branch.state
            await stub.Commit(participant_pb2.CommitRequest(transaction_id="t-0", **right))
            assert 2 == (await cluster.stock())["sku-apple"].sold

    asyncio.run(scenario())


def test_an_admin_call_for_another_participant_or_incarnation_reads_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """The operator's calls (ListBranches, ListLocks, ForceOutcome, ForgetBranch; Describe
    since) had no address: whatever listened at a registered address answered them, or was
    forced, under the name the operator asked for."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            server = cluster.participants["inventory"]
            mine = server.engine.incarnation
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            )
            ids = {"transaction_id": "t-1", "branch": 0}
            vote = await cluster.participant_stub("inventory").Prepare(
                participant_pb2.PrepareRequest(**ids, operation=operation)
            )
            assert coordinator_pb2.VOTE_PREPARED == vote.vote
            admin = cluster.admin("inventory")
            # A rollback: what the coordinator, with no record of t-1, answers (presumed abort);
            # the participant refuses a forced commit of it.
            force = {**ids, "commit": False, "i_understand_this_is_heuristic": True}
            for wrong in (
                {"participant": "orders", "incarnation": mine},
                {"participant": "inventory", "incarnation": "0123456789abcdef"},
            ):
                calls = [
                    admin.ListBranches(participant_pb2.ListBranchesRequest(**wrong)),
                    admin.ListLocks(participant_pb2.ListLocksRequest(**wrong)),
                    admin.ForceOutcome(participant_pb2.ForceOutcomeRequest(**force, **wrong)),
                    admin.ForgetBranch(participant_pb2.ForgetBranchRequest(**ids, **wrong)),
                    admin.Describe(participant_pb2.DescribeRequest(**wrong)),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert _misdirected(refused.value), refused.value
                    assert "this is participant 'inventory'" in (refused.value.details() or "")
                info = server.engine.branch(("t-1", 0))
                assert info is not None and BranchState.PREPARED is info.branch.state
            # Addressed right, or not addressed (an older caller): answered.
            right = {"participant": "inventory", "incarnation": mine}
            for address in (right, {}):
                listed = await admin.ListBranches(participant_pb2.ListBranchesRequest(**address))
                assert ["t-1"] == [b.transaction_id for b in listed.branches]
            forced = await admin.ForceOutcome(participant_pb2.ForceOutcomeRequest(**force, **right))
            assert participant_pb2.BRANCH_STATE_ROLLED_BACK == forced.branch.state

    asyncio.run(scenario())


def test_dtm_does_not_take_another_participant_at_a_registered_address_for_it(
    tmp_path: Path,
) -> None:
    """Orders restarted on inventory's old port, the registry still holding it for inventory:
    `dtm branches --participant inventory` listed orders' branches as inventory's (its t-1
    branch 1, in doubt), `dtm locks` its locks, and `dtm force ... --participant inventory`
    went to orders."""

    async def scenario() -> None:
        overrides = {"backoff_ms_min": 50, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path, coordinator_overrides=overrides) as cluster:
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-apple", 2)], amount_cents=1)
            assert (
                coordinator_pb2.OUTCOME_COMMITTED == (await cluster.submit(branches, "t-1")).outcome
            )
            await orders_on_inventorys_port(cluster, tmp_path)
            at = ["--coordinator", cluster.coordinator_address, "--json"]
            for command in (
                ["branches", "--participant", "inventory"],
                ["locks", "--participant", "inventory"],
                ["force", "t-1", "1", "--participant", "inventory", "--commit", "--i-understand"],
                ["branches", "forget", "t-1", "1", "--participant", "inventory"],
            ):
                status, out, err = await dtm(*at, *command)
                assert (cli.EXIT_ERROR, "") == (status, out), (command, out)
                assert "participant inventory at" in err, (command, err)
                assert "this is participant 'orders', not 'inventory'" in err, (command, err)
            # `dtm participants` does not call what answers at inventory's address inventory.
            status, out, err = await dtm(*at, "participants")
            assert cli.EXIT_NO == status, (out, err)
            health = {row["name"]: row["health"] for row in json.loads(out)}
            assert "ANOTHER PROCESS" == health["inventory"], health
            assert "SERVING" == health["orders"], health
            assert "this is participant 'orders', not 'inventory'" in err, err
            # Orders' branch was neither forced nor forgotten; asked as itself, it answers.
            status, out, err = await dtm(*at, "branches", "--participant", "orders")
            assert cli.EXIT_OK == status, err
            # (Prepared, or committed by the coordinator's phase 2 meanwhile: never forced.)
            [branch] = [b for b in json.loads(out) if b["transaction_id"] == "t-1"]
            assert (1, "", False) == (branch["branch"], branch["heuristic"], branch["forgotten"])

    asyncio.run(scenario())


def test_a_malformed_participant_or_incarnation_is_an_invalid_argument_not_misdirected(
    tmp_path: Path,
) -> None:
    """A name in upper case, with a trailing space, control characters or megabytes was
    refused as misdirected (FAILED_PRECONDITION, dtm-misdirected, "the coordinator's registry
    is stale"), which the coordinator reads as "not reached" (found by a bug hunt). The
    coordinator sends only registered, checked names: a malformed one is a bad request."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            server = cluster.participants["inventory"]
            mine = server.engine.incarnation
            stub = cluster.participant_stub("inventory")
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            )
            ids = {"transaction_id": "t-1", "branch": 0}
            malformed: list[dict[str, str]] = [
                {"participant": "Inventory"},
                {"participant": "inventory "},
                {"participant": "inv\u00e9ntory", "incarnation": mine},
                {"participant": "inv\nentory\x1b[31m"},
                {"participant": "x" * 3_000_000},
                {"incarnation": "ab\r\ncd"},
                {"incarnation": "y" * 3_000_000},
                {"participant": "inventory", "incarnation": "a" * 65},
            ]
            for fields in malformed:
                prepare = participant_pb2.PrepareRequest(**ids, operation=operation)
                calls = [
                    stub.Prepare(
                        participant_pb2.PrepareRequest(**ids, operation=operation, **fields)
                    ),
                    stub.Commit(participant_pb2.CommitRequest(**ids, **fields)),
                    stub.Rollback(participant_pb2.RollbackRequest(**ids, **fields)),
                    stub.Exchange(participant_pb2.ExchangeRequest(prepares=[prepare], **fields)),
                    stub.PrepareBatch(
                        participant_pb2.PrepareBatchRequest(prepares=[prepare], **fields)
                    ),
                    stub.PrepareBatch(  # on an item
                        participant_pb2.PrepareBatchRequest(
                            prepares=[
                                participant_pb2.PrepareRequest(**ids, operation=operation, **fields)
                            ]
                        )
                    ),
                    stub.DecideBatch(
                        participant_pb2.DecideBatchRequest(
                            decisions=[participant_pb2.Decision(**ids, commit=True)], **fields
                        )
                    ),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    error = refused.value
                    assert grpc.StatusCode.INVALID_ARGUMENT is error.code(), (fields, error)
                    metadata: Any = error.trailing_metadata() or ()
                    assert all(key != MISDIRECTED_METADATA_KEY for key, _ in metadata)
                    details = error.details() or ""
                    assert "is malformed" in details and "stale" not in details, details
                    assert len(details) < 300 and details.isascii() and details.isprintable()
            assert server.engine.branch(("t-1", 0)) is None

    asyncio.run(scenario())


def test_the_coordinator_reads_a_misdirected_refusal_as_not_reached() -> None:
    misdirected_metadata = grpc.aio.Metadata((MISDIRECTED_METADATA_KEY, "orders"))
    empty = grpc.aio.Metadata()
    code = grpc.StatusCode.FAILED_PRECONDITION
    misdirected = grpc.aio.AioRpcError(code, empty, misdirected_metadata, "this is 'orders'")
    contradiction = grpc.aio.AioRpcError(code, empty, empty, "rolled back")
    assert grpc.StatusCode.UNAVAILABLE is call_code(misdirected)
    assert grpc.StatusCode.FAILED_PRECONDITION is call_code(contradiction)

    class Refusing:
        name = "inventory"
        incarnation = "abc"

        def __init__(self, error: grpc.aio.AioRpcError) -> None:
            self.error = error

        async def commit(self, *args: Any) -> None:
            raise self.error

    async def scenario(error: grpc.aio.AioRpcError) -> DecideResult:
        port = ParticipantPort(Refusing(error), False, BatchPolicy())  # type: ignore[arg-type]
        answered: list[DecideResult] = []
        port.decide(DecideItem("t-1", 0, True, answered.append))
        await port.drain()
        return answered[0]

    result = asyncio.run(scenario(misdirected))
    assert not result.ok and "" == result.heuristic and "not reached" in result.error
    assert HEURISTIC_ROLLBACK == asyncio.run(scenario(contradiction)).heuristic


# ---- C: a participant that can never register ----


def test_a_malformed_participant_name_is_refused_at_construction(tmp_path: Path) -> None:
    class Loyalty(NotificationService):
        name = "Loyalty"  # the coordinator's names are [a-z0-9_-]

    with pytest.raises(ValueError, match="participant name 'Loyalty' is malformed"):
        ParticipantServer(Loyalty(), ParticipantConfig(data_dir=tmp_path))
    assert not (tmp_path / "Loyalty").exists()


def test_a_registration_refused_for_good_stops_the_participant(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            server = ParticipantServer(
                NotificationService(),
                ParticipantConfig(
                    data_dir=tmp_path / "other",
                    listen="127.0.0.1:0",
                    advertise="127.0.0.1:0",  # the coordinator refuses it: INVALID_ARGUMENT
                    coordinator=cluster.coordinator_address,
                ),
            )
            await server.start()
            try:
                await asyncio.wait_for(server.failed.wait(), 10)
                assert "INVALID_ARGUMENT" in server.failure
                assert not server.registered.is_set()
            finally:
                await server.stop(0)

    asyncio.run(scenario())


def test_a_full_registry_is_retried_until_a_slot_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            monkeypatch.setattr(limits, "PARTICIPANTS_MAX", 4)  # the cluster's four
            server = ParticipantServer(
                _Loyalty(),
                ParticipantConfig(
                    data_dir=tmp_path, listen="127.0.0.1:0", coordinator=cluster.coordinator_address
                ),
            )
            await server.start()
            try:
                await asyncio.sleep(1.0)
                assert not server.failed.is_set() and not server.registered.is_set()
                await cluster.client.UnregisterParticipant(
                    coordinator_pb2.UnregisterParticipantRequest(name="notification")
                )
                await asyncio.wait_for(server.registered.wait(), 10)
            finally:
                await server.stop(0)

    asyncio.run(scenario())


class _Loyalty(NotificationService):
    name = "loyalty"


@pytest.mark.slow
def test_a_participant_process_with_a_malformed_name_exits_with_status_1(tmp_path: Path) -> None:
    script = (
        "from participants.server import run\n"
        "from participants.services.notification import NotificationService\n"
        "class Loyalty(NotificationService):\n"
        "    name = 'Loyalty'\n"
        f"run(Loyalty(), ['--listen=127.0.0.1:0', '--data-dir={tmp_path}'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, env=ENV, cwd=ROOT, timeout=60
    )
    err = done.stderr.decode(errors="replace")
    assert 1 == done.returncode, err
    assert "participant name 'Loyalty' is malformed" in err and "Traceback" not in err
    assert not (tmp_path / "Loyalty").exists()


@pytest.mark.slow
def test_a_second_participant_process_under_an_owed_name_exits_with_status_1(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-apple", 1)], amount_cents=1)
            committed = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome  # notification owed
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "participants.services.notification",
                "--listen=127.0.0.1:0",
                f"--coordinator={cluster.coordinator_address}",
                f"--data-dir={tmp_path / 'process'}",  # its own log: another incarnation
                env=ENV,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 60)
            text = (err + out).decode(errors="replace")
            assert 1 == process.returncode, text
            assert "registration refused; stopping" in text
            assert "error: the coordinator at" in text and "FAILED_PRECONDITION" in text
            assert "t-1" in text
            # Both the ERROR line and the exit line name the operator's way out.
            for line in text.splitlines():
                if "registration refused; stopping" in line or "error: the coordinator" in line:
                    assert "start it with --replace-registration" in line, line
            registered = cluster.coordinator.engine.registry.participants["notification"]
            assert cluster.address("notification") == registered.address

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_participant_process_started_with_replace_registration_takes_an_owed_name(
    tmp_path: Path,
) -> None:
    """The lost-log case end to end: notification is owed t-1's Commit and its process is gone
    with its log; a new process on an empty data directory, started with
    --replace-registration, registers (without the flag it exits 1, as above) and the owed
    Commit becomes a heuristic hazard."""

    async def scenario() -> None:
        overrides = {"backoff_ms_min": 50, "backoff_ms_max": 200}
        async with InProcessCluster(tmp_path, coordinator_overrides=overrides) as cluster:
            engine = cluster.coordinator.engine
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-apple", 1)], amount_cents=1)
            committed = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome  # notification owed
            lost = cluster.participants.pop("notification")
            old_incarnation = lost.engine.incarnation
            await lost.stop(0)
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "participants.services.notification",
                "--listen=127.0.0.1:0",
                f"--coordinator={cluster.coordinator_address}",
                f"--data-dir={tmp_path / 'process'}",  # an empty log: another incarnation
                "--replace-registration",
                env=ENV,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:

                async def replaced() -> bool:
                    registered = engine.registry.participants["notification"]
                    return registered.incarnation != old_incarnation

                await eventually(replaced, 30)

                async def over() -> bool:
                    return "t-1" not in engine.active

                await eventually(over, 15)
                hazards = [(h.transaction_id, h.participant, h.outcome) for h in engine.heuristics]
                assert [("t-1", "notification", HEURISTIC_HAZARD)] == hazards
                assert process.returncode is None  # still serving
            finally:
                if process.returncode is None:
                    process.terminate()
                out, err = await asyncio.wait_for(process.communicate(), 60)
            text = (err + out).decode(errors="replace")
            assert "registration refused" not in text, text
            assert "--replace-registration: registering as a replacement" in text, text
            assert "registered" in text

    asyncio.run(scenario())


# ---- E: a replaced incarnation that still runs asks about its branches in doubt ----


async def replace_inventory(
    cluster: InProcessCluster, data_dir: Path, **config: Any
) -> ParticipantServer:
    """Another inventory, on its own (empty) log, takes the name with the operator's override
    while the first still runs: the misuse the README warns about."""
    second = ParticipantServer(
        InventoryService(dict(STOCK)),
        ParticipantConfig(
            data_dir=data_dir,
            listen="127.0.0.1:0",
            coordinator=cluster.coordinator_address,
            replace_registration=True,
            **config,
        ),
    )
    await second.start()
    await asyncio.wait_for(second.registered.wait(), 10)
    registered = cluster.coordinator.engine.registry.participants["inventory"]
    assert second.engine.incarnation == registered.incarnation
    return second


def test_an_inquiry_from_a_replaced_incarnation_is_refused_before_any_outcome(
    tmp_path: Path,
) -> None:
    """Who may learn an outcome: the registered incarnation, and anyone who names none (an
    operator before forcing, a participant in another language or from before the field).
    A replaced incarnation hears FAILED_PRECONDITION, whatever the transaction, even one the
    coordinator has no record of (presumed abort would have told it ABORTED)."""

    async def scenario() -> None:
        asks_later = {"in_doubt_after_ms": 600_000}  # only this test's inquiries
        async with InProcessCluster(tmp_path / "a", participant_overrides=asks_later) as cluster:
            old = cluster.participants["inventory"].engine.incarnation
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            branches = order_branches("o-1", [("sku-apple", 1)], amount_cents=1)
            committed = await cluster.submit(branches, "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome
            second = await replace_inventory(cluster, tmp_path / "b")
            try:
                new, address = second.engine.incarnation, f"127.0.0.1:{second.port}"
                for txn in ("t-1", "t-never"):
                    request = coordinator_pb2.QueryOutcomeRequest(
                        transaction_id=txn, participant="inventory", incarnation=old
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await cluster.client.QueryOutcome(request)
                    error = refused.value
                    assert grpc.StatusCode.FAILED_PRECONDITION is error.code(), error
                    details = error.details() or ""
                    assert f"incarnation {old!r} was replaced" in details, details
                    assert f"incarnation {new!r} at {address}" in details, details
                    assert "since 20" in details and "must stop" in details, details
                    metadata: Any = error.trailing_metadata() or ()
                    assert [new] == [v for k, v in metadata if k == "dtm-replaced"]
                answered = [
                    {"participant": "inventory", "incarnation": new},  # the registered one
                    {},  # no fields: as before
                    {"participant": "inventory"},
                    {"incarnation": old},  # no name: nothing to compare with
                    {"participant": "loyalty", "incarnation": old},  # not registered
                ]
                for fields in answered:
                    request = coordinator_pb2.QueryOutcomeRequest(transaction_id="t-1", **fields)
                    answer = await cluster.client.QueryOutcome(request)
                    assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, fields
            finally:
                await second.stop(0)

    asyncio.run(scenario())


def test_an_inquiry_naming_a_malformed_incarnation_is_an_invalid_argument(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            mine = cluster.participants["inventory"].engine.incarnation
            malformed: list[dict[str, str]] = [
                {"participant": "inventory", "incarnation": "a" * 65},
                {"participant": "inventory", "incarnation": "ab\r\ncd"},
                {"participant": "inventory", "incarnation": "inc\u00e9"},
                {"incarnation": "y" * 100_000},
                {"participant": "Inventory", "incarnation": mine},
            ]
            for fields in malformed:
                request = coordinator_pb2.QueryOutcomeRequest(transaction_id="t-1", **fields)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await cluster.client.QueryOutcome(request)
                error = refused.value
                assert grpc.StatusCode.INVALID_ARGUMENT is error.code(), (fields, error)
                details = error.details() or ""
                assert "is malformed" in details, details
                assert len(details) < 300 and details.isascii() and details.isprintable()

    asyncio.run(scenario())


def test_a_replaced_process_learns_no_outcome_by_inquiry_and_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Known gap: QueryOutcome named no incarnation, so after an operator replaced inventory
    while its first process still ran, that process learned t-1's outcome by inquiry and
    applied the Commit now owed to the replacement (which records it as a heuristic hazard):
    two incarnations acting on one decision. Now the coordinator refuses the old incarnation's
    inquiry, and the SDK, refused, keeps its branches in doubt, logs one ERROR naming both
    incarnations and stops, as when its registration is refused for good."""

    async def scenario() -> None:
        # No inquiry before the replacement: the first process asks once allowed to, below.
        asks_later = {"in_doubt_after_ms": 600_000}
        async with InProcessCluster(tmp_path / "a", participant_overrides=asks_later) as cluster:
            first = cluster.participants["inventory"]
            old = first.engine.incarnation
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            for n in (1, 2):  # two branches in doubt: two refusals in one round, one ERROR
                branches = order_branches(f"o-{n}", [("sku-apple", 1)], amount_cents=1)
                committed = await cluster.submit(branches, f"t-{n}")
                assert coordinator_pb2.OUTCOME_COMMITTED == committed.outcome
            second = await replace_inventory(cluster, tmp_path / "b", **asks_later)
            try:
                new = second.engine.incarnation
                capsys.readouterr()
                first.config.in_doubt_after_ms = 0  # the old process asks now
                await asyncio.wait_for(first.failed.wait(), 15)
                for key in (("t-1", 0), ("t-2", 0)):
                    info = first.engine.open.get(key)
                    assert info is not None and BranchState.PREPARED is info.branch.state, key
                assert repr(old) in first.failure and repr(new) in first.failure, first.failure
                assert "must stop" in first.failure, first.failure
                err = capsys.readouterr().err
                errors = [line for line in err.splitlines() if "replaced by another" in line]
                assert 1 == len(errors), err
                assert "ERROR" in errors[0] and "stopping" in errors[0], errors[0]
                assert f"incarnation={old}" in errors[0], errors[0]
                assert f"registered_incarnation={new}" in errors[0], errors[0]
                refused = [line for line in err.splitlines() if "replaced incarnation" in line]
                assert refused and all("WARNING" in line for line in refused), err
            finally:
                await second.stop(0)

    asyncio.run(scenario())


def test_a_replacement_refusal_stops_a_participant_only_once_it_was_registered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before its own registration is answered (a restart on its own log while another
    incarnation is registered, owed nothing), the registration decides, not a refusal of an
    inquiry that raced ahead of it; once registered, a refusal means a later registration
    replaced it: one ERROR, however many inquiries were refused."""

    async def scenario() -> None:
        server = ParticipantServer(InventoryService(dict(STOCK)), ParticipantConfig(tmp_path))
        await server.start()  # no coordinator: nothing registers or asks on its own
        try:
            server._replaced("b" * 16, "replaced")
            assert not server.failed.is_set()
            server.registered.set()
            server._replaced("b" * 16, "replaced")
            server._replaced("b" * 16, "replaced")
            assert server.failed.is_set()
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if "replaced by another" in line]
            assert 1 == len(errors), err
        finally:
            await server.stop(0)

    asyncio.run(scenario())
