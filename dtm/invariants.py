"""The order flow's invariants (design/reliability.md), checked over the four services' state.

`check(snapshot)` is pure: it takes plain data and returns violations, so every rule is
unit-testable without a server. Given the shop's `InitialState` (the bench, chaos and the demo
know it), it also checks that every SKU and account is still there with what it started with,
and that the total money is unchanged. `read_snapshot` builds that data from the services'
read APIs, and `check_services` does both. Like Jepsen's bank checker, this looks only at the
end state that clients can observe; it is meant to run after faults have healed (`settled=True`), or
mid-run with `settled=False`, where work still in flight (reservations, holds, pending orders,
staged messages) is allowed, and so is a commit halfway through phase 2, which reaches the
services in any order: a PENDING order already charged or notified, a CONFIRMED order whose
hold, reservation or staged message is still there (as long as what is held, reserved or
staged covers it: the snapshot does not tie them to orders). A free order (0 cents) has no
payment branch, so it is confirmed without a capture.

Reading a live cluster is not one consistent cut: the four services (and the pages of one
service) are read at different moments, so a transaction that runs between two of the reads
can look like a violation (an order read CONFIRMED by a read of orders made after its commit,
while payment was read before its prepare, shows "confirmed without a capture").
`check_services(settled=False)` therefore reads again what it found broken (`confirm_live`):
only a violation that every read shows is reported as one; the others are listed apart as
suspects (`Report.suspects`), never dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc

from dtm import grpc_edge
from dtm.orderflow import charges_payment
from dtmpb.v1 import shop_pb2, shop_pb2_grpc

PENDING = "PENDING"
CONFIRMED = "CONFIRMED"
CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class StockLevel:
    sku: str
    available: int
    reserved: int
    sold: int
    received: int


@dataclass(frozen=True)
class Account:
    account_id: str
    balance_cents: int
    held_cents: int
    captured_cents: int
    initial_cents: int
    declines: bool = False


@dataclass(frozen=True)
class Capture:
    order_id: str
    account_id: str
    amount_cents: int
    transaction_id: str = ""


@dataclass(frozen=True)
class Order:
    order_id: str
    customer_id: str
    #: (sku, quantity) pairs.
    lines: tuple[tuple[str, int], ...]
    amount_cents: int
    #: PENDING, CONFIRMED or CANCELLED (anything else is itself a violation).
    state: str
    transaction_id: str = ""


@dataclass(frozen=True)
class Notification:
    order_id: str
    recipient: str
    body: str = ""
    transaction_id: str = ""


@dataclass(frozen=True)
class Snapshot:
    """What the four services' read APIs show, as plain data."""

    stock: Sequence[StockLevel] = ()
    accounts: Sequence[Account] = ()
    captures: Sequence[Capture] = ()
    orders: Sequence[Order] = ()
    sent: Sequence[Notification] = ()
    #: Notifications prepared but not yet decided.
    staged: int = 0

    def in_flight(self) -> list[str]:
        """Work not yet decided; empty once everything has settled."""
        found: list[str] = []
        reserved = sum(level.reserved for level in self.stock)
        if reserved:
            found.append(f"{reserved} units reserved")
        held = sum(account.held_cents for account in self.accounts)
        if held:
            found.append(f"{held} cents held")
        pending = sum(order.state == PENDING for order in self.orders)
        if pending:
            found.append(f"{pending} orders pending")
        if self.staged:
            found.append(f"{self.staged} notifications staged")
        return found


