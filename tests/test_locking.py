"""Locks with timeouts, on real servers: deadlocks cannot hang, unvoted locks are reclaimed by a
lease, prepared locks are released only by the decision, a heuristic is recorded and reported."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
from participants.services.inventory import InventoryService
from participants.services.orders import OrdersService
from tests.harness import InProcessCluster, eventually, force_heuristic, order_branches, pack

LOCK_WAIT_MS = 300


def create_order(order_id: str) -> object:
    line = shop_pb2.StockLine(sku="sku-apple", quantity=1)
    return pack(
        shop_pb2.CreateOrder(order_id=order_id, customer_id="c", lines=[line], amount_cents=1)
    )


def second_orders_service() -> OrdersService:
    service = OrdersService()
    service.name = "orders2"
    return service


async def held_locks(cluster: InProcessCluster, name: str) -> list[participant_pb2.LockInfo]:
    response = await cluster.admin(name).ListLocks(participant_pb2.ListLocksRequest())
    return list(response.locks)


def test_opposite_order_deadlock_ends_within_the_lock_wait(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            extra_services=[second_orders_service()],
            participant_overrides={"lock_wait_ms": LOCK_WAIT_MS},
        ) as cluster:
            p1, p2 = cluster.participant_stub("orders"), cluster.participant_stub("orders2")

            def prepare(stub: object, txn: str, branch: int, order: str) -> object:
                request = participant_pb2.PrepareRequest(
                    transaction_id=txn, branch=branch, operation=create_order(order)
                )
                return stub.Prepare(request)  # type: ignore[attr-defined]

            # T1 takes x on P1, T2 takes y on P2; then each asks for the other's lock.
            assert coordinator_pb2.VOTE_PREPARED == (await prepare(p1, "T1", 0, "x")).vote
            assert coordinator_pb2.VOTE_PREPARED == (await prepare(p2, "T2", 0, "y")).vote
            t1_second, t2_second = await asyncio.gather(
                prepare(p2, "T1", 1, "y"), prepare(p1, "T2", 1, "x")
            )
            # Both waiters fail when their lock wait runs out (orders' wording of a lock
            # timeout: the order id is taken), not at a later deadline, which would say
            # otherwise; the holders are never disturbed.
            for vote, order_id in ((t1_second, "y"), (t2_second, "x")):
                assert coordinator_pb2.VOTE_REFUSED == vote.vote
                assert vote.reason.startswith(f"order id {order_id} is already being created")
            assert 1 == len(await held_locks(cluster, "orders"))  # T1 still holds x

            # The same conflict through the coordinator: both transactions end, none hangs.
            def txn(first: str, second: str) -> list[coordinator_pb2.BranchRequest]:
                return [
                    coordinator_pb2.BranchRequest(
                        participant="orders", operation=create_order(first)
                    ),
                    coordinator_pb2.BranchRequest(
                        participant="orders2", operation=create_order(second)
                    ),
                ]

            for stub, name in ((p1, "T1"), (p2, "T2")):
                await stub.Rollback(participant_pb2.RollbackRequest(transaction_id=name, branch=0))
            a, b = await asyncio.gather(
                cluster.submit(txn("p", "q")), cluster.submit(txn("p", "q"))
            )
            outcomes = sorted([a.outcome, b.outcome])
            assert coordinator_pb2.OUTCOME_ABORTED == outcomes[1]
            # Ended by a lock wait (orders' wording), not by the transaction's deadline.
            aborted = a if a.outcome == coordinator_pb2.OUTCOME_ABORTED else b
            assert "is already being created" in aborted.reason, aborted.reason
            await eventually(lambda: _no_locks(cluster, "orders", "orders2"))

    asyncio.run(scenario())


def test_a_deadlock_through_other_branches_of_the_transactions_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """On one participant, T1's branch 0 holds order x and T2's branch 0 order y; T1's branch 1
    waits for y, then T2's branch 1 asks for x. Neither branch 0 lets go before its transaction
    is decided, which waits for its branch 1: this used to wait out the lock wait. The lock wait
    is a minute here, so a refusal comes back only from the deadlock search."""

    async def scenario() -> None:
        # No inquiry either (the coordinator knows neither transaction, and would abort them).
        overrides = {"lock_wait_ms": 60_000, "in_doubt_after_ms": 60_000}
        async with InProcessCluster(tmp_path, participant_overrides=overrides) as cluster:
            orders = cluster.participant_stub("orders")

            def prepare(txn: str, branch: int, order: str) -> object:
                request = participant_pb2.PrepareRequest(
                    transaction_id=txn, branch=branch, operation=create_order(order)
                )
                return orders.Prepare(request)  # type: ignore[attr-defined]

            assert coordinator_pb2.VOTE_PREPARED == (await prepare("T1", 0, "x")).vote
            assert coordinator_pb2.VOTE_PREPARED == (await prepare("T2", 0, "y")).vote
            t1_waits = asyncio.ensure_future(prepare("T1", 1, "y"))

            async def t1_queued() -> bool:
                locks = {lock.resource: lock for lock in await held_locks(cluster, "orders")}
                return ["T1/1 (exclusive)"] == list(locks["order:y"].waiters)

            await eventually(t1_queued)
            async with asyncio.timeout(30):  # a bound on a hang, far below the lock wait
                vote = await prepare("T2", 1, "x")
            assert coordinator_pb2.VOTE_REFUSED == vote.vote
            assert "deadlock on order:x: T2/1 -> T1/0 -> T1/1 -> T2/0 -> T2/1" == vote.reason
            # T2 refused is aborted: its locks go, and T1 goes on.
            await orders.Rollback(participant_pb2.RollbackRequest(transaction_id="T2", branch=0))
            assert coordinator_pb2.VOTE_PREPARED == (await t1_waits).vote

    asyncio.run(scenario())


async def _no_locks(cluster: InProcessCluster, *names: str) -> bool:
    for name in names:
        if await held_locks(cluster, name):
            return False
    return True


@pytest.mark.parametrize("lock_skus", [False, True], ids=["escrow", "sku-locks"])
def test_hot_sku_never_oversells(tmp_path: Path, lock_skus: bool) -> None:
    """Stock 100, 500 concurrent one-unit orders. With the escrow design the service uses,
    exactly 100 commit. With the per-SKU lock alternative, orders serialize on the lock and
    many are refused for a lock timeout instead; either way nothing oversells. The printed
    rates compare the two (escrow was kept)."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            stock={"sku-hot": 100},
            prepare_timeout_ms=30_000,
            transaction_timeout_ms=60_000,
            participant_overrides={"lock_wait_ms": 2_000},
        ) as cluster:
            inventory = cluster.participants["inventory"].service
            assert isinstance(inventory, InventoryService)
            inventory.lock_skus = lock_skus
            started = time.monotonic()
            responses = await asyncio.gather(
                *(
                    cluster.submit(order_branches(f"hot-{i}", [("sku-hot", 1)], amount_cents=10))
                    for i in range(500)
                )
            )
            elapsed = time.monotonic() - started
            committed = sum(r.outcome == coordinator_pb2.OUTCOME_COMMITTED for r in responses)
            refused = [r for r in responses if r.outcome == coordinator_pb2.OUTCOME_ABORTED]
            assert 500 == committed + len(refused)
            hot = (await cluster.stock())["sku-hot"]
            if not lock_skus:
                assert 100 == committed
                assert all("out of stock" in r.reason for r in refused), {r.reason for r in refused}
            else:
                assert all(
                    "out of stock" in r.reason or "lock timeout" in r.reason for r in refused
                ), {r.reason for r in refused}

            async def released() -> bool:
                return 0 == (await cluster.stock())["sku-hot"].reserved

            await eventually(released)
            hot = (await cluster.stock())["sku-hot"]
            assert (100 - committed, 0, committed) == (hot.available, hot.reserved, hot.sold)
            design = "per-SKU locks" if lock_skus else "escrow"
            print(
                f"hot SKU ({design}), in-process: 500 orders decided in {elapsed:.2f} s "
                f"({500 / elapsed:.0f}/s), {committed} committed"
            )

    asyncio.run(scenario())


