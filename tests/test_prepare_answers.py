"""What a participant's prepare answer rests on: a service that raises refuses its branch and
keeps nothing, and a refusal waits for the records of the effects it was based on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from dtm import grpc_edge, limits, logs
from dtm.core.branch import BranchState, BranchVote, ErrorKind
from dtm.records import RecordType, ReplayError
from dtm.wal import MemoryLog, WriteAheadLog
from dtmpb.v1 import coordinator_pb2, log_pb2, participant_pb2, shop_pb2
from participants.branches import BranchEngine, BranchError
from participants.locks import LockManager, LockMode
from participants.server import ParticipantConfig, ParticipantServer
from participants.service import (
    InvalidOperation,
    LockRequest,
    Prepared,
    ReadOnly,
    Refused,
    Service,
    state_bytes,
)
from participants.services.inventory import InventoryService
from participants.services.orders import OrdersService
from participants.services.payment import PaymentService
from tests.doubles import ScriptedParticipant, scripted_branch, scripted_cluster
from tests.harness import until


class WaitsRecorded(MemoryLog):
    """Durable at once, like MemoryLog, but says which LSNs callers waited for."""

    def __init__(self) -> None:
        super().__init__()
        self.waited: list[int] = []

    async def wait_durable(self, lsn: int) -> None:
        self.waited.append(lsn)
        await super().wait_durable(lsn)


def engine(service: Service[Any], log: MemoryLog | None = None) -> BranchEngine:
    return BranchEngine(
        service, log or MemoryLog(), LockManager(wait_timeout_s=0.5), clock_ms=lambda: 0
    )


def packed(message: Message) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


class Broken(InventoryService):
    def prepare(
        self, owner: str, operation: shop_pb2.ReserveStock
    ) -> Prepared | ReadOnly | Refused:
        raise RuntimeError("bug in the service")


def test_a_service_that_raises_refuses_its_branch_and_keeps_no_lock(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("inventory", "INFO")
    broken = engine(Broken())
    reserve = shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
    answer = broken.begin_prepare("t-1", 0, packed(reserve), False)
    assert isinstance(answer, tuple)
    vote, reason = answer
    assert BranchVote.REFUSED is vote
    assert "inventory failed to prepare: RuntimeError" == reason
    info = broken.branch(("t-1", 0))
    assert info is not None and BranchState.REFUSED is info.branch.state
    assert [] == broken.locks.snapshot() and not broken.open
    # The ERROR line carries txn= like every line about a transaction (before: branch=t-1/0).
    assert (
        "the service's prepare raised: branch refused txn=t-1 branch=0" in capsys.readouterr().err
    )


class BrokenValidate(InventoryService):
    """Its validate() has a bug: a KeyError for the SKU "sku-bug"."""

    def validate(self, operation: shop_pb2.ReserveStock) -> None:
        if operation.lines[0].sku == "sku-bug":
            raise KeyError(operation.lines[0].sku)
        super().validate(operation)


def test_a_service_whose_validate_raises_refuses_its_branch_and_keeps_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As for a prepare or locks that raise: a bug in the service, not bad input. Before,
    begin_prepare raised the KeyError: every other item of the batched call failed with it."""
    logs.configure("inventory", "INFO")
    broken = engine(BrokenValidate())

    def reserve(sku: str) -> any_pb2.Any:
        return packed(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku=sku, quantity=1)]))

    refused = (BranchVote.REFUSED, "inventory failed to prepare: KeyError")
    assert refused == broken.begin_prepare("t-1", 0, reserve("sku-bug"), False)
    assert refused == broken.begin_prepare("t-1", 0, reserve("sku-bug"), False)  # again
    info = broken.branch(("t-1", 0))
    assert info is not None and BranchState.REFUSED is info.branch.state
    assert [] == broken.locks.snapshot() and not broken.open
    assert "the service's validate raised: branch refused txn=t-1 branch=0" in (
        capsys.readouterr().err
    )
    # Bad input is still INVALID_ARGUMENT, with no branch kept.
    with pytest.raises(InvalidOperation, match="quantity of sku-apple must be between 1"):
        broken.begin_prepare(
            "t-2",
            0,
            packed(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=0)])),
            False,
        )
    assert broken.branch(("t-2", 0)) is None


class BrokenLocks(OrdersService):
    """Its locks() raises for order "raises", and names no resource for order "unnamed"."""

    def locks(self, operation: shop_pb2.CreateOrder) -> list[LockRequest]:
        if operation.order_id == "raises":
            raise KeyError(operation.order_id)
        if operation.order_id == "unnamed":
            return [LockRequest("")]
        return list(super().locks(operation))


