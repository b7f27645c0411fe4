"""The checks of a run, pure: plain data in, violations out (the late-retry wave's too).

Part of `dtm.chaos`: see its docstring for what the runs do and how to replay one."""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from dtm import invariants
from dtm.chaos.matrix import (
    participants_text,
)
from dtm.chaos.orders import (
    ClientRecord,
)
from dtm.chaos.settings import (
    ABORTED,
    COMMITTED,
    UNARY_FLAG,
)
from dtm.cluster import SERVICES, Cluster
from dtm.limits import LIST_TRANSACTIONS_LIMIT_MAX
from dtm.orderflow import SubmitResult, charges_payment
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc


def orders_by_id(snapshot: invariants.Snapshot) -> dict[str, invariants.Order]:
    return {order.order_id: order for order in snapshot.orders}


@dataclass(frozen=True)
class Effects:
    """The settled services indexed by order: each order, the amounts captured for it and the
    notifications sent for it. Built once per snapshot, so checking every record of a run is
    linear (a fault soak checks some 26,000 orders against as many rows: scanned per record,
    that took over a minute)."""

    orders: dict[str, invariants.Order]
    captures: dict[str, list[int]]
    sent: Counter[str]

    @classmethod
    def of(cls, snapshot: invariants.Snapshot) -> Effects:
        captures: defaultdict[str, list[int]] = defaultdict(list)
        for capture in snapshot.captures:
            captures[capture.order_id].append(capture.amount_cents)
        return cls(
            orders=orders_by_id(snapshot),
            captures=dict(captures),
            sent=Counter(notification.order_id for notification in snapshot.sent),
        )


def check_committed(record: ClientRecord, effects: Effects) -> list[str]:
    """A transaction the client was told COMMITTED is confirmed with its effects."""
    order = effects.orders.get(record.order_id)
    where = f"order {record.order_id} ({record.transaction_id}) told COMMITTED"
    if order is None:
        return [f"{where}: the orders service does not have it (lost)"]
    if order.state != invariants.CONFIRMED:
        return [f"{where}: the order is {order.state} (reversed or lost)"]
    violations: list[str] = []
    captured = effects.captures.get(record.order_id, [])
    if not charges_payment(record.amount_cents):
        if captured:  # a free order has no payment branch
            violations.append(f"{where}: captures {captured} cents of a free order, expected none")
    elif captured != [record.amount_cents]:
        violations.append(
            f"{where}: captures {captured} cents, expected exactly one of {record.amount_cents}"
        )
    sent = effects.sent[record.order_id]
    if sent != 1:
        violations.append(f"{where}: {sent} notifications sent, expected exactly one")
    return violations


def check_client_outcomes(
    records: Iterable[ClientRecord], snapshot: invariants.Snapshot
) -> list[str]:
    """What clients were told against what the settled services show: COMMITTED must be
    confirmed with its capture and notification, ABORTED must not be confirmed. Unknown
    outcomes may land either way (their retry is checked by `check_retry`)."""
    effects = Effects.of(snapshot)
    violations: list[str] = []
    for record in records:
        if record.outcome == COMMITTED:
            violations += check_committed(record, effects)
        elif record.outcome == ABORTED:
            order = effects.orders.get(record.order_id)
            if order is not None and order.state == invariants.CONFIRMED:
                violations.append(
                    f"order {record.order_id} ({record.transaction_id}) told ABORTED "
                    f"({record.reason}), but the order is CONFIRMED"
                )
    return violations