@dataclass(frozen=True)
class InitialState:
    """What the shop started with: units per SKU, and per account its balance and whether it
    declines every charge. With it, `check` also compares the sets of SKUs and accounts, each
    one's starting figures and the total money against it: a SKU or an account that vanished
    (with its units or its money) leaves nothing else to catch it."""

    #: SKU -> units it started with (there is no restock operation).
    stock: Mapping[str, int]
    #: Account -> cents it started with (there is no deposit operation).
    accounts: Mapping[str, int]
    #: Accounts that decline every charge.
    declining: frozenset[str] = frozenset()

    @classmethod
    def of(cls, document: Mapping[str, Any]) -> InitialState:
        """From an `initial=` document of `dtm.cluster.Cluster` (the services' --initial file):
        {"stock": {sku: units}, "accounts": {id: {"balance_cents": n, "declines": bool}}}."""
        accounts: Mapping[str, Mapping[str, Any]] = document.get("accounts", {})
        return cls(
            stock={sku: int(units) for sku, units in document.get("stock", {}).items()},
            accounts={
                account_id: int(spec["balance_cents"]) for account_id, spec in accounts.items()
            },
            declining=frozenset(
                account_id for account_id, spec in accounts.items() if spec.get("declines")
            ),
        )


@dataclass
class Report:
    violations: list[str]
    confirmed_orders: int = 0
    cancelled_orders: int = 0
    pending_orders: int = 0
    captured_cents: int = 0
    units_sold: int = 0
    notifications_sent: int = 0
    snapshot: Snapshot = field(default_factory=Snapshot, repr=False)
    #: Checked while transactions may have been running (`check_services(settled=False)`).
    live: bool = False
    #: How many times the services were read for this report (a live check reads again what
    #: it found broken, at most 1 + LIVE_RECHECKS times).
    reads: int = 1
    #: Live only: what some reads showed broken and others did not, most likely a transaction
    #: that ran between the reads of two services, perhaps a violation that did not last.
    #: Not counted by `ok`; a check once the cluster has settled tells which.
    suspects: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        figures = (
            f"{self.confirmed_orders} orders confirmed, {self.cancelled_orders} cancelled, "
            f"{self.pending_orders} pending; {self.units_sold} units sold; "
            f"{self.captured_cents} cents captured; {self.notifications_sent} notifications sent"
        )
        if not self.live:
            return figures
        return (
            f"checked live (transactions may have been running; {self.reads} read(s), "
            f"{len(self.suspects)} suspect(s) not seen by every read): {figures}"
        )


def check(
    snapshot: Snapshot,
    *,
    settled: bool = True,
    lines_match_inventory: bool = True,
    initial: InitialState | None = None,
) -> list[str]:
    """Every violated invariant, one readable line each, naming the entity; [] if all hold.

    settled: every transaction has been decided and every decision delivered, so nothing may
    stay reserved, held, pending or staged. Not settled, a commit may also be halfway through
    phase 2 (see the module's docstring).
    lines_match_inventory: every order's inventory branch reserved exactly the order's lines
    (as `dtm.orderflow.order_request` builds them), so units sold per SKU must equal the units of
    confirmed orders exactly, not merely cover them.
    initial: what the shop started with, when the caller knows it (see `InitialState`).
    """
    violations: list[str] = []
    violations += _check_stock(snapshot.stock, settled)
    violations += _check_money(snapshot.accounts, snapshot.captures, settled)
    violations += _check_declines(snapshot.accounts, snapshot.captures, initial)
    if initial is not None:
        violations += _check_initial(snapshot, initial)
    violations += _check_orders(snapshot, settled, lines_match_inventory)
    violations += _check_notifications(snapshot, settled)
    return violations


def _check_stock(stock: Sequence[StockLevel], settled: bool) -> list[str]:
    violations: list[str] = []
    seen: set[str] = set()
    for level in stock:
        name = f"stock {level.sku}"
        if level.sku in seen:
            violations.append(f"{name}: listed twice")
        seen.add(level.sku)
        total = level.available + level.reserved + level.sold
        if total != level.received:
            violations.append(
                f"{name}: available {level.available} + reserved {level.reserved} + sold "
                f"{level.sold} = {total}, but {level.received} were received "
                f"({'oversold' if total > level.received else 'units lost'} by "
                f"{abs(total - level.received)})"
            )
        for field_name in ("available", "reserved", "sold"):
            value = getattr(level, field_name)
            if value < 0:
                violations.append(f"{name}: {field_name} is negative ({value})")
        if settled and level.reserved != 0:
            violations.append(
                f"{name}: {level.reserved} units still reserved after everything settled"
            )
    return violations