def test_a_service_whose_locks_raise_refuses_its_branch_and_keeps_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As for a prepare that raises. Before, begin_prepare raised: every other item of the
    batched call failed with it, and the branch stayed PREPARING until its lease ran out, a
    duplicate Prepare meanwhile refused with no reason at all."""
    logs.configure("orders", "INFO")
    broken = engine(BrokenLocks())

    def order(order_id: str) -> any_pb2.Any:
        line = shop_pb2.StockLine(sku="sku-apple", quantity=1)
        return packed(shop_pb2.CreateOrder(order_id=order_id, customer_id="c", lines=[line]))

    for transaction_id, error in (("t-1", "KeyError"), ("t-2", "ValueError")):
        operation = order("raises" if transaction_id == "t-1" else "unnamed")
        refused = (BranchVote.REFUSED, f"orders failed to prepare: {error}")
        assert refused == broken.begin_prepare(transaction_id, 0, operation, False)
        assert refused == broken.begin_prepare(transaction_id, 0, operation, False)  # again
        info = broken.branch((transaction_id, 0))
        assert info is not None and BranchState.REFUSED is info.branch.state
    assert "the service's locks raised: branch refused txn=t-1 branch=0" in capsys.readouterr().err
    assert [] == broken.locks.snapshot() and not broken.open
    assert (BranchVote.PREPARED, "") == broken.begin_prepare("t-3", 0, order("fine"), False)


def test_a_prepare_of_an_invalid_operation_is_counted_as_refused() -> None:
    """The answer is a refusal (VOTE_REFUSED with invalid_argument in a batch), but before
    dtm_branches_total{state="refused"} missed it: only the engine's own refusals counted."""
    inventory = engine(InventoryService())
    zero = shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=0)])
    for transaction_id, operation in [
        ("t-0", packed(zero)),  # the service's validate refuses it
        ("t-1", packed(shop_pb2.ChargePayment(account_id="acct-alice"))),  # another type
        ("t-2", any_pb2.Any()),  # none at all
    ]:
        with pytest.raises(InvalidOperation):
            inventory.begin_prepare(transaction_id, 0, operation, False)
    assert 3 == inventory.counters.refused
    assert (0, 0) == (inventory.counters.prepared, inventory.counters.rolled_back)
    assert not inventory.open and inventory.branch(("t-0", 0)) is None  # nothing kept


class WaitsPastTheCancel(LockManager):
    """Lock waits that do not stop at their task's cancel: a prepare that runs on after a
    Rollback (or its lease) cancelled it, as the simulator's prepare_past_cancel fault makes
    them. The stock LockManager stops; BranchEngine takes any lock manager, and must not
    rest on that."""

    async def acquire(
        self,
        owner: str,
        resource: str,
        mode: LockMode,
        timeout_s: float | None = None,
    ) -> None:
        try:
            await super().acquire(owner, resource, mode, timeout_s)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            await super().acquire(owner, resource, mode, timeout_s)


def test_a_vote_after_a_rollback_gives_back_its_reservation_and_locks() -> None:
    """A prepare waits for a lock; a Rollback cancels it, but its wait runs on, is granted
    the lock, and the service reserves. Before, the engine had dropped the operation at the
    cancel: the prepare raised KeyError (its caller heard an internal error), and the rolled
    back branch kept the lock and the reserved unit for good."""

    async def scenario() -> None:
        inventory = BranchEngine(
            InventoryService({"sku-apple": 5}, lock_skus=True),
            MemoryLog(),
            WaitsPastTheCancel(wait_timeout_s=5),
            clock_ms=lambda: 0,
        )
        reserve = packed(
            shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
        )
        assert (BranchVote.PREPARED, "") == inventory.begin_prepare("t-a", 0, reserve, False)
        waiting = asyncio.ensure_future(inventory.prepare("t-late", 0, reserve, False))
        await until(lambda: bool(inventory.locks.snapshot()[0].waiters))  # t-late queued
        await inventory.rollback("t-late", 0)  # cancels it; its wait runs on
        await inventory.commit("t-a", 0)  # the lock goes to t-late's wait, which prepares
        assert (BranchVote.REFUSED, "rolled back while preparing") == await waiting
        info = inventory.branch(("t-late", 0))
        assert info is not None and BranchState.ROLLED_BACK is info.branch.state
        assert [] == inventory.locks.snapshot()
        (level,) = inventory.service.levels(["sku-apple"])
        assert (4, 0, 1) == (level.available, level.reserved, level.sold)  # t-a's unit only
        assert not inventory.open

    asyncio.run(scenario())


