"""The four order-flow services (inventory, orders, payment, notification), built on the SDK.

Each module holds one `Service` implementation and a `main(argv)` that runs it as its own
process (`python -m participants.services.inventory [SDK flags] [--initial PATH.json]`).

This package module holds what the four share: field validation (so that every service words
its INVALID_ARGUMENT errors the same way), the branch-key helper and the snapshot encoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from dtm import limits
from dtmpb.v1 import shop_pb2
from participants.service import InvalidOperation

#: The servicer context every read API method receives.
Context = grpc.aio.ServicerContext[Any, Any]

#: Bumped when a service's snapshot layout changes; restore refuses any other version rather
#: than guess at a layout it does not know.
SNAPSHOT_FORMAT = 1


def transaction_of(key: str) -> str:
    """The transaction id part of a branch key "<transaction id>/<branch index>"."""
    transaction_id, separator, _ = key.rpartition("/")
    # A key without "/" is not something the SDK produces; keep it whole rather than lose it.
    return transaction_id if separator else key


def check_resource_id(field: str, value: str) -> None:
    """Raise InvalidOperation unless `value` is a well-formed resource id."""
    if not value:
        raise InvalidOperation(f"{field} is missing")
    if not limits.RESOURCE_ID_PATTERN.fullmatch(value):
        raise InvalidOperation(
            f"{field} {value[:40]!r} is malformed: use 1..128 characters of [A-Za-z0-9._:@-]"
        )


def check_lines(lines: Iterable[shop_pb2.StockLine]) -> None:
    """Raise InvalidOperation unless the stock lines are well-formed.

    A SKU may appear only once per operation: a caller that repeats a SKU almost certainly has a
    bug (a cart that failed to merge), and refusing it keeps one reservation per SKU per branch,
    which is what the read APIs and the invariants talk about.
    """
    seen: set[str] = set()
    count = 0
    for number, line in enumerate(lines, start=1):
        count = number
        if number > limits.LINES_PER_OPERATION_MAX:
            raise InvalidOperation(
                f"too many lines: at most {limits.LINES_PER_OPERATION_MAX} per operation"
            )
        check_resource_id(f"line {number}: sku", line.sku)
        if not 0 < line.quantity <= limits.QUANTITY_MAX:
            raise InvalidOperation(
                f"line {number}: quantity of {line.sku} must be between 1 and "
                f"{limits.QUANTITY_MAX}, got {line.quantity}"
            )
        if line.sku in seen:
            raise InvalidOperation(
                f"line {number}: sku {line.sku} appears more than once; merge its lines into one"
            )
        seen.add(line.sku)
    if count == 0:
        raise InvalidOperation("no lines: an operation needs at least one stock line")


def check_text(field: str, value: str, *, required: bool) -> None:
    if required and not value:
        raise InvalidOperation(f"{field} is missing")
    if len(value) > limits.TEXT_FIELD_LENGTH_MAX:
        raise InvalidOperation(
            f"{field} is {len(value)} characters; the limit is {limits.TEXT_FIELD_LENGTH_MAX}"
        )


def merged_lines(lines: Iterable[shop_pb2.StockLine]) -> dict[str, int]:
    """SKU -> total quantity, in first-seen order.

    validate() already refuses repeated SKUs; prepare still merges, because recovery replays
    logged operations through prepare without validate, and a reservation must never be
    checked line by line against stock that an earlier line of the same operation took.
    """
    wanted: dict[str, int] = {}
    for line in lines:
        wanted[line.sku] = wanted.get(line.sku, 0) + line.quantity
    return wanted


PAGE_SIZE_DEFAULT = 10_000


T = TypeVar("T")


def page(items: Sequence[T], page_size: int, page_token: str) -> tuple[Sequence[T], str]:
    """One page of a list read and the token of the next ("" on the last page).

    The token is the offset as text: simple, and consistent while the list does not change.
    Raises InvalidOperation for a token this server did not hand out.
    """
    if page_token and not page_token.isdigit():
        raise InvalidOperation(f"page_token {page_token[:20]!r} was not issued by this service")
    start = int(page_token or 0)
    size = min(page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_DEFAULT)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")


async def abort_if_too_large(response: Message, context: Context, what: str) -> None:
    """Fail a read with a clear RESOURCE_EXHAUSTED when its answer exceeds the message limit.

    The list reads of shop.proto have no pagination; past MESSAGE_BYTES_MAX gRPC would fail the
    call anyway, but with a message that does not say which read or why.
    """
    size = response.ByteSize()
    if size > limits.MESSAGE_BYTES_MAX:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{what} take {size} bytes, over the {limits.MESSAGE_BYTES_MAX}-byte message limit; "
            "this read has no pagination yet",
        )


def json_text(value: Any) -> str:
    """`value` as encode_state writes it: compact JSON with sorted keys, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def encode_state(
    service: str, state: Mapping[str, Any], texts: Mapping[str, str] | None = None
) -> bytes:
    """Deterministic snapshot bytes: compact JSON with sorted keys.

    Dict keys are sorted, so two services with the same state give the same bytes however the
    state was reached; anything whose order matters (orders, captures, the outbox) is a list.
    `texts` holds values already encoded with json_text (see EncodedRows): the bytes are the
    same as if they had been given, decoded, in `state`.
    """
    document = {"format": SNAPSHOT_FORMAT, "service": service, **state}
    if not texts:
        return json_text(document).encode("ascii")
    parts = {key: json_text(value) for key, value in document.items()}
    parts.update(texts)
    return ("{" + ",".join(f"{json_text(key)}:{parts[key]}" for key in sorted(parts)) + "}").encode(
        "ascii"
    )


