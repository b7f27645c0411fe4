"""Tests for participants.locks: modes, fairness, timeouts, deadlocks, cancellation, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from dtm.core.branch import BranchVote
from dtm.records import RecordType, ReplayError
from dtm.wal import MemoryLog
from dtmpb.v1 import shop_pb2
from participants import locks
from participants.branches import BranchEngine
from participants.locks import (
    DeadlockDetected,
    LockManager,
    LockMode,
    LockRefused,
    LockSnapshot,
    LockTimeout,
)
from participants.service import LockRequest, Prepared, PrepareResult, ReadOnly, transaction_of
from participants.services.inventory import InventoryService
from participants.services.orders import OrdersService
from tests.harness import until

S = LockMode.SHARED
X = LockMode.EXCLUSIVE
WAIT_S = 0.05  # the manager's default wait timeout in these tests
LONG_S = 5.0  # a wait that must never run out in a passing test
T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]], hard_timeout_s: float = 5.0) -> T:
    """Run one scenario on a fresh loop; a hang fails the test instead of stalling the suite."""

    async def bounded() -> T:
        async with asyncio.timeout(hard_timeout_s):
            return await main()

    return asyncio.run(bounded())


def waiting(manager: LockManager, resource: str) -> list[tuple[str, str]]:
    for lock in manager.snapshot():
        if lock.resource == resource:
            return [(owner, mode) for owner, mode, _ in lock.waiters]
    return []


def holders(manager: LockManager, resource: str) -> tuple[str, ...]:
    for lock in manager.snapshot():
        if lock.resource == resource:
            return lock.holders
    return ()


def assert_empty(manager: LockManager) -> None:
    """Nothing left behind: no lock entries and no owner index entries."""
    assert manager.snapshot() == []
    assert manager._resources_of == {}
    assert manager._branches == {}
    assert manager._transaction_by_owner == {}
    assert manager._pinned == set()


def check_invariants(manager: LockManager, owners: list[str]) -> None:
    held = {owner: manager.held_by(owner) for owner in owners}
    for lock in manager.snapshot():
        assert lock.holders, lock  # waiters never sit behind an empty lock
        modes = [held[owner][lock.resource] for owner in lock.holders]
        if X in modes:
            assert len(lock.holders) == 1, lock
        assert ("exclusive" if X in modes else "shared") == lock.mode
        assert len(lock.waiters) <= locks.WAITERS_PER_RESOURCE_MAX
    for owner, resources in held.items():
        for resource in resources:
            assert owner in holders(manager, resource)
    for resource, lock in manager._locks.items():
        # The index behind the duplicate-waiter check follows the queue: one entry per waiter.
        assert {waiter.owner: waiter for waiter in lock.waiters} == lock.waiting, resource
        assert len(lock.waiters) == len(lock.waiting), resource


def test_exclusive_excludes() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=WAIT_S)
        await manager.acquire("a", "sku-1", X)
        for mode in (S, X):
            with pytest.raises(LockTimeout):
                await manager.acquire("b", "sku-1", mode)
        assert manager.held_by("a") == {"sku-1": X}
        assert manager.held_by("b") == {}
        waiter = asyncio.create_task(manager.acquire("b", "sku-1", X, timeout_s=LONG_S))
        await until(lambda: waiting(manager, "sku-1") == [("b", "exclusive")])
        assert manager.release_all("a") == ["sku-1"]
        await waiter
        assert holders(manager, "sku-1") == ("b",)
        manager.release_all("b")
        assert_empty(manager)

    run(main)


def test_shared_shares_and_excludes_exclusive() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=WAIT_S)
        await manager.acquire("a", "sku-1", S)
        await manager.acquire("b", "sku-1", S)
        assert manager.waits == 0
        assert holders(manager, "sku-1") == ("a", "b")
        with pytest.raises(LockTimeout):
            await manager.acquire("c", "sku-1", X)
        assert manager.waits == 1
        manager.release_all("a")
        manager.release_all("b")
        assert_empty(manager)

    run(main)


def test_fifo_queued_exclusive_not_starved_by_later_shared() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", S)
        writer = asyncio.create_task(manager.acquire("w", "sku-1", X))
        await until(lambda: bool(waiting(manager, "sku-1")))
        # Compatible with the holder, but queued behind the writer: fairness over throughput.
        readers = [asyncio.create_task(manager.acquire(name, "sku-1", S)) for name in "bc"]
        await until(lambda: len(waiting(manager, "sku-1")) == 3)
        assert waiting(manager, "sku-1") == [("w", "exclusive"), ("b", "shared"), ("c", "shared")]
        manager.release_all("a")
        await writer
        assert holders(manager, "sku-1") == ("w",)
        assert not any(reader.done() for reader in readers)
        manager.release_all("w")
        await asyncio.gather(*readers)
        assert holders(manager, "sku-1") == ("b", "c")  # woken together
        manager.release_all("b")
        manager.release_all("c")
        assert_empty(manager)

    run(main)


def test_reentrant_acquire_is_granted_at_once() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=WAIT_S)
        await manager.acquire("a", "acct-1", X)
        await manager.acquire("b", "acct-2", S)
        waiter = asyncio.create_task(manager.acquire("c", "acct-1", S, timeout_s=LONG_S))
        await until(lambda: bool(waiting(manager, "acct-1")))
        # A weaker or equal mode is already covered, even with someone queued.
        await manager.acquire("a", "acct-1", X)
        await manager.acquire("a", "acct-1", S)
        await manager.acquire("b", "acct-2", S)
        assert manager.timeouts == 0
        assert manager.held_by("a") == {"acct-1": X}
        assert manager.grants == 5
        assert manager.release_all("a") == ["acct-1"]  # one release, however many acquires
        await waiter
        manager.release_all("b")
        manager.release_all("c")
        assert_empty(manager)

    run(main)


def test_upgrade_of_sole_holder_is_immediate() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=WAIT_S)
        await manager.acquire("a", "sku-1", S)
        await manager.acquire("a", "sku-1", X)
        assert manager.held_by("a") == {"sku-1": X}
        assert manager.waits == 0
        manager.release_all("a")
        assert_empty(manager)

    run(main)


def test_upgrade_waits_for_other_readers_and_goes_ahead_of_the_queue() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", S)
        await manager.acquire("b", "sku-1", S)
        writer = asyncio.create_task(manager.acquire("w", "sku-1", X))
        await until(lambda: bool(waiting(manager, "sku-1")))
        upgrade = asyncio.create_task(manager.acquire("a", "sku-1", X))
        await until(lambda: len(waiting(manager, "sku-1")) == 2)
        assert waiting(manager, "sku-1") == [("a", "exclusive"), ("w", "exclusive")]
        manager.release_all("b")
        await upgrade
        assert manager.held_by("a") == {"sku-1": X}
        assert not writer.done()
        manager.release_all("a")
        await writer
        manager.release_all("w")
        assert_empty(manager)

    run(main)


def test_two_upgraders_deadlock_the_later_one() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", S)
        await manager.acquire("b", "sku-1", S)
        first = asyncio.create_task(manager.acquire("a", "sku-1", X))
        await until(lambda: bool(waiting(manager, "sku-1")))
        with pytest.raises(DeadlockDetected) as refused:
            await manager.acquire("b", "sku-1", X)
        assert refused.value.reason == "deadlock on sku-1: b -> a -> b"
        assert manager.deadlocks == 1
        # The refused upgrader keeps what it held until its branch releases it.
        assert manager.held_by("b") == {"sku-1": S}
        assert waiting(manager, "sku-1") == [("a", "exclusive")]
        manager.release_all("b")
        await first
        assert manager.held_by("a") == {"sku-1": X}
        manager.release_all("a")
        assert_empty(manager)

    run(main)


def test_timeout_fails_the_waiter_never_the_holder() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=WAIT_S)
        await manager.acquire("a", "order-1", X)
        started = time.monotonic()
        with pytest.raises(LockTimeout) as refused:
            await manager.acquire("b", "order-1", X)
        # Not refused before its time (a loaded machine can only make it later).
        assert WAIT_S * 0.9 <= time.monotonic() - started
        assert refused.value.reason == "lock timeout on order-1 after 50 ms"
        assert isinstance(refused.value, LockRefused)
        with pytest.raises(LockTimeout, match="after 20 ms"):
            await manager.acquire("b", "order-1", S, timeout_s=0.02)
        assert manager.timeouts == 2
        assert manager.held_by("a") == {"order-1": X}
        assert waiting(manager, "order-1") == []
        assert manager.held_by("b") == {}
        manager.release_all("a")
        assert_empty(manager)

    run(main)


def test_timed_out_waiter_leaves_no_trace_and_the_one_behind_proceeds() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", S)
        writer = asyncio.create_task(manager.acquire("w", "sku-1", X, timeout_s=WAIT_S))
        await until(lambda: bool(waiting(manager, "sku-1")))
        reader = asyncio.create_task(manager.acquire("r", "sku-1", S))
        await until(lambda: len(waiting(manager, "sku-1")) == 2)
        with pytest.raises(LockTimeout):
            await writer
        # The reader was queued only behind the writer; with it gone it joins the holder.
        await reader
        assert holders(manager, "sku-1") == ("a", "r")
        assert waiting(manager, "sku-1") == []
        assert manager.held_by("w") == {}
        assert "w" not in manager._resources_of
        manager.release_all("a")
        manager.release_all("r")
        assert_empty(manager)

    run(main)


def test_opposite_order_deadlock_refuses_one_and_the_other_completes() -> None:
    async def branch(
        manager: LockManager, owner: str, first: str, second: str, both_hold: asyncio.Barrier
    ) -> str:
        try:
            await manager.acquire(owner, first, X)
            await both_hold.wait()
            await manager.acquire(owner, second, X)
            return "done"
        except LockRefused as refused:
            return refused.reason
        finally:
            manager.release_all(owner)

    async def main() -> list[str]:
        manager = LockManager(wait_timeout_s=WAIT_S)
        both_hold = asyncio.Barrier(2)
        outcomes = await asyncio.gather(
            branch(manager, "a", "acct-1", "acct-2", both_hold),
            branch(manager, "b", "acct-2", "acct-1", both_hold),
        )
        # Found as a deadlock, not left to the lock wait.
        assert manager.deadlocks == 1
        assert manager.timeouts == 0
        assert_empty(manager)
        return list(outcomes)

    outcomes = run(main)
    assert outcomes.count("done") == 1, outcomes
    (refusal,) = [outcome for outcome in outcomes if outcome != "done"]
    assert refusal in (
        "deadlock on acct-1: b -> a -> b",
        "deadlock on acct-2: a -> b -> a",
    )


def test_three_way_cycle_is_detected() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        for owner, resource in (("a", "r1"), ("b", "r2"), ("c", "r3")):
            await manager.acquire(owner, resource, X)
        a_waits = asyncio.create_task(manager.acquire("a", "r2", S))
        b_waits = asyncio.create_task(manager.acquire("b", "r3", S))
        await until(lambda: bool(waiting(manager, "r2") and waiting(manager, "r3")))
        with pytest.raises(DeadlockDetected, match=r"deadlock on r1: c -> a -> b -> c"):
            await manager.acquire("c", "r1", X)
        manager.release_all("c")
        await b_waits
        manager.release_all("b")
        await a_waits
        manager.release_all("a")
        assert_empty(manager)

    run(main)


def test_cycle_through_a_queued_waiter_is_detected() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "r1", S)
        await manager.acquire("c", "r2", X)
        a_waits = asyncio.create_task(manager.acquire("a", "r2", S))  # a waits on c
        b_waits = asyncio.create_task(manager.acquire("b", "r1", X))  # b waits on a
        await until(lambda: bool(waiting(manager, "r1") and waiting(manager, "r2")))
        # c is compatible with the holder a, but FIFO queues it behind b: c -> b -> a -> c.
        with pytest.raises(DeadlockDetected, match=r"deadlock on r1: c -> b -> a -> c"):
            await manager.acquire("c", "r1", S)
        manager.release_all("c")
        await a_waits
        manager.release_all("a")
        await b_waits
        manager.release_all("b")
        assert_empty(manager)

    run(main)


def test_shared_waiters_on_one_holder_are_no_deadlock() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "r1", X)
        await manager.acquire("b", "r2", S)
        # c waits on a (r1); b then asks r1 shared too: both wait on a, no cycle.
        c_waits = asyncio.create_task(manager.acquire("c", "r1", S))
        await until(lambda: bool(waiting(manager, "r1")))
        b_waits = asyncio.create_task(manager.acquire("b", "r1", S))
        await until(lambda: len(waiting(manager, "r1")) == 2)
        # a wants r2 shared, compatible with b's hold: granted, no cycle either.
        await manager.acquire("a", "r2", S)
        manager.release_all("a")
        await asyncio.gather(c_waits, b_waits)
        assert manager.deadlocks == 0
        manager.release_all("b")
        manager.release_all("c")
        assert_empty(manager)

    run(main)


def test_cancelled_waiter_is_removed_and_the_queue_moves_on() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", S)
        writer = asyncio.create_task(manager.acquire("w", "sku-1", X))
        await until(lambda: bool(waiting(manager, "sku-1")))
        reader = asyncio.create_task(manager.acquire("r", "sku-1", S))
        await until(lambda: len(waiting(manager, "sku-1")) == 2)
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        await reader
        assert holders(manager, "sku-1") == ("a", "r")
        assert "w" not in manager._resources_of
        manager.release_all("a")
        manager.release_all("r")
        assert_empty(manager)

    run(main)


def test_cancel_racing_a_grant_gives_the_lock_back() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        waiter = asyncio.create_task(manager.acquire("b", "sku-1", X))
        await until(lambda: bool(waiting(manager, "sku-1")))
        manager.release_all("a")  # grants b ...
        assert holders(manager, "sku-1") == ("b",)
        waiter.cancel()  # ... but b's task is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert_empty(manager)

    run(main)


def test_cancel_racing_an_upgrade_grant_restores_shared() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", S)
        await manager.acquire("b", "sku-1", S)
        upgrade = asyncio.create_task(manager.acquire("a", "sku-1", X))
        await until(lambda: bool(waiting(manager, "sku-1")))
        manager.release_all("b")
        upgrade.cancel()
        with pytest.raises(asyncio.CancelledError):
            await upgrade
        assert manager.held_by("a") == {"sku-1": S}
        manager.release_all("a")
        assert_empty(manager)

    run(main)


def test_release_all_wakes_waiters_and_fails_own_waits() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        await manager.acquire("a", "sku-2", X)
        await manager.acquire("z", "sku-3", X)
        a_waits = asyncio.create_task(manager.acquire("a", "sku-3", S))
        waiters = [
            asyncio.create_task(manager.acquire(owner, resource, mode))
            for owner, resource, mode in (("b", "sku-1", X), ("c", "sku-2", S), ("d", "sku-2", S))
        ]
        await until(lambda: sum(len(lock.waiters) for lock in manager.snapshot()) == 4)
        assert manager.release_all("a") == ["sku-1", "sku-2"]
        with pytest.raises(LockRefused, match="released while waiting"):
            await a_waits
        await asyncio.gather(*waiters)
        assert manager.held_by("b") == {"sku-1": X}
        assert holders(manager, "sku-2") == ("c", "d")
        assert waiting(manager, "sku-3") == []
        for owner in "bcdz":
            manager.release_all(owner)
        assert manager.release_all("nobody") == []
        assert_empty(manager)

    run(main)


def test_acquire_now_retakes_prepared_locks_after_restart() -> None:
    async def main() -> None:
        # Before the crash: a held sku-1 exclusively, b and c shared sku-2, all prepared.
        manager = LockManager(wait_timeout_s=WAIT_S)
        manager.acquire_now("a", "sku-1", X)
        manager.acquire_now("b", "sku-2", S)
        manager.acquire_now("c", "sku-2", S)
        manager.acquire_now("c", "sku-2", S)  # a recovered branch may list a lock twice
        assert manager.held_by("a") == {"sku-1": X}
        assert holders(manager, "sku-2") == ("b", "c")
        with pytest.raises(LockTimeout):
            await manager.acquire("new", "sku-1", S)
        with pytest.raises(
            LockRefused, match=r"d cannot re-take sku-2 \(exclusive\): held by b, c"
        ):
            manager.acquire_now("d", "sku-2", X)
        assert holders(manager, "sku-2") == ("b", "c") and manager.held_by("d") == {}
        manager.release_all("a")
        await manager.acquire("new", "sku-1", S)
        for owner in ("b", "c", "new"):
            manager.release_all(owner)
        assert_empty(manager)

    run(main)


def test_a_recovered_prepared_branch_holds_its_locks_since_its_prepare() -> None:
    """After a restart, a prepared branch's locks are held since its prepare as logged, not
    since the restart (ListLocks' held_since, `dtm locks`' "held for"), whether replayed from
    its record or restored from a checkpoint, on a lock clock that restarted too."""
    lock_clock = [50.0]  # monotonic: its zero moves with each process
    unix_ms = [1_000]

    def engine(log: MemoryLog) -> BranchEngine:
        manager = LockManager(wait_timeout_s=LONG_S, clock=lambda: lock_clock[0])
        return BranchEngine(OrdersService(), log, manager, clock_ms=lambda: unix_ms[0])

    def held_since(branches: BranchEngine) -> list[tuple[str, float]]:
        return [(lock.resource, lock.held_since) for lock in branches.locks.snapshot()]

    async def main() -> None:
        order = any_pb2.Any()
        line = shop_pb2.StockLine(sku="sku-1", quantity=1)
        order.Pack(shop_pb2.CreateOrder(order_id="X", customer_id="c", lines=[line]))
        first = engine(MemoryLog())
        assert (BranchVote.PREPARED, "") == await first.prepare("T", 0, order, False)
        assert [("order:X", 50.0)] == held_since(first)
        # Restarted 8 s later (unix time), its lock clock now reading 100.0.
        lock_clock[0], unix_ms[0] = 100.0, 9_000
        assert isinstance(first.log, MemoryLog)
        replayed = engine(MemoryLog())
        replayed.replay(first.log.records)
        assert [("order:X", 92.0)] == held_since(replayed)
        await first.checkpoint()
        restored = engine(MemoryLog())
        restored.replay(first.log.records)
        assert [("order:X", 92.0)] == held_since(restored)

    run(main)


def test_prepared_branches_whose_locks_conflict_now_refuse_the_replay() -> None:
    """Two branches prepared on one SKU under the escrow design (no locks), replayed by a
    service that now locks each SKU exclusively (a changed locks()): they cannot both hold it.
    The replay asserted that, so the process died with an AssertionError and a traceback, and
    under `python -O` both branches held the SKU exclusively. It refuses with a ReplayError
    naming the record, as for any log the service cannot replay."""
    reserve = any_pb2.Any()
    reserve.Pack(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-1", quantity=1)]))

    def engine(service: InventoryService) -> BranchEngine:
        return BranchEngine(
            service, MemoryLog(), LockManager(wait_timeout_s=LONG_S), clock_ms=lambda: 0
        )

    async def main() -> None:
        before = engine(InventoryService({"sku-1": 5}))
        for txn in ("T1", "T2"):
            assert (BranchVote.PREPARED, "") == await before.prepare(txn, 0, reserve, False)
        assert isinstance(before.log, MemoryLog)
        with pytest.raises(ReplayError) as refused:
            engine(InventoryService({"sku-1": 5}, lock_skus=True)).replay(before.log.records)
        assert (2, RecordType.BRANCH_PREPARED) == (refused.value.lsn, refused.value.record_type)
        assert (
            "re-taking the locks of prepared branch T2/0: T2/0 cannot re-take sku:sku-1 "
            "(exclusive): held by T1/0; the service's locks() do not match the log"
        ) in refused.value.reason

    run(main)


def test_a_prepared_branch_whose_locks_fail_now_refuses_the_replay() -> None:
    """A branch prepared, replayed by a service whose locks() now raises for its operation, or
    names no resource (a changed service): a ReplayError naming the record, as for a conflict
    (above) and as a prepare refuses such a branch. Before, the service's own exception (or
    an AssertionError) came out of the replay with a traceback instead."""
    reserve = any_pb2.Any()
    reserve.Pack(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-1", quantity=1)]))

    class Raising(InventoryService):
        def locks(self, operation: Any) -> list[LockRequest]:
            raise KeyError("sku-1")

    class Nameless(InventoryService):
        def locks(self, operation: Any) -> list[LockRequest]:
            return [LockRequest("", LockMode.EXCLUSIVE)]

    def engine(service: InventoryService) -> BranchEngine:
        return BranchEngine(
            service, MemoryLog(), LockManager(wait_timeout_s=LONG_S), clock_ms=lambda: 0
        )

    async def main() -> None:
        before = engine(InventoryService({"sku-1": 5}))
        assert (BranchVote.PREPARED, "") == await before.prepare("T1", 0, reserve, False)
        assert isinstance(before.log, MemoryLog)
        for service, said in (
            (Raising({"sku-1": 5}), "KeyError: 'sku-1'"),
            (Nameless({"sku-1": 5}), "locks() returned LockRequest(resource=''"),
        ):
            with pytest.raises(ReplayError) as refused:
                engine(service).replay(before.log.records)
            assert (1, RecordType.BRANCH_PREPARED) == (
                refused.value.lsn,
                refused.value.record_type,
            )
            reason = refused.value.reason
            assert "the service's locks raised" in reason and "replaying branch T1/0" in reason
            assert said in reason, reason

    run(main)


def test_snapshot_reports_holders_waiters_and_times() -> None:
    ticks: Iterator[float] = iter(float(tick) for tick in range(100, 200))

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S, clock=lambda: next(ticks))
        await manager.acquire("a", "sku-2", S)  # held since 100
        await manager.acquire("b", "sku-2", S)  # 101
        await manager.acquire("a", "sku-1", X)  # 102
        writer = asyncio.create_task(manager.acquire("w", "sku-2", X))  # waiting since 103
        await until(lambda: bool(waiting(manager, "sku-2")))
        assert [
            LockSnapshot("sku-1", "exclusive", ("a",), 102.0, ()),
            LockSnapshot("sku-2", "shared", ("a", "b"), 100.0, (("w", "exclusive", 103.0),)),
        ] == manager.snapshot()
        manager.release_all("a")
        assert [LockSnapshot("sku-2", "shared", ("b",), 101.0, (("w", "exclusive", 103.0),))] == (
            manager.snapshot()
        )
        manager.release_all("b")  # w granted at 104
        await writer
        assert [LockSnapshot("sku-2", "exclusive", ("w",), 104.0, ())] == manager.snapshot()
        manager.release_all("w")
        assert_empty(manager)

    run(main)


def test_a_limited_snapshot_lists_the_longest_held_locks_in_resource_order() -> None:
    manager = LockManager(wait_timeout_s=LONG_S, clock=lambda: 1_000.0)
    for resource, held_for_s in (("sku-1", 5), ("sku-2", 50), ("sku-4", 30)):
        manager.acquire_now(f"b-{resource}", resource, X, held_for_s=held_for_s)
    manager.acquire_now("r2", "sku-3", S)
    manager.acquire_now("r", "sku-3", S, held_for_s=90)  # its oldest hold dates the lock
    assert ["sku-2", "sku-3"] == [lock.resource for lock in manager.snapshot(limit=2)]
    assert 4 == manager.lock_count == len(manager.snapshot()) == len(manager.snapshot(limit=4))


def test_waiters_per_resource_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks, "WAITERS_PER_RESOURCE_MAX", 2)

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        queued = [asyncio.create_task(manager.acquire(owner, "sku-1", S)) for owner in "bc"]
        await until(lambda: len(waiting(manager, "sku-1")) == 2)
        with pytest.raises(LockRefused) as refused:
            await manager.acquire("d", "sku-1", S)
        # What a client reads as the abort's reason: the limit, and what to do about it.
        assert (
            "too many waiters on sku-1: 2 requests already wait for it (the limit), so this "
            "one was refused without waiting; a hot key: retry later, or spread the load over "
            "more keys"
        ) == refused.value.reason
        assert manager.held_by("d") == {}
        # Counted: a hot key past the limit shows in the metrics (dtm_lock_queue_full_total).
        assert (1, 2, 0) == (manager.queue_full, manager.waits, manager.timeouts)
        manager.release_all("a")
        await asyncio.gather(*queued)
        manager.release_all("b")
        manager.release_all("c")
        assert_empty(manager)

    run(main)


def test_waits_that_ended_do_not_count_against_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout or a cancellation ends a wait at once (its future is cancelled), but its task
    runs again only later. A request that runs before it (here: scheduled first, as one that
    arrives in the loop step of a mass timeout is) was refused "too many waiters" though
    nobody waited: the ended waits still filled the queue until their tasks ran."""
    monkeypatch.setattr(locks, "WAITERS_PER_RESOURCE_MAX", 2)

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        ended = [asyncio.create_task(manager.acquire(owner, "sku-1", S)) for owner in "bc"]
        await until(lambda: len(waiting(manager, "sku-1")) == 2)
        late = asyncio.create_task(manager.acquire("d", "sku-1", S))  # runs first ...
        for task in ended:
            task.cancel()  # ... before these tasks see their cancellation
        await until(lambda: late.done() or waiting(manager, "sku-1") == [("d", "shared")])
        assert not late.done(), late.exception()  # LockRefused: "too many waiters on sku-1"
        assert 0 == manager.queue_full
        manager.release_all("a")
        await late
        assert ("d",) == holders(manager, "sku-1")
        for task in ended:
            with pytest.raises(asyncio.CancelledError):
                await task
        manager.release_all("d")
        assert_empty(manager)

    run(main)


