"""The four order-flow services (inventory, orders, payment, notification), built on the SDK.

Each module holds one `Service` implementation and a `main(argv)` that runs it as its own
process (`python -m participants.services.inventory [SDK flags] [--initial PATH.json]`).

This package module holds what the four share: field validation (so that every service words
its INVALID_ARGUMENT errors the same way), the branch-key helper and the snapshot encoding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from dtm import limits
from dtmpb.v1 import shop_pb2
from participants.service import InvalidOperation, transaction_of

#: The servicer context every read API method receives.
Context = grpc.aio.ServicerContext[Any, Any]

#: Bumped when a service's snapshot layout changes; restore refuses any other version rather
#: than guess at a layout it does not know.
SNAPSHOT_FORMAT = 1


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

# A page token as page() hands it out: an offset in ASCII digits ("²".isdigit() is true and
# int("²") fails; int() refuses more than 4,300 digits). 18 digits is far past any list's
# length and keeps int() trivially cheap.
PAGE_TOKEN_PATTERN = re.compile(r"[0-9]{1,18}")


T = TypeVar("T")


def page_window(page_size: int, page_token: str) -> tuple[int, int]:
    """The number a page token holds (0 for none) and the page's size. Raises
    InvalidOperation for a token this server did not hand out."""
    if page_token and not PAGE_TOKEN_PATTERN.fullmatch(page_token):
        raise InvalidOperation(
            f"page_token {page_token[:20]!r} was not issued by this service: pass the "
            "next_page_token of the previous answer, or none for the first page"
        )
    return int(page_token or 0), min(page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_DEFAULT)


MessageT = TypeVar("MessageT", bound=Message)


def fitting(items: Sequence[T], to_pb: Callable[[T], MessageT]) -> list[MessageT]:
    """The first of `items`, as messages, that fit one answer together (grpc_edge.that_fit):
    a page of the largest orders or messages is over the 4 MiB message limit at the default
    page size, and the read failed (RESOURCE_EXHAUSTED) where it can answer a shorter page.

    At least one fits: the per-field limits keep an item under about 15 KB (an order of
    LINES_PER_OPERATION_MAX lines of 128-character SKUs), far below ANSWER_BYTES_MAX."""
    # Imported here: grpc_edge imports the write-ahead log, which the business logic of the
    # services (unit-tested without the SDK) does not need.
    from dtm.grpc_edge import that_fit

    listed, _ = that_fit(map(to_pb, items))
    assert listed or not items, "a list item outgrew an answer: the per-field limits changed"
    return listed


def page(
    items: Sequence[T], to_pb: Callable[[T], MessageT], page_size: int, page_token: str
) -> tuple[list[MessageT], str]:
    """One page of a list read, as messages, and the token of the next ("" on the last page).

    At most page_size items, fewer when more would not fit one answer (see `fitting`); the
    token is the offset, as text, of the first item not listed: simple, and consistent while
    the list only grows at its end (captures, sent messages); a list whose rows move needs its
    own token (ListOrders). Raises InvalidOperation for a token this server did not hand out.
    """
    start, size = page_window(page_size, page_token)
    listed = fitting(items[start : start + size], to_pb)
    end = start + len(listed)
    return listed, (str(end) if end < len(items) else "")


def json_text(value: Any) -> str:
    """`value` as encode_state writes it: compact JSON with sorted keys, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def encode_state(service: str, state: Mapping[str, Any]) -> bytes:
    """Deterministic snapshot bytes: compact JSON with sorted keys.

    Dict keys are sorted, so two services with the same state give the same bytes however the
    state was reached; anything whose order matters (orders, captures, the outbox) is a list.
    """
    return b"".join(state_pieces(service, state, {}))


def state_pieces(
    service: str, state: Mapping[str, Any], arrays: Mapping[str, list[bytes]]
) -> list[bytes]:
    """The bytes of `encode_state(service, state + arrays)`, as pieces to concatenate.

    `arrays` holds each growing table's JSON array already cut into pieces (see EncodedRows
    and SettledRows): the pieces are handed to the log as they are, and joined on the log's
    own thread, so a checkpoint of a large state does not copy it on the event loop.
    """
    document = {"format": SNAPSHOT_FORMAT, "service": service, **state}
    parts = {key: [json_text(value).encode("ascii")] for key, value in document.items()}
    parts.update(arrays)
    pieces = [b"{"]
    for index, key in enumerate(sorted(parts)):
        pieces.append(f"{',' if index else ''}{json_text(key)}:".encode("ascii"))
        pieces.extend(parts[key])
    pieces.append(b"}")
    return pieces


Row = TypeVar("Row")
_Row_co = TypeVar("_Row_co", covariant=True)


class TableRows(Protocol[_Row_co]):
    """A table's rows in order, as a list or a dict's values view gives them."""

    def __len__(self) -> int: ...

    def __reversed__(self) -> Iterator[_Row_co]: ...


