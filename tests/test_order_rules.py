"""The shop's business rules end to end, on a real in-process cluster: stock runs out and
payments are declined with a clear reason, exactly one of the orders racing for the last unit
or the last cent wins, a notification goes out once per committed order and never for an
aborted one (across restarts and repeated decisions), and the invariant checker, reading the
real services, catches a unit lost, a double charge and a message for an aborted order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from dtm import invariants, limits
from dtm.orderflow import order_request
from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
from participants.services.catalog import AccountSpec
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService, Sent
from participants.services.orders import OrdersService
from participants.services.payment import Capture, PaymentService
from tests.harness import (
    ACCOUNTS,
    STOCK,
    InProcessCluster,
    eventually,
    expect_status,
    order_branches,
    settled,
)

COMMITTED = coordinator_pb2.OUTCOME_COMMITTED
ABORTED = coordinator_pb2.OUTCOME_ABORTED
RACERS = 6
ORDERS_BRANCH = 1  # order_branches: inventory, orders, payment, notification
NOTIFICATION_BRANCH = 3
DUPLICATE_ORDER_ID = (
    "duplicate order id o-1: an order with this id exists; choose another order id, or look "
    "the order up (ListOrders)"
)
ORDER_ID_BEING_CREATED = (
    "orders refused: order id o-1 is already being created by a transaction not decided yet: "
    "choose another order id, or look the order up (ListOrders) once that one is decided"
)

INITIAL = invariants.InitialState(
    stock=dict(STOCK),
    accounts={account_id: spec.balance_cents for account_id, spec in ACCOUNTS.items()},
    declining=frozenset(account_id for account_id, spec in ACCOUNTS.items() if spec.declines),
)


def targets(cluster: InProcessCluster) -> dict[str, str]:
    return {name: cluster.address(name) for name in invariants.SERVICES}


async def race(
    cluster: InProcessCluster,
    name: str,
    branches: Callable[[int], list[coordinator_pb2.BranchRequest]],
) -> list[coordinator_pb2.SubmitResponse]:
    """RACERS orders submitted at once, each under its own transaction id."""
    return await asyncio.gather(
        *(cluster.submit(branches(i), f"txn-{name}-{i}") for i in range(RACERS))
    )


def test_exactly_one_order_gets_the_last_unit_and_one_the_last_cent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            # sku-scarce starts with 3: leave one.
            first = order_branches("o-first", [("sku-scarce", 2)], amount_cents=10)
            assert COMMITTED == (await cluster.submit(first, "txn-first")).outcome
            for_the_unit = await race(
                cluster,
                "unit",
                lambda i: order_branches(f"o-unit-{i}", [("sku-scarce", 1)], amount_cents=10),
            )
            # acct-poor holds 500 cents: an order of exactly the balance, six times at once.
            for_the_cents = await race(
                cluster,
                "cents",
                lambda i: order_branches(
                    f"o-cents-{i}", [("sku-apple", 1)], account="acct-poor", amount_cents=500
                ),
            )
            for responses, refusal in (
                (
                    for_the_unit,
                    "inventory refused: out of stock: sku sku-scarce has 0 available, 1 requested",
                ),
                (
                    for_the_cents,
                    "payment refused: insufficient funds: account acct-poor has 0 cents "
                    "available, 500 requested",
                ),
            ):
                assert [r.outcome for r in responses].count(COMMITTED) == 1
                losers = [r for r in responses if r.outcome != COMMITTED]
                assert {(r.outcome, r.reason) for r in losers} == {(ABORTED, refusal)}

            await settled(cluster)
            snapshot = await invariants.wait_until_settled(targets(cluster))
            assert [] == invariants.check(snapshot, initial=INITIAL)
            scarce = next(level for level in snapshot.stock if level.sku == "sku-scarce")
            assert (scarce.available, scarce.sold) == (0, 3)
            poor = next(a for a in snapshot.accounts if a.account_id == "acct-poor")
            assert (poor.balance_cents, poor.captured_cents) == (0, 500)

    asyncio.run(scenario())


def test_a_second_claim_of_an_order_id_being_created_is_told_so_not_lock_timeout(
    tmp_path: Path,
) -> None:
    """Two transactions create one order id: the second waits for the first's decision (the
    order-id lock) and gives up when its lock wait runs out. It used to read "orders refused:
    lock timeout on order:o-1 after 50 ms", which tells a client to retry, when the id is taken
    and retrying gets the same answer or "duplicate order id"."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            # The holder is prepared by hand, with no coordinator record: it must not ask the
            # coordinator (presumed abort) and roll back while the test runs.
            participant_overrides={"lock_wait_ms": 50, "in_doubt_after_ms": 600_000},
        ) as cluster:
            orders = cluster.participant_stub("orders")
            first = order_branches("o-1", [("sku-apple", 1)], account="acct-bob")
            held = await orders.Prepare(
                participant_pb2.PrepareRequest(
                    transaction_id="t-first",
                    branch=ORDERS_BRANCH,
                    operation=first[ORDERS_BRANCH].operation,
                )
            )
            assert coordinator_pb2.VOTE_PREPARED == held.vote
            second = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "t-second")
            assert (ABORTED, ORDER_ID_BEING_CREATED) == (second.outcome, second.reason)
            # The lock is not weakened: the first claim still holds the id, and takes it.
            await orders.Commit(
                participant_pb2.CommitRequest(transaction_id="t-first", branch=ORDERS_BRANCH)
            )
            [confirmed] = (await cluster.orders()).values()
            assert ("o-1", "t-first") == (confirmed.order_id, confirmed.transaction_id)
            again = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "t-third")
            assert (ABORTED, f"orders refused: {DUPLICATE_ORDER_ID}") == (
                again.outcome,
                again.reason,
            )

    asyncio.run(scenario())


