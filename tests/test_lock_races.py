"""Property: a participant's locks, its business state and its log agree under any schedule of
Prepares (some waiting for locks), Commits, Rollbacks, leases running out, inquiry answers,
checkpoints and restarts, on one event loop with the real branch engine, lock table and
service (protocol.md, "Locks and timeouts"; reliability.md, the stock invariants). A
transaction may have two branches here, which may want the same lock.

At every turn of the loop: every lock is held by an open branch (PREPARING or PREPARED) and a
PREPARED one holds all of its own, exclusively; the service's tentative effects (a stock
reservation, a PENDING order) are exactly those of the PREPARED branches; stock is conserved.
At the end, a restart from the log rebuilds the same state and the same prepared locks.

LOCK_RACE_EXAMPLES=N runs N examples of each property instead of 150 (a longer soak)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from dtm.core.branch import BranchState, BranchVote
from dtm.wal import MemoryLog
from dtmpb.v1 import shop_pb2
from participants.branches import BranchEngine, BranchError, IdReused, branch_key_text
from participants.locks import LockManager, LockMode
from participants.service import Service, state_bytes
from participants.services.inventory import InventoryService
from participants.services.orders import PENDING, OrdersService

STOCK = {"a": 3, "b": 2, "c": 5}
TRANSACTIONS = 6
BRANCHES = 2  # of one transaction on this participant
# Read at import: the examples are fixed when the tests are defined.
EXAMPLES = int(os.environ.get("LOCK_RACE_EXAMPLES", "150"))
# A lock wait of 0 is the manager's default; the others let waits run out mid-schedule.
LOCK_WAITS_S = [0.0, 0.005, 0.05]
# A Prepare's transaction fingerprint: none, or one of two attempts of the transaction id (a
# client that reused it), which the lock table names as two transactions.
ATTEMPTS = [b"", b"A" * 16, b"B" * 16]


def reserve(lines: list[tuple[str, int]]) -> any_pb2.Any:
    packed = any_pb2.Any()
    stock = [shop_pb2.StockLine(sku=sku, quantity=units) for sku, units in lines]
    packed.Pack(shop_pb2.ReserveStock(lines=stock))
    return packed


def create_order(order_id: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    line = shop_pb2.StockLine(sku="a", quantity=1)
    packed.Pack(shop_pb2.CreateOrder(order_id=order_id, customer_id="c", lines=[line]))
    return packed


# The operation of a Prepare: the inventory with a lock per SKU (lock_skus), whose lines may
# overlap, or orders, whose lock is the order id.
inventory_operation = st.lists(
    st.tuples(st.sampled_from(sorted(STOCK)), st.integers(1, 2)),
    min_size=1,
    max_size=3,
    unique_by=lambda line: line[0],
).map(reserve)
orders_operation = st.sampled_from(["x", "y"]).map(create_order)


def steps(operation: st.SearchStrategy[any_pb2.Any]) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    txn = st.integers(0, TRANSACTIONS - 1)
    branch = st.integers(0, BRANCHES - 1)
    step = st.one_of(
        st.tuples(
            st.just("prepare"),
            txn,
            branch,
            operation,
            st.sampled_from(LOCK_WAITS_S),
            st.booleans(),
            st.sampled_from(ATTEMPTS),
        ),
        st.tuples(st.sampled_from(["commit", "rollback", "lease"]), txn, branch),
        st.tuples(st.sampled_from(["learn", "force"]), txn, branch, st.booleans()),
        st.tuples(st.sampled_from(["checkpoint", "restart"])),
        st.tuples(st.just("turns"), st.integers(0, 4)),
        st.tuples(st.just("sleep"), st.sampled_from([0.001, 0.01, 0.03])),
    )
    return st.lists(step, min_size=1, max_size=25)


def tentative(service: Service[Any]) -> set[str]:
    """The branch keys the service holds tentative effects for, its own invariants checked."""
    if isinstance(service, InventoryService):
        for sku, item in service.items.items():
            assert item.available >= 0, (sku, item)
            assert item.available + item.reserved + item.sold == item.received, (sku, item)
            reserved = sum(units.get(sku, 0) for units in service.reservations.values())
            assert item.reserved == reserved, (sku, item, service.reservations)
        return set(service.reservations)
    assert isinstance(service, OrdersService)
    for order_id in service.pending.values():
        assert PENDING == service.orders[order_id].state, order_id
    assert len(service.pending) == sum(o.state == PENDING for o in service.orders.values())
    return set(service.pending)


def check(engine: BranchEngine, decided: set[tuple[str, int]]) -> None:
    """`decided`: the branches a decision was delivered to while PREPARED."""
    for info in engine.listed(set(), TRANSACTIONS * BRANCHES):
        branch = info.branch
        if branch.vote is BranchVote.PREPARED and branch.state is not BranchState.PREPARED:
            # Voted yes: decided only by a decision, never by a lease or a lock timeout.
            assert branch.key in decided, branch
    prepared = engine.in_doubt()
    assert {branch_key_text(info.branch.key) for info in prepared} == tentative(engine.service)
    open_owners = {branch_key_text(key) for key in engine.open}
    for lock in engine.locks.snapshot():
        assert lock.holders and set(lock.holders) <= open_owners, (lock, open_owners)
    for resource, entry in engine.locks._locks.items():
        # A wait leaves the queue as it ends: LockManager.acquire relies on every queued
        # waiter being live, and on the owner index matching the queue.
        assert all(waiter.live and waiter.queued for waiter in entry.waiters), resource
        assert {waiter.owner: waiter for waiter in entry.waiters} == entry.waiting, resource
    # Pinned (their locks held until the transaction is decided, in the deadlock search)
    # exactly while prepared: pinned at the vote or the replay, unpinned at the release.
    # Each owner's transaction as named when it entered the table, is the engine's while the
    # branch is open (it is, while in the table), and leaves the index with it.
    named = engine.locks._transaction_by_owner
    assert set(named) == set(engine.locks._resources_of)
    assert all(engine.transaction_of(owner) == named[owner] for owner in named), named
    by_transaction: dict[str, set[str]] = {}
    for owner, transaction in named.items():
        by_transaction.setdefault(transaction, set()).add(owner)
    assert by_transaction == engine.locks._branches
    assert engine.locks._pinned == {
        branch_key_text(info.branch.key)
        for info in prepared
        if branch_key_text(info.branch.key) in engine.locks._resources_of
    }
    for info in prepared:
        owner = branch_key_text(info.branch.key)
        operation = engine._operations[info.branch.key]
        wanted = {request.resource for request in engine.service.locks(operation)}
        held = engine.locks.held_by(owner)
        assert {resource: LockMode.EXCLUSIVE for resource in wanted} == held, (owner, held)


async def deliver(
    engine: BranchEngine, decided: set[tuple[str, int]], kind: str, key: tuple[str, int], arg: bool
) -> None:
    """A decision about a branch: the coordinator's, an inquiry's answer (`arg`: commit), or
    an operator's forcing (likewise)."""
    info = engine.open.get(key)
    if info is not None and info.branch.state is BranchState.PREPARED:
        decided.add(key)  # from here on, this branch may be decided
    if kind in ("commit", "rollback"):
        with contextlib.suppress(BranchError):  # refused: not prepared, decided otherwise
            engine.decide_now(key[0], key[1], kind == "commit")
    elif kind == "learn":
        # The inquiry loop asks about PREPARED branches only (decided since is fine).
        if info is None or info.branch.state is BranchState.PREPARED:
            engine.learn_outcome(key, commit=arg)
    else:
        with contextlib.suppress(BranchError):  # only a PREPARED branch can be forced
            await engine.force(key, commit=arg)