def test_unvoted_branch_loses_its_locks_at_its_lease(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            participant_overrides={"lock_wait_ms": 10_000, "lease_unvoted_ms": 300, "tick_ms": 20},
        ) as cluster:
            orders = cluster.participant_stub("orders")
            holder = participant_pb2.PrepareRequest(
                transaction_id="holder", branch=0, operation=create_order("o-1")
            )
            assert coordinator_pb2.VOTE_PREPARED == (await orders.Prepare(holder)).vote
            # The stalled branch waits for the holder's lock far longer than its lease.
            stalled = participant_pb2.PrepareRequest(
                transaction_id="stalled", branch=0, operation=create_order("o-1")
            )
            vote = await orders.Prepare(stalled)
            assert coordinator_pb2.VOTE_REFUSED == vote.vote
            assert "lease" in vote.reason  # the lease ended the wait, not the lock wait
            # Its late (duplicate) Prepare is refused; the holder kept its lock throughout.
            assert coordinator_pb2.VOTE_REFUSED == (await orders.Prepare(stalled)).vote
            locks = await held_locks(cluster, "orders")
            assert ["holder/0"] == [h for lock in locks for h in lock.holders]

    asyncio.run(scenario())


def test_prepared_locks_survive_a_coordinator_outage_and_go_with_the_decision(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            prepare_timeout_ms=5_000,
            participant_overrides={"in_doubt_after_ms": 200, "tick_ms": 20},
        ) as cluster:
            # Payment is slow: the others prepare (orders takes its order lock) and then the
            # coordinator goes away before any decision.
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=3_000)
            submit = asyncio.ensure_future(
                cluster.submit(order_branches("o-doubt", [("sku-apple", 1)]))
            )

            async def orders_prepared() -> bool:
                return bool(await held_locks(cluster, "orders"))

            await eventually(orders_prepared)
            await cluster.restart_coordinator(down_s=0.6)
            with pytest.raises(grpc.aio.AioRpcError):
                await submit  # its coordinator went away: the client's answer is unknown
            # While the coordinator was down the branch kept its lock (it asked, and waited);
            # the restarted coordinator has no decision on record: presumed abort frees it.
            await eventually(lambda: _no_locks(cluster, "orders"), timeout_s=10)
            listing = await cluster.admin("orders").ListBranches(
                participant_pb2.ListBranchesRequest()
            )
            assert {participant_pb2.BRANCH_STATE_ROLLED_BACK} == {b.state for b in listing.branches}
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_NONE)
            stock = (await cluster.stock())["sku-apple"]

            async def released() -> bool:
                return 0 == (await cluster.stock())["sku-apple"].reserved

            await eventually(released, timeout_s=10)
            assert 0 == stock.sold

    asyncio.run(scenario())


