"""The orders a chaos run submits, and the record of what each client was told.

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dtm.chaos.settings import (
    ABORTED,
    BATCH_IN_FLIGHT,
    COMMITTED,
    COMMON_SKUS,
    ORDER_KIND_WEIGHTS,
    ORDER_KINDS,
    PRICES_CENTS,
    RICH_ACCOUNTS,
)
from dtm.orderflow import SubmitResult, order_request
from dtmpb.v1 import coordinator_pb2


@dataclass
class ClientRecord:
    """One order as its client saw it."""

    order_id: str
    transaction_id: str
    #: COMMITTED, ABORTED, UNKNOWN, or the gRPC status name of a failed call.
    outcome: str
    amount_cents: int
    reason: str = ""
    #: The exact request, to retry it with the same transaction id.
    request: coordinator_pb2.SubmitRequest | None = field(default=None, repr=False)
    #: What a retry after recovery answered (unknown outcomes only).
    retry_outcome: str = ""
    #: Late-retry runs: what the retry after the coordinator forgot the order answered, and
    #: what that was (LATE_COMMITTED, LATE_ABORTED or LATE_RERUN; "" without an outcome).
    late_outcome: str = ""
    late_kind: str = ""

    @property
    def known(self) -> bool:
        return self.outcome in (COMMITTED, ABORTED)


def make_order(rng: random.Random, order_id: str) -> tuple[coordinator_pb2.SubmitRequest, int, str]:
    """A seeded order: (request, amount in cents, kind)."""
    kind = rng.choices(ORDER_KINDS, ORDER_KIND_WEIGHTS)[0]
    customer = f"cust-{rng.randint(1, 5)}"
    account = rng.choice(RICH_ACCOUNTS)
    skus = rng.sample(COMMON_SKUS, rng.randint(1, 2))
    lines = [(sku, rng.randint(1, 3)) for sku in skus]
    if kind == "rare":
        lines = [("sku-rare", 1)]
    elif kind == "no-stock":
        lines = [*lines[:1], ("sku-none", 1)]
    elif kind == "declined":
        account = "acct-blocked"
    elif kind == "poor":
        account = "acct-poor"
    amount = sum(PRICES_CENTS[sku] * quantity for sku, quantity in lines)
    request = order_request(
        order_id, customer, account, lines, amount, f"{customer}@example.com", timeout_ms=0
    )
    return request, amount, kind


def batch_in_flight_of(seed: int) -> int:
    """Odd seeds send their orders in SubmitBatch calls, even seeds one Submit each: both paths
    meet every crash point, and a replay (same seed) takes the same one."""
    return BATCH_IN_FLIGHT if seed % 2 else 0


def record_of(
    order_id: str, request: coordinator_pb2.SubmitRequest, amount: int, result: SubmitResult
) -> ClientRecord:
    return ClientRecord(
        order_id=order_id,
        transaction_id=request.transaction_id,
        outcome=result.outcome,
        amount_cents=amount,
        reason=result.reason,
        request=request,
    )