async def run_schedule(
    new_service: Callable[[], Service[Any]], schedule: list[tuple[Any, ...]]
) -> None:
    log = MemoryLog()  # everything appended is durable at once: a restart loses nothing
    decided: set[tuple[str, int]] = set()

    def start() -> BranchEngine:
        engine = BranchEngine(
            new_service(),
            log,
            # As a participant process wires them.
            LockManager(
                wait_timeout_s=0.02, transaction_of=lambda owner: engine.transaction_of(owner)
            ),
            clock_ms=lambda: 1_000,
        )
        engine.replay(log.records)
        return engine

    engine = start()
    answers: list[asyncio.Future[Any]] = []
    done = asyncio.Event()

    async def monitor() -> None:  # every turn of the loop, whatever the schedule awaits
        while not done.is_set():
            check(engine, decided)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(monitor())
    for kind, *args in schedule:
        if kind == "prepare":
            txn, index, operation, lock_wait_s, one_phase, attempt = args
            with contextlib.suppress(IdReused):  # known here under the other attempt
                answer = engine.begin_prepare(
                    f"t{txn}",
                    index,
                    operation,
                    one_phase,
                    lock_wait_s=lock_wait_s or None,
                    fingerprint=attempt,
                )
                if not isinstance(answer, tuple):
                    answers.append(asyncio.ensure_future(answer))
        elif kind in ("commit", "rollback", "learn", "force"):
            commit = len(args) > 2 and args[2]  # learn and force carry it
            await deliver(engine, decided, kind, (f"t{args[0]}", args[1]), commit)
        elif kind == "lease":
            engine.expire_lease((f"t{args[0]}", args[1]))
        elif kind == "checkpoint":
            await engine.checkpoint()
        elif kind == "restart":
            # The process stops: its lock waits end with it, and they append nothing.
            for task in list(engine._tasks.values()):
                task.cancel()
            await asyncio.gather(*answers, return_exceptions=True)
            answers = []
            engine = start()
        elif kind == "turns":
            for _ in range(args[0]):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(args[0])
        check(engine, decided)
    await asyncio.gather(*answers, return_exceptions=True)
    done.set()
    await watcher
    restarted = start()
    check(restarted, decided)
    assert {k for k, i in engine.open.items() if i.branch.state is BranchState.PREPARED} == set(
        restarted.open
    )
    assert state_bytes(engine.service.snapshot()) == state_bytes(restarted.service.snapshot())
    prepared = {branch_key_text(key) for key in restarted.open}
    assert [
        (lock.resource, lock.holders)
        for lock in engine.locks.snapshot()
        if set(lock.holders) <= prepared
    ] == [(lock.resource, lock.holders) for lock in restarted.locks.snapshot()]


@settings(max_examples=EXAMPLES, deadline=None)
@given(schedule=steps(inventory_operation))
def test_sku_locks_reservations_and_log_agree_under_any_schedule(
    schedule: list[tuple[Any, ...]],
) -> None:
    asyncio.run(run_schedule(lambda: InventoryService(STOCK, lock_skus=True), schedule))


@settings(max_examples=EXAMPLES, deadline=None)
@given(schedule=steps(orders_operation))
def test_order_locks_pending_orders_and_log_agree_under_any_schedule(
    schedule: list[tuple[Any, ...]],
) -> None:
    asyncio.run(run_schedule(OrdersService, schedule))