def test_a_refusal_waits_for_the_commit_it_rests_on() -> None:
    """A one-phase commit of order o-1 is appended; a second order o-1 is refused as a
    duplicate. If the refusal left before the commit's record were durable, a crash could
    lose the commit and leave the refusal resting on an order that never existed."""

    async def scenario() -> None:
        log = WaitsRecorded()
        orders = engine(OrdersService(), log)
        order = shop_pb2.CreateOrder(
            order_id="o-1",
            customer_id="c",
            lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)],
            amount_cents=100,
        )
        first = orders.begin_prepare("t-1", 1, packed(order), True)
        assert isinstance(first, tuple) and BranchVote.COMMITTED is first[0]
        committed_at = log.appended_lsn
        second = orders.begin_prepare("t-2", 1, packed(order), False)
        assert isinstance(second, tuple) and BranchVote.REFUSED is second[0]
        assert "o-1" in second[1]
        await orders.wait_durable([("t-2", 1)])  # what the server does before answering
        assert log.waited and log.waited[-1] >= committed_at

    asyncio.run(scenario())


def test_a_participant_s_long_reasons_are_cut_so_the_answer_fits(tmp_path: Path) -> None:
    """A participant in another language votes PREPARED with a 200 KB reason on 32 branches:
    kept whole, the transaction committed but its Submit answer (6.4 MB) could not be sent,
    and the client heard a final RESOURCE_EXHAUSTED."""

    class Chatty(ScriptedParticipant):
        async def Prepare(self, request: Any, context: Any) -> participant_pb2.PrepareResponse:
            return participant_pb2.PrepareResponse(
                vote=coordinator_pb2.VOTE_PREPARED, reason="r" * 200_000
            )

    async def scenario() -> None:
        chatty = Chatty()
        async with scripted_cluster(tmp_path, chatty) as cluster:
            branches = [scripted_branch() for _ in range(32)]
            response = await cluster.submit(branches, "t-chatty")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            reason = response.branches[0].reason
            assert reason.startswith("r" * limits.REASON_CHARS_MAX)
            assert reason.endswith(f"({200_000 - limits.REASON_CHARS_MAX} more characters)")

    asyncio.run(scenario())


class Idle(InventoryService):
    """Votes READ_ONLY: nothing to change here."""

    def prepare(
        self, owner: str, operation: shop_pb2.ReserveStock
    ) -> Prepared | ReadOnly | Refused:
        return ReadOnly()


def test_a_one_phase_read_only_branch_tells_a_probe_it_completed() -> None:
    """Its transaction committed (rule 8). The coordinator probes a lost one-phase answer
    with a Rollback; an acknowledgement would make it report ABORTED."""
    idle = engine(Idle())
    reserve = packed(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)]))
    assert (BranchVote.READ_ONLY, "") == idle.begin_prepare("t-one", 0, reserve, True)
    assert (BranchVote.READ_ONLY, "") == idle.begin_prepare("t-two", 0, reserve, False)
    with pytest.raises(BranchError) as raised:
        idle.decide_now("t-one", 0, commit=False)
    assert ErrorKind.FAILED_PRECONDITION is raised.value.kind
    assert "already completed (read-only, in one phase)" in str(raised.value)
    idle.decide_now("t-two", 0, commit=False)  # two-phase: an abort's Rollback is acknowledged


