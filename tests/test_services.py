"""The four order-flow services: business logic called directly, then each one served in-process
by the SDK and read over a real gRPC channel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import sys
import types
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from dtm import limits
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc, shop_pb2, shop_pb2_grpc
from participants.locks import LockMode
from participants.service import InvalidOperation, LockRequest, Prepared, Refused, state_bytes
from participants.services import (
    SNAPSHOT_FORMAT,
    EncodedRows,
    SettledRows,
    encode_state,
    json_text,
    state_pieces,
    transaction_of,
)
from participants.services.catalog import (
    DEFAULT_CATALOG,
    AccountSpec,
    load_catalog,
    parse_catalog,
    split_initial_arg,
)
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService
from participants.services.orders import OrdersReadApi, OrdersService
from participants.services.payment import PaymentService

T = TypeVar("T")


def reserve(*lines: tuple[str, int]) -> shop_pb2.ReserveStock:
    return shop_pb2.ReserveStock(
        lines=[shop_pb2.StockLine(sku=sku, quantity=units) for sku, units in lines]
    )


def order(
    order_id: str = "o-1",
    customer_id: str = "cust-1",
    lines: tuple[tuple[str, int], ...] = (("sku-apple", 2),),
    amount_cents: int = 1_000,
) -> shop_pb2.CreateOrder:
    return shop_pb2.CreateOrder(
        order_id=order_id,
        customer_id=customer_id,
        lines=[shop_pb2.StockLine(sku=sku, quantity=units) for sku, units in lines],
        amount_cents=amount_cents,
    )


def duplicate(order_id: str) -> str:
    """The orders service's refusal of an order id that is taken."""
    return (
        f"duplicate order id {order_id}: an order with this id exists; choose another order "
        "id, or look the order up (ListOrders)"
    )


def charge(
    account_id: str = "acct-alice", amount: int = 1_000, order_id: str = "o-1"
) -> shop_pb2.ChargePayment:
    return shop_pb2.ChargePayment(account_id=account_id, amount_cents=amount, order_id=order_id)


def note(
    order_id: str = "o-1", recipient: str = "alice@example.com", body: str = "hi"
) -> shop_pb2.SendNotification:
    return shop_pb2.SendNotification(order_id=order_id, recipient=recipient, body=body)


def stock_of(service: InventoryService) -> dict[str, tuple[int, int, int, int]]:
    return {
        sku: (item.available, item.reserved, item.sold, item.received)
        for sku, item in service.items.items()
    }


def assert_stock_conserved(service: InventoryService) -> None:
    for sku, item in service.items.items():
        assert item.available >= 0, sku
        assert item.available + item.reserved + item.sold == item.received, sku
        assert item.reserved == sum(r.get(sku, 0) for r in service.reservations.values()), sku


def assert_money_conserved(service: PaymentService) -> None:
    for account_id, a in service.accounts.items():
        assert a.balance_cents >= 0, account_id
        assert a.balance_cents + a.held_cents + a.captured_cents == a.initial_cents, account_id
        held = sum(h.amount_cents for h in service.holds.values() if h.account_id == account_id)
        assert a.held_cents == held, account_id
        captured = sum(c.amount_cents for c in service.captures if c.account_id == account_id)
        assert a.captured_cents == captured, account_id


# ---- shared helpers ----


def test_transaction_of_strips_the_branch_index() -> None:
    assert transaction_of("txn-1/0") == "txn-1"
    assert transaction_of("a.b:c/31") == "a.b:c"


# ---- catalog ----


def test_default_catalog_has_the_documented_accounts_and_skus() -> None:
    assert DEFAULT_CATALOG.stock["sku-apple"] == 50
    assert DEFAULT_CATALOG.stock["sku-scarce"] == 3
    assert DEFAULT_CATALOG.accounts["acct-poor"] == AccountSpec(500)
    assert DEFAULT_CATALOG.accounts["acct-blocked"].declines
    assert not DEFAULT_CATALOG.accounts["acct-alice"].declines


def test_parse_catalog_accepts_a_valid_document() -> None:
    catalog = parse_catalog(
        {
            "stock": {"sku-x": 5, "sku-y": 0},
            "accounts": {
                "acct-x": {"balance_cents": 700},
                "acct-y": {"balance_cents": 0, "declines": True},
            },
        }
    )
    assert dict(catalog.stock) == {"sku-x": 5, "sku-y": 0}
    assert dict(catalog.accounts) == {
        "acct-x": AccountSpec(700, False),
        "acct-y": AccountSpec(0, True),
    }


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ([], "must be a JSON object"),
        ({"stock": {}, "accounts": {}, "extra": 1}, "'extra'"),
        ({"accounts": {}}, "'stock'"),
        ({"stock": {}}, "'accounts'"),
        ({"stock": [], "accounts": {}}, "'stock' must be a JSON object"),
        ({"stock": {"bad sku": 1}, "accounts": {}}, "'bad sku'"),
        ({"stock": {"sku-a": -1}, "accounts": {}}, r"stock\['sku-a'\]"),
        ({"stock": {"sku-a": True}, "accounts": {}}, r"stock\['sku-a'\] must be an integer"),
        ({"stock": {"sku-a": 1.5}, "accounts": {}}, r"stock\['sku-a'\] must be an integer"),
        ({"stock": {"sku-a": 10**16}, "accounts": {}}, r"stock\['sku-a'\] must be between"),
        ({"stock": {}, "accounts": {"acct-a": 5}}, r"accounts\['acct-a'\] must be a JSON"),
        ({"stock": {}, "accounts": {"acct-a": {}}}, r"accounts\['acct-a'\]: missing"),
        (
            {"stock": {}, "accounts": {"acct-a": {"balance_cents": 1, "colour": "red"}}},
            "'colour'",
        ),
        (
            {"stock": {}, "accounts": {"acct-a": {"balance_cents": -5}}},
            r"accounts\['acct-a'\]\['balance_cents'\]",
        ),
        (
            {"stock": {}, "accounts": {"acct-a": {"balance_cents": 5, "declines": "no"}}},
            r"accounts\['acct-a'\]\['declines'\] must be true or false",
        ),
        ({"stock": {}, "accounts": {"": {"balance_cents": 1}}}, "accounts key"),
    ],
)
def test_parse_catalog_names_the_bad_key(document: object, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        parse_catalog(document)


def test_load_catalog_reads_a_file_and_reports_bad_json(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"stock": {"sku-q": 4}, "accounts": {}}))
    assert dict(load_catalog(good).stock) == {"sku-q": 4}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_catalog(bad)


def test_load_catalog_refuses_a_key_given_twice(tmp_path: Path) -> None:
    """JSON keeps the last of two equal keys: a SKU listed twice (a merge of two files gone
    wrong) silently started with the second figure, the first lost without a word."""
    path = tmp_path / "twice.json"
    path.write_text('{"stock": {"sku-q": 4, "sku-r": 1, "sku-q": 40}, "accounts": {}}')
    with pytest.raises(ValueError, match=f"{path}: key 'sku-q' appears twice in one object"):
        load_catalog(path)


def test_split_initial_arg_keeps_sdk_flags(tmp_path: Path) -> None:
    catalog, rest = split_initial_arg(["--listen", "127.0.0.1:0", "--data-dir", "/x"])
    assert catalog is DEFAULT_CATALOG
    assert rest == ["--listen", "127.0.0.1:0", "--data-dir", "/x"]

    path = tmp_path / "shop.json"
    path.write_text(json.dumps({"stock": {"sku-q": 4}, "accounts": {}}))
    catalog, rest = split_initial_arg(["--test-control", "--initial", str(path)])
    assert dict(catalog.stock) == {"sku-q": 4}
    assert rest == ["--test-control"]


