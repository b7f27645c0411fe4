"""The invariant check of design/reliability.md over a run's final state, as the bench wires it.

Three parts, all pure (a snapshot in, violation lines out), so a fabricated snapshot exercises
exactly the path a real run takes:

- `dtm.invariants.check` over the settled state, adapted to the branches the run used: with
  N < 4, an order without a payment or a notification is what the run asked for, not a
  violation, so exactly those lines are dropped (a changed wording in dtm.invariants makes them
  show up as violations: the adaptation can only fail loud).
- The clients' view (durability and atomicity as clients saw them): every order a client was
  told COMMITTED is CONFIRMED, none told ABORTED is, and the units sold match the committed
  orders (allowing for calls whose outcome the client never learned).
- For N > 4, the same checks again with each extra instance in place of its kind's first one;
  a line about that kind's state is then about the extra instance, and is named after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence, Set
from dataclasses import dataclass

from bench.workload import Participant
from dtm import invariants
from dtm.invariants import CONFIRMED, Snapshot
from dtm.orderflow import INVENTORY, NOTIFICATION, ORDER_PARTICIPANTS, ORDERS, PAYMENT

# Lines of dtm.invariants.check that only say that a kind of branch was absent from the orders.
ABSENT_KIND_SUFFIXES = {
    PAYMENT: ": CONFIRMED but no payment was captured for it",
    NOTIFICATION: ": CONFIRMED but no notification was sent",
}
# Listing every violation of a badly broken run would bury the table; the count is exact.
SAMPLES_KEPT = 10
# Whose state a violation line is about: the kind of service its subject (the words before its
# first colon) belongs to...
SUBJECT_KINDS = (
    ("stock", INVENTORY),
    ("account", PAYMENT),
    ("money", PAYMENT),
    ("capture", PAYMENT),
    ("notification", NOTIFICATION),
    ("order", ORDERS),
)
# ...and the kinds its text after the colon compares the subject with.
REFERENCE_KINDS = (
    (("the order ", "orders contain", "no such order", "an order that"), ORDERS),
    (("payment", "captur", "charged"), PAYMENT),
    (("notification",), NOTIFICATION),
)


def scope(kinds: Set[str]) -> str:
    absent = [kind for kind in ABSENT_KIND_SUFFIXES if kind not in kinds]
    if not absent:
        return "full"
    return f"full, except that orders need no {' or '.join(absent)} (not in the transaction)"


def check_state(
    snapshot: Snapshot, kinds: Set[str], initial: invariants.InitialState | None = None
) -> list[str]:
    """dtm.invariants.check of a settled state, for orders made of branches of `kinds`, against
    the run's initial stock and accounts when given."""
    # Units sold must equal the confirmed orders' lines exactly only when orders take part;
    # otherwise there are no orders to compare with, and sales are checked by `check_client_view`.
    found = invariants.check(
        snapshot, settled=True, lines_match_inventory=ORDERS in kinds, initial=initial
    )
    suffixes = tuple(suffix for kind, suffix in ABSENT_KIND_SUFFIXES.items() if kind not in kinds)
    return [line for line in found if not (suffixes and line.endswith(suffixes))]


@dataclass(frozen=True)
class ClientView:
    """What the clients were told, over the whole run (warmup and drain included)."""

    committed: Collection[str]
    aborted: Collection[str]
    #: Calls whose outcome the client never learned (UNKNOWN answers and failed calls).
    uncertain: int
    units_per_order: int


def check_client_view(snapshot: Snapshot, view: ClientView, kinds: Set[str]) -> list[str]:
    violations: list[str] = []
    if ORDERS in kinds:
        states = {order.order_id: order.state for order in snapshot.orders}
        for order_id in sorted(view.committed):
            state = states.get(order_id)
            if state != CONFIRMED:
                violations.append(
                    f"order {order_id}: the client was told COMMITTED, but the order is "
                    f"{state or 'missing'}"
                )
        for order_id in sorted(view.aborted):
            if states.get(order_id) == CONFIRMED:
                violations.append(
                    f"order {order_id}: the client was told ABORTED, but the order is CONFIRMED"
                )
    sold = sum(level.sold for level in snapshot.stock)
    least = len(view.committed) * view.units_per_order
    most = least + view.uncertain * view.units_per_order
    if not least <= sold <= most:
        violations.append(
            f"stock: {sold} units sold in all, but clients were told of {len(view.committed)} "
            f"committed orders ({least} units) and {view.uncertain} unknown outcomes "
            f"(so {least}..{most} units)"
        )
    return violations


@dataclass(frozen=True)
class InvariantResult:
    #: None when the state could not be read (then `note` says why).
    violations: int | None
    samples: list[str]
    scope: str
    note: str = ""
    #: States checked: the first instances', then one per extra instance.
    views: int = 0


def concerns(line: str) -> frozenset[str]:
    """The kinds of service whose state a violation line (of `check_state` or
    `check_client_view`) is about; every kind for a line of a shape it does not know, so that
    a new wording is counted in every view rather than merged away."""
    subject, _, rest = line.partition(":")
    kinds = {kind for prefix, kind in SUBJECT_KINDS if subject.startswith(prefix)}
    if not kinds:
        return frozenset(ORDER_PARTICIPANTS)
    kinds |= {kind for words, kind in REFERENCE_KINDS if any(word in rest for word in words)}
    return frozenset(kinds)


def _named(line: str, extra: Participant | None) -> str:
    if extra is not None and extra.kind in concerns(line):
        return f"[{extra.name}] {line}"
    return line


def combine(
    per_snapshot: list[list[str]],
    kinds: Set[str],
    note: str = "",
    swapped: Sequence[Participant | None] = (),
) -> InvariantResult:
    """The views' violations, each counted once. `swapped[i]` is the extra instance view i
    has in place of its kind's first one (None, or past the end: the first instances'). The
    views share every service but the one whose extra instance they swap in (and the
    clients' view), so a violation of a shared service shows in every view with the same
    text: it is counted once. A line about the swapped-in kind is about the extra instance,
    and the lines never name the instance: each is named after it ("[inventory-2] stock
    sku-0: ..."), so that the same defect in two instances counts twice. A line repeated
    within one view is as many violations (the maximum over the views is kept)."""
    counted: Counter[str] = Counter()
    for index, lines in enumerate(per_snapshot):
        extra = swapped[index] if index < len(swapped) else None
        counted |= Counter(_named(line, extra) for line in lines)
    everything = list(counted.elements())
    return InvariantResult(
        violations=len(everything),
        samples=everything[:SAMPLES_KEPT],
        scope=scope(kinds),
        note=note,
        views=len(per_snapshot),
    )


def check_all(
    snapshots: list[Snapshot],
    view: ClientView,
    kinds: Set[str],
    note: str = "",
    initial: invariants.InitialState | None = None,
    swapped: Sequence[Participant | None] = (),
) -> InvariantResult:
    """Every check over every snapshot (the first instances' state, then one per extra: see
    `combine` for `swapped`), each against the run's initial stock and accounts when given
    (extra instances start from the same)."""
    return combine(
        [
            check_state(snapshot, kinds, initial) + check_client_view(snapshot, view, kinds)
            for snapshot in snapshots
        ],
        kinds,
        note,
        swapped,
    )
