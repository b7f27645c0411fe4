"""One e-commerce order as one distributed transaction, and a small client to submit it.

An order is four branches, one per service: reserve the stock, create the order, charge the
payment, send the confirmation. A free order (0 cents, e.g. a 100 % voucher) has nothing to
charge, so it is three: no payment branch, no hold, no capture. Each branch's operation is the
service's typed message packed into a `google.protobuf.Any`; the coordinator commits all of
them or none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import random
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from dtm import grpc_edge, limits
from dtm.batcher import Batcher, BatchPolicy
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, shop_pb2

INVENTORY = "inventory"
ORDERS = "orders"
PAYMENT = "payment"
NOTIFICATION = "notification"
#: The participants of an order, in branch order (a free order leaves out PAYMENT: see
#: `charges_payment`).
ORDER_PARTICIPANTS = (INVENTORY, ORDERS, PAYMENT, NOTIFICATION)

#: Failures of a Submit call that leave the outcome open (the coordinator was down or slow):
#: the same Submit again may learn it. RESOURCE_EXHAUSTED of a request within the message
#: size limit is the coordinator's limit of transactions in flight: nothing ran, and the same
#: Submit a moment later runs (see _still_open). Every other failure is an answer that the
#: same call again does not change: bad input, permission, a message over the size limit.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: A request this large always fits the coordinator's message limit (with the call's framing),
#: so its RESOURCE_EXHAUSTED can only be the limit of transactions in flight.
REQUEST_BYTES_SURE_TO_FIT = limits.MESSAGE_BYTES_MAX - 1024
RETRY_ATTEMPTS_DEFAULT = 8
#: A transaction larger than this is sent in its own Submit, not batched: SUBMIT_BATCH_MAX of
#: them (with a few bytes of framing each) then always fit one message (MESSAGE_BYTES_MAX).
BATCHED_REQUEST_BYTES_MAX = limits.MESSAGE_BYTES_MAX // limits.SUBMIT_BATCH_MAX - 64
#: First and largest wait between two Submits of submit_until_known, seconds.
RETRY_BACKOFF_S = (0.05, 2.0)

#: (sku, quantity) pairs or ready-made StockLine messages.
Lines = Iterable[tuple[str, int]] | Iterable[shop_pb2.StockLine]


def transaction_id_for(order_id: str) -> str:
    """The default transaction id of an order: deterministic, so that a client retrying an
    order whose outcome it did not learn reuses the id and can never apply it twice.

    `txn-` and the order id when that is a valid transaction id. An order id may hold what a
    transaction id may not ("@", or 125 characters and more): then `txn:` and a digest of it,
    still deterministic (and 128 bits, so two such order ids never meet in one). The digest
    form starts `txn:`, never `txn-`, so that it is never also the readable form of the order
    id spelled as its hex digits."""
    readable = f"txn-{order_id}"
    if limits.TRANSACTION_ID_PATTERN.fullmatch(readable):
        return readable
    return "txn:" + hashlib.blake2b(order_id.encode(), digest_size=16).hexdigest()


def charges_payment(amount_cents: int) -> bool:
    """Whether an order of this amount has a payment branch. A free order (0 cents) has
    nothing to hold or capture, and payment refuses a charge of 0: it has none."""
    return amount_cents != 0


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
    """The SubmitRequest of one order: branches inventory, orders, payment, notification, or
    without payment for a free order (`charges_payment`; `account` is then unused).

    The inventory branch reserves exactly the order's lines, so that units sold always equal the
    lines of confirmed orders (the invariant checker relies on it). `timeout_ms` 0 means the
    coordinator's default. `transaction_id` None is the order's own (`transaction_id_for`);
    an empty one is refused (ValueError): the coordinator would pick a new id for each Submit
    of the request, so a plain retry would place the order twice.
    """
    line_messages = stock_lines(lines)
    if transaction_id is None:
        transaction_id = transaction_id_for(order_id)
    elif not transaction_id:
        raise ValueError(
            "transaction_id is empty: leave it out (None) for the order's own id, "
            f"{transaction_id_for(order_id)!r}, or pass one; with none, each Submit of the "
            "request would be a new transaction, and a retry would place the order twice"
        )
    if body is None:
        body = confirmation_body(order_id, line_messages, amount_cents)
    branches = [
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
    ]
    if charges_payment(amount_cents):
        charge = shop_pb2.ChargePayment(
            account_id=account, amount_cents=amount_cents, order_id=order_id
        )
        branches.append(_branch(PAYMENT, charge))
    branches.append(
        _branch(
            NOTIFICATION,
            shop_pb2.SendNotification(order_id=order_id, recipient=recipient, body=body),
        )
    )
    return coordinator_pb2.SubmitRequest(
        transaction_id=transaction_id, timeout_ms=timeout_ms, branches=branches
    )


def confirmation_body(order_id: str, lines: Sequence[shop_pb2.StockLine], amount_cents: int) -> str:
    """The default message of an order: its lines and amount, in at most
    TEXT_FIELD_LENGTH_MAX characters, which is all notification accepts. The lines of a large
    order (100 of them may be over 14,000 characters) are listed while they fit, the rest
    counted ("and 40 more lines")."""
    head = f"Order {order_id} confirmed: "
    tail = (
        f"; {amount_cents} cents charged."
        if charges_payment(amount_cents)
        else "; free order, nothing charged."
    )
    items = [f"{line.quantity} x {line.sku}" for line in lines]
    full = head + ", ".join(items) + tail
    if len(full) <= limits.TEXT_FIELD_LENGTH_MAX:
        return full
    # Room for the longest count there can be, so that the listed lines never push it out.
    count_room = len(f", and {len(items)} more lines")
    budget = limits.TEXT_FIELD_LENGTH_MAX - len(head) - len(tail) - count_room
    shown: list[str] = []
    used = 0
    for item in items:  # bounded by the order's lines
        used += len(item) + (2 if shown else 0)
        if used > budget:
            break
        shown.append(item)
    more = len(items) - len(shown)
    counted = f"and {more} more line{'s' if more > 1 else ''}"
    return head + ", ".join([*shown, counted]) + tail


@dataclass(frozen=True)
class SubmitResult:
    """What a client learned from one Submit: a response, or the gRPC error instead."""

    transaction_id: str
    response: coordinator_pb2.SubmitResponse | None
    code: grpc.StatusCode
    message: str
    elapsed_s: float
    #: Submits made for this answer (OrderClient.submit_until_known may make several).
    attempts: int = 1
    #: False when this Submit never left the client (closed, its time ran out while it
    #: queued, or the queue was at CLIENT_SUBMITS_QUEUED_MAX): it ran nothing. True when it
    #: may have reached the coordinator (for submit_until_known's answer: when any of its
    #: Submits may have).
    sent: bool = True

    @property
    def known(self) -> bool:
        """COMMITTED or ABORTED: the client knows what happened."""
        return self.committed or self.aborted

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


@dataclass(slots=True)
class _Pending:
    """A transaction queued for a SubmitBatch call, and where its answer goes."""

    request: coordinator_pb2.SubmitRequest
    timeout_s: float
    started: float
    answer: asyncio.Future[SubmitResult]
    sent: bool = False


class OrderClient:
    """A thin async client of Coordinator.Submit that reports errors as values.

    Pass an address (the client owns and closes its channel) or an existing channel (the
    caller keeps ownership: a submit after the caller closed it raises grpc.aio.UsageError,
    batched or not, as a mistake of the caller's; one in flight when it closes answers
    CANCELLED, the transaction may have run).

    `batch_in_flight` > 0 sends the transactions of concurrent `submit` calls together in
    SubmitBatch calls, for a process with many orders in flight at once (a gateway): a call's
    fixed cost is about half of what a transaction costs the coordinator, and is then shared.
    Nothing waits for a timer: what is submitted in the same event-loop iteration leaves
    together, and while `batch_in_flight` calls are in flight, new transactions queue for the
    next one. Each transaction still commits or aborts on its own and gets its own answer.
    At most `limits.CLIENT_SUBMITS_QUEUED_MAX` queue: beyond, `submit` answers
    RESOURCE_EXHAUSTED at once, with nothing sent (`submit_until_known` tries again).
    """

    def __init__(self, coordinator: str | grpc.aio.Channel, *, batch_in_flight: int = 0) -> None:
        if batch_in_flight < 0:
            raise ValueError(f"batch_in_flight must be >= 0, got {batch_in_flight}")
        if isinstance(coordinator, str):
            self._channel = grpc.aio.insecure_channel(
                coordinator, options=grpc_edge.CHANNEL_OPTIONS
            )
            self._owns_channel = True
        else:
            self._channel = coordinator
            self._owns_channel = False
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._batcher: Batcher[_Pending] | None = None
        self._batch_calls = 0
        self._batch_items = 0
        self._queued_max = limits.CLIENT_SUBMITS_QUEUED_MAX
        self._gave_up_unsent = 0  # submits that gave up unsent since the last _drop_given_up
        if batch_in_flight:
            policy = BatchPolicy(
                in_flight_max=batch_in_flight,
                items_max=limits.SUBMIT_BATCH_MAX,
                linger_ms=0,
                decision_linger_ms=0,
            )
            # Every transaction is urgent (a client waits for each): none lingers.
            self._batcher = Batcher(
                self._send_batch, policy, self._tasks, lambda _: True, component="client"
            )

    @property
    def batches(self) -> tuple[int, int]:
        """(SubmitBatch calls made, transactions they carried); (0, 0) when not batching."""
        return self._batch_calls, self._batch_items

    async def submit(
        self, request: coordinator_pb2.SubmitRequest, *, timeout_s: float | None = None
    ) -> SubmitResult:
        """Submit one transaction. `timeout_s` None waits as long as the transaction's own
        timeout allows (plus a margin), so a slow decision is not mistaken for a lost one.
        Any other `timeout_s` must be a positive, finite number of seconds (ValueError).
        A request without an id gets one here (`named`), which the result carries: a lost
        answer can then be looked up (`dtm txn show`) or submitted again with that id."""
        request = named(request)
        if timeout_s is None:
            timeout_ms = request.timeout_ms or limits.TRANSACTION_TIMEOUT_MS_DEFAULT
            timeout_s = timeout_ms / 1000 + 5.0
        _check_timeout(timeout_s)
        started = time.perf_counter()
        if self._closed:
            message = "the client is closed: nothing was sent"
            return _failed(request, grpc.StatusCode.CANCELLED, message, started, sent=False)
        if self._batcher is not None and request.ByteSize() <= BATCHED_REQUEST_BYTES_MAX:
            return await self._submit_batched(request, timeout_s, started)
        try:
            response: coordinator_pb2.SubmitResponse = await self.stub.Submit(
                request, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            return _failed(request, error.code(), error.details() or "", started)
        except asyncio.CancelledError:
            # Closing the channel (close(), or its owner closing a channel lent to us) cancels
            # its calls, and grpc.aio raises CancelledError in the caller's task, which nobody
            # cancelled: answer, as the batched path does. A caller whose own task is being
            # cancelled gets its cancellation.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            closed = "the client" if self._closed else "the channel"
            message = (
                f"{closed} was closed while the call was in flight; the transaction may have "
                "run: submit it again with the same id to learn its outcome"
            )
            return _failed(request, grpc.StatusCode.CANCELLED, message, started)
        return _answered(response, started)

    async def _submit_batched(
        self, request: coordinator_pb2.SubmitRequest, timeout_s: float, started: float
    ) -> SubmitResult:
        assert self._batcher is not None
        queued = self._batcher.queued
        if queued >= self._queued_max and self._gave_up_unsent:
            queued = self._drop_given_up()
        if queued >= self._queued_max:
            message = (
                f"not sent: {queued} transactions already queue behind the SubmitBatch calls "
                f"in flight (the limit, CLIENT_SUBMITS_QUEUED_MAX); nothing ran: submit it "
                "again shortly, or keep fewer submits waiting at once"
            )
            return _failed(
                request, grpc.StatusCode.RESOURCE_EXHAUSTED, message, started, sent=False
            )
        answer: asyncio.Future[SubmitResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(request, timeout_s, started, answer)
        self._batcher.add(pending)
        try:
            # Its own deadline, whatever its neighbours' (the call waits for the longest).
            return await asyncio.wait_for(answer, timeout_s)
        except TimeoutError:
            if pending.sent:
                message = f"no answer within {timeout_s:g} s; the transaction may have run"
            else:  # and never will be: _send_batch skips an answered submit
                message = (
                    f"not sent: {timeout_s:g} s passed while it queued behind the SubmitBatch "
                    "calls in flight; nothing ran"
                )
            return _failed(
                request,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                message,
                started,
                sent=pending.sent,
            )
        finally:
            if not pending.sent:  # gave up (deadline, or cancelled): may still be queued
                self._gave_up_unsent += 1

    def _drop_given_up(self) -> int:
        """Take the submits that gave up unsent out of the queue, and say how many remain.
        Queued, they counted against CLIENT_SUBMITS_QUEUED_MAX until their call left, and
        behind a slow call, callers who gave up filled it: every new submit was refused
        "N already queue" with none waiting. O(queue), so only at the limit and only after
        a give-up since the last time (a give-up already taken is counted too, harmlessly)."""
        assert self._batcher is not None
        self._gave_up_unsent = 0
        given_up = [p for p in self._batcher.queued_items() if p.answer.done()]
        self._batcher.drop(given_up)
        return self._batcher.queued

    async def submit_until_known(
        self,
        request: coordinator_pb2.SubmitRequest,
        *,
        attempts: int = RETRY_ATTEMPTS_DEFAULT,
        timeout_s: float | None = None,
        backoff_s: tuple[float, float] = RETRY_BACKOFF_S,
    ) -> SubmitResult:
        """Submit, and submit again with the same transaction id while the outcome is open: the
        call failed in a way that leaves it unknown (RETRYABLE_CODES), the coordinator was at
        its limit of transactions in flight or this client at its limit of queued ones
        (nothing ran), or it answered UNKNOWN (a one-phase
        commit it is still resolving). At most `attempts` Submits,
        with capped exponential backoff and jitter between them
        (`backoff_s`: the first and the largest wait, seconds; ValueError unless
        0 <= first <= largest, both finite). Any other answer is final:
        bad input is not retried. The last answer is returned, known or not.

        Safe because a Submit with an id the coordinator or its participants remember (the
        last `finished_kept`, 20,000 by default, finished transactions there; 100,000 decided
        branches here) never executes
        twice; retries come seconds apart, far inside that. A request without an id gets one
        here (`named`) before the first Submit: retried without one, each Submit would be a
        new transaction."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if timeout_s is not None:
            _check_timeout(timeout_s)
        delay_s, delay_max_s = backoff_s
        if not 0 <= delay_s <= delay_max_s < math.inf:  # False for NaN too
            # inf slept forever between two Submits; a negative retried at once.
            raise ValueError(
                "backoff_s must be (first, largest) seconds with 0 <= first <= largest, both "
                f"finite, got {backoff_s!r}"
            )
        request = named(request)  # once: every retry is of the same transaction
        sent_before = False
        for attempt in range(1, attempts + 1):
            result = await self.submit(request, timeout_s=timeout_s)
            if sent_before and not result.sent:
                result = _after_one_sent(result)
            sent_before = sent_before or result.sent
            if attempt == attempts or not _still_open(result, request):
                return dataclasses.replace(result, attempts=attempt)
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))  # jitter: no lockstep
            delay_s = min(delay_s * 2, delay_max_s)
        raise AssertionError("unreachable: the last attempt returns")

    async def _send_batch(self, batch: list[_Pending]) -> None:
        # A submit that gave up meanwhile (its deadline, or cancelled) is not sent: nobody
        # would hear its answer.
        batch = [pending for pending in batch if not pending.answer.done()]
        if not batch:
            return
        self._batch_calls += 1
        self._batch_items += len(batch)
        for pending in batch:
            pending.sent = True
        try:
            results = await self._call_batch(batch)
        except grpc.aio.UsageError as error:
            # The caller closed the channel it lent us: nothing left. Each submit raises it, as
            # a Submit on that channel does on the unary path (a mistake of the caller's, not
            # an outcome: UNKNOWN said the transaction may have run).
            for pending in batch:
                pending.sent = False
                if not pending.answer.done():
                    pending.answer.set_exception(error)
            return
        except Exception as error:  # not a gRPC status: still an answer
            message = f"SubmitBatch failed in the client: {type(error).__name__}: {error}"
            results = [
                _failed(p.request, grpc.StatusCode.UNKNOWN, message, p.started) for p in batch
            ]
        except BaseException:  # cancelled: whoever waits gets an answer, not a hang
            message = "the SubmitBatch call carrying it was cancelled"
            for pending in batch:
                _settle(
                    pending,
                    _failed(pending.request, grpc.StatusCode.CANCELLED, message, pending.started),
                )
            raise
        for pending, result in zip(batch, results, strict=True):
            _settle(pending, result)

    async def _call_batch(self, batch: list[_Pending]) -> list[SubmitResult]:
        """One SubmitBatch call; each transaction's answer, as its own Submit would give it."""
        # Each submit waits no longer than its own timeout (see _submit_batched); the call
        # lasts as long as the most patient of them has left.
        now = time.perf_counter()
        timeout_s = max(pending.started + pending.timeout_s - now for pending in batch)
        request = coordinator_pb2.SubmitBatchRequest(
            transactions=[pending.request for pending in batch]
        )
        try:
            response: coordinator_pb2.SubmitBatchResponse = await self.stub.SubmitBatch(
                request, timeout=max(0.0, timeout_s)
            )
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            return [_failed(p.request, error.code(), details, p.started) for p in batch]
        if len(response.results) != len(batch):  # a broken server; never guess which is which
            message = f"{len(response.results)} answers to {len(batch)} transactions"
            return [_failed(p.request, grpc.StatusCode.INTERNAL, message, p.started) for p in batch]
        results = []
        for pending, result in zip(batch, response.results, strict=True):
            if result.code:
                code = grpc_edge.STATUS_OF_CODE.get(result.code, grpc.StatusCode.UNKNOWN)
                results.append(_failed(pending.request, code, result.message, pending.started))
                continue
            results.append(_answered(result.response, pending.started))
        return results

    async def close(self) -> None:
        self._closed = True
        if self._batcher is not None:
            for pending in self._batcher.close():
                message = "the client was closed before this transaction was sent"
                failed = _failed(
                    pending.request, grpc.StatusCode.CANCELLED, message, pending.started, sent=False
                )
                _settle(pending, failed)
            await asyncio.gather(*self._tasks, return_exceptions=True)
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