def test_split_initial_arg_turns_a_bad_file_into_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 2, as for any configuration refused: SystemExit(message) exited 1."""
    path = tmp_path / "shop.json"
    path.write_text(json.dumps({"stock": {"sku-q": -4}, "accounts": {}}))
    for argv, expected in (
        (["--initial", str(path)], r"--initial: .*stock\['sku-q'\]"),
        (["--initial", str(tmp_path / "missing.json")], "--initial: cannot read"),
    ):
        with pytest.raises(SystemExit) as exited:
            split_initial_arg(argv)
        assert 2 == exited.value.code
        assert re.search(expected, capsys.readouterr().err), argv


def test_an_initial_file_that_cannot_be_read_is_named_by_the_setting_that_gave_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`initial = DIR` in [inventory] stopped the service with "--initial: [Errno 21] Is a
    directory: 'DIR'", naming a flag nobody gave, in Python's words. The setting that gave
    the path is named now (the key and file, or the variables), with what to give instead."""
    from participants.services import inventory, payment

    for name in [name for name in os.environ if name.startswith("DTM_")]:
        monkeypatch.delenv(name)
    directory = tmp_path / "shop"
    directory.mkdir()
    toml = tmp_path / "dtm.toml"
    toml.write_text(f'[inventory]\ninitial = "{directory}"\n', encoding="utf-8")

    def refusal(main: Callable[[list[str]], None], *args: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        assert 2 == exited.value.code
        message = capsys.readouterr().err.removeprefix("error: ")
        assert "Errno" not in message, message
        return message

    assert refusal(inventory.main, "--config", str(toml)).startswith(
        f"initial ([inventory] or [participant] of {toml}, or DTM_INVENTORY_INITIAL or "
        f"DTM_PARTICIPANT_INITIAL): cannot read {directory}: Is a directory; give the path of "
        "a JSON file"
    )
    monkeypatch.setenv("DTM_PARTICIPANT_INITIAL", str(directory))
    assert refusal(payment.main).startswith(
        f"initial (DTM_PAYMENT_INITIAL or DTM_PARTICIPANT_INITIAL): cannot read {directory}"
    )
    # An --initial given overrides the configured one: it is the one named.
    missing = tmp_path / "missing.json"
    assert refusal(inventory.main, "--config", str(toml), "--initial", str(missing)).startswith(
        f"--initial: cannot read {missing}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("module", "expected_type"),
    [
        ("inventory", InventoryService),
        ("orders", OrdersService),
        ("payment", PaymentService),
        ("notification", NotificationService),
    ],
)
def test_main_builds_the_service_and_hands_the_rest_to_the_sdk(
    module: str, expected_type: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "shop.json"
    path.write_text(
        json.dumps({"stock": {"sku-q": 4}, "accounts": {"acct-q": {"balance_cents": 9}}})
    )
    calls: list[tuple[Any, list[str] | None]] = []
    fake = types.ModuleType("participants.server")
    fake.run = lambda service, argv=None: calls.append((service, argv))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "participants.server", fake)
    main = __import__(f"participants.services.{module}", fromlist=["main"]).main
    main(["--initial", str(path), "--listen", "127.0.0.1:0"])
    [(service, argv)] = calls
    assert isinstance(service, expected_type)
    assert argv == ["--listen", "127.0.0.1:0"]
    if isinstance(service, InventoryService):
        assert stock_of(service) == {"sku-q": (4, 0, 0, 4)}
    if isinstance(service, PaymentService):
        assert list(service.accounts) == ["acct-q"]


# ---- inventory ----


def test_inventory_prepare_reserves_commit_sells() -> None:
    inventory = InventoryService({"sku-a": 10, "sku-b": 5})
    assert inventory.locks(reserve(("sku-a", 1))) == []
    assert inventory.prepare("t1/0", reserve(("sku-a", 3), ("sku-b", 5))) == Prepared()
    assert stock_of(inventory) == {"sku-a": (7, 3, 0, 10), "sku-b": (0, 5, 0, 5)}
    assert_stock_conserved(inventory)
    inventory.commit("t1/0", reserve(("sku-a", 3), ("sku-b", 5)))
    assert stock_of(inventory) == {"sku-a": (7, 0, 3, 10), "sku-b": (0, 0, 5, 5)}
    assert inventory.reservations == {}
    assert_stock_conserved(inventory)


def test_inventory_rollback_releases_the_reservation() -> None:
    inventory = InventoryService({"sku-a": 10})
    assert inventory.prepare("t1/0", reserve(("sku-a", 4))) == Prepared()
    inventory.rollback("t1/0", reserve(("sku-a", 4)))
    assert stock_of(inventory) == {"sku-a": (10, 0, 0, 10)}
    assert inventory.reservations == {}


def test_inventory_refusals_give_the_reason_and_change_nothing() -> None:
    inventory = InventoryService({"sku-a": 10, "sku-b": 2})
    before = state_bytes(inventory.snapshot())
    assert inventory.prepare("t1/0", reserve(("sku-a", 1), ("sku-zz", 1))) == Refused(
        "unknown sku sku-zz"
    )
    # The first line fits, the second does not: nothing at all is reserved.
    assert inventory.prepare("t2/0", reserve(("sku-a", 5), ("sku-b", 3))) == Refused(
        "out of stock: sku sku-b has 2 available, 3 requested"
    )
    assert state_bytes(inventory.snapshot()) == before


def test_inventory_concurrent_reservations_never_oversell() -> None:
    inventory = InventoryService({"sku-scarce": 3})
    assert inventory.prepare("t1/0", reserve(("sku-scarce", 2))) == Prepared()
    # t1 is undecided; its 2 units are not available to t2.
    assert inventory.prepare("t2/0", reserve(("sku-scarce", 2))) == Refused(
        "out of stock: sku sku-scarce has 1 available, 2 requested"
    )
    assert inventory.prepare("t3/0", reserve(("sku-scarce", 1))) == Prepared()
    assert stock_of(inventory) == {"sku-scarce": (0, 3, 0, 3)}
    inventory.rollback("t1/0", reserve(("sku-scarce", 2)))
    assert inventory.prepare("t2/0", reserve(("sku-scarce", 2))) == Prepared()
    assert_stock_conserved(inventory)


def test_inventory_prepare_is_idempotent_per_branch_and_decisions_of_unknown_keys_are_noops() -> (
    None
):
    inventory = InventoryService({"sku-a": 10})
    assert inventory.prepare("t1/0", reserve(("sku-a", 4))) == Prepared()
    assert inventory.prepare("t1/0", reserve(("sku-a", 4))) == Prepared()
    assert stock_of(inventory) == {"sku-a": (6, 4, 0, 10)}
    before = state_bytes(inventory.snapshot())
    inventory.commit("nope/0", reserve(("sku-a", 4)))
    inventory.rollback("nope/1", reserve(("sku-a", 4)))
    assert state_bytes(inventory.snapshot()) == before


def test_inventory_prepare_merges_repeated_skus_it_was_not_asked_to_validate() -> None:
    # validate refuses repeated SKUs; prepare must still be safe if handed one (log replay does
    # not validate), checking the total and not each line separately.
    inventory = InventoryService({"sku-a": 5})
    assert inventory.prepare("t1/0", reserve(("sku-a", 3), ("sku-a", 3))) == Refused(
        "out of stock: sku sku-a has 5 available, 6 requested"
    )
    assert inventory.prepare("t2/0", reserve(("sku-a", 2), ("sku-a", 3))) == Prepared()
    assert inventory.reservations == {"t2/0": {"sku-a": 5}}


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        (reserve(), "no lines"),
        (
            reserve(*[(f"sku-{i}", 1) for i in range(limits.LINES_PER_OPERATION_MAX + 1)]),
            "too many",
        ),
        (reserve(("", 1)), "line 1: sku is missing"),
        (reserve(("sku a", 1)), "line 1: sku 'sku a' is malformed"),
        (reserve(("x" * 129, 1)), "malformed"),
        (reserve(("sku-a", 1), ("sku-b", 0)), "line 2: quantity of sku-b must be between 1 and"),
        (reserve(("sku-a", -3)), "got -3"),
        (reserve(("sku-a", limits.QUANTITY_MAX + 1)), "must be between 1 and"),
        (reserve(("sku-a", 1), ("sku-a", 2)), "line 2: sku sku-a appears more than once"),
    ],
)
def test_inventory_validate_refuses_malformed_operations(
    operation: shop_pb2.ReserveStock, message: str
) -> None:
    with pytest.raises(InvalidOperation, match=message):
        InventoryService().validate(operation)


def test_inventory_validate_accepts_the_bounds() -> None:
    lines = [(f"sku-{i}", 1) for i in range(limits.LINES_PER_OPERATION_MAX - 1)]
    InventoryService().validate(reserve(*lines, ("sku-max", limits.QUANTITY_MAX)))


def test_inventory_snapshot_round_trip_keeps_reservations() -> None:
    inventory = InventoryService({"sku-a": 10, "sku-b": 4})
    inventory.prepare("t1/0", reserve(("sku-a", 3)))
    inventory.prepare("t2/0", reserve(("sku-a", 1), ("sku-b", 4)))
    inventory.commit("t2/0", reserve(("sku-a", 1), ("sku-b", 4)))
    snapshot = state_bytes(inventory.snapshot())

    restored = InventoryService({})
    restored.restore(snapshot)
    assert state_bytes(restored.snapshot()) == snapshot
    assert stock_of(restored) == stock_of(inventory)
    assert restored.reservations == {"t1/0": {"sku-a": 3}}
    # The tentative reservation survives: its decision still applies after the restart.
    restored.commit("t1/0", reserve(("sku-a", 3)))
    assert stock_of(restored)["sku-a"] == (6, 0, 4, 10)
    assert_stock_conserved(restored)


def test_inventory_restore_refuses_a_reservation_of_an_unknown_sku() -> None:
    """A reservation whose SKU the snapshot does not list was restored, and its branch's
    decision then raised KeyError in commit or rollback, which must not fail. Refused at
    restore instead (the start names the record), as payment refuses a hold of an unknown
    account, and the state is left as it was."""
    inventory = InventoryService({"sku-a": 10})
    inventory.prepare("t1/0", reserve(("sku-a", 3)))
    before = state_bytes(inventory.snapshot())
    document = json.loads(before)
    document["reservations"]["t2/0"] = {"sku-gone": 1}
    with pytest.raises(ValueError, match="branch t2/0 reserves unknown sku 'sku-gone'"):
        inventory.restore(json.dumps(document).encode())
    assert state_bytes(inventory.snapshot()) == before