def test_heuristic_outcome_is_forced_recorded_and_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, participant_overrides={"in_doubt_after_ms": 60_000}
        ) as cluster:
            inventory = cluster.participant_stub("inventory")
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=2)])
            )
            await inventory.Prepare(
                participant_pb2.PrepareRequest(transaction_id="t-h", branch=0, operation=operation)
            )
            admin = cluster.admin("inventory")
            force = participant_pb2.ForceOutcomeRequest(
                transaction_id="t-h", branch=0, commit=False
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.ForceOutcome(force)  # not confirmed: refused
            assert grpc.StatusCode.FAILED_PRECONDITION == refused.value.code()
            force.i_understand_this_is_heuristic = True
            forced = await admin.ForceOutcome(force)
            assert "heuristic rollback" == forced.branch.heuristic
            assert participant_pb2.BRANCH_STATE_ROLLED_BACK == forced.branch.state
            assert 0 == (await cluster.stock())["sku-apple"].reserved
            # The decision that arrives later disagrees: the participant says so, explicitly.
            with pytest.raises(grpc.aio.AioRpcError) as conflict:
                await inventory.Commit(
                    participant_pb2.CommitRequest(transaction_id="t-h", branch=0)
                )
            assert grpc.StatusCode.FAILED_PRECONDITION == conflict.value.code()
            assert ("dtm-heuristic", "heuristic rollback") in tuple(
                conflict.value.trailing_metadata() or ()
            )

    asyncio.run(scenario())


def test_coordinator_shows_a_heuristic_reported_during_phase_two(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            # Notification votes, then becomes unreachable for phase 2: its branch stays in doubt.
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            response = await cluster.submit(order_branches("o-h", [("sku-apple", 1)]), "txn-h")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            get = coordinator_pb2.GetTransactionRequest(transaction_id="txn-h")

            async def retrying() -> bool:
                status = await cluster.client.GetTransaction(get)
                return status.branches[3].phase_two_attempts >= 1

            await eventually(retrying)
            status = await cluster.client.GetTransaction(get)
            assert coordinator_pb2.TRANSACTION_STATE_COMMITTING == status.state
            assert "rejects decisions" in status.branches[3].last_error
            # An operator forces the in-doubt branch the other way; then the participant is back.
            await force_heuristic(cluster, "notification", "txn-h", 3, commit=False)
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_NONE)

            async def reported() -> bool:
                status = await cluster.client.GetTransaction(get)
                return status.state == coordinator_pb2.TRANSACTION_STATE_COMMITTED

            await eventually(reported)
            status = await cluster.client.GetTransaction(get)
            assert "heuristic rollback" == status.branches[3].heuristic
            assert "" == status.branches[0].heuristic

    asyncio.run(scenario())


def test_listlocks_held_since_survives_a_participant_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        # No inquiry while the test looks: the branch below has no transaction at the
        # coordinator, which would answer it with a presumed abort.
        async with InProcessCluster(
            tmp_path, participant_overrides={"in_doubt_after_ms": 60_000}
        ) as cluster:
            request = participant_pb2.PrepareRequest(
                transaction_id="T1", branch=0, operation=create_order("X")
            )
            prepared = await cluster.participant_stub("orders").Prepare(request)
            assert coordinator_pb2.VOTE_PREPARED == prepared.vote
            (before,) = await held_locks(cluster, "orders")
            await asyncio.sleep(0.2)  # so that a hold re-taken at the restart looks younger
            restart_ms = time.time_ns() // 1_000_000
            restarted = await cluster.restart_participant("orders", OrdersService())
            (after,) = await held_locks(cluster, "orders")
            prepared_at_ms = restarted.engine.open[("T1", 0)].prepared_at_ms  # from its log
            # Locks are taken just before the prepare record that dates the branch. After the
            # restart they are held since that prepare (give or take the ms between reading the
            # engine's clock and the lock table's), not since the restart.
            assert before.held_since_unix_ms <= prepared_at_ms
            assert prepared_at_ms - 1 <= after.held_since_unix_ms < restart_ms, (
                before.held_since_unix_ms,
                after.held_since_unix_ms,
                prepared_at_ms,
            )
            assert (list(before.holders), before.mode) == (list(after.holders), after.mode)

    asyncio.run(scenario())