def _check_money(
    accounts: Sequence[Account], captures: Sequence[Capture], settled: bool
) -> list[str]:
    violations: list[str] = []
    captured_by_account: Counter[str] = Counter()
    for capture in captures:
        captured_by_account[capture.account_id] += capture.amount_cents
        if capture.amount_cents <= 0:
            violations.append(
                f"capture for order {capture.order_id}: amount {capture.amount_cents} cents "
                "is not positive"
            )
    known: set[str] = set()
    for account in accounts:
        if account.account_id in known:
            violations.append(f"account {account.account_id}: listed twice")
        known.add(account.account_id)
    for account_id in sorted(set(captured_by_account) - known):
        violations.append(
            f"account {account_id}: {captured_by_account[account_id]} cents captured from an "
            "account the payment service does not list"
        )
    for account in accounts:
        name = f"account {account.account_id}"
        total = account.balance_cents + account.held_cents + account.captured_cents
        if total != account.initial_cents:
            violations.append(
                f"{name}: money not conserved: balance {account.balance_cents} + held "
                f"{account.held_cents} + captured {account.captured_cents} = {total}, "
                f"initial {account.initial_cents}"
            )
        if account.balance_cents < 0:
            violations.append(f"{name}: negative balance ({account.balance_cents} cents)")
        if account.held_cents < 0:
            violations.append(f"{name}: negative hold ({account.held_cents} cents)")
        if account.captured_cents != captured_by_account[account.account_id]:
            violations.append(
                f"{name}: captured_cents says {account.captured_cents}, but its captures add "
                f"up to {captured_by_account[account.account_id]}"
            )
        if settled and account.held_cents != 0:
            violations.append(
                f"{name}: {account.held_cents} cents still held after everything settled"
            )
    return violations


def _other_transaction(effect: str, order: str) -> bool:
    """An order's capture or message was made by another transaction than the order's own
    (only the branches of one transaction make an order, its payment and its message)."""
    return bool(effect and order and effect != order)


def _check_declines(
    accounts: Sequence[Account], captures: Sequence[Capture], initial: InitialState | None
) -> list[str]:
    """A declining account (a blocked card) refuses every charge: nothing may be held on it
    or captured from it, ever."""
    violations: list[str] = []
    declining = {account.account_id for account in accounts if account.declines}
    if initial is not None:
        declining |= initial.declining
    for account in accounts:
        if account.account_id in declining and account.held_cents:
            violations.append(
                f"account {account.account_id}: declines every charge, yet "
                f"{account.held_cents} cents are held on it"
            )
    for capture in captures:
        if capture.account_id in declining:
            violations.append(
                f"capture for order {capture.order_id} ({capture.amount_cents} cents): account "
                f"{capture.account_id} declines every charge"
            )
    return violations


def _missing_or_new(
    kind: str, noun: str, unit: str, service: str, started: Mapping[str, int], now: Iterable[str]
) -> list[str]:
    """What the shop started with and `service` no longer lists, and what it lists that the
    shop never had."""
    listed = set(now)
    missing = [
        f"{kind} {key}: started with {started[key]} {unit}, but {service} does not list the "
        f"{noun} any more"
        for key in sorted(set(started) - listed)
    ]
    new = [
        f"{kind} {key}: listed by {service}, but the shop never had it"
        for key in sorted(listed - set(started))
    ]
    return missing + new


def _check_initial(snapshot: Snapshot, initial: InitialState) -> list[str]:
    """The SKUs and accounts the shop started with are all there, with their starting figures,
    and no other; the money in all accounts is what it started with."""
    received = {level.sku: level.received for level in snapshot.stock}
    violations = _missing_or_new("stock", "SKU", "units", "inventory", initial.stock, received)
    for sku in sorted(set(received) & set(initial.stock)):
        if received[sku] != initial.stock[sku]:
            violations.append(
                f"stock {sku}: {received[sku]} units received, but it started with "
                f"{initial.stock[sku]} (there is no restock)"
            )
    listed = {account.account_id: account for account in snapshot.accounts}
    violations += _missing_or_new(
        "account", "account", "cents", "payment", initial.accounts, listed
    )
    for account_id in sorted(set(listed) & set(initial.accounts)):
        if listed[account_id].initial_cents != initial.accounts[account_id]:
            violations.append(
                f"account {account_id}: initial_cents says {listed[account_id].initial_cents}, "
                f"but it started with {initial.accounts[account_id]}"
            )
    total = sum(a.balance_cents + a.held_cents + a.captured_cents for a in snapshot.accounts)
    started = sum(initial.accounts.values())
    if total != started:
        violations.append(
            f"money: balances + held + captured of every account add up to {total} cents, but "
            f"the accounts started with {started} (there is no deposit)"
        )
    return violations