@pytest.mark.parametrize(
    "service",
    [InventoryService(), OrdersService(), PaymentService(), NotificationService()],
    ids=lambda s: s.name,
)
def test_restore_refuses_foreign_or_unknown_snapshots(service: Any) -> None:
    other = NotificationService() if service.name != "notification" else OrdersService()
    with pytest.raises(ValueError, match="belongs to service"):
        service.restore(state_bytes(other.snapshot()))
    future = json.loads(state_bytes(service.snapshot()))
    future["format"] = SNAPSHOT_FORMAT + 1
    with pytest.raises(ValueError, match="format"):
        service.restore(json.dumps(future).encode())
    with pytest.raises(ValueError, match="not valid JSON"):
        service.restore(b"\xff\x00")


# ---- orders ----


def test_orders_prepare_creates_pending_commit_confirms() -> None:
    orders = OrdersService()
    assert orders.prepare("txn-1/0", order()) == Prepared()
    [pending] = orders.all_orders()
    assert pending.state == shop_pb2.ORDER_STATE_PENDING
    assert pending.transaction_id == "txn-1"
    assert pending.customer_id == "cust-1"
    assert [(line.sku, line.quantity) for line in pending.lines] == [("sku-apple", 2)]
    assert pending.amount_cents == 1_000
    orders.commit("txn-1/0", order())
    [confirmed] = orders.all_orders()
    assert confirmed.state == shop_pb2.ORDER_STATE_CONFIRMED
    assert orders.pending == {}


def test_orders_refuse_duplicates_while_pending_and_once_confirmed() -> None:
    orders = OrdersService()
    assert orders.prepare("txn-1/0", order()) == Prepared()
    assert orders.prepare("txn-2/0", order(customer_id="other")) == Refused(duplicate("o-1"))
    orders.commit("txn-1/0", order())
    # The reason says what to do, not only what is wrong.
    assert Refused(
        "duplicate order id o-1: an order with this id exists; choose another order id, or "
        "look the order up (ListOrders)"
    ) == orders.prepare("txn-3/0", order())
    assert [o.transaction_id for o in orders.all_orders()] == ["txn-1"]


def test_orders_rollback_frees_the_id_and_keeps_a_cancelled_record() -> None:
    orders = OrdersService()
    orders.prepare("txn-1/0", order())
    orders.rollback("txn-1/0", order())
    assert orders.orders == {}
    [cancelled] = orders.all_orders()
    assert cancelled.state == shop_pb2.ORDER_STATE_CANCELLED
    assert cancelled.transaction_id == "txn-1"
    # The retry with the same order id goes through, and is the one ListOrders shows: each
    # order id appears once, as its latest attempt.
    assert orders.prepare("txn-2/0", order()) == Prepared()
    assert [(o.transaction_id, o.state) for o in orders.all_orders()] == [
        ("txn-2", shop_pb2.ORDER_STATE_PENDING)
    ]
    orders.rollback("txn-2/0", order())
    assert orders.prepare("txn-3/0", order()) == Prepared()
    orders.commit("txn-3/0", order())
    assert [(o.transaction_id, o.state) for o in orders.all_orders()] == [
        ("txn-3", shop_pb2.ORDER_STATE_CONFIRMED)
    ]


def test_orders_cancelled_record_is_bounded() -> None:
    orders = OrdersService(cancelled_kept=2)
    for n in range(3):
        orders.prepare(f"txn-{n}/0", order(order_id=f"o-{n}"))
        orders.rollback(f"txn-{n}/0", order(order_id=f"o-{n}"))
    assert [o.order_id for o in orders.all_orders()] == ["o-1", "o-2"]


def test_orders_lock_the_order_id_exclusively() -> None:
    # A second claim that gives up waiting is told the id is taken, not "lock timeout".
    assert OrdersService().locks(order(order_id="o-42")) == [
        LockRequest(
            "order:o-42",
            LockMode.EXCLUSIVE,
            "order id o-42 is already being created by a transaction not decided yet: choose "
            "another order id, or look the order up (ListOrders) once that one is decided",
        )
    ]


def test_orders_pages_read_each_order_once_while_orders_are_cancelled_between_them() -> None:
    """A page token was an offset into cancelled + live orders: a cancellation between two
    pages moved its order from the live list to the cancelled one, every row before it in the
    live list shifted by one, and rows were read twice (a fault soak's check saw ten orders
    "listed twice"). Now the token is the last place read, and a place never changes."""

    async def read(service: OrdersService, token: str) -> shop_pb2.ListOrdersResponse:
        request = shop_pb2.ListOrdersRequest(page_size=3, page_token=token)
        return await OrdersReadApi(service).ListOrders(request, None)  # type: ignore[arg-type]

    async def scenario() -> None:
        orders = OrdersService()
        for n in range(6):
            orders.prepare(f"txn-{n}/0", order(order_id=f"o-{n}"))
        first = await read(orders, "")
        orders.rollback("txn-4/0", order(order_id="o-4"))  # between the two pages
        orders.rollback("txn-1/0", order(order_id="o-1"))  # an order already read
        rest = await read(orders, first.next_page_token)
        read_ids = [o.order_id for o in (*first.orders, *rest.orders)]
        assert read_ids == [f"o-{n}" for n in range(6)]
        assert rest.orders[1].state == shop_pb2.ORDER_STATE_CANCELLED
        # A snapshot keeps the places: the same token reads the same rest after a restart.
        restored = OrdersService()
        restored.restore(state_bytes(orders.snapshot()))
        again = await read(restored, first.next_page_token)
        assert [o.order_id for o in again.orders] == ["o-3", "o-4", "o-5"]
        # A new order goes after every restored one.
        restored.prepare("txn-9/0", order(order_id="o-9"))
        assert [o.order_id for o in restored.all_orders()][-1] == "o-9"

    asyncio.run(scenario())


def test_orders_pages_list_a_retried_order_once() -> None:
    """A paging pass lists each order id once while an order already read is retried.

    A retry took a new place (after every order), so an order read on page one as CANCELLED
    came back on page two as its retry, and the invariant checker, which reads an id listed
    twice as a violation, reported one. Now the retry keeps the cancelled attempt's place."""

    async def read(service: OrdersService, token: str) -> shop_pb2.ListOrdersResponse:
        request = shop_pb2.ListOrdersRequest(page_size=2, page_token=token)
        return await OrdersReadApi(service).ListOrders(request, None)  # type: ignore[arg-type]

    async def scenario() -> None:
        orders = OrdersService()
        for n in range(4):
            orders.prepare(f"txn-{n}/0", order(order_id=f"o-{n}"))
        orders.rollback("txn-0/0", order(order_id="o-0"))
        first = await read(orders, "")
        assert [(o.order_id, o.state) for o in first.orders] == [
            ("o-0", shop_pb2.ORDER_STATE_CANCELLED),
            ("o-1", shop_pb2.ORDER_STATE_PENDING),
        ]
        # Between the pages: o-0 (read) is retried, o-3 (not read yet) rolled back and retried.
        orders.prepare("txn-5/0", order(order_id="o-0"))
        orders.rollback("txn-3/0", order(order_id="o-3"))
        orders.prepare("txn-6/0", order(order_id="o-3"))
        orders.prepare("txn-7/0", order(order_id="o-7"))
        rest = await read(orders, first.next_page_token)
        last = await read(orders, rest.next_page_token)
        read_ids = [o.order_id for o in (*first.orders, *rest.orders, *last.orders)]
        assert read_ids == ["o-0", "o-1", "o-2", "o-3", "o-7"]
        assert last.next_page_token == ""
        # The same order in one read, and after a restart (the places are in the snapshot).
        assert [o.order_id for o in orders.all_orders()] == read_ids
        restored = OrdersService()
        restored.restore(state_bytes(orders.snapshot()))
        assert [o.order_id for o in restored.all_orders()] == read_ids
        again = await read(restored, first.next_page_token)
        assert [o.order_id for o in again.orders] == ["o-2", "o-3"]

    asyncio.run(scenario())


def test_orders_prepare_is_idempotent_per_branch() -> None:
    orders = OrdersService()
    assert orders.prepare("txn-1/0", order()) == Prepared()
    assert orders.prepare("txn-1/0", order()) == Prepared()
    assert len(orders.all_orders()) == 1
    before = state_bytes(orders.snapshot())
    orders.commit("nope/0", order())
    orders.rollback("nope/0", order())
    assert state_bytes(orders.snapshot()) == before


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        (order(order_id=""), "order_id is missing"),
        (order(order_id="o 1"), "order_id 'o 1' is malformed"),
        (order(customer_id=""), "customer_id is missing"),
        (order(customer_id="c/1"), "customer_id 'c/1' is malformed"),
        (order(amount_cents=-1), "amount_cents must be between 0 and"),
        (order(amount_cents=limits.AMOUNT_CENTS_MAX + 1), "amount_cents must be between 0 and"),
        (order(lines=()), "no lines"),
        (order(lines=(("sku-a", 0),)), "quantity of sku-a"),
        (order(lines=(("sku-a", 1), ("sku-a", 1))), "appears more than once"),
    ],
)
def test_orders_validate_refuses_malformed_operations(
    operation: shop_pb2.CreateOrder, message: str
) -> None:
    with pytest.raises(InvalidOperation, match=message):
        OrdersService().validate(operation)