def check_retry(
    record: ClientRecord, retry: SubmitResult, before: Mapping[str, invariants.Order]
) -> tuple[list[str], bool | None]:
    """The retry of an unknown outcome, against the settled orders before it (by id).

    Returns the violations and whether the order must be CONFIRMED from now on (None when the
    retry told nothing definite). The retry must answer COMMITTED or ABORTED and agree with the
    services. A transaction that left a cancelled order behind was aborted, so its retry must
    say ABORTED; one that left no trace at all never ran, so its retry may run it now.
    """
    where = (
        f"order {record.order_id} ({record.transaction_id}), first answered {record.outcome}, "
        f"retried after recovery"
    )
    outcome = retry.outcome
    if outcome not in (COMMITTED, ABORTED):
        detail = f": {retry.reason}" if retry.reason else ""
        return [f"{where}: the retry answered {outcome}{detail}, not the outcome"], None
    order = before.get(record.order_id)
    state = order.state if order is not None else "absent"
    if outcome == COMMITTED and state not in (invariants.CONFIRMED, "absent"):
        return [f"{where}: the retry answered COMMITTED, but the order was {state}"], True
    if outcome == ABORTED and state == invariants.CONFIRMED:
        return [f"{where}: the retry answered ABORTED, but the order is CONFIRMED"], False
    return [], outcome == COMMITTED


def check_branch_outcomes(
    transaction_ids: Iterable[str], states: Mapping[str, Mapping[str, int]]
) -> list[str]:
    """Atomicity per transaction, from the branches themselves: no transaction committed in
    one service and rolled back in another. (The state invariants compare totals per SKU, so
    two splits of the same size on one SKU would cancel out there.) `states` is service ->
    transaction id -> its branch's BranchState."""
    committed, rolled_back = (
        participant_pb2.BRANCH_STATE_COMMITTED,
        participant_pb2.BRANCH_STATE_ROLLED_BACK,
    )
    violations = []
    for transaction_id in transaction_ids:
        by_service = {
            name: seen[transaction_id] for name, seen in states.items() if transaction_id in seen
        }
        if committed in by_service.values() and rolled_back in by_service.values():
            split = ", ".join(
                f"{name} {participant_pb2.BranchState.Name(state)}"
                for name, state in sorted(by_service.items())
            )
            violations.append(f"transaction {transaction_id} split across the services: {split}")
    return violations


async def read_branch_states(cluster: Cluster) -> dict[str, dict[str, int]]:
    """Each service's newest branches (LIST_TRANSACTIONS_LIMIT_MAX: a run's are among them)."""
    states: dict[str, dict[str, int]] = {}
    for name, address in cluster.service_addresses.items():
        async with grpc.aio.insecure_channel(address) as channel:
            admin = participant_pb2_grpc.ParticipantAdminStub(channel)
            listed = await admin.ListBranches(participant_pb2.ListBranchesRequest(), timeout=10)
        states[name] = {branch.transaction_id: branch.state for branch in listed.branches}
    return states


def branches_of(transaction_id: str, states: Mapping[str, Mapping[str, int]]) -> str:
    """ "inventory COMMITTED, orders -, ...": each service's branch of the transaction."""
    return ", ".join(
        f"{name} "
        + (
            participant_pb2.BranchState.Name(seen[transaction_id]).removeprefix("BRANCH_STATE_")
            if transaction_id in seen
            else "-"
        )
        for name, seen in sorted(states.items())
    )


#: The states of a transaction the coordinator has finished (TransactionState).
FINISHED_STATES = frozenset(
    {coordinator_pb2.TRANSACTION_STATE_COMMITTED, coordinator_pb2.TRANSACTION_STATE_ABORTED}
)


async def remembered_transactions(cluster: Cluster) -> dict[str, int]:
    """The transactions the coordinator knows, with their TransactionState: in flight, and
    its window of finished ones (at most LIST_TRANSACTIONS_LIMIT_MAX)."""
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        listed = await stub.ListTransactions(
            coordinator_pb2.ListTransactionsRequest(limit=LIST_TRANSACTIONS_LIMIT_MAX), timeout=10
        )
    return {transaction.transaction_id: transaction.state for transaction in listed.transactions}