def _check_orders(snapshot: Snapshot, settled: bool, lines_match_inventory: bool) -> list[str]:
    violations: list[str] = []
    orders: dict[str, Order] = {}
    for order in snapshot.orders:
        if order.order_id in orders:
            violations.append(f"order {order.order_id}: listed twice")
        orders[order.order_id] = order
        if order.state not in (PENDING, CONFIRMED, CANCELLED):
            violations.append(f"order {order.order_id}: unknown state {order.state!r}")
        if settled and order.state == PENDING:
            violations.append(
                f"order {order.order_id}: still PENDING after everything settled "
                f"(transaction {order.transaction_id or '?'})"
            )

    captures_by_order: defaultdict[str, list[Capture]] = defaultdict(list)
    for capture in snapshot.captures:
        captures_by_order[capture.order_id].append(capture)

    # Mid-run, phase 2 reaches the services in any order: payment may have captured (and
    # notification sent) for an order still PENDING at the orders service, and the orders
    # service may have confirmed an order whose hold, reservation or staged message is still
    # there. The snapshot does not tie holds or reservations to orders, so what is still held
    # or reserved must cover what a confirmed order has not yet been charged or sold.
    def committing(order: Order) -> bool:
        return order.state == CONFIRMED or (not settled and order.state == PENDING)

    confirmed = [order for order in orders.values() if order.state == CONFIRMED]
    uncaptured: list[Order] = []
    for order in orders.values():
        found = captures_by_order.get(order.order_id, [])
        if order.state == CONFIRMED and not found:
            # A free order has no payment branch: nothing was to be captured.
            if charges_payment(order.amount_cents):
                uncaptured.append(order)
        elif not committing(order) or not found:
            continue
        elif len(found) > 1:
            violations.append(
                f"order {order.order_id}: {order.state} with {len(found)} captures "
                f"({', '.join(str(c.amount_cents) for c in found)} cents): charged more than once"
            )
        elif found[0].amount_cents != order.amount_cents:
            violations.append(
                f"order {order.order_id}: {order.state} for {order.amount_cents} cents but "
                f"{found[0].amount_cents} cents were captured"
            )
        elif _other_transaction(found[0].transaction_id, order.transaction_id):
            violations.append(
                f"order {order.order_id}: captured by transaction {found[0].transaction_id}, "
                f"but the order is transaction {order.transaction_id}"
            )
    held = sum(max(account.held_cents, 0) for account in snapshot.accounts)
    if settled or sum(order.amount_cents for order in uncaptured) > held:
        for order in uncaptured:
            violations.append(
                f"order {order.order_id}: CONFIRMED but no payment was captured for it"
                + ("" if settled else f" (nor can the {held} cents still held cover it)")
            )
    for order_id, found in sorted(captures_by_order.items()):
        order_or_none = orders.get(order_id)
        if order_or_none is None:
            violations.append(
                f"capture for order {order_id} ({sum(c.amount_cents for c in found)} cents from "
                f"{found[0].account_id}): no such order: payment without an order"
            )
        elif not committing(order_or_none):
            violations.append(
                f"capture for order {order_id} ({sum(c.amount_cents for c in found)} cents): "
                f"the order is {order_or_none.state}, not CONFIRMED"
            )

    # Units of confirmed orders must have been sold: each confirmed order reserved its lines
    # and the commit turned the reservation into a sale. Mid-run, a confirmed order's units
    # may still be reserved, and a pending order's already sold.
    ordered_units: Counter[str] = Counter()
    for order in confirmed:
        for sku, quantity in order.lines:
            ordered_units[sku] += quantity
    pending_units: Counter[str] = Counter()
    for order in orders.values():
        if order.state == PENDING:
            for sku, quantity in order.lines:
                pending_units[sku] += quantity
    sold = {level.sku: level.sold for level in snapshot.stock}
    reserved = {level.sku: level.reserved for level in snapshot.stock}
    for sku in sorted(set(ordered_units) | set(sold)):
        ordered = ordered_units[sku]
        units_sold = sold.get(sku)
        unsold_allowed = 0 if settled else max(reserved.get(sku, 0), 0)
        oversold_allowed = 0 if settled else pending_units[sku]
        if units_sold is None:
            violations.append(
                f"stock {sku}: confirmed orders contain {ordered} units of it, but inventory "
                "does not list the SKU"
            )
        elif units_sold + unsold_allowed < ordered:
            violations.append(
                f"stock {sku}: confirmed orders contain {ordered} units but only {units_sold} "
                "were sold" + ("" if settled else f" (and {unsold_allowed} are still reserved)")
            )
        elif lines_match_inventory and units_sold > ordered + oversold_allowed:
            violations.append(
                f"stock {sku}: {units_sold} units sold but confirmed orders contain {ordered}: "
                f"{units_sold - ordered} units sold without a confirmed order"
                + ("" if settled else f" (pending orders contain {oversold_allowed})")
            )
    return violations


