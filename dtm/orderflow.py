"""One e-commerce order as one distributed transaction, and a small client to submit it.

An order is four branches, one per service: reserve the stock, create the order, charge the
payment, send the confirmation. Each branch's operation is the service's typed message packed
into a `google.protobuf.Any`; the coordinator commits all four or none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from dtm import grpc_edge, limits
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, shop_pb2

INVENTORY = "inventory"
ORDERS = "orders"
PAYMENT = "payment"
NOTIFICATION = "notification"
#: The participants of an order, in branch order.
ORDER_PARTICIPANTS = (INVENTORY, ORDERS, PAYMENT, NOTIFICATION)

#: (sku, quantity) pairs or ready-made StockLine messages.
Lines = Iterable[tuple[str, int]] | Iterable[shop_pb2.StockLine]


def transaction_id_for(order_id: str) -> str:
    """The default transaction id of an order: deterministic, so that a client retrying an
    order whose outcome it did not learn reuses the id and can never apply it twice."""
    return f"txn-{order_id}"


def stock_lines(lines: Lines) -> list[shop_pb2.StockLine]:
    result: list[shop_pb2.StockLine] = []
    for line in lines:
        if isinstance(line, shop_pb2.StockLine):
            result.append(line)
        else:
            sku, quantity = line
            result.append(shop_pb2.StockLine(sku=sku, quantity=quantity))
    return result


def _branch(participant: str, operation: Message) -> coordinator_pb2.BranchRequest:
    packed = any_pb2.Any()
    packed.Pack(operation)
    return coordinator_pb2.BranchRequest(participant=participant, operation=packed)


def order_request(
    order_id: str,
    customer: str,
    account: str,
    lines: Lines,
    amount_cents: int,
    recipient: str,
    *,
    transaction_id: str | None = None,
    timeout_ms: int = 0,
    body: str | None = None,
) -> coordinator_pb2.SubmitRequest:
    """The SubmitRequest of one order: branches inventory, orders, payment, notification.

    The inventory branch reserves exactly the order's lines, so that units sold always equal the
    lines of confirmed orders (the invariant checker relies on it). `timeout_ms` 0 means the
    coordinator's default.
    """
    line_messages = stock_lines(lines)
    if transaction_id is None:
        transaction_id = transaction_id_for(order_id)
    if body is None:
        items = ", ".join(f"{line.quantity} x {line.sku}" for line in line_messages)
        body = f"Order {order_id} confirmed: {items}; {amount_cents} cents charged."
    return coordinator_pb2.SubmitRequest(
        transaction_id=transaction_id,
        timeout_ms=timeout_ms,
        branches=[
            _branch(INVENTORY, shop_pb2.ReserveStock(lines=line_messages)),
            _branch(
                ORDERS,
                shop_pb2.CreateOrder(
                    order_id=order_id,
                    customer_id=customer,
                    lines=line_messages,
                    amount_cents=amount_cents,
                ),
            ),
            _branch(
                PAYMENT,
                shop_pb2.ChargePayment(
                    account_id=account, amount_cents=amount_cents, order_id=order_id
                ),
            ),
            _branch(
                NOTIFICATION,
                shop_pb2.SendNotification(order_id=order_id, recipient=recipient, body=body),
            ),
        ],
    )


@dataclass(frozen=True)
class SubmitResult:
    """What a client learned from one Submit: a response, or the gRPC error instead."""

    transaction_id: str
    response: coordinator_pb2.SubmitResponse | None
    code: grpc.StatusCode
    message: str
    elapsed_s: float

    @property
    def outcome(self) -> str:
        """COMMITTED, ABORTED, UNKNOWN, or the gRPC status name when the call itself failed
        (e.g. DEADLINE_EXCEEDED: the client does not know the outcome)."""
        if self.response is None:
            return self.code.name
        name: str = coordinator_pb2.Outcome.Name(self.response.outcome)
        return name.removeprefix("OUTCOME_")

    @property
    def committed(self) -> bool:
        return self.response is not None and (
            self.response.outcome == coordinator_pb2.OUTCOME_COMMITTED
        )

    @property
    def aborted(self) -> bool:
        return self.response is not None and (
            self.response.outcome == coordinator_pb2.OUTCOME_ABORTED
        )

    @property
    def reason(self) -> str:
        return self.response.reason if self.response is not None else self.message


class OrderClient:
    """A thin async client of Coordinator.Submit that reports errors as values.

    Pass an address (the client owns and closes its channel) or an existing channel (the
    caller keeps ownership).
    """

    def __init__(self, coordinator: str | grpc.aio.Channel) -> None:
        if isinstance(coordinator, str):
            self._channel = grpc.aio.insecure_channel(
                coordinator, options=grpc_edge.CHANNEL_OPTIONS
            )
            self._owns_channel = True
        else:
            self._channel = coordinator
            self._owns_channel = False
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def submit(
        self, request: coordinator_pb2.SubmitRequest, *, timeout_s: float | None = None
    ) -> SubmitResult:
        """Submit one transaction. `timeout_s` None waits as long as the transaction's own
        timeout allows (plus a margin), so a slow decision is not mistaken for a lost one."""
        if timeout_s is None:
            timeout_ms = request.timeout_ms or limits.TRANSACTION_TIMEOUT_MS_DEFAULT
            timeout_s = timeout_ms / 1000 + 5.0
        started = time.perf_counter()
        try:
            response: coordinator_pb2.SubmitResponse = await self.stub.Submit(
                request, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            return SubmitResult(
                transaction_id=request.transaction_id,
                response=None,
                code=error.code(),
                message=error.details() or "",
                elapsed_s=time.perf_counter() - started,
            )
        return SubmitResult(
            transaction_id=response.transaction_id,
            response=response,
            code=grpc.StatusCode.OK,
            message="",
            elapsed_s=time.perf_counter() - started,
        )

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> OrderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def line_summary(lines: Sequence[tuple[str, int]] | Sequence[shop_pb2.StockLine]) -> str:
    """'2 x sku-apple, 1 x sku-pear': for people reading a demo or a report."""
    return ", ".join(f"{line.quantity} x {line.sku}" for line in stock_lines(lines))