def named(request: coordinator_pb2.SubmitRequest) -> coordinator_pb2.SubmitRequest:
    """`request` if it has a transaction id, else a copy with a fresh one (`txn-` and a random
    hex). Left to the coordinator, the id came back only in an answer: a call that failed
    left the caller nothing to look the transaction up by, or to submit again with."""
    if request.transaction_id:
        return request
    copy = coordinator_pb2.SubmitRequest()
    copy.CopyFrom(request)
    copy.transaction_id = f"txn-{uuid.uuid4().hex}"
    return copy


def _check_timeout(timeout_s: float) -> None:
    """Refuse a deadline no call can keep. grpc answers 0, a negative, inf or NaN with
    DEADLINE_EXCEEDED (having sent the call for 0, which may then commit; not for a negative),
    and submit_until_known retried that answer `attempts` times as an open outcome."""
    if not 0 < timeout_s < math.inf:  # False for NaN too
        raise ValueError(
            f"timeout_s must be a positive, finite number of seconds (or None for the "
            f"transaction's own timeout and a margin), got {timeout_s!r}"
        )


def _still_open(result: SubmitResult, request: coordinator_pb2.SubmitRequest) -> bool:
    """Whether the same Submit again may learn more than `result` says."""
    if result.response is None:
        if result.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # in flight, or queued here
            return request.ByteSize() <= REQUEST_BYTES_SURE_TO_FIT
        return result.code in RETRYABLE_CODES
    return result.response.outcome == coordinator_pb2.OUTCOME_UNKNOWN