def test_orders_validate_accepts_free_orders() -> None:
    OrdersService().validate(order(amount_cents=0))
    OrdersService().validate(order(amount_cents=limits.AMOUNT_CENTS_MAX))


def test_orders_snapshot_round_trip_keeps_pending_orders_and_their_order() -> None:
    orders = OrdersService()
    orders.prepare("txn-b/0", order(order_id="o-b"))
    orders.prepare("txn-a/0", order(order_id="o-a"))
    orders.commit("txn-a/0", order(order_id="o-a"))
    orders.prepare("txn-c/0", order(order_id="o-c"))
    orders.rollback("txn-c/0", order(order_id="o-c"))
    snapshot = state_bytes(orders.snapshot())

    restored = OrdersService()
    restored.restore(snapshot)
    assert state_bytes(restored.snapshot()) == snapshot
    assert restored.all_orders() == orders.all_orders()
    assert restored.prepare("txn-x/0", order(order_id="o-b")) == Refused(duplicate("o-b"))
    restored.commit("txn-b/0", order(order_id="o-b"))
    # By creation, each order at its place (kept in the snapshot), cancelled or not.
    assert [(o.order_id, o.state) for o in restored.all_orders()] == [
        ("o-b", shop_pb2.ORDER_STATE_CONFIRMED),
        ("o-a", shop_pb2.ORDER_STATE_CONFIRMED),
        ("o-c", shop_pb2.ORDER_STATE_CANCELLED),
    ]


def test_orders_restore_refuses_a_pending_branch_without_its_order() -> None:
    document = json.loads(state_bytes(OrdersService().snapshot()))
    document["pending"] = {"txn-1/0": "o-missing"}
    with pytest.raises(ValueError, match="o-missing"):
        OrdersService().restore(json.dumps(document).encode())


def test_orders_restore_leaves_the_state_alone_when_the_snapshot_is_bad() -> None:
    orders = OrdersService()
    orders.prepare("txn-1/0", order())
    before = state_bytes(orders.snapshot())
    document = json.loads(before)
    document["cancelled"] = document["orders"]  # o-1 both live and cancelled
    with pytest.raises(ValueError, match="both cancelled and live"):
        orders.restore(json.dumps(document).encode())
    assert state_bytes(orders.snapshot()) == before


# ---- payment ----


def test_payment_prepare_holds_commit_captures() -> None:
    payment = PaymentService({"acct-a": AccountSpec(10_000)})
    assert payment.locks(charge("acct-a")) == []
    assert payment.prepare("txn-1/1", charge("acct-a", 2_500, "o-7")) == Prepared()
    a = payment.accounts["acct-a"]
    assert (a.balance_cents, a.held_cents, a.captured_cents) == (7_500, 2_500, 0)
    assert_money_conserved(payment)
    payment.commit("txn-1/1", charge("acct-a", 2_500, "o-7"))
    assert (a.balance_cents, a.held_cents, a.captured_cents) == (7_500, 0, 2_500)
    [capture] = payment.listing().captures
    assert capture == shop_pb2.Capture(
        order_id="o-7", account_id="acct-a", amount_cents=2_500, transaction_id="txn-1"
    )
    assert_money_conserved(payment)


def test_payment_rollback_releases_the_hold() -> None:
    payment = PaymentService({"acct-a": AccountSpec(10_000)})
    payment.prepare("txn-1/1", charge("acct-a", 2_500))
    payment.rollback("txn-1/1", charge("acct-a", 2_500))
    a = payment.accounts["acct-a"]
    assert (a.balance_cents, a.held_cents, a.captured_cents) == (10_000, 0, 0)
    assert payment.captures == []


def test_payment_refusals_give_the_reason_and_change_nothing() -> None:
    payment = PaymentService()
    before = state_bytes(payment.snapshot())
    assert payment.prepare("t1/0", charge("acct-nobody")) == Refused("unknown account acct-nobody")
    assert payment.prepare("t2/0", charge("acct-blocked", 1)) == Refused(
        "payment declined for account acct-blocked"
    )
    assert payment.prepare("t3/0", charge("acct-poor", 501)) == Refused(
        "insufficient funds: account acct-poor has 500 cents available, 501 requested"
    )
    assert state_bytes(payment.snapshot()) == before
    assert payment.prepare("t4/0", charge("acct-poor", 500)) == Prepared()


def test_payment_holds_isolate_concurrent_charges() -> None:
    payment = PaymentService({"acct-a": AccountSpec(1_000)})
    assert payment.prepare("t1/0", charge("acct-a", 600)) == Prepared()
    assert payment.prepare("t2/0", charge("acct-a", 600)) == Refused(
        "insufficient funds: account acct-a has 400 cents available, 600 requested"
    )
    payment.rollback("t1/0", charge("acct-a", 600))
    assert payment.prepare("t2/0", charge("acct-a", 600)) == Prepared()
    assert_money_conserved(payment)


def test_payment_prepare_is_idempotent_per_branch() -> None:
    payment = PaymentService({"acct-a": AccountSpec(1_000)})
    assert payment.prepare("t1/0", charge("acct-a", 600)) == Prepared()
    assert payment.prepare("t1/0", charge("acct-a", 600)) == Prepared()
    assert payment.accounts["acct-a"].held_cents == 600
    before = state_bytes(payment.snapshot())
    payment.commit("nope/0", charge("acct-a", 600))
    payment.rollback("nope/0", charge("acct-a", 600))
    assert state_bytes(payment.snapshot()) == before


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        (charge(account_id=""), "account_id is missing"),
        (charge(account_id="acct a"), "account_id 'acct a' is malformed"),
        (charge(amount=0), "amount_cents is 0: a free order has no payment branch"),
        (charge(amount=-5), "got -5"),
        (charge(amount=limits.AMOUNT_CENTS_MAX + 1), "amount_cents must be between 1 and"),
        (charge(order_id=""), "order_id is missing"),
        (charge(order_id="o#1"), "order_id 'o#1' is malformed"),
    ],
)
def test_payment_validate_refuses_malformed_operations(
    operation: shop_pb2.ChargePayment, message: str
) -> None:
    with pytest.raises(InvalidOperation, match=message):
        PaymentService().validate(operation)


def test_payment_snapshot_round_trip_keeps_holds_and_captures() -> None:
    payment = PaymentService()
    payment.prepare("t1/1", charge("acct-alice", 300, "o-1"))
    payment.prepare("t2/1", charge("acct-bob", 700, "o-2"))
    payment.commit("t2/1", charge("acct-bob", 700, "o-2"))
    snapshot = state_bytes(payment.snapshot())

    restored = PaymentService({})
    restored.restore(snapshot)
    assert state_bytes(restored.snapshot()) == snapshot
    assert restored.listing() == payment.listing()
    assert restored.accounts["acct-blocked"].declines
    restored.commit("t1/1", charge("acct-alice", 300, "o-1"))
    assert [c.order_id for c in restored.captures] == ["o-2", "o-1"]
    assert_money_conserved(restored)


# ---- notification ----


def test_notification_stages_then_sends_on_commit() -> None:
    notification = NotificationService()
    assert notification.locks(note()) == []
    assert notification.prepare("txn-1/3", note(body="your order shipped")) == Prepared()
    # Staged is not sent: nothing is in the outbox before the decision.
    assert notification.listing() == shop_pb2.ListSentResponse(staged=1)
    notification.commit("txn-1/3", note(body="your order shipped"))
    assert notification.listing() == shop_pb2.ListSentResponse(
        sent=[
            shop_pb2.SentNotification(
                order_id="o-1",
                recipient="alice@example.com",
                body="your order shipped",
                transaction_id="txn-1",
            )
        ],
        staged=0,
    )


def test_notification_rollback_drops_the_message() -> None:
    notification = NotificationService()
    notification.prepare("txn-1/3", note())
    notification.rollback("txn-1/3", note())
    assert notification.listing() == shop_pb2.ListSentResponse(staged=0)


def test_notification_commit_is_exactly_once() -> None:
    notification = NotificationService()
    notification.prepare("txn-1/3", note())
    notification.prepare("txn-1/3", note())
    notification.commit("txn-1/3", note())
    notification.commit("txn-1/3", note())
    notification.commit("unknown/0", note())
    assert len(notification.outbox) == 1