def test_one_notification_per_committed_order_across_restarts_and_repeated_decisions(
    tmp_path: Path,
) -> None:
    async def restart_notification(cluster: InProcessCluster) -> None:
        await cluster.restart_participant("notification", NotificationService())

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            committed = order_branches("o-1", [("sku-apple", 1)])
            declined = order_branches("o-2", [("sku-apple", 1)], account="acct-blocked")
            assert COMMITTED == (await cluster.submit(committed, "t-1")).outcome
            assert ABORTED == (await cluster.submit(declined, "t-2")).outcome
            # o-3 commits while notification refuses every decision: its message goes out
            # only when the coordinator's retried Commit reaches the restarted service.
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            late = order_branches("o-3", [("sku-pear", 1)])
            assert COMMITTED == (await cluster.submit(late, "t-3")).outcome
            await restart_notification(cluster)
            await settled(cluster)

            async def sent_once() -> bool:
                return len((await cluster.sent()).sent) == 2

            await eventually(sent_once)

            # Every decision again, and the wrong one, as a duplicated or stray delivery would.
            stub = cluster.participant_stub("notification")
            for transaction_id in ("t-1", "t-3"):
                await stub.Commit(
                    participant_pb2.CommitRequest(
                        transaction_id=transaction_id, branch=NOTIFICATION_BRANCH
                    )
                )
            await stub.Rollback(
                participant_pb2.RollbackRequest(transaction_id="t-2", branch=NOTIFICATION_BRANCH)
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Commit(
                    participant_pb2.CommitRequest(transaction_id="t-2", branch=NOTIFICATION_BRANCH)
                )
            assert grpc.StatusCode.FAILED_PRECONDITION == raised.value.code()
            again = await stub.Prepare(
                participant_pb2.PrepareRequest(
                    transaction_id="t-2",
                    branch=NOTIFICATION_BRANCH,
                    operation=declined[NOTIFICATION_BRANCH].operation,
                )
            )
            assert coordinator_pb2.VOTE_REFUSED == again.vote
            await restart_notification(cluster)

            listed = await cluster.sent()
            assert [(s.order_id, s.transaction_id) for s in listed.sent] == [
                ("o-1", "t-1"),
                ("o-3", "t-3"),
            ]
            assert 0 == listed.staged
            snapshot = await invariants.wait_until_settled(targets(cluster))
            assert [] == invariants.check(snapshot, initial=INITIAL)

    asyncio.run(scenario())


def test_the_checker_catches_a_lost_unit_a_double_charge_and_a_message_for_an_abort(
    tmp_path: Path,
) -> None:
    """The services' state is corrupted in memory one way at a time, as a bug would leave it,
    and `check_services` must report it through the read APIs; undone, all holds again."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            committed = order_branches("o-1", [("sku-apple", 2)], amount_cents=300)
            declined = order_branches("o-2", [("sku-pear", 1)], account="acct-blocked")
            assert COMMITTED == (await cluster.submit(committed, "t-1")).outcome
            assert ABORTED == (await cluster.submit(declined, "t-2")).outcome
            await settled(cluster)
            await invariants.wait_until_settled(targets(cluster))
            inventory, _, payment, notification = cluster.services
            assert isinstance(inventory, InventoryService)
            assert isinstance(payment, PaymentService)
            assert isinstance(notification, NotificationService)

            async def violations() -> list[str]:
                report = await invariants.check_services(targets(cluster), initial=INITIAL)
                return report.violations

            assert [] == await violations()

            inventory.items["sku-apple"].available -= 1
            assert any(
                "stock sku-apple" in v and "units lost by 1" in v for v in await violations()
            )
            inventory.items["sku-apple"].available += 1

            alice = payment.accounts["acct-alice"]
            alice.balance_cents -= 300
            alice.captured_cents += 300
            payment.captures.append(Capture("o-1", "acct-alice", 300, "t-1"))
            assert any(
                "order o-1" in v and "charged more than once" in v for v in await violations()
            )
            payment.captures.pop()
            alice.captured_cents -= 300
            alice.balance_cents += 300

            notification.outbox.append(Sent("o-2", "cust-1@example.test", "thanks", "t-2"))
            assert any(
                "notification for order o-2" in v and "CANCELLED, not CONFIRMED" in v
                for v in await violations()
            )
            notification.outbox.pop()

            assert [] == await violations()

    asyncio.run(scenario())


def test_a_free_order_commits_without_a_payment_branch(tmp_path: Path) -> None:
    """A free order (0 cents, a 100 % voucher) is a valid order: it has nothing to charge, so
    order_request leaves out the payment branch, and inventory, orders and notification commit
    it. It failed INVALID_ARGUMENT: payment refuses a charge of 0."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            request = order_request("o-free", "cust-1", "acct-alice", [("sku-pear", 2)], 0, "r")
            assert ["inventory", "orders", "notification"] == [
                branch.participant for branch in request.branches
            ]
            response = await cluster.submit(request.branches, request.transaction_id)
            assert COMMITTED == response.outcome, response.reason
            snapshot = await invariants.wait_until_settled(targets(cluster))
            assert [] == invariants.check(snapshot, initial=INITIAL)
            pear = next(level for level in snapshot.stock if level.sku == "sku-pear")
            assert (STOCK["sku-pear"] - 2, 0, 2) == (pear.available, pear.reserved, pear.sold)
            assert [("o-free", 0, invariants.CONFIRMED, request.transaction_id)] == [
                (o.order_id, o.amount_cents, o.state, o.transaction_id) for o in snapshot.orders
            ]
            assert [
                ("o-free", "Order o-free confirmed: 2 x sku-pear; free order, nothing charged.")
            ] == [(n.order_id, n.body) for n in snapshot.sent]
            assert [] == list(snapshot.captures)
            assert INITIAL.accounts == {a.account_id: a.balance_cents for a in snapshot.accounts}

    asyncio.run(scenario())


def test_a_free_order_refused_by_inventory_aborts_with_nothing_left(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            # sku-scarce has 3 units: inventory refuses 4.
            request = order_request("o-free", "cust-1", "acct-alice", [("sku-scarce", 4)], 0, "r")
            response = await cluster.submit(request.branches, request.transaction_id)
            assert ABORTED == response.outcome
            assert "inventory" in response.reason and "sku-scarce" in response.reason
            await settled(cluster)
            snapshot = await invariants.wait_until_settled(targets(cluster))
            assert [] == invariants.check(snapshot, initial=INITIAL)
            # Orders may have prepared the order before inventory's refusal decided the abort
            # (the Prepares go out together): then it is CANCELLED, else absent.
            assert all(o.state == invariants.CANCELLED for o in snapshot.orders), snapshot.orders
            assert STOCK == {level.sku: level.available for level in snapshot.stock}
            assert ([], [], 0) == (list(snapshot.sent), list(snapshot.captures), snapshot.staged)

    asyncio.run(scenario())


def test_payment_refuses_a_charge_of_zero_naming_the_free_order_rule(tmp_path: Path) -> None:
    """A payment branch of 0 cents, built by hand (order_request leaves it out), is still bad
    input: the Submit fails INVALID_ARGUMENT, nothing is applied, and the message says what to
    do instead."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            branches = order_branches("o-free", [("sku-apple", 1)], amount_cents=0)
            await expect_status(
                cluster.submit(branches, "txn-o-free"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "branch 2 (payment)",
                "a free order has no payment branch",
            )
            await settled(cluster)
            snapshot = await invariants.wait_until_settled(targets(cluster))
            assert [] == invariants.check(snapshot, initial=INITIAL)
            assert STOCK == {level.sku: level.available for level in snapshot.stock}

    asyncio.run(scenario())


def test_an_order_request_at_every_limit_passes_every_services_validation() -> None:
    """order_request's default message listed every line: past about 70 short lines (of the
    100 an order may have) it was over the 1,024 characters notification accepts, and an order
    every other service took was refused, INVALID_ARGUMENT, for a body its client never wrote.
    The lines that do not fit are counted instead."""
    lines = [(f"{number:03d}" + "s" * 125, limits.QUANTITY_MAX) for number in range(100)]
    assert len(lines) == limits.LINES_PER_OPERATION_MAX
    request = order_request(
        "o" * 128, "c" * 128, "a" * 128, lines, limits.AMOUNT_CENTS_MAX, "r" * 1024
    )
    services = {
        "inventory": InventoryService({}),
        "orders": OrdersService(),
        "payment": PaymentService({}),
        "notification": NotificationService(),
    }
    for branch in request.branches:
        service = services[branch.participant]
        operation = service.operation_type()
        assert branch.operation.Unpack(operation)
        service.validate(operation)
    message = shop_pb2.SendNotification()
    assert request.branches[3].operation.Unpack(message)
    assert message.body.startswith(f"Order {'o' * 128} confirmed: 1000000 x 000s")
    assert message.body.endswith(f" more lines; {limits.AMOUNT_CENTS_MAX} cents charged.")


def test_an_order_requests_message_lists_every_line_when_they_fit() -> None:
    request = order_request("o-1", "c-1", "acct-1", [("sku-a", 2), ("sku-b", 1)], 300, "r")
    message = shop_pb2.SendNotification()
    assert request.branches[3].operation.Unpack(message)
    assert message.body == "Order o-1 confirmed: 2 x sku-a, 1 x sku-b; 300 cents charged."


def test_the_checker_reads_lists_whose_default_page_is_over_the_message_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_snapshot asked for the server's default page (10,000 items): 4,000 messages of a
    1,024-character body (or 300 orders of 100 lines) are over the 4 MiB a message may carry,
    the services answered RESOURCE_EXHAUSTED "pass a smaller page_size", and the checker could
    not read the shop at all. Here the limit is lowered instead of making thousands of orders;
    the services answer the pages short (as many as fit) and the reader follows their tokens."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            body = "b" * limits.TEXT_FIELD_LENGTH_MAX
            for number in range(6):
                request = order_request(
                    f"o-{number}", "cust-1", "acct-alice", [("sku-apple", 1)], 100, "r", body=body
                )
                response = await cluster.submit(request.branches, request.transaction_id)
                assert COMMITTED == response.outcome
            await settled(cluster)
            # Six bodies (6 KiB) are over it, one of them is not.
            monkeypatch.setattr(limits, "ANSWER_BYTES_MAX", 4 * 1024)
            snapshot = await invariants.wait_until_settled(targets(cluster))
            assert [n.order_id for n in snapshot.sent] == [f"o-{n}" for n in range(6)]
            assert [] == invariants.check(snapshot, initial=INITIAL)

    asyncio.run(scenario())


def test_the_checker_reads_a_catalog_and_accounts_over_the_message_limit(tmp_path: Path) -> None:
    """GetStock answered every SKU at once and ListAccounts every account on every page: 40,000
    SKUs and 40,000 accounts of the longest allowed id (128 characters) take about 5.5 MB each,
    over the 4 MiB a message may carry, and the checker could not read the shop at all
    (RESOURCE_EXHAUSTED). Both now page; the checker must see each SKU and account once."""
    count = 40_000
    skus = [f"{n:05d}" + "s" * 123 for n in range(count)]
    account_ids = [f"{n:05d}" + "a" * 123 for n in range(count)]
    stock = dict.fromkeys(skus, 1)
    accounts = dict.fromkeys(account_ids, AccountSpec(1))
    initial = invariants.InitialState(stock=stock, accounts=dict.fromkeys(account_ids, 1))

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, stock=stock, accounts=accounts) as cluster:
            snapshot = await invariants.read_snapshot(targets(cluster), timeout_s=30)
        assert skus == [level.sku for level in snapshot.stock]
        assert account_ids == [account.account_id for account in snapshot.accounts]
        assert [] == invariants.check(snapshot, initial=initial)

    asyncio.run(scenario())