def test_a_refused_one_phase_prepare_is_refused_again_after_a_restart() -> None:
    """Before, a refusal left no record: after a restart the same Prepare (a stale duplicate,
    or the client's retry) ran anew and, the stock being back, committed an order the client
    had been told was aborted."""

    async def scenario() -> None:
        log = MemoryLog()
        inventory = engine(InventoryService({"sku-a": 1}), log)
        reserve = packed(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-a", quantity=1)]))
        assert BranchVote.PREPARED is (await inventory.prepare("t-1", 0, reserve, False))[0]
        refused = await inventory.prepare("t-2", 0, reserve, True)
        assert BranchVote.REFUSED is refused[0] and "out of stock" in refused[1]
        await inventory.rollback("t-1", 0)  # the unit is back

        restarted = engine(InventoryService({"sku-a": 1}), log)
        restarted.replay(log.records)
        again = await restarted.prepare("t-2", 0, reserve, True)
        assert (BranchVote.REFUSED, refused[1]) == again
        service = restarted.service
        assert isinstance(service, InventoryService) and 0 == service.items["sku-a"].sold

    asyncio.run(scenario())


def test_a_commit_on_a_branch_still_preparing_changes_nothing() -> None:
    """Before, it was answered "already rolled back" (a heuristic rollback to the coordinator)
    and it renewed the branch's lease: repeated, it kept the branch's locks held."""

    async def scenario() -> None:
        now = [0]
        orders = BranchEngine(
            OrdersService(), MemoryLog(), LockManager(wait_timeout_s=5), clock_ms=lambda: now[0]
        )
        order = packed(
            shop_pb2.CreateOrder(
                order_id="o-1",
                customer_id="c",
                lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)],
                amount_cents=100,
            )
        )
        assert BranchVote.PREPARED is (await orders.prepare("holder", 1, order, False))[0]
        waiting = asyncio.ensure_future(orders.prepare("waiter", 1, order, False))
        await asyncio.sleep(0)  # it waits for the order id's lock
        now[0] = 1_000
        with pytest.raises(BranchError) as raised:
            await orders.commit("waiter", 1)
        assert ErrorKind.FAILED_PRECONDITION is raised.value.kind
        assert "still preparing" in str(raised.value)
        info = orders.branch(("waiter", 1))
        assert info is not None and BranchState.PREPARING is info.branch.state
        assert 0 == info.updated_at_ms  # the lease still runs from its start
        await orders.rollback("holder", 1)
        assert BranchVote.PREPARED is (await waiting)[0]

    asyncio.run(scenario())


class FailsAtReplay(OrdersService):
    """Orders whose `failing` step raises: set once the log is written, it fails at replay
    only (a bug the restart runs into, or a service changed since the log was written)."""

    failing = ""

    def _step(self, step: str) -> None:
        if self.failing == step:
            raise RuntimeError(f"{step} broke\nsee above")

    def locks(self, operation: shop_pb2.CreateOrder) -> list[LockRequest]:
        self._step("locks")
        return list(super().locks(operation))

    def prepare(self, key: str, operation: shop_pb2.CreateOrder) -> Prepared | ReadOnly | Refused:
        self._step("prepare")
        return super().prepare(key, operation)

    def commit(self, key: str, operation: shop_pb2.CreateOrder) -> None:
        self._step("commit")
        super().commit(key, operation)

    def rollback(self, key: str, operation: shop_pb2.CreateOrder) -> None:
        self._step("rollback")
        super().rollback(key, operation)

    def restore(self, state: bytes) -> None:
        self._step("restore")
        super().restore(state)


# A failing step -> the log that reaches it at replay: what follows the prepare of T/0.
REPLAY_FAILURES = {
    "prepare": ("", RecordType.BRANCH_PREPARED),
    "locks": ("", RecordType.BRANCH_PREPARED),
    "commit": ("commit", RecordType.BRANCH_COMMITTED),
    "rollback": ("rollback", RecordType.BRANCH_ROLLED_BACK),
    "restore": ("checkpoint", RecordType.PARTICIPANT_CHECKPOINT),
    "locks of a checkpoint's prepared branch": ("checkpoint", RecordType.PARTICIPANT_CHECKPOINT),
}


def log_reaching(then: str) -> MemoryLog:
    async def write() -> MemoryLog:
        log = MemoryLog()
        orders = engine(FailsAtReplay(), log)
        line = shop_pb2.StockLine(sku="sku-apple", quantity=1)
        order = shop_pb2.CreateOrder(order_id="o-1", customer_id="c", lines=[line])
        assert (BranchVote.PREPARED, "") == await orders.prepare("T", 0, packed(order), False)
        if then == "commit":
            await orders.commit("T", 0)
        elif then == "rollback":
            await orders.rollback("T", 0)
        elif then == "checkpoint":
            await orders.checkpoint()
        return log

    return asyncio.run(write())