@pytest.mark.parametrize(
    ("operation", "message"),
    [
        (note(order_id=""), "order_id is missing"),
        (note(order_id="o 1"), "order_id 'o 1' is malformed"),
        (note(recipient=""), "recipient is missing"),
        (note(recipient=" \t"), r"^recipient is blank: give the address to notify$"),
        (
            note(recipient="a@example.com\r\nBcc: b@example.com"),
            r"^recipient 'a@example.com\\r\\nBcc: b@example.com' holds a line break or another "
            r"unprintable character: give one address, on one line$",
        ),
        (note(recipient="a\x00b"), "holds a line break or another unprintable character"),
        (note(recipient="r" * (limits.TEXT_FIELD_LENGTH_MAX + 1)), "recipient is 1025 characters"),
        (note(body="b" * (limits.TEXT_FIELD_LENGTH_MAX + 1)), "body is 1025 characters"),
    ],
)
def test_notification_validate_refuses_malformed_operations(
    operation: shop_pb2.SendNotification, message: str
) -> None:
    with pytest.raises(InvalidOperation, match=message):
        NotificationService().validate(operation)


def test_notification_validate_accepts_the_bounds() -> None:
    NotificationService().validate(note(body=""))
    # A name with its address, in any script, is printable; only the recipient is checked so.
    NotificationService().validate(
        note(recipient="Zoë Ø <zoe@example.com>", body="line 1\nline 2\ttab")
    )
    NotificationService().validate(
        note(recipient="r" * limits.TEXT_FIELD_LENGTH_MAX, body="é" * limits.TEXT_FIELD_LENGTH_MAX)
    )


def test_notification_snapshot_round_trip_keeps_staged_messages() -> None:
    notification = NotificationService()
    notification.prepare("t1/0", note(order_id="o-1", body="première ✓"))
    notification.prepare("t2/0", note(order_id="o-2"))
    notification.commit("t2/0", note(order_id="o-2"))
    snapshot = state_bytes(notification.snapshot())

    restored = NotificationService()
    restored.restore(snapshot)
    assert state_bytes(restored.snapshot()) == snapshot
    assert restored.listing() == notification.listing()
    restored.commit("t1/0", note(order_id="o-1"))
    assert [(s.order_id, s.body) for s in restored.outbox] == [
        ("o-2", "hi"),
        ("o-1", "première ✓"),
    ]


# ---- invariants and determinism over random histories ----

# One step of a history: (branch number, action, argument index); see `_apply`.
steps = st.lists(
    st.tuples(
        st.integers(0, 7), st.sampled_from(["prepare", "commit", "rollback"]), st.integers(0, 5)
    ),
    max_size=60,
)

SKUS = ["sku-apple", "sku-pear", "sku-scarce", "sku-soldout", "sku-unknown"]
ACCOUNTS = ["acct-alice", "acct-poor", "acct-blocked", "acct-nobody"]


def _operations(choice: int) -> tuple[Message, ...]:
    """A deterministic operation per service for an argument index."""
    sku_a, sku_b = SKUS[choice % len(SKUS)], SKUS[(choice + 1) % len(SKUS)]
    return (
        reserve((sku_a, 1 + choice), (sku_b, 1)),
        order(order_id=f"o-{choice % 3}", amount_cents=choice * 100),
        charge(ACCOUNTS[choice % len(ACCOUNTS)], 100 * (1 + choice**3), f"o-{choice}"),
        note(order_id=f"o-{choice}", body=f"body {choice}"),
    )


def _services() -> tuple[InventoryService, OrdersService, PaymentService, NotificationService]:
    return InventoryService(), OrdersService(), PaymentService(), NotificationService()


Prepared_ = dict[tuple[int, int], Message]  # (service number, branch) -> its operation


def _run(
    history: list[tuple[int, str, int]],
    services: tuple[Any, ...],
    prepared: Prepared_ | None = None,
) -> Prepared_:
    """Drive the services the way the SDK does: decisions only for prepared branches.

    Returns the branches left prepared (what the SDK's log would know as in doubt).
    """
    prepared = {} if prepared is None else prepared
    for branch, action, choice in history:
        for number, (service, operation) in enumerate(
            zip(services, _operations(choice), strict=True)
        ):
            key = f"txn-{branch}/{number}"
            held = prepared.get((number, branch))
            if action == "prepare" and held is None:
                if isinstance(service.prepare(key, operation), Prepared):
                    prepared[(number, branch)] = operation
            elif action == "commit" and held is not None:
                service.commit(key, held)
                del prepared[(number, branch)]
            elif action == "rollback" and held is not None:
                service.rollback(key, held)
                del prepared[(number, branch)]
    return prepared


@settings(max_examples=200, deadline=None)
@given(steps)
def test_random_histories_conserve_stock_and_money(history: list[tuple[int, str, int]]) -> None:
    inventory, orders, payment, notification = services = _services()
    prepared = _run(history, services)
    assert_stock_conserved(inventory)
    assert_money_conserved(payment)
    # Tentative state exists exactly for the prepared, undecided branches.
    tentative: list[Mapping[str, object]] = [
        inventory.reservations,
        orders.pending,
        payment.holds,
        notification.staged,
    ]
    for number, held in enumerate(tentative):
        assert set(held) == {f"txn-{b}/{n}" for n, b in prepared if n == number}
    assert all(orders.orders[o].state == "PENDING" for o in orders.pending.values())
    listed = [o.order_id for o in orders.all_orders()]
    assert len(listed) == len(set(listed)), "an order id is listed twice"
    # Every capture and every sent message belongs to a committed branch: never a staged one.
    assert len(payment.captures) + len(payment.holds) <= len(history)
    assert len(notification.outbox) + len(notification.staged) <= len(history)


@settings(max_examples=100, deadline=None)
@given(steps, st.integers(0, 60))
def test_replay_is_deterministic_and_snapshots_resume_identically(
    history: list[tuple[int, str, int]], cut: int
) -> None:
    first = _services()
    _run(history, first)
    second = _services()
    _run(history, second)
    assert [state_bytes(s.snapshot()) for s in first] == [state_bytes(s.snapshot()) for s in second]

    # A restart mid-history: snapshot, restore into fresh services, carry on; same end state.
    # Branches prepared before the cut are decided after it, so tentative state must survive.
    head: tuple[Any, ...] = _services()
    in_doubt = _run(history[:cut], head)
    resumed: tuple[Any, ...] = _services()
    for old, new in zip(head, resumed, strict=True):
        new.restore(state_bytes(old.snapshot()))
    _run(history[cut:], resumed, in_doubt)
    assert [state_bytes(s.snapshot()) for s in resumed] == [
        state_bytes(s.snapshot()) for s in first
    ]


# ---- each service served in-process by the SDK, read over real gRPC ----


def serve(
    tmp_path: Path,
    service: Any,
    scenario: Callable[[grpc.aio.Channel], Awaitable[T]],
    **config: Any,
) -> T:
    # Imported here so that the business-logic tests above run even while the SDK's own
    # dependencies (the write-ahead log) are unavailable.
    from participants.server import ParticipantConfig, ParticipantServer

    async def main() -> T:
        server = ParticipantServer(
            service, ParticipantConfig(data_dir=tmp_path, listen="127.0.0.1:0", **config)
        )
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(channel)
        finally:
            await server.stop()

    return asyncio.run(main())


def packed(operation: Message) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(operation)
    return value


async def prepare(
    channel: grpc.aio.Channel, transaction_id: str, operation: Message, branch: int = 0
) -> participant_pb2.PrepareResponse:
    stub = participant_pb2_grpc.ParticipantStub(channel)
    response: participant_pb2.PrepareResponse = await stub.Prepare(
        participant_pb2.PrepareRequest(
            transaction_id=transaction_id, branch=branch, operation=packed(operation)
        ),
        timeout=10,
    )
    return response


async def decide(channel: grpc.aio.Channel, transaction_id: str, commit: bool) -> None:
    stub = participant_pb2_grpc.ParticipantStub(channel)
    if commit:
        await stub.Commit(participant_pb2.CommitRequest(transaction_id=transaction_id), timeout=10)
    else:
        await stub.Rollback(
            participant_pb2.RollbackRequest(transaction_id=transaction_id), timeout=10
        )


