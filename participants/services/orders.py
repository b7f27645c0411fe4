"""The orders participant: CreateOrder. Prepare creates a PENDING order, commit confirms it,
rollback cancels it.

An order id is taken by a pending or confirmed order. A rolled-back (cancelled) order is
removed, so its id becomes usable again: the usual cause of a rollback is another participant
refusing (out of stock, declined card), and the client's natural reaction is to retry with the
same order id once the problem is fixed. Cancelled orders stay visible in `ListOrders` through a
bounded record (the latest CANCELLED_KEPT), which is for display only and never refuses anything.

`ListOrders` shows each order id once, as its latest attempt: a cancelled record is dropped when
its id is used again, so a retry that succeeds shows as CONFIRMED and not also as CANCELLED (the
invariant checker reads an id listed twice as a violation).

Run: python -m participants.services.orders [SDK flags] [--initial PATH.json (ignored)]
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from dtm import limits
from dtmpb.v1 import shop_pb2, shop_pb2_grpc
from participants.service import (
    InvalidOperation,
    LockRequest,
    Prepared,
    PrepareResult,
    Refused,
    Service,
)
from participants.services import (
    Context,
    SettledRows,
    check_lines,
    check_resource_id,
    decode_state,
    fitting,
    json_text,
    page_window,
    state_pieces,
    transaction_of,
)
from participants.services.catalog import split_initial_arg

# How many cancelled orders ListOrders remembers; the oldest are forgotten first.
CANCELLED_KEPT = 10_000

PENDING = "PENDING"
CONFIRMED = "CONFIRMED"
CANCELLED = "CANCELLED"
_STATE_TO_PB = {
    PENDING: shop_pb2.ORDER_STATE_PENDING,
    CONFIRMED: shop_pb2.ORDER_STATE_CONFIRMED,
    CANCELLED: shop_pb2.ORDER_STATE_CANCELLED,
}


def lock_resource(order_id: str) -> str:
    return f"order:{order_id}"


@dataclass(slots=True)
class OrderRecord:
    order_id: str
    customer_id: str
    lines: list[tuple[str, int]]
    amount_cents: int
    state: str
    transaction_id: str
    # The snapshot text of a CONFIRMED or CANCELLED order, which never changes again: encoded
    # once, at commit or rollback, so a checkpoint of 100,000 orders is a join of cached
    # chunks, not 100,000 encodings (1.5 s, the loop stalled), and the 10,000 orders since the
    # last one cost it nothing either.
    final_text: str = field(default="", compare=False)
    # Its place in ListOrders: given when the attempt is created, never changed (a cancelled
    # order keeps it, a retry of a cancelled attempt still remembered takes it over), and kept
    # in snapshots, so a page token (the last place read) means the
    # same while orders change between pages and across a restart. 0: not given yet (a
    # snapshot from before places; restore gives them).
    place: int = field(default=0, compare=False)

    @property
    def settled(self) -> bool:
        """Never to change or be removed again: so far, only a pending order can."""
        return self.state != PENDING

    def json_text(self) -> str:
        if self.final_text:
            return self.final_text
        text = json_text(self.to_json())
        if self.settled:
            self.final_text = text
        return text

    def to_pb(self) -> shop_pb2.Order:
        return shop_pb2.Order(
            order_id=self.order_id,
            customer_id=self.customer_id,
            lines=[shop_pb2.StockLine(sku=sku, quantity=units) for sku, units in self.lines],
            amount_cents=self.amount_cents,
            state=_STATE_TO_PB[self.state],
            transaction_id=self.transaction_id,
        )

    def to_json(self) -> list[Any]:
        return [
            self.order_id,
            self.customer_id,
            [[sku, units] for sku, units in self.lines],
            self.amount_cents,
            self.state,
            self.transaction_id,
            self.place,
        ]

    @classmethod
    def from_json(cls, value: list[Any]) -> OrderRecord:
        # Six fields in a snapshot from before places.
        order_id, customer_id, lines, amount_cents, state, transaction_id, *place = value
        if state not in _STATE_TO_PB:
            raise ValueError(f"orders snapshot: order {order_id!r} has unknown state {state!r}")
        return cls(
            order_id=str(order_id),
            customer_id=str(customer_id),
            lines=[(str(sku), int(units)) for sku, units in lines],
            amount_cents=int(amount_cents),
            state=str(state),
            transaction_id=str(transaction_id),
            place=int(place[0]) if place else 0,
        )


class OrdersService(Service[shop_pb2.CreateOrder]):
    name = "orders"
    operation_type = shop_pb2.CreateOrder

    def __init__(self, cancelled_kept: int = CANCELLED_KEPT) -> None:
        # Order id -> the pending or confirmed order holding it, in creation order. This is the
        # shop's business record, so it grows with the orders; a real system would archive it.
        self.orders: dict[str, OrderRecord] = {}
        # Branch key -> order id of the PENDING order that branch created.
        self.pending: dict[str, str] = {}
        # Order id -> its latest cancelled attempt, oldest first; display only. Never holds an
        # id that is also in `orders`.
        self.cancelled: OrderedDict[str, OrderRecord] = OrderedDict()
        self.cancelled_kept = cancelled_kept
        self._orders_text = SettledRows[OrderRecord](
            OrderRecord.json_text, lambda order: order.settled
        )
        # The next OrderRecord.place. ListOrders pages by place, not by offset: a cancellation
        # moves its order from `orders` to `cancelled`, so with offsets the rows behind it
        # shifted by one between two pages, and a chaos check read ten orders twice.
        self._places = itertools.count(1)

    # ---- the branch operations ----

    def validate(self, operation: shop_pb2.CreateOrder) -> None:
        check_resource_id("order_id", operation.order_id)
        check_resource_id("customer_id", operation.customer_id)
        if not 0 <= operation.amount_cents <= limits.AMOUNT_CENTS_MAX:
            raise InvalidOperation(
                f"amount_cents must be between 0 and {limits.AMOUNT_CENTS_MAX}, "
                f"got {operation.amount_cents}"
            )
        check_lines(operation.lines)

    def locks(self, operation: shop_pb2.CreateOrder) -> Sequence[LockRequest]:
        # Unlike stock and money, an order id is not a quantity that can be escrowed: two
        # transactions creating the same id must be ordered. The exclusive lock, held until the
        # first one's decision, makes the second wait and then see the outcome: refused as a
        # duplicate if the first committed, free to proceed if it rolled back. Without it the
        # second would be refused while the first might still roll back, and a client retrying
        # an order whose first attempt is about to abort would be told "duplicate" spuriously.
        # A second claim that gives up waiting is told the id is taken, not "lock timeout":
        # retrying it gets the same answer, or "duplicate order id" once the first commits.
        order_id = operation.order_id
        return [
            LockRequest(
                lock_resource(order_id),
                timeout_reason=f"order id {order_id} is already being created by a transaction "
                "not decided yet: choose another order id, or look the order up (ListOrders) "
                "once that one is decided",
            )
        ]

    def prepare(self, key: str, operation: shop_pb2.CreateOrder) -> PrepareResult:
        if self.pending.get(key) == operation.order_id:
            # This branch already created it: prepare is idempotent per branch key.
            return Prepared()
        if operation.order_id in self.orders:
            # What to do, not only what is wrong: the same order id again gets the same answer.
            return Refused(
                f"duplicate order id {operation.order_id}: an order with this id exists; "
                "choose another order id, or look the order up (ListOrders)"
            )
        # The new attempt supersedes a cancelled one in ListOrders (one entry per order id),
        # at its place: at a new one, a paging reader that read the cancelled attempt would
        # read the order id again on a later page.
        superseded = self.cancelled.pop(operation.order_id, None)
        self.orders[operation.order_id] = OrderRecord(
            order_id=operation.order_id,
            customer_id=operation.customer_id,
            lines=[(line.sku, line.quantity) for line in operation.lines],
            amount_cents=operation.amount_cents,
            state=PENDING,
            transaction_id=transaction_of(key),
            place=superseded.place if superseded else next(self._places),
        )
        self.pending[key] = operation.order_id
        return Prepared()

    def commit(self, key: str, operation: shop_pb2.CreateOrder) -> None:
        # An unknown key created nothing (the SDK only commits prepared branches); commit must
        # not fail, so there is nothing to do.
        order_id = self.pending.pop(key, None)
        if order_id is not None:
            order = self.orders[order_id]
            order.state = CONFIRMED
            order.json_text()  # encoded now, once, rather than in a checkpoint's stall

    def rollback(self, key: str, operation: shop_pb2.CreateOrder) -> None:
        order_id = self.pending.pop(key, None)
        if order_id is not None:
            order = self.orders.pop(order_id)
            order.state = CANCELLED
            order.json_text()  # encoded now, once, rather than in a checkpoint's stall
            self.cancelled[order_id] = order
            while len(self.cancelled) > self.cancelled_kept:
                self.cancelled.popitem(last=False)

    # ---- state ----

    def snapshot(self) -> list[bytes]:
        # Lists, not dicts, for orders: their creation order is what ListOrders shows.
        return state_pieces(
            self.name,
            {"pending": self.pending},
            {
                "orders": self._orders_text.pieces(self.orders, self.orders.values()),
                # At most cancelled_kept, each text cached: a join, not an encoding.
                "cancelled": [
                    (
                        "[" + ",".join(map(OrderRecord.json_text, self.cancelled.values())) + "]"
                    ).encode("ascii")
                ],
            },
        )

    def restore(self, state: bytes) -> None:
        document = decode_state(self.name, state)
        orders = [OrderRecord.from_json(value) for value in document["orders"]]
        pending = {str(key): str(order_id) for key, order_id in document["pending"].items()}
        cancelled = [OrderRecord.from_json(value) for value in document["cancelled"]]
        by_id = {order.order_id: order for order in orders}
        for key, order_id in pending.items():
            if order_id not in by_id or by_id[order_id].state != PENDING:
                raise ValueError(f"orders snapshot: branch {key} holds no pending {order_id!r}")
        cancelled_by_id = OrderedDict((order.order_id, order) for order in cancelled)
        for order_id in cancelled_by_id:
            if order_id in by_id:
                raise ValueError(f"orders snapshot: {order_id!r} is both cancelled and live")
        # Replace only once everything parsed: a bad snapshot leaves the state as it was.
        self.orders = by_id
        self.pending = pending
        self.cancelled = cancelled_by_id
        last = max((order.place for order in (*orders, *cancelled)), default=0)
        self._places = itertools.count(last + 1)
        for order in (*cancelled, *orders):  # a snapshot from before places: as it listed them
            if not order.place:
                order.place = next(self._places)
        # Encoded and cached now, at start, not in the first checkpoint's stall.
        self._orders_text.pieces(self.orders, self.orders.values())
        for order in cancelled:
            order.json_text()

    # ---- reads ----

    def listed_after(self, place: int) -> Iterator[OrderRecord]:
        """Every order (its latest attempt: pending, confirmed or cancelled) placed after
        `place` (0: all), in the order of their places: the creation of the order id's first
        attempt still remembered (a retry takes its cancelled attempt's place)."""

        def placed(order: OrderRecord) -> int:
            return order.place

        # `orders` holds increasing places but for the retries, each back at its first place:
        # nearly sorted, which sorted() (a merge sort of the sorted runs) takes in about one pass.
        return iter(
            sorted(
                (
                    order
                    for order in itertools.chain(self.orders.values(), self.cancelled.values())
                    if order.place > place
                ),
                key=placed,
            )
        )

    def all_orders(self) -> list[shop_pb2.Order]:
        """Every order, in the order ListOrders shows them (see `listed_after`)."""
        return [order.to_pb() for order in self.listed_after(0)]

    def add_read_api(self, server: grpc.aio.Server) -> list[str]:
        shop_pb2_grpc.add_OrdersServicer_to_server(OrdersReadApi(self), server)
        return [shop_pb2.DESCRIPTOR.services_by_name["Orders"].full_name]


class OrdersReadApi(shop_pb2_grpc.OrdersServicer):
    def __init__(self, service: OrdersService) -> None:
        self.service = service

    async def ListOrders(
        self, request: shop_pb2.ListOrdersRequest, context: Context
    ) -> shop_pb2.ListOrdersResponse:
        # The token is the last place read (see OrdersService._place), not an offset: pages
        # stay consistent while orders are created and cancelled between them.
        try:
            after, size = page_window(request.page_size, request.page_token)
        except InvalidOperation as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # One more than the page is looked for: whether another page follows.
        chunk = list(itertools.islice(self.service.listed_after(after), size + 1))
        orders = fitting(chunk[:size], OrderRecord.to_pb)
        # Fewer than `size` when more would not fit one answer: the next page starts after
        # the last listed.
        token = str(chunk[len(orders) - 1].place) if len(orders) < len(chunk) else ""
        return shop_pb2.ListOrdersResponse(orders=orders, next_page_token=token)


def main(argv: list[str] | None = None) -> None:
    # Imported here: the business logic above is usable (and unit-tested) without the SDK.
    from participants.server import run

    _, rest = split_initial_arg(argv)  # accepted for a uniform command line; orders start empty
    run(OrdersService(), rest)


if __name__ == "__main__":
    main()