Row = TypeVar("Row")


class EncodedRows(Generic[Row]):
    """The JSON text of an append-only list of immutable rows, each row encoded once.

    A checkpoint snapshots a service's whole state; for a table that only grows (the outbox,
    the ledger of captures) re-encoding every row each time stalls the event loop for longer
    and longer (orders: 1.5 s at 100,000 orders). This keeps the text of the rows encoded so
    far and encodes only those appended since. A new list object (after a restore) starts
    over.

    A service calls `catch_up` as it appends (at commit), so that a row is encoded when it is
    made, not at the next checkpoint: 10,000 rows encoded at once stalled the event loop for
    42-52 ms (measured on the build machine, idle), and every transaction in flight with it.
    """

    def __init__(self, encode: Callable[[Row], Any]) -> None:
        self._encode = encode
        self._rows: Sequence[Row] | None = None
        self._texts: list[str] = []

    def catch_up(self, rows: Sequence[Row]) -> None:
        """Encode the rows appended since the last call (all of them for a new list)."""
        if rows is not self._rows or len(rows) < len(self._texts):
            self._rows = rows
            self._texts = []
        encode = self._encode
        self._texts.extend(json_text(encode(row)) for row in rows[len(self._texts) :])

    def text(self, rows: Sequence[Row]) -> str:
        self.catch_up(rows)
        return "[" + ",".join(self._texts) + "]"


def decode_state(service: str, data: bytes) -> dict[str, Any]:
    """Parse snapshot bytes from `encode_state`, refusing another service's or format's."""
    try:
        document = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{service} snapshot is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{service} snapshot is not a JSON object")
    if document.get("service") != service:
        raise ValueError(
            f"snapshot belongs to service {document.get('service')!r}, not {service!r}"
        )
    if document.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(
            f"{service} snapshot has format {document.get('format')!r}; "
            f"this build reads format {SNAPSHOT_FORMAT}"
        )
    return document


__all__ = [
    "SNAPSHOT_FORMAT",
    "Context",
    "abort_if_too_large",
    "check_lines",
    "check_resource_id",
    "check_text",
    "decode_state",
    "encode_state",
    "merged_lines",
    "transaction_of",
]
