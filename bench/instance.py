"""An extra instance of one of the four order-flow services, registered under another name.

For runs with more than four participants: `python -m participants.services.<kind>` always
registers as "<kind>", so this entry point builds the same service object and renames it before
handing it to the SDK. Everything else (gRPC server, registration, durable log under
DATA_DIR/<name>/, recovery, read API) is the service's and the SDK's own code.

    python -m bench.instance --kind inventory --name inventory-2 [SDK flags] [--initial PATH]
"""

from __future__ import annotations

import argparse
from typing import Any

from dtm import limits
from dtm.orderflow import ORDER_PARTICIPANTS
from participants.service import Service
from participants.services.catalog import split_initial_arg


def build(kind: str, name: str, argv: list[str] | None) -> tuple[Service[Any], list[str]]:
    """The renamed service and the command line left for the SDK."""
    # Imported here: each import pulls in its service's protobufs; only one is needed.
    from participants.services.inventory import InventoryService
    from participants.services.notification import NotificationService
    from participants.services.orders import OrdersService
    from participants.services.payment import PaymentService

    if not limits.PARTICIPANT_NAME_PATTERN.fullmatch(name):
        raise SystemExit(f"--name {name!r}: use 1..64 characters of [a-z0-9_-]")
    catalog, rest = split_initial_arg(argv)
    service: Service[Any]
    if kind == "inventory":
        service = InventoryService(catalog.stock)
    elif kind == "payment":
        service = PaymentService(catalog.accounts)
    elif kind == "orders":
        service = OrdersService()
    elif kind == "notification":
        service = NotificationService()
    else:
        raise SystemExit(f"--kind {kind!r}: one of {', '.join(ORDER_PARTICIPANTS)}")
    # An instance attribute shadows the class's `name`; the services and the SDK only ever
    # read `self.name` (log directory, registration, snapshots), so the rename is complete.
    service.name = name
    return service, rest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instance", add_help=True, allow_abbrev=False
    )
    parser.add_argument("--kind", required=True, choices=ORDER_PARTICIPANTS)
    parser.add_argument("--name", required=True)
    options, rest = parser.parse_known_args(argv)
    service, sdk_args = build(options.kind, options.name, rest)

    from participants.server import run

    run(service, sdk_args)


if __name__ == "__main__":
    main()