def create_order(order_id: str) -> any_pb2.Any:
    packed = any_pb2.Any()
    line = shop_pb2.StockLine(sku="sku-1", quantity=1)
    packed.Pack(shop_pb2.CreateOrder(order_id=order_id, customer_id="c", lines=[line]))
    return packed


def test_a_branch_wanting_what_a_branch_of_its_own_transaction_holds_is_refused_at_once() -> None:
    """Branch 1 of t1 claims order id o-1, which branch 0 of t1 holds: branch 0 keeps it until
    t1 is decided, and t1 cannot be decided before branch 1 votes, so no wait can end well. It
    waited out its whole lock wait, then was refused as if another transaction were creating
    the order. Refused at once now: with a wait timeout of an hour and nothing ever releasing
    branch 0, the answer comes back only if no wait happened (run's bound catches a hang)."""

    async def main() -> None:
        manager = branch_locks()
        engine = BranchEngine(OrdersService(), MemoryLog(), manager, clock_ms=lambda: 0)
        order = create_order("o-1")
        assert (BranchVote.PREPARED, "") == engine.begin_prepare("t1", 0, order, False)
        answer = engine.begin_prepare("t1", 1, order, False)
        assert not isinstance(answer, tuple)  # the lock was taken: the prepare went to a task
        assert (
            BranchVote.REFUSED,
            "branch t1/0 of this transaction already holds order:o-1 (exclusive): one "
            "transaction cannot take it twice unless both take it shared; put the work on it "
            "in one branch",
        ) == await answer
        assert (0, 1, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        assert ("t1/0",) == holders(manager, "order:o-1") and [] == waiting(manager, "order:o-1")

    run(main)


def test_branches_of_one_transaction_share_shared_locks_and_wait_for_other_transactions() -> None:
    """Only a conflict with a prepared branch of the requester's own transaction is refused at
    once: shared holds of one transaction still share, and a hold of another transaction is
    waited for as before. An upgrade past a prepared sibling's shared hold is the same
    self-deadlock."""

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S, transaction_of=transaction_of)
        await manager.acquire("t1/0", "sku-1", S)
        await manager.acquire("t1/1", "sku-1", S)
        manager.pin("t1/0")
        assert ("t1/0", "t1/1") == holders(manager, "sku-1")
        with pytest.raises(locks.HeldByOwnTransaction, match=r"^branch t1/0 of this transaction"):
            await manager.acquire("t1/1", "sku-1", X)
        assert {"sku-1": S} == manager.held_by("t1/1")  # the refused upgrade changed nothing
        other = asyncio.create_task(manager.acquire("t2/0", "sku-1", X))
        await until(lambda: waiting(manager, "sku-1") == [("t2/0", "exclusive")])
        manager.release_all("t1/0")
        manager.release_all("t1/1")
        await other
        assert (1, 1) == (manager.waits, manager.deadlocks)
        manager.release_all("t2/0")
        assert_empty(manager)

    run(main)


