"""Tests for dtm.invariants.check: a consistent end state passes, and every kind of broken one
is caught with a message that names the broken entity.

Each bad snapshot is the consistent one with one thing changed (and, where one fault would
trip two rules, the other side adjusted), so each test shows that its rule alone catches it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from dtm import invariants
from dtm.invariants import (
    CANCELLED,
    CONFIRMED,
    PENDING,
    Account,
    Capture,
    InitialState,
    Notification,
    Order,
    Snapshot,
    StockLevel,
    check,
)
from dtmpb.v1 import shop_pb2


def consistent() -> Snapshot:
    """o-1 and o-2 confirmed (3 units of sku-a, 300 cents), o-3 cancelled (nothing kept)."""
    return Snapshot(
        stock=[
            StockLevel("sku-a", available=7, reserved=0, sold=3, received=10),
            StockLevel("sku-b", available=5, reserved=0, sold=0, received=5),
        ],
        accounts=[
            Account(
                "acct-1", balance_cents=800, held_cents=0, captured_cents=200, initial_cents=1000
            ),
            Account(
                "acct-2", balance_cents=400, held_cents=0, captured_cents=100, initial_cents=500
            ),
        ],
        captures=[
            Capture("o-1", "acct-1", 200, "txn-o-1"),
            Capture("o-2", "acct-2", 100, "txn-o-2"),
        ],
        orders=[
            Order("o-1", "alice", (("sku-a", 2),), 200, CONFIRMED, "txn-o-1"),
            Order("o-2", "bob", (("sku-a", 1),), 100, CONFIRMED, "txn-o-2"),
            Order("o-3", "bob", (("sku-b", 1),), 50, CANCELLED, "txn-o-3"),
        ],
        sent=[
            Notification("o-1", "alice@example.com", "confirmed", "txn-o-1"),
            Notification("o-2", "bob@example.com", "confirmed", "txn-o-2"),
        ],
        staged=0,
    )


def with_stock(snapshot: Snapshot, sku: str, **changes: Any) -> Snapshot:
    return replace(
        snapshot,
        stock=[replace(s, **changes) if s.sku == sku else s for s in snapshot.stock],
    )


def with_account(snapshot: Snapshot, account_id: str, **changes: Any) -> Snapshot:
    return replace(
        snapshot,
        accounts=[
            replace(a, **changes) if a.account_id == account_id else a for a in snapshot.accounts
        ],
    )


def assert_caught(violations: list[str], *fragments: str) -> None:
    """Some violation contains every fragment (the entity named, and what is wrong)."""
    assert violations, "the broken snapshot passed the check"
    matching = [v for v in violations if all(f in v for f in fragments)]
    assert matching, f"no violation mentions {fragments}: {violations}"


def test_consistent_snapshot_passes_settled_and_unsettled() -> None:
    assert check(consistent(), settled=True) == []
    assert check(consistent(), settled=False) == []


def test_report_sums_up_the_end_state() -> None:
    report = invariants.report(consistent())
    assert report.ok
    assert report.confirmed_orders == 2
    assert report.cancelled_orders == 1
    assert report.pending_orders == 0
    assert report.captured_cents == 300
    assert report.units_sold == 3
    assert report.notifications_sent == 2


# ---- stock ----


def test_oversold_stock_is_caught() -> None:
    # One more unit sold than was ever received (and than any confirmed order asked for).
    snapshot = with_stock(consistent(), "sku-a", sold=4)
    violations = check(snapshot)
    assert_caught(violations, "stock sku-a", "oversold by 1")
    assert_caught(violations, "stock sku-a", "1 units sold without a confirmed order")


def test_lost_units_are_caught() -> None:
    snapshot = with_stock(consistent(), "sku-b", available=4)
    assert_caught(check(snapshot), "stock sku-b", "units lost by 1")


def test_negative_available_is_caught() -> None:
    snapshot = with_stock(consistent(), "sku-b", available=-1, reserved=6)
    violations = check(snapshot, settled=False)
    assert_caught(violations, "stock sku-b", "available is negative (-1)")


def test_confirmed_units_not_sold_are_caught() -> None:
    # The units went back to available although o-1 and o-2 were confirmed.
    snapshot = with_stock(consistent(), "sku-a", available=10, sold=0)
    assert_caught(check(snapshot), "stock sku-a", "confirmed orders contain 3 units", "only 0")


def test_sold_units_without_any_order_for_the_sku_are_caught() -> None:
    snapshot = with_stock(consistent(), "sku-b", available=3, sold=2)
    assert_caught(check(snapshot), "stock sku-b", "2 units sold without a confirmed order")
    # Only when every order's inventory branch matches its lines is it a violation.
    assert check(snapshot, lines_match_inventory=False) == []


def test_confirmed_order_for_an_unlisted_sku_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, stock=[s for s in snapshot.stock if s.sku != "sku-a"])
    assert_caught(check(snapshot), "stock sku-a", "does not list the SKU")


# ---- money ----


def test_money_not_conserved_is_caught() -> None:
    snapshot = with_account(consistent(), "acct-1", balance_cents=900)
    assert_caught(check(snapshot), "account acct-1", "money not conserved", "initial 1000")


def test_negative_balance_is_caught() -> None:
    snapshot = with_account(consistent(), "acct-2", balance_cents=-100, initial_cents=0)
    assert_caught(check(snapshot), "account acct-2", "negative balance (-100 cents)")


def test_captured_total_not_matching_captures_is_caught() -> None:
    # The account says it paid 300, yet only one capture of 200 exists.
    snapshot = with_account(consistent(), "acct-1", balance_cents=700, captured_cents=300)
    assert_caught(check(snapshot), "account acct-1", "captures add up to 200")


def test_capture_from_unlisted_account_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(
        snapshot, captures=[replace(c, account_id="acct-x") for c in snapshot.captures]
    )
    assert_caught(check(snapshot), "account acct-x", "does not list")


# ---- orders and payments ----


def test_confirmed_order_without_capture_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, captures=[c for c in snapshot.captures if c.order_id != "o-2"])
    # Keep acct-2 itself consistent: the only fault is the missing capture.
    snapshot = with_account(snapshot, "acct-2", balance_cents=500, captured_cents=0)
    violations = check(snapshot)
    assert_caught(violations, "order o-2", "CONFIRMED but no payment was captured")
    assert all("o-2" in v for v in violations), violations


def with_free_order(snapshot: Snapshot) -> Snapshot:
    """`snapshot` plus o-4, a free order (0 cents, a 100 % voucher) confirmed: its unit of
    sku-b sold and its message sent, and, since it has no payment branch, no capture."""
    snapshot = with_stock(snapshot, "sku-b", available=4, sold=1)
    return replace(
        snapshot,
        orders=[*snapshot.orders, Order("o-4", "carol", (("sku-b", 1),), 0, CONFIRMED, "t-4")],
        sent=[*snapshot.sent, Notification("o-4", "carol@example.com", "confirmed", "t-4")],
    )


def test_a_confirmed_free_order_without_capture_passes() -> None:
    snapshot = with_free_order(consistent())
    assert [] == check(snapshot, settled=True)
    assert [] == check(snapshot, settled=False)


def test_a_capture_for_a_free_order_is_caught() -> None:
    snapshot = with_free_order(consistent())
    snapshot = replace(snapshot, captures=[*snapshot.captures, Capture("o-4", "acct-2", 50)])
    snapshot = with_account(snapshot, "acct-2", balance_cents=350, captured_cents=150)
    violations = check(snapshot)
    assert_caught(violations, "order o-4", "CONFIRMED for 0 cents but 50 cents")
    assert all("o-4" in v for v in violations), violations


def test_a_paid_order_without_capture_is_still_caught_beside_a_free_one() -> None:
    snapshot = with_free_order(consistent())
    snapshot = replace(snapshot, captures=[c for c in snapshot.captures if c.order_id != "o-2"])
    snapshot = with_account(snapshot, "acct-2", balance_cents=500, captured_cents=0)
    for settled in (True, False):
        violations = check(snapshot, settled=settled)
        assert_caught(violations, "order o-2", "CONFIRMED but no payment was captured")
        assert all("o-2" in v for v in violations), violations


def test_order_charged_twice_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, captures=[*snapshot.captures, Capture("o-1", "acct-1", 200)])
    snapshot = with_account(snapshot, "acct-1", balance_cents=600, captured_cents=400)
    violations = check(snapshot)
    assert_caught(violations, "order o-1", "2 captures", "charged more than once")
    assert all("o-1" in v for v in violations), violations


def test_capture_of_the_wrong_amount_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(
        snapshot,
        captures=[
            replace(c, amount_cents=150) if c.order_id == "o-1" else c for c in snapshot.captures
        ],
    )
    snapshot = with_account(snapshot, "acct-1", balance_cents=850, captured_cents=150)
    assert_caught(check(snapshot), "order o-1", "CONFIRMED for 200 cents but 150 cents")


def test_capture_without_order_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, captures=[*snapshot.captures, Capture("o-9", "acct-2", 100)])
    snapshot = with_account(snapshot, "acct-2", balance_cents=300, captured_cents=200)
    violations = check(snapshot)
    assert_caught(violations, "capture for order o-9", "payment without an order")
    assert all("o-9" in v for v in violations), violations


def test_capture_for_a_cancelled_order_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, captures=[*snapshot.captures, Capture("o-3", "acct-2", 50)])
    snapshot = with_account(snapshot, "acct-2", balance_cents=350, captured_cents=150)
    assert_caught(check(snapshot), "capture for order o-3", "CANCELLED, not CONFIRMED")


def test_unknown_order_state_and_duplicate_listing_are_caught() -> None:
    snapshot = consistent()
    snapshot = replace(
        snapshot,
        orders=[*snapshot.orders, replace(snapshot.orders[2], state="SHIPPED")],
    )
    violations = check(snapshot)
    assert_caught(violations, "order o-3", "listed twice")
    assert_caught(violations, "order o-3", "unknown state 'SHIPPED'")


# ---- notifications ----


def test_notification_for_an_unconfirmed_order_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, sent=[*snapshot.sent, Notification("o-3", "bob@example.com")])
    violations = check(snapshot)
    assert_caught(violations, "notification for order o-3", "CANCELLED, not CONFIRMED")
    assert all("o-3" in v for v in violations), violations


def test_notification_for_a_missing_order_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, sent=[*snapshot.sent, Notification("o-7", "eve@example.com")])
    assert_caught(check(snapshot), "notification for order o-7", "does not exist")


def test_duplicate_notification_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, sent=[*snapshot.sent, snapshot.sent[0]])
    violations = check(snapshot)
    assert_caught(violations, "notification for order o-1", "sent 2 times")
    assert all("o-1" in v for v in violations), violations


def test_confirmed_order_without_notification_is_caught() -> None:
    snapshot = consistent()
    snapshot = replace(snapshot, sent=[n for n in snapshot.sent if n.order_id != "o-2"])
    assert_caught(check(snapshot), "order o-2", "no notification was sent")


# ---- against the initial state, and declining accounts ----

#: What consistent() started with.
INITIAL = InitialState(stock={"sku-a": 10, "sku-b": 5}, accounts={"acct-1": 1000, "acct-2": 500})


def test_initial_state_reads_a_cluster_document() -> None:
    document = {
        "stock": {"sku-a": 10, "sku-b": 5},
        "accounts": {
            "acct-1": {"balance_cents": 1000},
            "acct-2": {"balance_cents": 500, "declines": True},
        },
    }
    assert InitialState(
        stock={"sku-a": 10, "sku-b": 5},
        accounts={"acct-1": 1000, "acct-2": 500},
        declining=frozenset({"acct-2"}),
    ) == InitialState.of(document)
    assert check(consistent(), initial=INITIAL) == []
    assert check(consistent(), initial=INITIAL, settled=False) == []


def test_a_vanished_account_and_its_money_are_caught() -> None:
    # acct-2 (500 cents, charged 100 for o-2) gone with its capture, o-2 and its message.
    base = consistent()
    snapshot = replace(
        base,
        stock=[replace(base.stock[0], available=8, sold=2), base.stock[1]],
        accounts=base.accounts[:1],
        captures=base.captures[:1],
        orders=[base.orders[0], base.orders[2]],
        sent=base.sent[:1],
    )
    assert check(snapshot) == []  # nothing else can see it
    violations = check(snapshot, initial=INITIAL)
    assert_caught(violations, "account acct-2", "started with 500 cents", "does not list")
    assert_caught(violations, "money", "add up to 1000 cents", "started with 1500")
    assert len(violations) == 2, violations


def test_a_vanished_sku_is_caught() -> None:
    snapshot = replace(consistent(), stock=consistent().stock[:1])
    assert check(snapshot) == []
    assert_caught(check(snapshot, initial=INITIAL), "stock sku-b", "started with 5 units")


def test_accounts_and_skus_the_shop_never_had_or_other_starting_figures_are_caught() -> None:
    extra = replace(
        consistent(),
        stock=[*consistent().stock, StockLevel("sku-z", 1, 0, 0, 1)],
        accounts=[*consistent().accounts, Account("acct-9", 70, 0, 0, 70)],
    )
    violations = check(extra, initial=INITIAL)
    assert_caught(violations, "stock sku-z", "never had it")
    assert_caught(violations, "account acct-9", "never had it")
    assert_caught(violations, "money", "1570 cents", "started with 1500")
    # Starting figures rewritten along with the state: each side balances, the start does not.
    moved = with_stock(consistent(), "sku-b", available=6, received=6)
    moved = with_account(moved, "acct-2", balance_cents=500, initial_cents=600)
    violations = check(moved, initial=INITIAL)
    assert_caught(violations, "stock sku-b", "6 units received", "started with 5")
    assert_caught(violations, "account acct-2", "initial_cents says 600", "started with 500")


def test_an_account_listed_twice_is_caught() -> None:
    snapshot = replace(consistent(), accounts=[*consistent().accounts, consistent().accounts[1]])
    assert_caught(check(snapshot), "account acct-2", "listed twice")


def test_a_hold_or_capture_on_a_declining_account_is_caught() -> None:
    declining = with_account(consistent(), "acct-2", declines=True)
    assert_caught(check(declining), "capture for order o-2", "account acct-2 declines every charge")
    held = with_account(in_flight(), "acct-1", declines=True)
    assert_caught(check(held, settled=False), "account acct-1", "declines every charge", "50")
    # The initial state says so even if the service forgot it.
    initial = replace(INITIAL, declining=frozenset({"acct-2"}))
    assert_caught(check(consistent(), initial=initial), "account acct-2 declines every charge")


def test_a_capture_or_message_made_by_another_transaction_is_caught() -> None:
    base = consistent()
    foreign = replace(base, captures=[replace(base.captures[0], transaction_id="txn-x")])
    assert_caught(check(foreign), "order o-1", "captured by transaction txn-x", "txn-o-1")
    foreign = replace(base, sent=[replace(base.sent[0], transaction_id="txn-x"), base.sent[1]])
    assert_caught(check(foreign), "notification for order o-1", "transaction txn-x")


# ---- settling ----


def in_flight() -> Snapshot:
    """Consistent, with o-4 prepared everywhere and not yet decided."""
    snapshot = consistent()
    snapshot = with_stock(snapshot, "sku-b", available=4, reserved=1)
    snapshot = with_account(snapshot, "acct-1", balance_cents=750, held_cents=50)
    return replace(
        snapshot,
        orders=[*snapshot.orders, Order("o-4", "alice", (("sku-b", 1),), 50, PENDING, "txn-o-4")],
        staged=1,
    )


def test_work_in_flight_is_allowed_while_not_settled() -> None:
    assert check(in_flight(), settled=False) == []


def test_pending_leftovers_are_caught_when_settled() -> None:
    violations = check(in_flight(), settled=True)
    assert_caught(violations, "stock sku-b", "1 units still reserved")
    assert_caught(violations, "account acct-1", "50 cents still held")
    assert_caught(violations, "order o-4", "still PENDING", "txn-o-4")
    assert_caught(violations, "notification", "1 message(s) still staged")
    assert len(violations) == 4, violations


def committed_at_payment_and_notification_first() -> Snapshot:
    """o-4 committed: payment captured and notification sent, orders and inventory not yet."""
    snapshot = with_stock(consistent(), "sku-b", available=4, reserved=1)
    snapshot = with_account(snapshot, "acct-1", balance_cents=750, captured_cents=250)
    return replace(
        snapshot,
        captures=[*snapshot.captures, Capture("o-4", "acct-1", 50, "txn-o-4")],
        orders=[*snapshot.orders, Order("o-4", "alice", (("sku-b", 1),), 50, PENDING, "txn-o-4")],
        sent=[*snapshot.sent, Notification("o-4", "alice@example.com", "", "txn-o-4")],
    )


def committed_at_orders_and_inventory_first() -> Snapshot:
    """o-4 committed: confirmed at orders, sold at inventory; payment and notification not yet."""
    snapshot = with_stock(consistent(), "sku-b", available=4, sold=1)
    snapshot = with_account(snapshot, "acct-1", balance_cents=750, held_cents=50)
    return replace(
        snapshot,
        orders=[*snapshot.orders, Order("o-4", "alice", (("sku-b", 1),), 50, CONFIRMED, "txn-o-4")],
        staged=1,
    )


def committed_at_orders_first() -> Snapshot:
    """o-4 committed: confirmed at orders only; its reservation, hold and message wait."""
    snapshot = with_stock(consistent(), "sku-b", available=4, reserved=1)
    snapshot = with_account(snapshot, "acct-1", balance_cents=750, held_cents=50)
    return replace(
        snapshot,
        orders=[*snapshot.orders, Order("o-4", "alice", (("sku-b", 1),), 50, CONFIRMED, "txn-o-4")],
        staged=1,
    )


def committed_at_inventory_first() -> Snapshot:
    """o-4 committed: sold at inventory only; the order is still PENDING."""
    return replace(in_flight(), stock=with_stock(in_flight(), "sku-b", reserved=0, sold=1).stock)


@pytest.mark.parametrize(
    "snapshot",
    [
        committed_at_payment_and_notification_first(),
        committed_at_orders_and_inventory_first(),
        committed_at_orders_first(),
        committed_at_inventory_first(),
    ],
    ids=["payment-first", "orders-and-inventory-first", "orders-first", "inventory-first"],
)
def test_a_commit_halfway_through_phase_two_is_allowed_while_not_settled(
    snapshot: Snapshot,
) -> None:
    assert check(snapshot, settled=False) == []
    assert check(snapshot, settled=True) != []


def test_mid_run_a_commit_must_still_be_covered_by_what_is_held_reserved_or_staged() -> None:
    # Confirmed at orders, but nothing held, reserved or staged is left to become it.
    snapshot = committed_at_orders_first()
    snapshot = with_stock(snapshot, "sku-b", available=5, reserved=0)
    snapshot = with_account(snapshot, "acct-1", balance_cents=800, held_cents=0)
    violations = check(replace(snapshot, staged=0), settled=False)
    assert_caught(violations, "order o-4", "no payment was captured")
    assert_caught(violations, "stock sku-b", "only 0 were sold")
    assert_caught(violations, "order o-4", "no notification was sent")
    # A pending order charged twice, or a cancelled one charged at all, is never in progress.
    twice = committed_at_payment_and_notification_first()
    twice = with_account(twice, "acct-1", balance_cents=700, captured_cents=300)
    twice = replace(twice, captures=[*twice.captures, Capture("o-4", "acct-1", 50, "txn-o-4")])
    assert_caught(check(twice, settled=False), "order o-4", "charged more than once")
    cancelled = committed_at_payment_and_notification_first()
    cancelled = replace(
        cancelled,
        orders=[
            replace(o, state=CANCELLED) if o.order_id == "o-4" else o for o in cancelled.orders
        ],
    )
    violations = check(cancelled, settled=False)
    assert_caught(violations, "capture for order o-4", "CANCELLED, not CONFIRMED")
    assert_caught(violations, "notification for order o-4", "CANCELLED, not CONFIRMED")


def test_in_flight_lists_undecided_work() -> None:
    assert consistent().in_flight() == []
    assert in_flight().in_flight() == [
        "1 units reserved",
        "50 cents held",
        "1 orders pending",
        "1 notifications staged",
    ]


# ---- reading the services' answers ----


def test_snapshot_from_read_api_answers() -> None:
    snapshot = invariants.snapshot_from_pb(
        shop_pb2.GetStockResponse(
            levels=[shop_pb2.StockLevel(sku="sku-a", available=7, sold=3, received=10)]
        ),
        shop_pb2.ListOrdersResponse(
            orders=[
                shop_pb2.Order(
                    order_id="o-1",
                    customer_id="alice",
                    lines=[shop_pb2.StockLine(sku="sku-a", quantity=3)],
                    amount_cents=300,
                    state=shop_pb2.ORDER_STATE_CONFIRMED,
                    transaction_id="txn-o-1",
                )
            ]
        ),
        shop_pb2.ListAccountsResponse(
            accounts=[
                shop_pb2.Account(
                    account_id="acct-1", balance_cents=700, captured_cents=300, initial_cents=1000
                )
            ],
            captures=[shop_pb2.Capture(order_id="o-1", account_id="acct-1", amount_cents=300)],
        ),
        shop_pb2.ListSentResponse(
            sent=[shop_pb2.SentNotification(order_id="o-1", recipient="alice@example.com")],
            staged=0,
        ),
    )
    assert snapshot.orders[0].lines == (("sku-a", 3),)
    assert snapshot.orders[0].state == CONFIRMED
    assert check(snapshot) == []


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (shop_pb2.ORDER_STATE_PENDING, PENDING),
        (shop_pb2.ORDER_STATE_CANCELLED, CANCELLED),
        (shop_pb2.ORDER_STATE_UNSPECIFIED, "UNSPECIFIED"),
    ],
)
def test_order_states_map_to_names(state: shop_pb2.OrderState, expected: str) -> None:
    response = shop_pb2.ListOrdersResponse(orders=[shop_pb2.Order(order_id="o-1", state=state)])
    snapshot = invariants.snapshot_from_pb(
        shop_pb2.GetStockResponse(),
        response,
        shop_pb2.ListAccountsResponse(),
        shop_pb2.ListSentResponse(),
    )
    assert expected == snapshot.orders[0].state
