"""What the benchmark's clients submit: N-branch order transactions, and the shop they run in.

With N = 4 every order is exactly `dtm.orderflow.order_request`'s: one branch each for
inventory, orders, payment and notification. N < 4 keeps the first N of those branches. N > 4
adds branches for extra instances of the same four services under other names (inventory-2,
orders-2, ... see `bench.instance`), each given the same operation as its kind's first
instance, so every branch is real business logic with a durable log behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from dtm import limits
from dtm.orderflow import (
    INVENTORY,
    NOTIFICATION,
    ORDER_PARTICIPANTS,
    ORDERS,
    PAYMENT,
    transaction_id_for,
)
from dtmpb.v1 import coordinator_pb2, shop_pb2

# Enough stock and money that neither limits a run (a box does ~10^3 orders/s, 10^6 per
# quarter hour), within the catalog's bounds (10^15 each).
STOCK_UNITS = 10**9
BALANCE_CENTS = 10**15
# Orders spread over this many SKUs and accounts (client i uses number i mod 64), so that
# without --hot-sku two clients rarely touch the same record.
SKUS = 64
ACCOUNTS = 64
HOT_SKU = "sku-hot"
#: No stock at all: every order for it is refused by inventory (aborts when payment is absent).
EMPTY_SKU = "sku-empty"
#: A blocked card: payment refuses every charge (aborts when payment takes part).
DECLINING_ACCOUNT = "acct-declines"
AMOUNT_CENTS = 1_999
UNITS_PER_ORDER = 1


@dataclass(frozen=True)
class Participant:
    """One participant process: its registered name and which service it runs."""

    name: str
    kind: str

    @property
    def extra(self) -> bool:
        """True for an extra instance that `dtm.cluster.Cluster` does not start."""
        return self.name != self.kind


def participants_for(count: int) -> list[Participant]:
    """The participants of an N-branch order: the first min(N, 4) services, then extra
    instances cycling over the four kinds (inventory-2, orders-2, payment-2, notification-2,
    inventory-3, ...)."""
    if not 1 <= count <= limits.BRANCHES_PER_TRANSACTION_MAX:
        raise ValueError(
            f"participants must be between 1 and {limits.BRANCHES_PER_TRANSACTION_MAX} "
            f"(branches per transaction), got {count}"
        )
    result = [Participant(kind, kind) for kind in ORDER_PARTICIPANTS[:count]]
    for extra in range(count - len(result)):
        kind = ORDER_PARTICIPANTS[extra % len(ORDER_PARTICIPANTS)]
        result.append(Participant(f"{kind}-{2 + extra // len(ORDER_PARTICIPANTS)}", kind))
    return result


def initial_state() -> dict[str, Any]:
    """The `initial=` document of `dtm.cluster.Cluster` (and of extra instances)."""
    stock = {f"sku-{index}": STOCK_UNITS for index in range(SKUS)}
    stock[HOT_SKU] = STOCK_UNITS
    stock[EMPTY_SKU] = 0
    accounts: dict[str, dict[str, Any]] = {
        f"acct-{index}": {"balance_cents": BALANCE_CENTS} for index in range(ACCOUNTS)
    }
    accounts[DECLINING_ACCOUNT] = {"balance_cents": BALANCE_CENTS, "declines": True}
    return {"stock": stock, "accounts": accounts}


def aborts(number: int, ratio: float) -> bool:
    """Whether call `number` of a client is made to abort: exactly floor(k * ratio) of the first
    k calls do, spread evenly, so even a short run has the asked-for ratio (a coin flip would
    not) and every run is the same."""
    return int((number + 1) * ratio) > int(number * ratio)


@dataclass(frozen=True)
class Order:
    request: coordinator_pb2.SubmitRequest
    order_id: str
    #: The workload made this order to abort (declining card or empty SKU).
    abort_expected: bool


class Workload:
    def __init__(
        self,
        participants: Sequence[Participant],
        *,
        run_id: str,
        abort_ratio: float = 0.0,
        hot_sku: bool = False,
        timeout_ms: int = 0,
    ) -> None:
        if not 0.0 <= abort_ratio <= 1.0:
            raise ValueError(f"abort ratio must be within [0, 1], got {abort_ratio}")
        if not limits.RESOURCE_ID_PATTERN.fullmatch(f"{run_id}-0-0"):
            raise ValueError(f"run id {run_id!r} does not make valid order ids")
        self.participants = list(participants)
        self.kinds = {participant.kind for participant in self.participants}
        self.run_id = run_id
        self.abort_ratio = abort_ratio
        self.hot_sku = hot_sku
        self.timeout_ms = timeout_ms

    @property
    def abort_mechanism(self) -> str:
        # A refusal by payment comes after inventory has reserved (the common real case), so
        # it is preferred; without payment, inventory refuses an empty SKU instead.
        return "declining account" if PAYMENT in self.kinds else "empty SKU"

    def order(self, client: int, number: int) -> Order:
        abort = aborts(number, self.abort_ratio)
        order_id = f"{self.run_id}-{client}-{number}"
        sku = HOT_SKU if self.hot_sku else f"sku-{client % SKUS}"
        account = f"acct-{client % ACCOUNTS}"
        if abort and PAYMENT in self.kinds:
            account = DECLINING_ACCOUNT
        elif abort:
            sku = EMPTY_SKU
        lines = [shop_pb2.StockLine(sku=sku, quantity=UNITS_PER_ORDER)]
        operations: dict[str, Message] = {
            INVENTORY: shop_pb2.ReserveStock(lines=lines),
            ORDERS: shop_pb2.CreateOrder(
                order_id=order_id,
                customer_id=f"cust-{client}",
                lines=lines,
                amount_cents=AMOUNT_CENTS,
            ),
            PAYMENT: shop_pb2.ChargePayment(
                account_id=account, amount_cents=AMOUNT_CENTS, order_id=order_id
            ),
            # A short body keeps ListSent small: the invariant check reads every message sent.
            NOTIFICATION: shop_pb2.SendNotification(
                order_id=order_id, recipient=f"c{client}@bench", body="ok"
            ),
        }
        branches = []
        for participant in self.participants:
            packed = any_pb2.Any()
            packed.Pack(operations[participant.kind])
            branches.append(
                coordinator_pb2.BranchRequest(participant=participant.name, operation=packed)
            )
        request = coordinator_pb2.SubmitRequest(
            transaction_id=transaction_id_for(order_id),
            timeout_ms=self.timeout_ms,
            branches=branches,
        )
        return Order(request=request, order_id=order_id, abort_expected=abort)