def _answered(response: coordinator_pb2.SubmitResponse, started: float) -> SubmitResult:
    return SubmitResult(
        response.transaction_id, response, grpc.StatusCode.OK, "", time.perf_counter() - started
    )


def _failed(
    request: coordinator_pb2.SubmitRequest,
    code: grpc.StatusCode,
    message: str,
    started: float,
    *,
    sent: bool = True,
) -> SubmitResult:
    elapsed_s = time.perf_counter() - started
    return SubmitResult(request.transaction_id, None, code, message, elapsed_s, sent=sent)


def _after_one_sent(unsent: SubmitResult) -> SubmitResult:
    """The answer of a retry that never left, after an attempt that did: "nothing ran" is
    true of this attempt only, and the transaction's outcome is unknown."""
    return dataclasses.replace(
        unsent,
        sent=True,
        message=f"this attempt was not sent ({unsent.message}); an earlier attempt under this "
        "id was sent and may have run: the outcome is unknown (submit again with the same id "
        "to learn it)",
    )


def _settle(pending: _Pending, result: SubmitResult) -> None:
    if not pending.answer.done():  # done: its submit was cancelled meanwhile
        pending.answer.set_result(result)


def line_summary(lines: Sequence[tuple[str, int]] | Sequence[shop_pb2.StockLine]) -> str:
    """'2 x sku-apple, 1 x sku-pear': for people reading a demo or a report."""
    return ", ".join(f"{line.quantity} x {line.sku}" for line in stock_lines(lines))