def _check_notifications(snapshot: Snapshot, settled: bool) -> list[str]:
    violations: list[str] = []
    states = {order.order_id: order.state for order in snapshot.orders}
    orders = {order.order_id: order for order in snapshot.orders}
    sent_per_order = Counter(notification.order_id for notification in snapshot.sent)
    for order_id, count in sorted(sent_per_order.items()):
        state = states.get(order_id)
        if state is None:
            violations.append(
                f"notification for order {order_id}: sent {count} time(s) for an order that "
                "does not exist"
            )
        elif state != CONFIRMED and (settled or state != PENDING):
            # Mid-run, notification may have sent the message of an order still PENDING at
            # the orders service (phase 2 reaches the services in any order).
            violations.append(
                f"notification for order {order_id}: sent {count} time(s) but the order is "
                f"{state}, not CONFIRMED"
            )
        elif count > 1:
            violations.append(f"notification for order {order_id}: sent {count} times, not once")
    for notification in snapshot.sent:
        order = orders.get(notification.order_id)
        if order is not None and _other_transaction(
            notification.transaction_id, order.transaction_id
        ):
            violations.append(
                f"notification for order {order.order_id}: sent by transaction "
                f"{notification.transaction_id}, but the order is transaction "
                f"{order.transaction_id}"
            )
    unsent = [
        order_id
        for order_id, state in sorted(states.items())
        if state == CONFIRMED and sent_per_order[order_id] == 0
    ]
    # Mid-run, a confirmed order's message may still be staged: the staged ones must cover them.
    if settled or len(unsent) > snapshot.staged:
        for order_id in unsent:
            violations.append(
                f"order {order_id}: CONFIRMED but no notification was sent"
                + ("" if settled else f" (nor can the {snapshot.staged} staged cover it)")
            )
    if settled and snapshot.staged:
        violations.append(
            f"notification: {snapshot.staged} message(s) still staged after everything settled"
        )
    return violations


def report(
    snapshot: Snapshot,
    *,
    settled: bool = True,
    lines_match_inventory: bool = True,
    initial: InitialState | None = None,
) -> Report:
    """`check` plus the summary figures."""
    return Report(
        violations=check(
            snapshot,
            settled=settled,
            lines_match_inventory=lines_match_inventory,
            initial=initial,
        ),
        confirmed_orders=sum(order.state == CONFIRMED for order in snapshot.orders),
        cancelled_orders=sum(order.state == CANCELLED for order in snapshot.orders),
        pending_orders=sum(order.state == PENDING for order in snapshot.orders),
        captured_cents=sum(capture.amount_cents for capture in snapshot.captures),
        units_sold=sum(level.sold for level in snapshot.stock),
        notifications_sent=len(snapshot.sent),
        snapshot=snapshot,
    )