async def set_fault(cluster: Cluster, name: str, mode: int) -> None:
    """A service's fault injection (its --test-control allows it)."""
    async with grpc.aio.insecure_channel(cluster.service_addresses[name]) as channel:
        admin = participant_pb2_grpc.ParticipantAdminStub(channel)
        await admin.SetFault(participant_pb2.SetFaultRequest(mode=mode), timeout=10)  # type: ignore[arg-type]


async def read_heuristics(cluster: Cluster) -> list[str]:
    """Heuristic outcomes the coordinator holds: chaos forces nothing, so any is a split."""
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        listed = await stub.ListHeuristics(coordinator_pb2.ListHeuristicsRequest(), timeout=10)
    return [
        f"heuristic outcome at {h.participant} for {h.transaction_id}: {h.outcome}"
        for h in listed.heuristics
    ]


async def read_batching(cluster: Cluster) -> dict[str, bool]:
    """Each registered participant: whether it declared the batch capability (the coordinator
    then calls it with Exchange, else with one unary call per branch), as the coordinator
    lists it."""
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        listed = await stub.ListParticipants(coordinator_pb2.ListParticipantsRequest(), timeout=10)
    return {info.name: info.capabilities.batch for info in listed.participants}


def check_participant_modes(unary: Collection[str], batching: Mapping[str, bool]) -> list[str]:
    """Every service is registered as the run started it (`unary`: without the batch
    capability): otherwise the run did not test the path its line names."""
    violations: list[str] = []
    for name in SERVICES:
        if name not in batching:
            violations.append(f"participants: {name} is not registered at the coordinator")
        elif batching[name] == (name in unary):
            started = f"with {UNARY_FLAG}" if name in unary else f"without {UNARY_FLAG}"
            violations.append(
                f"participants: {name} was started {started} but registered batch = "
                f"{str(batching[name]).lower()}: the run ({participants_text(unary)}) did not "
                "take the path it says"
            )
    return violations


def check_ledger(ledger: Mapping[str, bool], snapshot: invariants.Snapshot) -> list[str]:
    """Every order whose outcome a client learned is still in that state: durable, never
    reversed, in every later run too."""
    orders = orders_by_id(snapshot)
    violations: list[str] = []
    for order_id, confirmed in ledger.items():
        order = orders.get(order_id)
        state = order.state if order is not None else "absent"
        if confirmed and state != invariants.CONFIRMED:
            violations.append(f"order {order_id}: a client learned COMMITTED, it is now {state}")
        elif not confirmed and state == invariants.CONFIRMED:
            violations.append(f"order {order_id}: a client learned ABORTED, it is now CONFIRMED")
    return violations


# ---- late retries: the checks of the wave (pure as well) ----

#: Branch states that are a participant's record of the transaction's abort: a retry it
#: takes part in is refused.
ABORT_RECORD_STATES = frozenset(
    {participant_pb2.BRANCH_STATE_ROLLED_BACK, participant_pb2.BRANCH_STATE_REFUSED}
)
#: Branch states a retry must leave as they are: the participant answers from its record.
DECIDED_STATES = ABORT_RECORD_STATES | {participant_pb2.BRANCH_STATE_COMMITTED}
#: What a late retry found (ClientRecord.late_kind).
LATE_COMMITTED = "committed"
LATE_ABORTED = "aborted"
#: An order learned ABORTED whose late retry ran afresh and committed, no participant having
#: kept a record of the abort: the known limit (README "Failure semantics"), not a violation.
LATE_RERUN = "rerun"


def learned_outcome(record: ClientRecord) -> str:
    """COMMITTED or ABORTED as its client learned it (the first answer, else the retry after
    recovery), or "" if it never learned one."""
    for outcome in (record.outcome, record.retry_outcome):
        if outcome in (COMMITTED, ABORTED):
            return outcome
    return ""