#: Rows per cached chunk of a table's JSON text: small enough that joining the open chunk is
#: cheap, large enough that a table of 100,000 rows is about a hundred pieces.
CHUNK_ROWS = 1024


def _array(chunks: list[bytes], open_texts: list[str]) -> list[bytes]:
    """A JSON array's pieces: `[`, the cached chunks and the open texts, comma-separated, `]`."""
    items = [*chunks, ",".join(open_texts).encode("ascii")] if open_texts else chunks
    pieces = [b"["]
    for index, item in enumerate(items):
        if index:
            pieces.append(b",")
        pieces.append(item)
    pieces.append(b"]")
    return pieces


class EncodedRows(Generic[Row]):
    """The JSON text of an append-only list of immutable rows, each row encoded once, and each
    chunk of CHUNK_ROWS rows joined once.

    A checkpoint snapshots a service's whole state; for a table that only grows (the outbox,
    the ledger of captures) re-encoding every row each time stalls the event loop for longer
    and longer (orders: 1.5 s at 100,000 orders), and so does joining them (70-170 ms at
    150,000 rows: copies of a 10-20 MB text). This keeps the bytes of every full chunk and the
    texts of the rows since, so a snapshot is a list of cached pieces. A new list object (after
    a restore) starts over.

    A service calls `catch_up` as it appends (at commit), so that a row is encoded when it is
    made, not at the next checkpoint: 10,000 rows encoded at once stalled the event loop for
    42-52 ms (measured on the build machine, idle), and every transaction in flight with it.
    """

    def __init__(self, encode: Callable[[Row], Any]) -> None:
        self._encode = encode
        self._rows: Sequence[Row] | None = None
        self._chunks: list[bytes] = []
        self._open: list[str] = []  # texts of the rows after the last full chunk

    def catch_up(self, rows: Sequence[Row]) -> None:
        """Encode the rows appended since the last call (all of them for a new list)."""
        seen = len(self._chunks) * CHUNK_ROWS + len(self._open)
        if rows is not self._rows or len(rows) < seen:
            self._rows = rows
            self._chunks = []
            self._open = []
            seen = 0
        encode = self._encode
        # Bounded by the rows appended since the last call.
        for row in rows[seen:]:
            self._open.append(json_text(encode(row)))
            if len(self._open) == CHUNK_ROWS:
                self._chunks.append(",".join(self._open).encode("ascii"))
                self._open = []

    def pieces(self, rows: Sequence[Row]) -> list[bytes]:
        """The JSON array of `rows`, as pieces to concatenate."""
        self.catch_up(rows)
        return _array(self._chunks, self._open)


class SettledRows(Generic[Row]):
    """The JSON text of a table whose rows settle in order, each chunk of CHUNK_ROWS settled
    rows joined once.

    For a table that grows at its end but whose recent rows may still change or go (the
    orders: a pending order is confirmed or removed). A row is settled when its text will
    never change again and it will never be removed; a chunk is cached once its rows, and every
    row before them, are settled. The rows after the cached chunks are read again at every
    snapshot: a few thousand at most, unless a branch stays in doubt for long, which only
    delays caching. `row_text` should cache the text of a settled row (see OrderRecord).
    """

    def __init__(self, row_text: Callable[[Row], str], settled: Callable[[Row], bool]) -> None:
        self._row_text = row_text
        self._settled = settled
        self._table: object = None
        self._chunks: list[bytes] = []

    def pieces(self, table: object, rows: TableRows[Row]) -> list[bytes]:
        """The JSON array of `rows`, the rows of `table` in order, as pieces to concatenate.

        Another `table` object (after a restore) starts over, as does a table shorter than the
        rows cached, which a table whose settled rows stay cannot be."""
        cached = len(self._chunks) * CHUNK_ROWS
        if table is not self._table or len(rows) < cached:
            self._table = table
            self._chunks = []
            cached = 0
        # The rows after the cached ones, read from the end: rows are added only there and the
        # cached ones never go, so this is O(new rows), where skipping the cached ones from the
        # start took 4 ms at 135,000 orders.
        fresh = list(islice(reversed(rows), len(rows) - cached))
        fresh.reverse()
        row_text, settled = self._row_text, self._settled
        texts: list[str] = []
        caching = True  # until the first unsettled row: what follows it may still change
        for row in fresh:  # bounded by the table's length
            texts.append(row_text(row))
            caching = caching and settled(row)
            if caching and len(texts) == CHUNK_ROWS:
                self._chunks.append(",".join(texts).encode("ascii"))
                texts = []
        return _array(self._chunks, texts)


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
    "CHUNK_ROWS",
    "SNAPSHOT_FORMAT",
    "Context",
    "EncodedRows",
    "SettledRows",
    "check_lines",
    "check_resource_id",
    "check_text",
    "decode_state",
    "encode_state",
    "fitting",
    "merged_lines",
    "state_pieces",
    "transaction_of",
]