def subject(violation: str) -> str:
    """What a violation is about: its text up to the first ": " ("order o-4", "stock sku-a",
    "capture for order o-4 (50 cents)"), which stays the same from one read to the next while
    the figures after it move with the traffic."""
    return violation.partition(": ")[0]


async def confirm_live(
    first: Report, read_again: Callable[[], Awaitable[Report]], rechecks: int
) -> Report:
    """Read again (at most `rechecks` times, fewer once nothing is left to confirm) what a
    live check found broken, and return the last report with its violations cut to the
    subjects that every read showed broken; every other subject seen broken goes to
    `suspects`, with the texts of the last read that showed it: nothing is dropped.

    A transaction can only make a read look broken by running between the reads of two
    services (or two pages): one read it before its prepare, the other after its decision, so
    it had prepared everywhere before that read ended, and every later read sees it at least
    prepared, which the mid-run rules allow. Only another transaction across a later read (on
    the same busy SKU or account) can make the same subject look broken again, hence the few
    reads. A broken state that lasts is shown by every read; a quiesced cluster reads the same
    each time, so its report is the first read's."""
    current = first
    kept = {subject(v) for v in first.violations}
    seen = _by_subject(first.violations)
    reads = 1
    while kept and reads <= rechecks:
        current = await read_again()
        reads += 1
        latest = _by_subject(current.violations)
        kept &= set(latest)
        seen.update(latest)
    current.violations = [v for v in current.violations if subject(v) in kept]
    current.suspects = [text for key, texts in seen.items() if key not in kept for text in texts]
    current.live = True
    current.reads = reads
    return current


def _by_subject(violations: Iterable[str]) -> dict[str, list[str]]:
    found: defaultdict[str, list[str]] = defaultdict(list)
    for violation in violations:
        found[subject(violation)].append(violation)
    return dict(found)


# ---- reading the services ----

#: Service name (inventory, orders, payment, notification) -> "host:port" or an open channel.
Targets = Mapping[str, str | grpc.aio.Channel]
SERVICES = ("inventory", "orders", "payment", "notification")
# Bound on the items of one list read.
ITEMS_MAX = 10_000_000
#: The page a list read asks for: the services' default and largest (a page of large orders
#: or messages comes back shorter, as many as fit one message).
PAGE_SIZE = 10_000
#: How many times a live check (`check_services(settled=False)`) reads the services again to
#: confirm what its first read found broken: 2 more reads, each one whole read of the shop.
LIVE_RECHECKS = 2
#: How long `wait_until_settled` waits, by default.
SETTLE_TIMEOUT_S = 15.0
#: The deadline of each call of a read of the services, by default.
READ_TIMEOUT_S = 5.0
#: The repeated fields a list read's pages hold, appended page after page.
_LISTED = ("levels", "orders", "accounts", "captures", "sent")
_Page = TypeVar(
    "_Page",
    shop_pb2.GetStockResponse,
    shop_pb2.ListOrdersResponse,
    shop_pb2.ListAccountsResponse,
    shop_pb2.ListSentResponse,
)


class ServiceUnreadable(grpc.aio.AioRpcError):
    """A read of one service failed: its gRPC error, naming the service, which the error alone
    does not (the four are read at once). Still an AioRpcError, for callers that catch one."""

    def __init__(self, service: str, error: grpc.aio.AioRpcError) -> None:
        super().__init__(
            error.code(),
            error.initial_metadata(),
            # Typed as a tuple by grpc's stubs: it is the Metadata the error was made with.
            cast(grpc.aio.Metadata, error.trailing_metadata()),
            error.details(),
            error.debug_error_string(),
        )
        self.service = service


def _order_state(state: int) -> str:
    name: str = shop_pb2.OrderState.Name(state)
    return name.removeprefix("ORDER_STATE_")


