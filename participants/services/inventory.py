"""The inventory participant: ReserveStock. Prepare reserves, commit deducts, rollback releases.

Per SKU: available + reserved + sold == received, always (received is the initial stock; there
is no restock operation yet). `reserved` is exactly the sum of the reservations of prepared
branches, which are kept per branch key so that commit and rollback move exactly what prepare
moved, and so that a snapshot carries them across a restart.

Run: python -m participants.services.inventory [SDK flags] [--initial PATH.json]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

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
    check_lines,
    decode_state,
    encode_state,
    merged_lines,
    page,
)
from participants.services.catalog import DEFAULT_CATALOG, split_initial_arg

# Bound on one GetStock request, so a read cannot make the server build an unbounded answer
# beyond the catalog itself.
GET_STOCK_SKUS_MAX = 10_000


@dataclass(slots=True)
class StockItem:
    available: int
    reserved: int
    sold: int
    received: int

    def level(self, sku: str) -> shop_pb2.StockLevel:
        return shop_pb2.StockLevel(
            sku=sku,
            available=self.available,
            reserved=self.reserved,
            sold=self.sold,
            received=self.received,
        )


class InventoryService(Service[shop_pb2.ReserveStock]):
    name = "inventory"
    operation_type = shop_pb2.ReserveStock

    def __init__(self, stock: Mapping[str, int] | None = None, *, lock_skus: bool = False) -> None:
        initial = DEFAULT_CATALOG.stock if stock is None else stock
        # The alternative to escrow, kept only to measure the two against each other
        # (tests/test_locking.py): an exclusive lock per SKU held from prepare to decision.
        self.lock_skus = lock_skus
        self.items: dict[str, StockItem] = {
            sku: StockItem(available=units, reserved=0, sold=0, received=units)
            for sku, units in initial.items()
        }
        # Every SKU, sorted: what GetStock pages through. Sorted once, not at every page: the
        # set of SKUs never changes after the start (no operation adds or removes one).
        self.skus = sorted(self.items)
        # Branch key -> {sku: units} reserved by that prepared branch.
        self.reservations: dict[str, dict[str, int]] = {}

    # ---- the branch operations ----

    def validate(self, operation: shop_pb2.ReserveStock) -> None:
        check_lines(operation.lines)

    def locks(self, operation: shop_pb2.ReserveStock) -> Sequence[LockRequest]:
        # No locks: this is an escrow design. The reservation itself isolates concurrent orders:
        # prepare checks and moves units available -> reserved in one synchronous step on the
        # single event-loop thread, so no other branch can see or take those units, `available`
        # never goes negative, and commit/rollback only touch this branch's own reservation.
        # Holding a per-SKU lock until the decision would serialize every order for a popular
        # SKU behind a full two-phase round trip for no extra safety (measured: see lock_skus).
        if self.lock_skus:
            return [LockRequest(f"sku:{line.sku}") for line in operation.lines]
        return []

    def prepare(self, key: str, operation: shop_pb2.ReserveStock) -> PrepareResult:
        if key in self.reservations:
            # Already reserved for this branch: reserving twice would leak units.
            return Prepared()
        wanted = merged_lines(operation.lines)
        # Check every line before touching any: a refusal must leave no trace.
        for sku in wanted:
            if sku not in self.items:
                return Refused(f"unknown sku {sku}")
        for sku, units in wanted.items():
            item = self.items[sku]
            if item.available < units:
                return Refused(
                    f"out of stock: sku {sku} has {item.available} available, {units} requested"
                )
        for sku, units in wanted.items():
            item = self.items[sku]
            item.available -= units
            item.reserved += units
        self.reservations[key] = wanted
        return Prepared()

    def commit(self, key: str, operation: shop_pb2.ReserveStock) -> None:
        # An unknown key means nothing was reserved for it (the SDK only commits prepared
        # branches); commit must not fail, so there is nothing to do.
        for sku, units in self.reservations.pop(key, {}).items():
            item = self.items[sku]
            item.reserved -= units
            item.sold += units

    def rollback(self, key: str, operation: shop_pb2.ReserveStock) -> None:
        for sku, units in self.reservations.pop(key, {}).items():
            item = self.items[sku]
            item.reserved -= units
            item.available += units

    # ---- state ----

    def snapshot(self) -> bytes:
        return encode_state(
            self.name,
            {
                "items": {
                    sku: [item.available, item.reserved, item.sold, item.received]
                    for sku, item in self.items.items()
                },
                "reservations": self.reservations,
            },
        )

    def restore(self, state: bytes) -> None:
        document = decode_state(self.name, state)
        items = {
            str(sku): StockItem(int(a), int(r), int(s), int(t))
            for sku, (a, r, s, t) in document["items"].items()
        }
        reservations = {
            str(key): {str(sku): int(units) for sku, units in reserved.items()}
            for key, reserved in document["reservations"].items()
        }
        for key, reserved in reservations.items():
            for sku in reserved:
                if sku not in items:
                    # Its commit or rollback would raise KeyError, and neither may fail.
                    raise ValueError(
                        f"inventory snapshot: branch {key} reserves unknown sku {sku!r}"
                    )
        # Replace only once everything parsed: a bad snapshot leaves the state as it was.
        self.items = dict(sorted(items.items()))
        self.skus = list(self.items)
        self.reservations = reservations

    # ---- reads ----

    def levels(self, skus: Sequence[str] = ()) -> list[shop_pb2.StockLevel]:
        """Stock levels of `skus` (in that order), or of every SKU sorted; KeyError if unknown."""
        if not skus:
            return [self.items[sku].level(sku) for sku in self.skus]
        return [self.items[sku].level(sku) for sku in skus]

    def add_read_api(self, server: grpc.aio.Server) -> list[str]:
        shop_pb2_grpc.add_InventoryServicer_to_server(InventoryReadApi(self), server)
        return [shop_pb2.DESCRIPTOR.services_by_name["Inventory"].full_name]


class InventoryReadApi(shop_pb2_grpc.InventoryServicer):
    def __init__(self, service: InventoryService) -> None:
        self.service = service

    async def GetStock(
        self, request: shop_pb2.GetStockRequest, context: Context
    ) -> shop_pb2.GetStockResponse:
        if len(request.skus) > GET_STOCK_SKUS_MAX:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.skus)} skus requested; at most {GET_STOCK_SKUS_MAX} per request",
            )
        for sku in request.skus:
            if sku not in self.service.items:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown sku {sku[:128]}")
        # Every SKU by default: pages of one list, so each SKU is on one page.
        listed = request.skus or self.service.skus
        items = self.service.items
        try:
            # Not levels(chunk): an empty chunk (a token past the end) would list every SKU.
            levels, token = page(
                listed, lambda sku: items[sku].level(sku), request.page_size, request.page_token
            )
        except InvalidOperation as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return shop_pb2.GetStockResponse(levels=levels, next_page_token=token)


def main(argv: list[str] | None = None) -> None:
    # Imported here, not at the top: the business logic above is usable (and unit-tested)
    # without the SDK server and its log.
    from dtm.config import configured_initial
    from participants.server import run

    # `initial` from the configuration file or DTM_*_INITIAL, unless --initial is given.
    catalog, rest = split_initial_arg(*configured_initial("inventory", argv))
    run(InventoryService(catalog.stock), rest)


if __name__ == "__main__":
    main()