# ---- deadlocks through sibling branches: a transaction is one node of the search ----
# A prepared branch's locks (`pin`) go only when its transaction is decided, which waits for
# every branch of it to vote. Each deadlock below used to end only at the lock wait timeout.
# The wait timeout is an hour and nothing releases the locks, so a refusal comes back only if
# there was no wait (run's bound fails a hang).


def branch_locks() -> LockManager:
    return LockManager(wait_timeout_s=3600.0, transaction_of=transaction_of)


async def queued(manager: LockManager, owner: str, resource: str, mode: LockMode) -> Any:
    """Start `owner`'s request and return its task once it waits in `resource`'s queue."""
    task = asyncio.create_task(manager.acquire(owner, resource, mode))
    await until(lambda: owner in [waiter for waiter, _ in waiting(manager, resource)])
    return task


def test_a_branch_queued_behind_a_waiting_sibling_is_refused_when_the_sibling_prepares() -> None:
    """t1/0 waits for t2/0's r; t1/1 queues behind t1/0. Until t1/0 votes, that is a wait: it
    may vote READ_ONLY and let r go at once. Once it has r and votes PREPARED, it keeps r until
    t1 is decided, after t1/1's vote: t1/1's wait is refused then."""

    async def main() -> None:
        manager = branch_locks()
        await manager.acquire("t2/0", "r", X)
        manager.pin("t2/0")
        first = await queued(manager, "t1/0", "r", X)
        second = await queued(manager, "t1/1", "r", X)
        manager.release_all("t2/0")
        await first
        assert (2, 0) == (manager.waits, manager.deadlocks) and not second.done()
        manager.pin("t1/0")
        with pytest.raises(locks.HeldByOwnTransaction, match=r"^branch t1/0 of this transaction"):
            await second
        assert (2, 1, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        manager.release_all("t1/0")
        assert_empty(manager)

    run(main)


def test_two_transactions_waiting_for_each_other_through_other_branches_deadlock() -> None:
    """Prepared t1/0 holds A and prepared t2/0 holds B; t1/1 waits for B, then t2/1 asks for
    A: each transaction waits for the other's decision."""

    async def main() -> None:
        manager = branch_locks()
        await manager.acquire("t1/0", "A", X)
        await manager.acquire("t2/0", "B", X)
        manager.pin("t1/0")
        manager.pin("t2/0")
        t1_waits = await queued(manager, "t1/1", "B", X)
        with pytest.raises(
            DeadlockDetected, match=r"^deadlock on A: t2/1 -> t1/0 -> t1/1 -> t2/0 -> t2/1$"
        ):
            await manager.acquire("t2/1", "A", X)
        assert (1, 1, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        manager.release_all("t2/0")  # t2 refused: aborted, so t1 goes on
        await t1_waits
        manager.release_all("t1/0")
        manager.release_all("t1/1")
        assert_empty(manager)

    run(main)


def test_a_shared_request_queued_behind_another_transaction_deadlocks_on_a_sibling() -> None:
    """Prepared t1/0 holds r shared; t2/0 queues for it exclusive; t1/1 asking r shared queues
    behind t2/0 (FIFO), which waits for t1/0, which waits for t1/1's vote."""

    async def main() -> None:
        manager = branch_locks()
        await manager.acquire("t1/0", "r", S)
        manager.pin("t1/0")
        t2_waits = await queued(manager, "t2/0", "r", X)
        with pytest.raises(
            DeadlockDetected, match=r"^deadlock on r: t1/1 -> t2/0 -> t1/0 -> t1/1$"
        ):
            await manager.acquire("t1/1", "r", S)
        assert (1, 1, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        manager.release_all("t1/0")
        await t2_waits
        manager.release_all("t2/0")
        assert_empty(manager)

    run(main)


def test_a_cycle_closed_by_a_vote_is_refused_at_the_vote() -> None:
    """t2/1 waits for unvoted t1/0's A (a wait for t1/0 alone: it may vote READ_ONLY), t1/1 for
    prepared t2/0's B: no cycle yet. t1/0 votes PREPARED: it keeps A until t1 is decided, after
    t1/1's vote, which waits for t2, which waits for A. t1/1's wait is refused then."""

    async def main() -> None:
        manager = branch_locks()
        await manager.acquire("t1/0", "A", X)
        await manager.acquire("t2/0", "B", X)
        manager.pin("t2/0")
        t2_waits = await queued(manager, "t2/1", "A", X)
        t1_waits = await queued(manager, "t1/1", "B", X)
        assert (2, 0) == (manager.waits, manager.deadlocks)
        manager.pin("t1/0")
        with pytest.raises(
            DeadlockDetected, match=r"^deadlock on B: t1/1 -> t2/0 -> t2/1 -> t1/0 -> t1/1$"
        ):
            await t1_waits
        assert (2, 1, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        assert [] == waiting(manager, "B") and not t2_waits.done()
        manager.release_all("t1/0")  # t1 refused: aborted, so t2 goes on
        await t2_waits
        manager.release_all("t2/0")
        manager.release_all("t2/1")
        assert_empty(manager)

    run(main)


def test_a_vote_with_no_sibling_waiting_reads_no_queue() -> None:
    """The usual vote: a branch alone of its transaction here, holding a lock a long queue
    waits for. A cycle its vote closes starts with a sibling's wait; with none, pinning it
    searches nothing (it read the whole queue at each vote, per branch of the queue)."""

    async def main() -> None:
        manager = branch_locks()
        await manager.acquire("t0/0", "r", X)
        waits = [await queued(manager, f"t{n}/0", "r", X) for n in range(1, 101)]
        steps = manager.search_steps
        manager.pin("t0/0")
        assert steps == manager.search_steps
        for n, wait in enumerate(waits):
            manager.release_all(f"t{n}/0")
            await wait
        manager.release_all("t100/0")
        assert_empty(manager)

    run(main)


def test_a_branch_recovered_as_prepared_is_pinned() -> None:
    """A branch re-taking its locks after a restart voted PREPARED before it: a sibling
    wanting what it holds is refused at once, as before the restart."""

    async def main() -> None:
        manager = branch_locks()
        manager.acquire_now("t1/0", "r", X)
        with pytest.raises(locks.HeldByOwnTransaction, match=r"^branch t1/0 of this transaction"):
            await manager.acquire("t1/1", "r", X)
        manager.release_all("t1/0")
        assert_empty(manager)

    run(main)


# ---- two attempts of one transaction id: two transactions ----
# The coordinator forgot the first attempt (its window of finished transactions moved past it,
# or a restart: presumed abort), which is still PREPARED here, in doubt, and the client reused
# the id for other content: the second attempt's branch at this participant has another
# index. The two attempts are told apart by their fingerprints; sharing an id does not make
# them one transaction, so the new branch waits for the old one's decision as for any other
# transaction's hold. The wait timeout is an hour: an answer comes back only if it waits for
# nothing, or once the test releases what it waits for (run's bound fails a hang).

OLD_ATTEMPT = b"\x01" * 16
NEW_ATTEMPT = b"\x02" * 16


def attempts_engine(service: Any) -> BranchEngine:
    """An engine and its lock table wired as a participant process wires them."""
    engine: BranchEngine
    manager = LockManager(
        wait_timeout_s=3600.0, transaction_of=lambda owner: engine.transaction_of(owner)
    )
    engine = BranchEngine(service, MemoryLog(), manager, clock_ms=lambda: 0)
    return engine


@pytest.mark.parametrize("recovered", [False, True], ids=["live", "recovered"])
def test_a_new_attempt_of_an_id_waits_for_an_in_doubt_old_attempt_s_locks(recovered: bool) -> None:
    """Old attempt t1/0 prepared order o-1 (live, or recovered from the log after a restart);
    new attempt t1/1 creates o-1 too. It was refused at once as "branch t1/0 of this
    transaction already holds order:o-1", though t1/0 belongs to another transaction whose
    decision (presumed abort, once its inquiry is answered) lets the lock go."""

    async def main() -> None:
        engine = attempts_engine(OrdersService())
        order = create_order("o-1")
        assert (BranchVote.PREPARED, "") == await engine.prepare(
            "t1", 0, order, False, fingerprint=OLD_ATTEMPT
        )
        if recovered:
            assert isinstance(engine.log, MemoryLog)
            engine, crashed = attempts_engine(OrdersService()), engine
            engine.replay(crashed.log.records)
        manager = engine.locks
        new = started(engine.begin_prepare("t1", 1, order, False, fingerprint=NEW_ATTEMPT))
        await queued_or_done(manager, new, "order:o-1")
        assert not new.done(), new.result()
        assert [("t1/1", "exclusive")] == waiting(manager, "order:o-1")
        assert engine.learn_outcome(("t1", 0), commit=False)  # the inquiry's presumed abort
        assert (BranchVote.PREPARED, "") == await new
        assert (1, 0, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        assert ("t1/1",) == holders(manager, "order:o-1")
        engine.decide_now("t1", 1, commit=False, fingerprint=NEW_ATTEMPT)
        assert_empty(manager)

    run(main)


def test_branches_of_one_attempt_are_still_one_transaction() -> None:
    """Told apart by fingerprint, the branches of one attempt are still siblings: a branch
    wanting what its prepared sibling holds is refused at once, not left to wait an hour."""

    async def main() -> None:
        engine = attempts_engine(OrdersService())
        order = create_order("o-1")
        for index, vote in ((0, BranchVote.PREPARED), (1, BranchVote.REFUSED)):
            answer = engine.begin_prepare("t1", index, order, False, fingerprint=OLD_ATTEMPT)
            said = answer if isinstance(answer, tuple) else await answer
            assert vote == said[0], said
        assert said[1].startswith("branch t1/0 of this transaction already holds order:o-1")
        assert (0, 1) == (engine.locks.waits, engine.locks.deadlocks)
        engine.decide_now("t1", 0, commit=False, fingerprint=OLD_ATTEMPT)
        assert_empty(engine.locks)

    run(main)


def test_a_new_attempt_of_an_id_behind_another_transaction_is_no_deadlock() -> None:
    """Old attempt t1/0 prepared: it reads r (shared) and writes w. t2/0 queues to write r;
    new attempt t1/1 reads r, queued behind t2/0 (FIFO). t1/1 waits for t2/0, which waits for
    the old attempt, which waits for nobody here: no cycle. It was refused as the deadlock
    "t1/1 -> t2/0 -> t1/0 -> t1/1", as if t1/0's locks waited for t1/1's vote."""

    async def main() -> None:
        engine = attempts_engine(Shelf())
        manager = engine.locks
        old = engine.begin_prepare(
            "t1", 0, shelf_operation(r=0, w=1), False, fingerprint=OLD_ATTEMPT
        )
        assert (BranchVote.PREPARED, "") == old
        writer = started(engine.begin_prepare("t2", 0, shelf_operation(r=1), False))
        await queued_or_done(manager, writer, "sku:r")
        new = started(
            engine.begin_prepare("t1", 1, shelf_operation(r=0, v=1), False, fingerprint=NEW_ATTEMPT)
        )
        await until(lambda: new.done() or len(waiting(manager, "sku:r")) == 2)
        assert not new.done(), new.result()
        assert (2, 0) == (manager.waits, manager.deadlocks)
        engine.decide_now("t1", 0, commit=False, fingerprint=OLD_ATTEMPT)
        assert (BranchVote.PREPARED, "") == await writer
        engine.decide_now("t2", 0, commit=True)
        assert (BranchVote.PREPARED, "") == await new
        assert (2, 0, 0) == (manager.waits, manager.deadlocks, manager.timeouts)
        engine.decide_now("t1", 1, commit=True, fingerprint=NEW_ATTEMPT)
        assert_empty(manager)

    run(main)


class Shelf:
    """A service of reads and writes of SKUs: a line of 0 units reads its SKU (shared lock),
    another writes it (exclusive); a branch of reads only votes READ_ONLY, so its locks go at
    its vote, not at its transaction's decision."""

    name = "shelf"
    operation_type = shop_pb2.ReserveStock

    def validate(self, operation: shop_pb2.ReserveStock) -> None:
        pass

    def locks(self, operation: shop_pb2.ReserveStock) -> list[LockRequest]:
        return [
            LockRequest(f"sku:{line.sku}", X if line.quantity else S) for line in operation.lines
        ]

    def prepare(self, key: str, operation: shop_pb2.ReserveStock) -> PrepareResult:
        return Prepared() if any(line.quantity for line in operation.lines) else ReadOnly()

    def commit(self, key: str, operation: shop_pb2.ReserveStock) -> None:
        pass

    def rollback(self, key: str, operation: shop_pb2.ReserveStock) -> None:
        pass

    def snapshot(self) -> bytes:
        return b""

    def restore(self, state: bytes) -> None:
        pass

    def add_read_api(self, server: Any) -> list[str]:
        return []


def shelf_operation(**lines: int) -> any_pb2.Any:
    packed = any_pb2.Any()
    stock = [shop_pb2.StockLine(sku=sku, quantity=units) for sku, units in lines.items()]
    packed.Pack(shop_pb2.ReserveStock(lines=stock))
    return packed


def started(answer: Any) -> asyncio.Future[Any]:
    """A prepare that waits for a lock, as a future (not answered at once)."""
    assert not isinstance(answer, tuple), answer
    return asyncio.ensure_future(answer)


async def queued_or_done(manager: LockManager, prepare: asyncio.Future[Any], resource: str) -> None:
    await until(lambda: prepare.done() or bool(waiting(manager, resource)))


def test_a_read_only_sibling_s_hold_is_waited_for_not_refused() -> None:
    """t1/0 reads a and b and waits for b (t9/0 writes it); t1/1 writes a. t1/0 votes
    READ_ONLY once it has b, letting a go, so t1/1's wait ends well: it was refused at once as
    held by its own transaction, aborting t1 for nothing."""

    async def main() -> None:
        manager = branch_locks()
        engine = BranchEngine(Shelf(), MemoryLog(), manager, clock_ms=lambda: 0)
        assert (BranchVote.PREPARED, "") == engine.begin_prepare(
            "t9", 0, shelf_operation(b=1), False
        )
        read = started(engine.begin_prepare("t1", 0, shelf_operation(a=0, b=0), False))
        await queued_or_done(manager, read, "sku:b")
        write = started(engine.begin_prepare("t1", 1, shelf_operation(a=1), False))
        await queued_or_done(manager, write, "sku:a")
        assert not write.done(), write.result()
        engine.decide_now("t9", 0, commit=True)
        assert (BranchVote.READ_ONLY, "") == await read
        assert (BranchVote.PREPARED, "") == await write
        assert (2, 0) == (manager.waits, manager.deadlocks)

    run(main)


def test_a_wait_for_a_read_only_branch_is_not_a_wait_for_its_siblings() -> None:
    """t1/0 reads a and b and waits for b (t9/0 writes it); t1/1 waits for c (t2/0 writes it);
    t2/1 writes a, held by t1/0. t1/0 lets a go at its vote (READ_ONLY), whatever t1/1 waits
    for, so there is no cycle: t2/1 was refused as a deadlock through t1/1, aborting t2 for
    nothing."""

    async def main() -> None:
        manager = branch_locks()
        engine = BranchEngine(Shelf(), MemoryLog(), manager, clock_ms=lambda: 0)
        for transaction, sku in (("t9", "b"), ("t2", "c")):
            assert (BranchVote.PREPARED, "") == engine.begin_prepare(
                transaction, 0, shelf_operation(**{sku: 1}), False
            )
        read = started(engine.begin_prepare("t1", 0, shelf_operation(a=0, b=0), False))
        await queued_or_done(manager, read, "sku:b")
        t1_write = started(engine.begin_prepare("t1", 1, shelf_operation(c=1), False))
        await queued_or_done(manager, t1_write, "sku:c")
        t2_write = started(engine.begin_prepare("t2", 1, shelf_operation(a=1), False))
        await queued_or_done(manager, t2_write, "sku:a")
        assert not t2_write.done(), t2_write.result()
        engine.decide_now("t9", 0, commit=True)
        assert (BranchVote.READ_ONLY, "") == await read
        assert (BranchVote.PREPARED, "") == await t2_write
        for branch in (0, 1):
            engine.decide_now("t2", branch, commit=True)
        assert (BranchVote.PREPARED, "") == await t1_write
        assert (3, 0) == (manager.waits, manager.deadlocks)

    run(main)


def test_branches_of_one_transaction_waiting_on_a_transaction_that_waits_on_nobody_wait() -> None:
    """No cycle: t2 waits for nothing, so t1's branches wait for it, on one resource shared or
    on two resources exclusive, and get their locks when t2 is decided."""

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S, transaction_of=transaction_of)
        await manager.acquire("t2/0", "r", X)
        await manager.acquire("t2/1", "q", X)
        waits = [
            await queued(manager, "t1/0", "r", S),
            await queued(manager, "t1/1", "r", S),
            await queued(manager, "t1/2", "q", X),
        ]
        assert (3, 0) == (manager.waits, manager.deadlocks)
        manager.release_all("t2/0")
        manager.release_all("t2/1")
        await asyncio.gather(*waits)
        assert ("t1/0", "t1/1") == holders(manager, "r") and ("t1/2",) == holders(manager, "q")
        for owner in ("t1/0", "t1/1", "t1/2"):
            manager.release_all(owner)
        assert_empty(manager)

    run(main)


def test_owner_cannot_wait_twice_on_one_resource() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        first = asyncio.create_task(manager.acquire("b", "sku-1", S))
        await until(lambda: bool(waiting(manager, "sku-1")))
        with pytest.raises(LockRefused, match="b is already waiting on sku-1"):
            await manager.acquire("b", "sku-1", X)
        manager.release_all("a")
        await first
        manager.release_all("b")
        assert_empty(manager)

    run(main)


def test_an_owner_whose_wait_ended_may_wait_again_at_once_but_only_once() -> None:
    """The duplicate check reads an index of the queue's owners (_Lock.waiting), not the queue:
    a wait that is cancelled (or times out: the same cancel of its future) leaves the index the
    moment it ends, so the owner's next request, run before the ended wait's task, queues; a
    second request while that one waits is refused, and release_all leaves nothing behind."""

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        ended = asyncio.create_task(manager.acquire("b", "sku-1", S))
        await until(lambda: waiting(manager, "sku-1") == [("b", "shared")])
        again = asyncio.create_task(manager.acquire("b", "sku-1", X))  # runs first ...
        ended.cancel()  # ... before this task sees its cancellation
        await until(lambda: again.done() or waiting(manager, "sku-1") == [("b", "exclusive")])
        assert not again.done(), again.exception()  # LockRefused: "b is already waiting"
        with pytest.raises(asyncio.CancelledError):
            await ended
        with pytest.raises(LockRefused, match=r"^b is already waiting on sku-1$"):
            await manager.acquire("b", "sku-1", S)
        check_invariants(manager, ["a", "b"])
        manager.release_all("b")  # fails its own wait, and takes it out of the index
        with pytest.raises(LockRefused, match=r"^released while waiting$"):
            await again
        assert [] == waiting(manager, "sku-1")
        check_invariants(manager, ["a", "b"])
        manager.release_all("a")
        assert_empty(manager)

    run(main)


def test_a_dead_waiter_found_by_its_owner_does_not_leave_the_new_request_waiting() -> None:
    """acquire drops an owner's queued waiter that is no longer live before queueing the owner
    again, without waking the queue. That state is not reached (a wait leaves the queue as it
    ends; test_lock_races checks it at every turn), so it is forged here: a waiter's future
    cancelled without its callback, and the holder's conflict gone without a wake-up, so the
    dead waiter is all that keeps the new request from being granted at once. It is still
    granted without waiting out its wait (run's bound would catch that): the dead waiter's own
    task, woken by the cancel, runs _abandon, which wakes the queue."""

    async def main() -> None:
        manager = LockManager(wait_timeout_s=LONG_S)
        await manager.acquire("a", "sku-1", X)
        ended = asyncio.create_task(manager.acquire("b", "sku-1", S))
        await until(lambda: waiting(manager, "sku-1") == [("b", "shared")])
        lock = manager._locks["sku-1"]
        asyncio.Future.cancel(lock.waiting["b"].future)  # not _WaitFuture.cancel: stays queued
        lock.holders["a"].mode = S  # no conflict left, and no wake-up
        await manager.acquire("b", "sku-1", S)
        assert ("a", "b") == holders(manager, "sku-1") and [] == waiting(manager, "sku-1")
        with pytest.raises(asyncio.CancelledError):
            await ended
        manager.release_all("a")
        manager.release_all("b")
        assert_empty(manager)

    run(main)


# ---- the deadlock search's cost: counted (search_steps), never timed ----

HOT_QUEUE = 500
HOT_WAIT_S = 600.0  # the old search took minutes to queue them: no wait may end before


async def queue_on(
    manager: LockManager, resource: str, owners: list[str]
) -> list[asyncio.Task[None]]:
    """Queue one exclusive request per owner on `resource`, in order; returns their tasks."""
    tasks = []
    for owner in owners:
        tasks.append(asyncio.create_task(manager.acquire(owner, resource, X)))
        await asyncio.sleep(0)  # runs that acquire up to its wait: queued in this order
    await until(lambda: len(waiting(manager, resource)) == len(owners))
    return tasks


async def release_everything(manager: LockManager, tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for owner in list(manager._resources_of):
        manager.release_all(owner)
    assert_empty(manager)


@pytest.mark.parametrize("by_transaction", [False, True])
def test_queuing_many_waiters_on_one_resource_costs_linear_search_work(
    by_transaction: bool,
) -> None:
    # Each queued request runs the deadlock search. It used to expand every waiter ahead and
    # each of those every waiter ahead of it: ~n^2 steps per request, n^3 for the queue, and 200
    # waiters froze the event loop for 1.8 s. A fresh branch nobody waits for needs no search,
    # nor does one of a transaction none of whose branches anybody waits for.
    async def main() -> None:
        options: dict[str, Any] = {"transaction_of": transaction_of} if by_transaction else {}
        manager = LockManager(wait_timeout_s=HOT_WAIT_S, **options)
        await manager.acquire("holder/0", "order-1", X)
        tasks = await queue_on(manager, "order-1", [f"w{k:03}/0" for k in range(HOT_QUEUE)])
        assert manager.search_steps < 10 * HOT_QUEUE, manager.search_steps
        assert manager.deadlocks == 0
        await release_everything(manager, tasks)

    run(main, hard_timeout_s=600.0)


def test_a_search_through_a_long_queue_is_linear_in_it() -> None:
    async def main() -> None:
        manager = LockManager(wait_timeout_s=HOT_WAIT_S)
        await manager.acquire("holder", "order-1", X)
        await manager.acquire("last", "sku-2", X)
        await manager.acquire("z", "sku-3", X)
        y_waits = asyncio.create_task(manager.acquire("y", "sku-3", X))  # y waits for z
        owners = [f"w{k:03}" for k in range(HOT_QUEUE - 1)] + ["last"]
        tasks = await queue_on(manager, "order-1", owners)
        # z waits for last, which waits for everyone queued ahead of it and the holder: the
        # search walks the whole queue and finds no way back to z.
        before = manager.search_steps
        z_waits = asyncio.create_task(manager.acquire("z", "sku-2", X))
        await until(lambda: bool(waiting(manager, "sku-2")))
        assert manager.search_steps - before < 10 * HOT_QUEUE, manager.search_steps - before
        # And the holder asking for sku-2 closes a cycle, reported by its shortest way back.
        with pytest.raises(
            DeadlockDetected, match=r"^deadlock on sku-2: holder -> last -> holder$"
        ):
            await manager.acquire("holder", "sku-2", X)
        await release_everything(manager, [*tasks, y_waits, z_waits])

    run(main, hard_timeout_s=600.0)


# ---- property: the deadlock search answers as a search of the whole wait-for graph ----


def whole_graph_waits_for(manager: LockManager, owner: str) -> set[str]:
    """Every edge out of `owner`: each conflicting holder, and each conflicting live waiter
    ahead of its own (FIFO). The search used to build exactly this, ~n^2/2 edges per queue."""
    blockers: set[str] = set()
    for resource in manager._resources_of.get(owner, ()):
        lock = manager._locks[resource]
        for position, waiter in enumerate(lock.waiters):
            if waiter.owner != owner or not waiter.live:
                continue
            blockers.update(
                holder
                for holder, hold in lock.holders.items()
                if holder != owner and not locks._compatible(hold.mode, waiter.mode)
            )
            blockers.update(
                ahead.owner
                for ahead in lock.waiters[:position]
                if ahead.owner != owner
                and ahead.live
                and not locks._compatible(ahead.mode, waiter.mode)
            )
    return blockers


def whole_graph_has_cycle_through(manager: LockManager, owner: str) -> bool:
    seen: set[str] = set()
    todo = list(whole_graph_waits_for(manager, owner))
    while todo:
        node = todo.pop()
        if node == owner:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(whole_graph_waits_for(manager, node))
    return False


LockTable = dict[str, tuple[dict[str, LockMode], list[tuple[str, LockMode, bool]]]]


@st.composite
def lock_tables(draw: st.DrawFn, owners: tuple[str, ...] = tuple("abcdef")) -> LockTable:
    """Random lock tables of 6 owners and 4 resources, as `acquire` leaves them: holders
    compatible; upgrades (exclusive requests of shared holders) ahead of the other requests;
    at most one live request per owner and resource; dead (timed out, cancelled) requests
    still queued anywhere."""
    tables = {}
    for resource in ("r1", "r2", "r3", "r4"):
        kind = draw(st.sampled_from(["none", "shared", "exclusive"]))
        holders: dict[str, LockMode] = {}
        if kind == "exclusive":
            holders[draw(st.sampled_from(owners))] = X
        elif kind == "shared":
            holders = dict.fromkeys(
                draw(st.lists(st.sampled_from(owners), min_size=1, unique=True)), S
            )
        queue: list[tuple[str, LockMode, bool]] = []
        live: set[str] = set()
        if kind == "shared":
            for owner in draw(st.lists(st.sampled_from(sorted(holders)), unique=True)):
                alive = draw(st.booleans())
                queue.append((owner, X, alive))
                if alive:
                    live.add(owner)
        others = [owner for owner in owners if owner not in holders]
        if others:
            requests = st.tuples(st.sampled_from(others), st.sampled_from([S, X]), st.booleans())
            for owner, mode, alive in draw(st.lists(requests, max_size=8)):
                alive = alive and owner not in live
                queue.append((owner, mode, alive))
                if alive:
                    live.add(owner)
        tables[resource] = (holders, queue)
    return tables


def table_manager(table: LockTable, loop: asyncio.AbstractEventLoop, **options: Any) -> LockManager:
    """A manager whose lock table is `table` (its dead requests' futures cancelled)."""
    manager = LockManager(wait_timeout_s=LONG_S, **options)
    for resource, (holders, queue) in table.items():
        lock = locks._Lock()
        for owner, mode in holders.items():
            lock.holders[owner] = locks._Hold(mode, 0.0)
            manager._index(owner, resource)
        for owner, mode, alive in queue:
            hold = holders.get(owner)
            waiter = locks._Waiter(owner, mode, hold, 0.0, loop.create_future())
            if not alive:
                waiter.future.cancel()
            lock.waiters.append(waiter)
            manager._index(owner, resource)
        if lock.holders or lock.waiters:
            manager._locks[resource] = lock
    return manager


@settings(max_examples=500, deadline=None)
@given(table=lock_tables())
def test_deadlock_search_agrees_with_a_search_of_the_whole_graph(table: LockTable) -> None:
    loop = asyncio.new_event_loop()
    try:
        manager = table_manager(table, loop)
        for owner in sorted(manager._resources_of):
            cycle = manager._find_cycle(owner)
            assert (cycle is not None) == whole_graph_has_cycle_through(manager, owner), owner
            if cycle is not None:  # a real cycle of the whole graph, from owner back to it
                assert cycle[0] == cycle[-1] == owner, cycle
                for here, there in itertools.pairwise(cycle):
                    assert there in whole_graph_waits_for(manager, here), (cycle, here, there)
    finally:
        loop.close()


BRANCHES = ("t1/0", "t1/1", "t1/2", "t2/0", "t2/1", "t3/0")


def whole_graph_has_transaction_cycle_through(manager: LockManager, owner: str) -> bool:
    """A search of the whole graph of branches and transactions: a wait for a pinned
    (prepared) branch is a wait for its transaction, that is for the waits of every branch of
    it (a sibling's included, a transaction waiting for itself); a wait for another branch is
    a wait for its own waits only (it may let its locks go at its vote). A cycle through
    `owner` comes back to it or to its transaction."""

    def node_of(branch: str) -> tuple[str, str]:
        if branch in manager._pinned:
            return ("transaction", transaction_of(branch))
        return ("branch", branch)

    def waits_for(node: tuple[str, str]) -> set[tuple[str, str]]:
        kind, name = node
        return {
            node_of(blocker)
            for branch in manager._resources_of
            if (transaction_of(branch) == name if kind == "transaction" else branch == name)
            for blocker in whole_graph_waits_for(manager, branch)
        }

    start = node_of(owner)
    ends = {start, ("transaction", transaction_of(owner))}
    seen: set[tuple[str, str]] = set()
    todo = list(waits_for(start))
    while todo:
        node = todo.pop()
        if node in ends:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(waits_for(node))
    return False


@settings(max_examples=500, deadline=None)
@given(table=lock_tables(BRANCHES), pinned=st.sets(st.sampled_from(BRANCHES)))
def test_deadlock_search_of_transactions_agrees_with_a_search_of_the_whole_graph(
    table: LockTable, pinned: set[str]
) -> None:
    """The same with branches of three transactions, some of them pinned (prepared): a wait
    for a pinned one is a wait for its transaction, and the cycle reported steps along the
    whole graph's edges or from a branch to a sibling."""
    loop = asyncio.new_event_loop()
    try:
        manager = table_manager(table, loop, transaction_of=transaction_of)
        manager._pinned = pinned & manager._resources_of.keys()
        for owner in sorted(manager._resources_of):
            cycle = manager._find_cycle(owner)
            assert (cycle is not None) == whole_graph_has_transaction_cycle_through(
                manager, owner
            ), owner
            if cycle is not None:
                assert cycle[0] == cycle[-1] == owner, cycle
                for here, there in itertools.pairwise(cycle):
                    assert there in whole_graph_waits_for(manager, here) or (
                        transaction_of(here) == transaction_of(there) != ""
                    ), (cycle, here, there)
    finally:
        loop.close()


# ---- property: random branches never break exclusion and never hang ----

OWNERS = ["a", "b", "c", "d"]
step = st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.sampled_from([S, X]))
branch_plan = st.tuples(
    st.lists(step, min_size=1, max_size=4),  # the locks the branch takes, in order
    st.integers(min_value=0, max_value=3),  # loop turns it keeps each lock before the next
    st.none() | st.integers(min_value=0, max_value=8),  # cancelled after this many turns
)


@settings(max_examples=100, deadline=None)
@given(
    plans=st.lists(branch_plan, min_size=2, max_size=len(OWNERS)),
    detection_only=st.booleans(),
)
def test_random_branches_keep_exclusion_and_always_finish(
    plans: list[tuple[list[tuple[str, LockMode]], int, int | None]], detection_only: bool
) -> None:
    # With a wait timeout far beyond the run's bound, only deadlock detection can end a
    # cycle in time: finishing then shows that no cycle went undetected.
    short_wait_s = 0.01
    wait_s = 60.0 if detection_only else short_wait_s
    owners = OWNERS[: len(plans)]

    async def branch(
        manager: LockManager, owner: str, steps: list[tuple[str, LockMode]], turns: int
    ) -> str:
        try:
            for resource, mode in steps:
                await manager.acquire(owner, resource, mode)
                held = manager.held_by(owner)[resource]
                assert held is X or mode is S
                check_invariants(manager, owners)
                for _ in range(turns):
                    await asyncio.sleep(0)
            return "done"
        except LockRefused:
            return "refused"
        finally:
            manager.release_all(owner)
            check_invariants(manager, owners)

    async def cancel_after(task: asyncio.Task[str], turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()

    async def monitor(manager: LockManager) -> None:
        while True:  # checks the table at every turn of the loop while branches run
            check_invariants(manager, owners)
            await asyncio.sleep(0)

    async def main() -> None:
        manager = LockManager(wait_timeout_s=wait_s)
        watcher = asyncio.create_task(monitor(manager))
        tasks = [
            asyncio.create_task(branch(manager, owner, steps, turns))
            for owner, (steps, turns, _) in zip(owners, plans, strict=True)
        ]
        cancellers = [
            asyncio.create_task(cancel_after(task, cancel))
            for task, (_, _, cancel) in zip(tasks, plans, strict=True)
            if cancel is not None
        ]
        # Every acquire ends within the short wait timeout (or at once when detection_only),
        # so a branch ends within steps * timeout; the bound fails the run instead of a hang.
        longest = max(len(steps) for steps, _, _ in plans)
        async with asyncio.timeout(longest * short_wait_s + 1.0):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*cancellers)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher  # re-raises an invariant the monitor found broken
        for outcome in outcomes:
            assert outcome in ("done", "refused") or isinstance(outcome, asyncio.CancelledError), (
                outcome
            )
        refused = outcomes.count("refused")
        assert manager.timeouts + manager.deadlocks == refused
        assert_empty(manager)

    run(main, hard_timeout_s=10.0)