async def read_snapshot(targets: Targets, *, timeout_s: float = READ_TIMEOUT_S) -> Snapshot:
    """Read the four services' state concurrently. Raises ServiceUnreadable (an AioRpcError)
    if one of them does not answer: an unreadable service is not a consistent one."""
    missing = [name for name in SERVICES if name not in targets]
    if missing:
        raise ValueError(f"no address for {', '.join(missing)}")
    owned: list[grpc.aio.Channel] = []

    def channel(name: str) -> grpc.aio.Channel:
        target = targets[name]
        if isinstance(target, str):
            opened = grpc.aio.insecure_channel(target, options=grpc_edge.CHANNEL_OPTIONS)
            owned.append(opened)
            return opened
        return target

    async def all_pages(fetch: Callable[[str], Awaitable[_Page]], what: str) -> _Page:
        """Every page of a list read, each page's items appended to the first page. A page of
        large orders or messages comes back short, as many as fit one message, and its
        next_page_token continues after them."""
        merged: _Page | None = None
        token = ""
        items = 0
        while True:  # bounded: ITEMS_MAX items, at least one a page
            try:
                page = await fetch(token)
            except grpc.aio.AioRpcError as error:
                raise ServiceUnreadable(what, error) from error
            listed = [getattr(page, name) for name in _LISTED if hasattr(page, name)]
            count = sum(map(len, listed))
            if merged is None:
                merged = page
            else:
                for name in _LISTED:
                    if hasattr(page, name):
                        getattr(merged, name).extend(getattr(page, name))
            token = page.next_page_token
            if not token:
                merged.next_page_token = ""
                return merged
            items += count
            if not count:
                raise RuntimeError(f"{what}: a page with a next_page_token but no items")
            if items > ITEMS_MAX:
                raise RuntimeError(f"{what}: more than {ITEMS_MAX} items")

    stock_stub = shop_pb2_grpc.InventoryStub(channel("inventory"))
    orders_stub = shop_pb2_grpc.OrdersStub(channel("orders"))
    payment_stub = shop_pb2_grpc.PaymentStub(channel("payment"))
    sent_stub = shop_pb2_grpc.NotificationStub(channel("notification"))

    def get_stock(token: str) -> Awaitable[shop_pb2.GetStockResponse]:
        return stock_stub.GetStock(  # type: ignore[no-any-return]
            shop_pb2.GetStockRequest(page_token=token, page_size=PAGE_SIZE), timeout=timeout_s
        )

    def list_orders(token: str) -> Awaitable[shop_pb2.ListOrdersResponse]:
        return orders_stub.ListOrders(  # type: ignore[no-any-return]
            shop_pb2.ListOrdersRequest(page_token=token, page_size=PAGE_SIZE), timeout=timeout_s
        )

    def list_accounts(token: str) -> Awaitable[shop_pb2.ListAccountsResponse]:
        return payment_stub.ListAccounts(  # type: ignore[no-any-return]
            shop_pb2.ListAccountsRequest(page_token=token, page_size=PAGE_SIZE), timeout=timeout_s
        )

    def list_sent(token: str) -> Awaitable[shop_pb2.ListSentResponse]:
        return sent_stub.ListSent(  # type: ignore[no-any-return]
            shop_pb2.ListSentRequest(page_token=token, page_size=PAGE_SIZE), timeout=timeout_s
        )

    async def stock_pages() -> shop_pb2.GetStockResponse:
        return await all_pages(get_stock, "inventory")

    async def orders_pages() -> shop_pb2.ListOrdersResponse:
        return await all_pages(list_orders, "orders")

    async def payment_pages() -> shop_pb2.ListAccountsResponse:
        return await all_pages(list_accounts, "payment")

    async def sent_pages() -> shop_pb2.ListSentResponse:
        return await all_pages(list_sent, "notification")

    try:
        stock, orders, accounts, sent = await asyncio.gather(
            stock_pages(),
            orders_pages(),
            payment_pages(),
            sent_pages(),
        )
    finally:
        await asyncio.gather(*(opened.close(None) for opened in owned))
    return snapshot_from_pb(stock, orders, accounts, sent)