@pytest.mark.parametrize("case", list(REPLAY_FAILURES))
def test_a_service_that_raises_at_replay_refuses_the_start_naming_the_record(case: str) -> None:
    """Whatever the service raises at replay is the ReplayError that names the record (run_server
    prints it as one line, exit status 1). Before, anything but a ValueError escaped replay:
    the process died with a bare traceback naming neither the log nor the record."""
    then, record_type = REPLAY_FAILURES[case]
    log = log_reaching(then)
    step = case.split()[0]
    service = FailsAtReplay()
    service.failing = step
    with pytest.raises(ReplayError) as refused:
        engine(service, MemoryLog()).replay(log.records)
    assert record_type == refused.value.record_type
    # The record's LSN: a checkpoint's first one (its records replay as one).
    assert next(r.lsn for r in log.records if r.record_type == record_type) == refused.value.lsn
    reason = refused.value.reason
    assert reason.startswith(
        f"the service's {step} raised RuntimeError: {step} broke see above (in _step, "
    )
    assert __file__ in reason and "\n" not in reason
    if step != "restore":
        assert ", replaying branch T/0 (a bug in the service" in reason


def test_a_lock_request_naming_no_resource_at_replay_refuses_the_start() -> None:
    """Checked as at prepare (`_checked_locks`): before, the lock table's assert failed with
    a traceback (under `python -O`, the branch took a lock on the resource "")."""

    class Unnamed(OrdersService):
        def locks(self, operation: shop_pb2.CreateOrder) -> list[LockRequest]:
            return [LockRequest("")]

    with pytest.raises(ReplayError) as refused:
        engine(Unnamed(), MemoryLog()).replay(log_reaching("").records)
    assert refused.value.reason.startswith(
        "the service's locks raised ValueError: locks() returned LockRequest(resource=''"
    )


@pytest.mark.parametrize("logged_in", ["record", "checkpoint"])
def test_a_prepared_operation_of_another_type_refuses_the_replay(logged_in: str) -> None:
    """Any.Unpack answers False for another type and leaves the message empty: before, such a
    branch was replayed PREPARED on an empty operation (here an empty order), silently."""
    reserve = shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
    prepared = log_pb2.BranchPrepared(transaction_id="T", branch=0, operation=packed(reserve))
    log = MemoryLog()
    if logged_in == "record":
        log.append(RecordType.BRANCH_PREPARED, prepared.SerializeToString())
    else:
        checkpoint = log_pb2.ParticipantCheckpoint(
            service_state=[state_bytes(OrdersService().snapshot())], prepared=[prepared]
        )
        log.append(RecordType.PARTICIPANT_CHECKPOINT, checkpoint.SerializeToString())
    orders = engine(OrdersService(), MemoryLog())
    with pytest.raises(ReplayError) as refused:
        orders.replay(log.records)
    assert (
        "the operation of branch T/0 is 'dtm.v1.ReserveStock', not dtm.v1.CreateOrder (a log "
        "written by another service?)"
    ) == refused.value.reason


def test_a_snapshot_restore_refuses_is_reported_in_the_service_s_words() -> None:
    """restore's ValueError is its documented refusal, worded for an operator: reported as it
    is, not as a bug in the service."""
    log = log_reaching("checkpoint")
    with pytest.raises(ReplayError) as refused:
        engine(PaymentService(), MemoryLog()).replay(log.records)
    assert "the service's restore raised" not in refused.value.reason
    assert RecordType.PARTICIPANT_CHECKPOINT == refused.value.record_type


def test_a_service_that_raises_at_replay_stops_the_process_with_one_line(
    tmp_path: Path,
) -> None:
    """The process: exit status 1 with the one line, nothing written to its log, and the log
    released (an embedder can start again on it, with the service fixed)."""
    directory = tmp_path / "orders" / "wal"
    written, _ = WriteAheadLog.open(directory)
    for record in log_reaching("").records:
        written.append(record.record_type, record.payload)
    written.close()
    segments = {path.name: path.read_bytes() for path in directory.glob("*.wal")}
    assert segments
    service = FailsAtReplay()
    service.failing = "prepare"
    with pytest.raises(SystemExit) as stopped:
        grpc_edge.run_server(lambda: ParticipantServer(service, ParticipantConfig(tmp_path)))
    message = str(stopped.value.code)
    assert 1 == len(message.splitlines()), message
    assert message.startswith(
        f"error: cannot replay the write-ahead log {directory}: record at LSN 1 "
        "(BRANCH_PREPARED): the service's prepare raised RuntimeError: prepare broke see above"
    ), message
    assert segments == {path.name: path.read_bytes() for path in directory.glob("*.wal")}
    reopened, records = WriteAheadLog.open(directory)  # released: not "in use"
    reopened.close()
    assert [RecordType.BRANCH_PREPARED] == [record.record_type for record in records]