def abort_records(transaction_id: str, states: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The services holding a record of the transaction's abort ("payment
    BRANCH_STATE_REFUSED", ...): `states` is service -> transaction id -> BranchState."""
    return [
        f"{name} {participant_pb2.BranchState.Name(seen[transaction_id])}"
        for name, seen in sorted(states.items())
        if seen.get(transaction_id) in ABORT_RECORD_STATES
    ]


def check_late_retry(
    record: ClientRecord, retry: SubmitResult, aborts_recorded: Sequence[str]
) -> tuple[list[str], str]:
    """A retry of `record`'s order (same transaction id, same content) after the coordinator
    forgot it, against what its client learned and the services' branches before the wave
    (`aborts_recorded`: see `abort_records`). Returns the violations and the retry's kind
    (LATE_COMMITTED, LATE_ABORTED, LATE_RERUN; "" when it told no outcome).

    Learned COMMITTED: the retry must answer COMMITTED (the participants hold the branches
    committed, and say so), whichever process is down. Learned ABORTED: ABORTED, or COMMITTED
    only where no participant kept a record of the abort (the known limit: a rerun). Whatever
    was learned, a retry that a participant's record of an abort would refuse cannot commit.
    """
    learned = learned_outcome(record)
    where = (
        f"order {record.order_id} ({record.transaction_id}), learned {learned or 'no outcome'}, "
        "retried after the coordinator forgot it"
    )
    outcome = retry.outcome
    if outcome not in (COMMITTED, ABORTED):
        detail = f": {retry.reason}" if retry.reason else ""
        return [
            f"{where}: the late retry answered {outcome}{detail} (after {retry.attempts} "
            "Submits), not the outcome"
        ], ""
    if outcome == ABORTED:
        if learned == COMMITTED:
            return [f"{where}: the late retry answered ABORTED ({retry.reason})"], LATE_ABORTED
        return [], LATE_ABORTED
    if aborts_recorded:
        return [
            f"{where}: the late retry answered COMMITTED, but {', '.join(aborts_recorded)} "
            "held a record of its abort"
        ], LATE_RERUN if learned == ABORTED else LATE_COMMITTED
    return [], LATE_RERUN if learned == ABORTED else LATE_COMMITTED


def check_branches_kept(
    transaction_ids: Iterable[str],
    before: Mapping[str, Mapping[str, int]],
    after: Mapping[str, Mapping[str, int]],
) -> list[str]:
    """A branch decided before the late retries (committed, rolled back or refused) is in the
    same state after them: a participant answers a retry from its record, and changes
    nothing. `before` and `after` are service -> transaction id -> BranchState."""
    violations = []
    for transaction_id in transaction_ids:
        for name, seen in sorted(before.items()):
            state = seen.get(transaction_id)
            if state not in DECIDED_STATES:
                continue
            now = after.get(name, {}).get(transaction_id)
            if now != state:
                shown = "absent" if now is None else participant_pb2.BranchState.Name(now)
                violations.append(
                    f"transaction {transaction_id}: {name} held its branch "
                    f"{participant_pb2.BranchState.Name(state)} before the late retries, "
                    f"{shown} after them"
                )
    return violations


def check_after_late_retries(
    records: Iterable[ClientRecord], snapshot: invariants.Snapshot
) -> list[str]:
    """The settled services after the wave, against the outcome each order has now: learned
    COMMITTED, or rerun by its late retry (known limit), it is CONFIRMED with one capture of
    its amount and one notification; learned ABORTED and not rerun, it is not CONFIRMED. An
    order that never learned an outcome is held to its late retry's answer."""
    expected = []
    for record in records:
        outcome = learned_outcome(record) or record.late_outcome
        if record.late_kind == LATE_RERUN:
            outcome = COMMITTED
        if outcome in (COMMITTED, ABORTED):
            expected.append(dataclasses.replace(record, outcome=outcome))
    return [
        f"after the late retries: {violation}"
        for violation in check_client_outcomes(expected, snapshot)
    ]