def snapshot_from_pb(
    stock: shop_pb2.GetStockResponse,
    orders: shop_pb2.ListOrdersResponse,
    accounts: shop_pb2.ListAccountsResponse,
    sent: shop_pb2.ListSentResponse,
) -> Snapshot:
    return Snapshot(
        stock=[
            StockLevel(
                sku=level.sku,
                available=level.available,
                reserved=level.reserved,
                sold=level.sold,
                received=level.received,
            )
            for level in stock.levels
        ],
        accounts=[
            Account(
                account_id=account.account_id,
                balance_cents=account.balance_cents,
                held_cents=account.held_cents,
                captured_cents=account.captured_cents,
                initial_cents=account.initial_cents,
                declines=account.declines,
            )
            for account in accounts.accounts
        ],
        captures=[
            Capture(
                order_id=capture.order_id,
                account_id=capture.account_id,
                amount_cents=capture.amount_cents,
                transaction_id=capture.transaction_id,
            )
            for capture in accounts.captures
        ],
        orders=[
            Order(
                order_id=order.order_id,
                customer_id=order.customer_id,
                lines=tuple((line.sku, line.quantity) for line in order.lines),
                amount_cents=order.amount_cents,
                state=_order_state(order.state),
                transaction_id=order.transaction_id,
            )
            for order in orders.orders
        ],
        sent=[
            Notification(
                order_id=notification.order_id,
                recipient=notification.recipient,
                body=notification.body,
                transaction_id=notification.transaction_id,
            )
            for notification in sent.sent
        ],
        staged=sent.staged,
    )


async def wait_until_settled(
    targets: Targets,
    *,
    timeout_s: float = SETTLE_TIMEOUT_S,
    poll_s: float = 0.1,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> Snapshot:
    """Poll until nothing is reserved, held, pending or staged, and two reads in a row show
    the same state; return that snapshot.

    One read that shows nothing in flight is not enough: the reads of the four services are
    not one consistent cut, and a transaction that ran between them (prepared after one read,
    committed before another) is nowhere in flight in what they show, while its order is
    CONFIRMED with nothing captured or sold. A read made after that one ended sees it everywhere,
    and differs; so does a cluster that is still changing.

    Settling is driven by the servers (phase-2 retries, participants' inquiries about in-doubt
    branches), which expose no event to wait on, hence the bounded poll. Raises TimeoutError
    naming what is still in flight. `read_timeout_s`: the deadline of each call of a read.
    """
    deadline = time.monotonic() + timeout_s
    # The last read that showed nothing in flight, for the next to confirm.
    quiet: Snapshot | None = None
    while True:
        snapshot = await read_snapshot(targets, timeout_s=read_timeout_s)
        in_flight = snapshot.in_flight()
        if not in_flight and snapshot == quiet:
            return snapshot
        # A first quiet read gets its confirming read even past the deadline (one read, at
        # once): refused unconfirmed, a cluster that settled in the last poll failed the wait.
        unconfirmed = not in_flight and quiet is None
        if time.monotonic() >= deadline and not unconfirmed:
            still = ", ".join(in_flight) or "changing between two reads"
            raise TimeoutError(f"not settled after {timeout_s:g} s: still {still}")
        # The read that confirms a quiet one follows it at once: a quiet cluster costs one
        # read more, not a poll interval.
        if in_flight or quiet is not None:
            await asyncio.sleep(poll_s)
        quiet = None if in_flight else snapshot


async def check_services(
    targets: Targets,
    *,
    settled: bool = True,
    lines_match_inventory: bool = True,
    initial: InitialState | None = None,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> Report:
    """Read the services and check every invariant over what they show.

    Not settled (a live cluster), what the first read shows broken is read again, up to
    LIVE_RECHECKS times: only what every read shows is a violation, the rest are suspects
    (`confirm_live`). Settled, one read: it is final. `read_timeout_s`: the deadline of each
    call of a read."""

    async def read() -> Report:
        return report(
            await read_snapshot(targets, timeout_s=read_timeout_s),
            settled=settled,
            lines_match_inventory=lines_match_inventory,
            initial=initial,
        )

    first = await read()
    if settled:
        return first
    return await confirm_live(first, read, LIVE_RECHECKS)