def test_inventory_served_by_the_sdk(tmp_path: Path) -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        stub = shop_pb2_grpc.InventoryStub(channel)
        vote = await prepare(channel, "txn-1", reserve(("sku-apple", 5)))
        assert vote.vote == coordinator_pb2.VOTE_PREPARED
        refused = await prepare(channel, "txn-2", reserve(("sku-scarce", 4)))
        assert refused.vote == coordinator_pb2.VOTE_REFUSED
        assert refused.reason == "out of stock: sku sku-scarce has 3 available, 4 requested"
        await decide(channel, "txn-1", commit=True)

        everything = await stub.GetStock(shop_pb2.GetStockRequest(), timeout=10)
        assert [level.sku for level in everything.levels] == sorted(DEFAULT_CATALOG.stock)
        some = await stub.GetStock(shop_pb2.GetStockRequest(skus=["sku-apple"]), timeout=10)
        assert list(some.levels) == [
            shop_pb2.StockLevel(sku="sku-apple", available=45, reserved=0, sold=5, received=50)
        ]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.GetStock(shop_pb2.GetStockRequest(skus=["sku-nope"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert raised.value.details() == "unknown sku sku-nope"

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await prepare(channel, "txn-3", reserve(("sku-apple", 0)))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    serve(tmp_path, InventoryService(), scenario)

    # Restart on the same data directory with a fresh service: the log rebuilds the state.
    async def after_restart(channel: grpc.aio.Channel) -> None:
        stub = shop_pb2_grpc.InventoryStub(channel)
        some = await stub.GetStock(shop_pb2.GetStockRequest(skus=["sku-apple"]), timeout=10)
        assert (some.levels[0].available, some.levels[0].sold) == (45, 5)

    serve(tmp_path, InventoryService(), after_restart)


def test_orders_served_by_the_sdk_isolates_the_same_order_id(tmp_path: Path) -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        first = await prepare(channel, "txn-1", order())
        assert first.vote == coordinator_pb2.VOTE_PREPARED
        # A second transaction for the same order id waits on the order lock...
        second = asyncio.ensure_future(prepare(channel, "txn-2", order()))
        await asyncio.sleep(0.2)
        assert not second.done()
        # ...and, once the first rolls back, takes the freed id.
        await decide(channel, "txn-1", commit=False)
        assert (await second).vote == coordinator_pb2.VOTE_PREPARED
        await decide(channel, "txn-2", commit=True)
        third = await prepare(channel, "txn-3", order())
        assert third.vote == coordinator_pb2.VOTE_REFUSED
        assert third.reason == duplicate("o-1")
        assert (await prepare(channel, "txn-4", order(order_id="o-2"))).vote == (
            coordinator_pb2.VOTE_PREPARED
        )
        await decide(channel, "txn-4", commit=False)

        listed = await shop_pb2_grpc.OrdersStub(channel).ListOrders(
            shop_pb2.ListOrdersRequest(), timeout=10
        )
        assert [(o.order_id, o.transaction_id, o.state) for o in listed.orders] == [
            ("o-1", "txn-2", shop_pb2.ORDER_STATE_CONFIRMED),
            ("o-2", "txn-4", shop_pb2.ORDER_STATE_CANCELLED),
        ]

    serve(tmp_path, OrdersService(), scenario, lock_wait_ms=10_000)


def test_payment_served_by_the_sdk(tmp_path: Path) -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        assert (await prepare(channel, "txn-1", charge("acct-bob", 1_500, "o-9"))).vote == (
            coordinator_pb2.VOTE_PREPARED
        )
        declined = await prepare(channel, "txn-2", charge("acct-blocked", 1))
        assert declined.vote == coordinator_pb2.VOTE_REFUSED
        assert declined.reason == "payment declined for account acct-blocked"
        await decide(channel, "txn-1", commit=True)
        listed = await shop_pb2_grpc.PaymentStub(channel).ListAccounts(
            shop_pb2.ListAccountsRequest(), timeout=10
        )
        bob = next(a for a in listed.accounts if a.account_id == "acct-bob")
        assert (bob.balance_cents, bob.held_cents, bob.captured_cents, bob.initial_cents) == (
            48_500,
            0,
            1_500,
            50_000,
        )
        assert list(listed.captures) == [
            shop_pb2.Capture(
                order_id="o-9", account_id="acct-bob", amount_cents=1_500, transaction_id="txn-1"
            )
        ]

    serve(tmp_path, PaymentService(), scenario)


def test_notification_served_by_the_sdk(tmp_path: Path) -> None:
    async def scenario(channel: grpc.aio.Channel) -> None:
        stub = shop_pb2_grpc.NotificationStub(channel)
        assert (await prepare(channel, "txn-1", note(body="sent"))).vote == (
            coordinator_pb2.VOTE_PREPARED
        )
        assert (await prepare(channel, "txn-2", note(body="dropped"))).vote == (
            coordinator_pb2.VOTE_PREPARED
        )
        staged = await stub.ListSent(shop_pb2.ListSentRequest(), timeout=10)
        assert (list(staged.sent), staged.staged) == ([], 2)
        await decide(channel, "txn-1", commit=True)
        await decide(channel, "txn-2", commit=False)
        listed = await stub.ListSent(shop_pb2.ListSentRequest(), timeout=10)
        assert [(s.body, s.transaction_id) for s in listed.sent] == [("sent", "txn-1")]
        assert listed.staged == 0

    serve(tmp_path, NotificationService(), scenario)


def numbered(number: int) -> shop_pb2.StockLine:
    return shop_pb2.StockLine(sku=f"sku-{number}", quantity=number)


def test_page_walks_a_list_in_bounded_pages() -> None:
    from participants.services import PAGE_SIZE_DEFAULT, page

    def numbers(listed: list[shop_pb2.StockLine]) -> list[int]:
        return [line.quantity for line in listed]

    items = list(range(5))
    first, token = page(items, numbered, 2, "")
    assert ([0, 1], "2") == (numbers(first), token)
    second, token = page(items, numbered, 2, token)
    third, token = page(items, numbered, 2, token)
    assert ([2, 3], [4], "") == (numbers(second), numbers(third), token)
    many = list(range(PAGE_SIZE_DEFAULT + 5))
    assert PAGE_SIZE_DEFAULT == len(page(many, numbered, 10**9, "")[0])
    with pytest.raises(InvalidOperation):
        page(items, numbered, 2, "not-a-token")


def test_a_page_holds_what_fits_one_answer_and_its_token_continues_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page of items over the message limit was refused (RESOURCE_EXHAUSTED); now it holds
    as many as fit, and its token is the offset of the first one left out."""
    from participants.services import page

    item_bytes = numbered(10).ByteSize() + limits.REPEATED_ELEMENT_FRAMING_BYTES
    monkeypatch.setattr(limits, "ANSWER_BYTES_MAX", 3 * item_bytes)
    items = list(range(10, 17))
    pages = []
    token = ""
    while True:  # bounded: 7 items, 3 a page
        listed, token = page(items, numbered, 0, token)
        pages.append([line.quantity for line in listed])
        if not token:
            break
    assert [[10, 11, 12], [13, 14, 15], [16]] == pages


# Each paginated read: its service, and a call of it with a given page_token.
PAGED_READS: dict[str, tuple[Callable[[], Any], Callable[[grpc.aio.Channel, str], Any]]] = {
    "GetStock": (
        InventoryService,
        lambda channel, token: shop_pb2_grpc.InventoryStub(channel).GetStock(
            shop_pb2.GetStockRequest(page_token=token), timeout=10
        ),
    ),
    "ListOrders": (
        OrdersService,
        lambda channel, token: shop_pb2_grpc.OrdersStub(channel).ListOrders(
            shop_pb2.ListOrdersRequest(page_token=token), timeout=10
        ),
    ),
    "ListAccounts": (
        PaymentService,
        lambda channel, token: shop_pb2_grpc.PaymentStub(channel).ListAccounts(
            shop_pb2.ListAccountsRequest(page_token=token), timeout=10
        ),
    ),
    "ListSent": (
        NotificationService,
        lambda channel, token: shop_pb2_grpc.NotificationStub(channel).ListSent(
            shop_pb2.ListSentRequest(page_token=token), timeout=10
        ),
    ),
}


@pytest.mark.parametrize("read_name", sorted(PAGED_READS))
def test_a_page_token_that_is_not_an_ascii_offset_is_invalid_argument(
    tmp_path: Path, read_name: str
) -> None:
    # "²".isdigit() is true but int("²") fails, and int() refuses more than 4,300 digits: both
    # failed the read with UNKNOWN (found by a bug hunt).
    make_service, read = PAGED_READS[read_name]

    async def scenario(channel: grpc.aio.Channel) -> None:
        for token in ("\u00b2", "9" * 5_000, "not-a-token"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await read(channel, token)
            details = raised.value.details() or ""
            assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code(), details
            assert f"page_token {token[:20]!r} was not issued by this service" in details
            assert "next_page_token" in details
            assert len(details) < 200

    serve(tmp_path, make_service(), scenario)


def test_a_default_page_of_the_largest_orders_comes_back_short_and_pages_every_order_once(
    tmp_path: Path,
) -> None:
    """400 orders of 100 lines with 128-character SKUs take about 5.4 MB at the default page
    size: ListOrders was refused (RESOURCE_EXHAUSTED "pass a smaller page_size"). Now the page
    holds the orders that fit, with a token that continues after them: across the pages every
    order comes once, in creation order, also while one is cancelled between two pages."""
    service = OrdersService()
    lines = tuple((f"{n:03d}" + "s" * 125, 1) for n in range(limits.LINES_PER_OPERATION_MAX))
    created = [f"o-{n}" for n in range(400)]
    for number, order_id in enumerate(created):
        operation = order(order_id=order_id, lines=lines)
        service.validate(operation)
        service.prepare(f"t-{number}/0", operation)
        if order_id != "o-399":
            service.commit(f"t-{number}/0", operation)

    async def scenario(channel: grpc.aio.Channel) -> list[list[str]]:
        stub = shop_pb2_grpc.OrdersStub(channel)

        async def read(token: str) -> shop_pb2.ListOrdersResponse:
            answer: shop_pb2.ListOrdersResponse = await stub.ListOrders(
                shop_pb2.ListOrdersRequest(page_token=token), timeout=10
            )
            assert answer.ByteSize() <= limits.MESSAGE_BYTES_MAX
            if token:  # after the first page: the pending order is cancelled (keeps its place)
                service.rollback("t-399/0", order(order_id="o-399", lines=lines))
            return answer

        return await every_page(read, lambda answer: [o.order_id for o in answer.orders])

    pages = serve(tmp_path, service, scenario)
    assert len(pages) > 1
    assert all(0 < len(chunk) < len(created) for chunk in pages), [len(c) for c in pages]
    assert created == [order_id for chunk in pages for order_id in chunk]


def test_a_default_page_of_the_largest_messages_comes_back_short_and_pages_each_once(
    tmp_path: Path,
) -> None:
    """1,100 sent notifications of a 1,024-character body of 4-byte characters take about
    4.6 MB at the default page size: ListSent was refused (RESOURCE_EXHAUSTED)."""
    service = NotificationService()
    body = "\U0001f600" * limits.TEXT_FIELD_LENGTH_MAX
    sent = [f"o-{n}" for n in range(1_100)]
    for number, order_id in enumerate(sent):
        operation = note(order_id=order_id, body=body)
        service.validate(operation)
        service.prepare(f"t-{number}/0", operation)
        service.commit(f"t-{number}/0", operation)

    async def scenario(channel: grpc.aio.Channel) -> list[list[str]]:
        stub = shop_pb2_grpc.NotificationStub(channel)

        async def read(token: str) -> shop_pb2.ListSentResponse:
            answer: shop_pb2.ListSentResponse = await stub.ListSent(
                shop_pb2.ListSentRequest(page_token=token), timeout=10
            )
            assert answer.ByteSize() <= limits.MESSAGE_BYTES_MAX
            return answer

        return await every_page(read, lambda answer: [n.order_id for n in answer.sent])

    pages = serve(tmp_path, service, scenario)
    assert len(pages) > 1
    assert all(0 < len(chunk) < len(sent) for chunk in pages), [len(c) for c in pages]
    assert sent == [order_id for chunk in pages for order_id in chunk]


def test_one_order_or_message_of_the_largest_allowed_fits_an_answer_many_times() -> None:
    """A short page holds at least one item (participants.services.fitting asserts it): the
    largest order and sent notification the services accept are far below the message limit."""
    from participants.services import fitting

    lines = tuple((longest_id(f"{n:03d}"), limits.QUANTITY_MAX) for n in range(100))
    assert limits.LINES_PER_OPERATION_MAX == len(lines)
    largest = order(longest_id("o"), longest_id("c"), lines, limits.AMOUNT_CENTS_MAX)
    OrdersService().validate(largest)
    record = shop_pb2.Order(
        order_id=largest.order_id,
        customer_id=largest.customer_id,
        lines=largest.lines,
        amount_cents=largest.amount_cents,
        state=shop_pb2.ORDER_STATE_CANCELLED,
        transaction_id=longest_id("t"),
    )
    wide = "\U0001f600" * limits.TEXT_FIELD_LENGTH_MAX  # 4 bytes a character
    message = note(longest_id("o"), wide, wide)
    NotificationService().validate(message)
    sent = shop_pb2.SentNotification(
        order_id=message.order_id,
        recipient=message.recipient,
        body=message.body,
        transaction_id=longest_id("t"),
    )
    # 14,202 and 8,460 bytes: 290 and 487 of them fit an answer.
    assert record.ByteSize() < 16 * 1024 and sent.ByteSize() < 16 * 1024
    assert 250 < len(fitting([record] * 1_000, lambda listed: listed))


def longest_id(kind: str) -> str:
    """An id of the longest length a resource id may have (128 characters)."""
    return kind + "x" * (128 - len(kind))


def test_a_default_page_of_the_largest_stock_levels_accounts_or_captures_fits_a_message() -> None:
    """The default page, PAGE_SIZE_DEFAULT items of the largest each can be: ids of the longest
    allowed length, every int64 at its longest encoding (10 bytes, a negative one), and the
    longest token a page can carry. A request without paging fields gets that page, so it must
    fit the message limit whatever the catalog."""
    from participants.services import PAGE_SIZE_DEFAULT, PAGE_TOKEN_PATTERN

    token = "9" * 18  # the longest PAGE_TOKEN_PATTERN takes
    assert PAGE_TOKEN_PATTERN.fullmatch(token) and not PAGE_TOKEN_PATTERN.fullmatch(token + "9")
    assert 128 == len(longest_id("s")) and limits.RESOURCE_ID_PATTERN.fullmatch(longest_id("s"))
    level = shop_pb2.StockLevel(
        sku=longest_id("sku"), available=-1, reserved=-1, sold=-1, received=-1
    )
    account = shop_pb2.Account(
        account_id=longest_id("acct"),
        balance_cents=-1,
        held_cents=-1,
        captured_cents=-1,
        initial_cents=-1,
        declines=True,
    )
    capture = shop_pb2.Capture(
        order_id=longest_id("o"),
        account_id=longest_id("acct"),
        amount_cents=-1,
        transaction_id=longest_id("txn"),  # TRANSACTION_ID_PATTERN: 128 characters at most
    )
    pages = {
        "stock": shop_pb2.GetStockResponse(
            levels=[level] * PAGE_SIZE_DEFAULT, next_page_token=token
        ),
        "accounts": shop_pb2.ListAccountsResponse(
            accounts=[account] * PAGE_SIZE_DEFAULT, next_page_token=token
        ),
        # A capture is larger than an account: a page of captures is the largest ListAccounts
        # page, and one mixing the two is smaller.
        "captures": shop_pb2.ListAccountsResponse(
            captures=[capture] * PAGE_SIZE_DEFAULT, next_page_token=token
        ),
    }
    sizes = {name: answer.ByteSize() for name, answer in pages.items()}
    assert sizes["accounts"] < sizes["captures"]
    # 1,780,020, 1,800,020 and 4,070,020 bytes of 4,194,304.
    assert all(size <= limits.MESSAGE_BYTES_MAX for size in sizes.values()), sizes


async def every_page(
    read: Callable[[str], Awaitable[Any]], listed: Callable[[Any], list[Any]]
) -> list[list[Any]]:
    """The items of each page of a paged read, following next_page_token to the end."""
    pages: list[list[Any]] = []
    token = ""
    while True:  # bounded: each test's list has a few pages
        answer = await read(token)
        pages.append(listed(answer))
        token = answer.next_page_token
        if not token:
            return pages
        assert len(pages) < 100


def test_get_stock_pages_a_catalog_larger_than_a_page(tmp_path: Path) -> None:
    """A catalog of PAGE_SIZE_DEFAULT + 5 SKUs: without paging fields the first page has the
    default size and a token; every SKU comes once across the pages, sorted, at any size."""
    from participants.services import PAGE_SIZE_DEFAULT

    skus = [f"sku-{n:05d}" for n in range(PAGE_SIZE_DEFAULT + 5)]
    random.Random(7).shuffle(skus)  # the catalog's order is not the listing's

    async def scenario(channel: grpc.aio.Channel) -> None:
        stub = shop_pb2_grpc.InventoryStub(channel)

        def stock(size: int) -> Callable[[str], Awaitable[Any]]:
            return lambda token: stub.GetStock(
                shop_pb2.GetStockRequest(page_size=size, page_token=token), timeout=10
            )

        def listed(answer: shop_pb2.GetStockResponse) -> list[str]:
            return [level.sku for level in answer.levels]

        default = await every_page(stock(0), listed)
        assert [PAGE_SIZE_DEFAULT, 5] == [len(chunk) for chunk in default]
        assert sorted(skus) == [sku for chunk in default for sku in chunk]
        small = await every_page(stock(3_000), listed)
        assert [3_000, 3_000, 3_000, 1_005] == [len(chunk) for chunk in small]
        assert sorted(skus) == [sku for chunk in small for sku in chunk]
        # Named SKUs page too, in the order named.
        named = ["sku-00009", "sku-00002", "sku-00005"]
        some = await every_page(
            lambda token: stub.GetStock(
                shop_pb2.GetStockRequest(skus=named, page_size=2, page_token=token), timeout=10
            ),
            listed,
        )
        assert [named[:2], named[2:]] == some
        # A token past the end is an empty last page, not the whole catalog.
        past = await stub.GetStock(shop_pb2.GetStockRequest(page_token="999999"), timeout=10)
        assert ([], "") == (list(past.levels), past.next_page_token)

    serve(tmp_path, InventoryService(dict.fromkeys(skus, 1)), scenario)


def test_list_accounts_pages_the_accounts_then_the_captures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every account was on every page; now each account and each capture is on one page:
    the accounts sorted, then the captures in the order they were made."""
    account_ids = [f"acct-{n}" for n in range(5)]
    service = PaymentService(dict.fromkeys(reversed(account_ids), AccountSpec(1_000)))
    for n in range(4):
        service.prepare(f"txn-{n}/0", charge(account_ids[n], 10, f"o-{n}"))
        service.commit(f"txn-{n}/0", charge(account_ids[n], 10, f"o-{n}"))

    async def scenario(channel: grpc.aio.Channel) -> None:
        stub = shop_pb2_grpc.PaymentStub(channel)

        def accounts(size: int) -> Callable[[str], Awaitable[Any]]:
            return lambda token: stub.ListAccounts(
                shop_pb2.ListAccountsRequest(page_size=size, page_token=token), timeout=10
            )

        def listed(answer: shop_pb2.ListAccountsResponse) -> list[str]:
            return [a.account_id for a in answer.accounts] + [c.order_id for c in answer.captures]

        pages = await every_page(accounts(2), listed)
        assert [
            ["acct-0", "acct-1"],
            ["acct-2", "acct-3"],
            ["acct-4", "o-0"],
            ["o-1", "o-2"],
            ["o-3"],
        ] == pages
        # Without paging fields, one page holds everything while it fits the default size.
        everything = [*account_ids, "o-0", "o-1", "o-2", "o-3"]
        assert [everything] == await every_page(accounts(0), listed)
        # And what fits one answer when that is less: each item once, accounts then captures.
        capture = service.captures[0].to_pb()
        room = 3 * (capture.ByteSize() + limits.REPEATED_ELEMENT_FRAMING_BYTES)
        monkeypatch.setattr(limits, "ANSWER_BYTES_MAX", room)
        assert [everything[:3], everything[3:6], everything[6:]] == await every_page(
            accounts(0), listed
        )

    serve(tmp_path, service, scenario)


# ---- snapshots of growing tables: rows encoded once ----


def test_state_pieces_give_the_bytes_of_plain_values() -> None:
    state = {"b": {"z": 1, "a": [1, "x"]}, "rows": [[1, "é"], [2, "b"]]}
    plain = encode_state("svc", state)
    rows = [b"[", json_text([1, "é"]).encode(), b",", json_text([2, "b"]).encode(), b"]"]
    assert plain == b"".join(state_pieces("svc", {"b": state["b"]}, {"rows": rows}))
    assert json.loads(plain)["rows"] == [[1, "é"], [2, "b"]]


def test_encoded_rows_encode_only_what_was_appended_and_restart_on_a_new_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("participants.services.CHUNK_ROWS", 2)
    encoded: list[int] = []

    def encode(row: int) -> list[int]:
        encoded.append(row)
        return [row]

    rows = EncodedRows[int](encode)
    table = [1]
    assert b"[[1]]" == b"".join(rows.pieces(table))
    table += [2, 3]
    first = rows.pieces(table)
    assert b"[[1],[2],[3]]" == b"".join(first)
    table += [4, 5]
    second = rows.pieces(table)
    assert b"[[1],[2],[3],[4],[5]]" == b"".join(second)
    assert [1, 2, 3, 4, 5] == encoded  # none encoded twice
    assert first[1] is second[1]  # the full chunk [1],[2]: joined once, handed over as is
    assert b"[[7]]" == b"".join(rows.pieces([7]))  # another list (a restore): from scratch
    assert b"[]" == b"".join(rows.pieces([]))


@dataclasses.dataclass
class _Row:
    number: int
    settled: bool = False


def test_settled_rows_match_a_fresh_encoding_and_cache_only_settled_prefixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Random growth, settling and removal of unsettled rows, against encoding the whole
    table again each time; a cached chunk is reused, never rebuilt."""
    monkeypatch.setattr("participants.services.CHUNK_ROWS", 3)
    generator = random.Random(5)

    def text(row: _Row) -> str:
        return json_text([row.number, row.settled])

    for _ in range(30):
        table: dict[int, _Row] = {}
        rows = SettledRows[_Row](text, lambda row: row.settled)
        for number in range(60):
            table[number] = _Row(number)
            unsettled = [row for row in table.values() if not row.settled]
            for row in generator.sample(unsettled, generator.randint(0, len(unsettled))):
                if generator.random() < 0.2:
                    del table[row.number]  # only an unsettled row may go
                else:
                    row.settled = True
            cached = list(rows._chunks)
            pieces = rows.pieces(table, table.values())
            expected = json_text([[row.number, row.settled] for row in table.values()])
            # Had a chunk been cached with a row that later changed or went, this would differ.
            assert expected.encode() == b"".join(pieces)
            assert cached == rows._chunks[: len(cached)]
            assert all(old is new for old, new in zip(cached, rows._chunks, strict=False))
            assert all(any(chunk is piece for piece in pieces) for chunk in rows._chunks)
        # Another table (a restore) starts over.
        assert b"[]" == b"".join(rows.pieces({}, []))


def test_growing_tables_encode_a_row_at_commit_so_a_checkpoint_only_joins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders, payment, notification = OrdersService(), PaymentService(), NotificationService()
    for index in range(5):
        key = f"txn-{index}/0"
        orders.prepare(key, order(order_id=f"o-{index}"))
        orders.commit(key, order(order_id=f"o-{index}"))
        charge = shop_pb2.ChargePayment(account_id="acct-alice", amount_cents=5, order_id="o")
        payment.prepare(key, charge)
        payment.commit(key, charge)
        note = shop_pb2.SendNotification(order_id=f"o-{index}", recipient="a@x", body="hi")
        notification.prepare(key, note)
        notification.commit(key, note)
    encoded: list[object] = []

    def counting(value: object) -> str:
        encoded.append(value)
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    # Every json_text a snapshot makes, in every module that encodes rows.
    for module in ("participants.services", "participants.services.orders"):
        monkeypatch.setattr(f"{module}.json_text", counting)
    for service in (orders, payment, notification):
        state_bytes(service.snapshot())
    # Only the small parts (the document's keys and its maps of open branches, accounts...)
    # were encoded: none of the 15 committed rows, which are lists of 4 or 6 values.
    rows = [value for value in encoded if isinstance(value, list) and len(value) in (4, 6)]
    assert [] == rows, rows


def test_growing_tables_snapshot_the_same_after_more_rows_and_after_a_restore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("participants.services.CHUNK_ROWS", 2)  # many cached chunks
    orders, payment, notification = OrdersService(), PaymentService(), NotificationService()
    for index in range(9):
        if index == 2:  # a pending order among settled ones: nothing after it is cached
            orders.prepare("held/0", order(order_id="o-held"))
        if index == 6:
            orders.commit("held/0", order(order_id="o-held"))
        key = f"txn-{index}/0"
        orders.prepare(key, order(order_id=f"o-{index}"))
        orders.commit(key, order(order_id=f"o-{index}"))
        charge = shop_pb2.ChargePayment(
            account_id="acct-alice", amount_cents=5, order_id=f"o-{index}"
        )
        payment.prepare(key, charge)
        payment.commit(key, charge)
        note = shop_pb2.SendNotification(order_id=f"o-{index}", recipient="a@x", body="hi")
        notification.prepare(key, note)
        notification.commit(key, note)
        for service in (orders, payment, notification):
            snapshot = state_bytes(service.snapshot())  # rows cached by now, one more each round
            fresh = type(service)()
            fresh.restore(snapshot)
            assert state_bytes(fresh.snapshot()) == snapshot
            # The cached text says what re-encoding everything would say, byte for byte.
            assert json_text(json.loads(snapshot)).encode() == snapshot
        assert json.loads(state_bytes(orders.snapshot()))["orders"] == [
            order.to_json() for order in orders.orders.values()
        ]


def test_a_restart_with_another_initial_state_keeps_the_stock_the_log_had(tmp_path: Path) -> None:
    """The initial state is read only while the log is empty (catalog.py). Before, the log held
    no copy of it until its first periodic checkpoint (20,000 records), so a restart with
    another file replayed the sales on top of it: (97, 3, 100) instead of (7, 3, 10)."""

    async def sell(channel: grpc.aio.Channel) -> None:
        vote = await prepare(channel, "txn-1", reserve(("sku-a", 3)))
        assert coordinator_pb2.VOTE_PREPARED == vote.vote
        await decide(channel, "txn-1", commit=True)

    async def nothing(channel: grpc.aio.Channel) -> None:
        return None

    serve(tmp_path, InventoryService({"sku-a": 10}), sell)
    restarted = InventoryService({"sku-a": 100})
    serve(tmp_path, restarted, nothing)
    item = restarted.items["sku-a"]
    assert (7, 3, 10) == (item.available, item.sold, item.received)


def test_a_restart_with_a_smaller_initial_balance_still_commits_its_prepared_charge(
    tmp_path: Path,
) -> None:
    """Before, the replayed prepare of a charge in doubt was refused against the new file's
    balance, and the participant did not start (RecoveryError), its branch stuck in it."""

    async def hold(channel: grpc.aio.Channel) -> None:
        vote = await prepare(channel, "txn-1", charge("acct-x", 500))
        assert coordinator_pb2.VOTE_PREPARED == vote.vote  # in doubt at the restart

    async def commit(channel: grpc.aio.Channel) -> None:
        await decide(channel, "txn-1", commit=True)

    serve(tmp_path, PaymentService({"acct-x": AccountSpec(1_000)}), hold)
    restarted = PaymentService({"acct-x": AccountSpec(100)})
    serve(tmp_path, restarted, commit)
    assert 500 == restarted.accounts["acct-x"].captured_cents
