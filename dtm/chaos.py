"""`make chaos`: kill real processes at every named crash point, and at random, and check that
nothing a client was told is ever lost, and that the order flow stays consistent.

Three kinds of runs, all against the coordinator and the four services as real processes on
loopback ports (`dtm.cluster.Cluster`, reused from run to run while it stays healthy):

* The crash matrix: every crash point of `dtm.crashpoints` x every component it applies to
  (coordinator.* in the coordinator, participant.* in each of the four services, wal.* in all
  five when dtm/wal/ calls them) x seeds. A run restarts its target with DTM_CRASH_AT armed
  at a seeded count ("<point>@<n>", so the crash hits a different transaction each time),
  submits a seeded burst of concurrent orders (some commit; some abort: out of stock, declined
  card, insufficient funds; odd seeds send them in SubmitBatch calls, even seeds one by one),
  waits for the target to die with status 86, restarts it plainly and lets everything settle.
  Points hit while a process recovers (*.during_recovery) are reached by SIGKILLing the target
  mid-burst and restarting it armed.
* Random SIGKILLs under load: several clients submit orders back to back for a few seconds
  while a seeded nemesis SIGKILLs the coordinator or a service at random times and restarts it
  (odd seeds: the clients share one client that sends SubmitBatch calls).
* Late retries (after the random-kill runs, on a cluster of their own whose coordinator
  remembers only its last LATE_FINISHED_KEPT finished transactions, `finished_kept`): a
  random-kill run, checked as one; then a few more orders push every order of the run out of
  the coordinator's memory, and EVERY order of the run is submitted again (same transaction
  id, same content) while a seeded nemesis SIGKILLs, SIGSTOPs or fault-injects one process
  (FAULT_MODE_DOWN) during the first part of that wave. The coordinator no longer knows any of
  them: the participants' records answer (`check_late_retry`).

After every run, once everything has healed and settled:

* every invariant of design/reliability.md holds over the services' state (`dtm.invariants`);
* every order the client was told COMMITTED is CONFIRMED, with one capture of its amount and
  one notification, and stays so in every later run (durability);
* no order the client was told ABORTED is CONFIRMED;
* every order whose answer was unknown (UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED, ...) is
  submitted again with the same transaction id: the answer must be COMMITTED or ABORTED and
  match what the services show, and after that retry has settled nothing is applied twice.

After a late-retry wave, in addition (once it has settled, and the coordinator has had
LATE_DRAIN_S to deliver its last Rollbacks):

* an order the client learned COMMITTED is answered COMMITTED (an answer that leaves the
  outcome open, UNAVAILABLE say, is retried until it is COMMITTED or ABORTED), never ABORTED;
* an order the client learned ABORTED never becomes CONFIRMED, with one exception, the known
  limit of README "Failure semantics" (a client retries very late): where no participant kept
  a record of the abort (a prepare that reached none of them, a lazy record lost), the retry
  runs afresh and may commit. Such reruns are counted apart, not as violations, and only when
  no service showed a rolled-back or refused branch of the transaction before the wave;
* every invariant still holds, every confirmed order has one capture and one notification,
  a branch decided before the wave is still in that state, and the coordinator recorded no
  heuristic outcome (a retry's Rollback to a committed branch was once recorded as one).

Each run prints one line; a summary table and the totals follow. The last line is always
`chaos: <runs> runs, <violations> violations`; the exit status is 0 only with no violation.
A violation prints its seed, its point and the tails of the relevant process logs, and a
command that replays that run alone (same point, count, orders and kill schedule, on a fresh
cluster; timing on real processes is never exactly the same). Defaults: --kill-runs is
--runs / 10; --late-runs is --kill-runs / LATE_RUNS_PER_KILL_RUNS; --sim-seeds 0 (with
M > 0, dtm.sim.run_seed runs seeds S..S+M-1 and its violations count in the total).

    python -m dtm.chaos --runs N [--seed S] [--kill-runs K] [--late-runs L] [--sim-seeds M]
    python -m dtm.chaos --replay coordinator.mid_phase_two:coordinator:1017
    python -m dtm.chaos --replay kill:2003
    python -m dtm.chaos --replay late:2103
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dtm import config, crashpoints, invariants, wal
from dtm.cluster import COORDINATOR, PROCESSES, SERVICES, Cluster, ClusterError, Ports
from dtm.limits import LIST_TRANSACTIONS_LIMIT_MAX
from dtm.orderflow import OrderClient, SubmitResult, order_request
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc

# ---- settings: small timeouts, so that a run takes one or two seconds ----

#: Services ask the coordinator about a prepared branch after this long (default 2,000 ms).
IN_DOUBT_AFTER_MS = 300
# Checkpoints every 200 records instead of 20,000, in every process: a run of the matrix then
# meets one every few runs and a random-kill run several, so kills land before, during and
# after checkpoint writes (the segment is written on a worker thread while records are held).
CHECKPOINT_EVERY_RECORDS = 200
PREPARE_TIMEOUT_MS = 1_000
TRANSACTION_TIMEOUT_MS = 3_000
#: A client waits this long for Submit (the transaction's timeout plus a margin).
SUBMIT_TIMEOUT_S = 5.0
SETTLE_TIMEOUT_S = 30.0
SETTLE_POLL_S = 0.05
#: An armed target still running this long after its burst did not reach its crash point.
CRASH_GRACE_S = 0.5
#: A burst that did not reach the crash point is followed by at most this many more.
BURSTS_MAX = 2
ORDERS_PER_BURST = 10
#: Orders of a burst start at seeded offsets within this window, so a crash finds
#: transactions at different steps.
BURST_SPREAD_S = 0.15
# Calls in flight of the batching client odd seeds use (see batch_in_flight_of).
BATCH_IN_FLIGHT = 2
#: How long a process armed with a *.during_recovery point may take to reach it.
RECOVERY_CRASH_TIMEOUT_S = 20.0
#: A retry whose outcome is still open (UNAVAILABLE: a channel still reconnecting) is tried
#: again, spaced out (OrderClient.submit_until_known).
RETRY_ATTEMPTS = 5
RETRY_SPACING_S = 0.2
#: Bound on one run, whatever happens inside it.
RUN_TIMEOUT_S = 120.0
#: A cluster is replaced by a fresh one after this many orders, so that reading the services'
#: full state after each run stays cheap.
CLUSTER_ORDERS_MAX = 10_000

# Random SIGKILL runs
LOAD_S = 2.0
LOAD_CLIENTS = 4
ORDERS_PER_CLIENT_MAX = 150
#: Pause after a Submit that did not commit (a process may be down): no tight loop.
CLIENT_ERROR_PAUSE_S = 0.1
NEMESIS_INTERVAL_S = (0.2, 0.7)
NEMESIS_DOWNTIME_S = (0.0, 0.3)
#: Relative chance of each process being the nemesis's victim, in PROCESSES order.
NEMESIS_WEIGHTS = (4.0, 1.5, 1.5, 1.5, 1.5)

# The fault soak (`--soak SECONDS`, `make chaos-fault-soak`): one long random-kill run, more
# clients, a SIGKILL every SOAK_FAULT_EVERY_S (design/reliability.md: "soak: concurrent
# clients with a fault every 10 s"), with the latency of every Submit reported.
SOAK = "soak"
SOAK_FAULT_EVERY_S = 10.0
SOAK_CLIENTS = 8

# Late-retry runs
#: The coordinator of the late-retry cluster remembers only this many finished transactions
#: (`finished_kept`, 20,000 by default): a few more orders push a run's out of its memory.
LATE_FINISHED_KEPT = 8
#: The load before the wave (LOAD_S in a random-kill run): fewer orders, as many kinds of end.
LATE_LOAD_S = 1.5
#: Rounds of those orders at most (each LATE_FINISHED_KEPT + 2 orders, concurrent).
LATE_PUSH_ROUNDS_MAX = 5
#: The wave: every order of the run again, each started at a seeded offset within this.
LATE_WAVE_SPREAD_S = 1.5
#: The wave's nemesis acts during this first part of it, then the rest runs unharmed.
LATE_NEMESIS_S = 1.0
#: What it does to its one victim each time, and how often (relative): SIGKILL (restarted
#: after the fault's duration), SIGSTOP (then SIGCONT: a participant that hangs), or a
#: participant's fault injection FAULT_MODE_DOWN (every call answered UNAVAILABLE).
LATE_FAULTS = ("kill", "stop", "down")
LATE_FAULT_WEIGHTS = (4.0, 3.0, 3.0)
#: Relative chance of each process being the wave's victim, in PROCESSES order (the
#: coordinator is only ever SIGKILLed).
LATE_VICTIM_WEIGHTS = (1.0, 2.0, 2.0, 2.0, 2.0)
LATE_FAULT_S = (0.2, 0.6)
LATE_FAULT_GAP_S = (0.05, 0.3)
#: A late retry whose outcome is still open is submitted again, up to this many times, with
#: this backoff: enough to outlast the nemesis and the restarts it causes.
LATE_RETRY_ATTEMPTS = 25
LATE_RETRY_BACKOFF_S = (0.1, 0.5)
#: Heuristic outcomes are read this long after the wave's processes were healed: the time a
#: Rollback still being retried needs to reach its branch (a heuristic commit was recorded
#: when it did). Its retries back off from 50 ms; five at most.
LATE_DRAIN_S = 1.0
#: Default --late-runs: one late-retry run per this many random-kill runs.
LATE_RUNS_PER_KILL_RUNS = 10
#: The plan's marker of a late-retry run (None marks a random-kill run).
LATE = "late"
_TITLES = {
    LATE: "late retries after kills",
    SOAK: f"fault soak: a SIGKILL every {SOAK_FAULT_EVERY_S:g} s",
}

LOG_TAIL_LINES = 30
#: A run slower than this prints where its time went.
SLOW_RUN_S = 4.0

# ---- the shop every chaos cluster starts with ----

PRICES_CENTS = {"sku-a": 150, "sku-b": 275, "sku-c": 990, "sku-rare": 5_000, "sku-none": 100}
COMMON_SKUS = ("sku-a", "sku-b", "sku-c")
RICH_ACCOUNTS = ("acct-1", "acct-2", "acct-3")
INITIAL = {
    "stock": {
        "sku-a": 10**12,
        "sku-b": 10**12,
        "sku-c": 10**12,
        # Sells out after a few orders: contention first, then every order for it refused.
        "sku-rare": 4,
        # Sold out from the start.
        "sku-none": 0,
    },
    "accounts": {
        **{account: {"balance_cents": 10**13} for account in RICH_ACCOUNTS},
        # Runs out of money after a few orders: then "insufficient funds".
        "acct-poor": {"balance_cents": 2_000},
        "acct-blocked": {"balance_cents": 10**9, "declines": True},
    },
}
#: The same, for the invariants: what every SKU and account must still be there with.
INITIAL_STATE = invariants.InitialState.of(INITIAL)
#: What a generated order is, and how often (percent); only "ok" orders can commit for sure.
ORDER_KINDS = ("ok", "rare", "no-stock", "declined", "poor")
ORDER_KIND_WEIGHTS = (60, 5, 10, 15, 10)

COMMITTED = "COMMITTED"
ABORTED = "ABORTED"
CRASH_EXIT_STATUS = crashpoints.CRASH_EXIT_STATUS


# ---- the matrix ----


@dataclass(frozen=True)
class Cell:
    """One (crash point, component) pair of the matrix."""

    point: str
    component: str

    @property
    def during_recovery(self) -> bool:
        return self.point.endswith(".during_recovery")

    def __str__(self) -> str:
        return f"{self.point}:{self.component}"


def wal_points_wired() -> bool:
    """Whether the log (the dtm.wal package) calls its crash points (they are listed before
    they are wired)."""
    wal = importlib.import_module("dtm.wal")
    package = Path(wal.__file__).parent if wal.__file__ else None
    source = "".join(path.read_text() for path in sorted(package.glob("*.py"))) if package else ""
    return all(f'"{name}"' in source for name in crashpoints.POINTS if name.startswith("wal."))


def matrix(include_wal: bool | None = None) -> list[Cell]:
    """Every (point, component) pair, in the order of `crashpoints.POINTS`."""
    if include_wal is None:
        include_wal = wal_points_wired()
    cells: list[Cell] = []
    for point in crashpoints.POINTS:
        if point.startswith("coordinator."):
            components: Sequence[str] = (COORDINATOR,)
        elif point.startswith("participant."):
            components = SERVICES
        elif point.startswith("wal.") and include_wal:
            components = PROCESSES
        else:
            continue
        cells.extend(Cell(point, component) for component in components)
    return cells


def run_modes(cell: Cell, seed: int) -> tuple[bool, bool]:
    """(lose the unsynced writes, and group commit on its own thread) for a crash-matrix run:
    half the runs lose them, and half of those use wal_sync = thread. Drawn per (cell, seed),
    not from the seed's parity, which with an even number of cells gives each cell one mode."""
    modes = random.Random(f"chaos-modes:{cell}:{seed}")
    loses = modes.random() < 0.5
    return loses, loses and modes.random() < 0.5


def crash_count(point: str, ok_orders: int, aborting_orders: int, rng: random.Random) -> int:
    """The n of "<point>@<n>": a seeded count that a burst's orders are likely to reach, so
    that the crash hits the first, a middle or a late transaction of the burst."""
    votes = 4 * (ok_orders + aborting_orders)
    expected = {
        "coordinator.after_vote_received": votes // 2,
        "coordinator.after_client_reply": ok_orders + aborting_orders,
        "coordinator.mid_phase_two": 3 * ok_orders,
        "coordinator.after_abort_decided": aborting_orders,
        "participant.after_rollback_applied": aborting_orders // 2,
        "wal.before_fsync": ok_orders,
        "wal.after_fsync": ok_orders,
    }.get(point, ok_orders)
    if point.endswith(".during_recovery"):
        return 1  # hit once per start
    return rng.randint(1, max(1, (expected * 3) // 4))


# ---- orders and what clients were told ----


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


# ---- the checks (pure: plain data in, violations out) ----


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
    if captured != [record.amount_cents]:
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


# ---- one run's result ----


@dataclass
class RunResult:
    index: int
    kind: str  # "matrix", "kill", "late" or "soak"
    seed: int
    cell: Cell | None = None
    crash_at: str = ""
    #: The crash point also dropped the target's unsynced log writes, as a power loss would
    #: (dtm.wal.LOSE_UNSYNCED_VARIABLE): half the runs, drawn per (cell, seed).
    loses_unsynced: bool = False
    #: The target's group commit while armed (dtm.wal.async_log): "loop", or "thread".
    wal_sync: str = "loop"
    #: "crashed" (status 86), "not reached", or what else happened to the target.
    target: str = ""
    kills: Counter[str] = field(default_factory=Counter)
    records: list[ClientRecord] = field(default_factory=list)
    #: Late-retry runs: the orders that pushed the run's out of the coordinator's memory
    #: (checked, not retried), the wave's faults ("stop payment": 2), and how many late
    #: retries were under way while a fault was on.
    pushers: list[ClientRecord] = field(default_factory=list)
    late_faults: Counter[str] = field(default_factory=Counter)
    late_during_faults: int = 0
    #: The known-limit reruns (LATE_RERUN), each with what the services showed of it.
    reruns: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    #: Fault soaks: how long, and each Submit's latency at its client, ms (any outcome).
    soak_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    #: Process name -> tail of its log, kept when the run has violations.
    logs: dict[str, str] = field(default_factory=dict)
    data_dir: str = ""
    elapsed_s: float = 0.0
    #: (phase, seconds) in order: where a run's time went (printed with --verbose).
    phases: list[tuple[str, float]] = field(default_factory=list)
    _last_mark: float = field(default_factory=time.perf_counter, repr=False)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases.append((phase, now - self._last_mark))
        self._last_mark = now

    def count(self, outcome: str) -> int:
        return sum(record.outcome == outcome for record in self.records)

    @property
    def committed(self) -> int:
        return self.count(COMMITTED)

    @property
    def aborted(self) -> int:
        return self.count(ABORTED)

    @property
    def unknown(self) -> int:
        return sum(not record.known for record in self.records)

    @property
    def retried(self) -> Counter[str]:
        return Counter(r.retry_outcome for r in self.records if r.retry_outcome)

    @property
    def late(self) -> Counter[str]:
        """Late retries by what they found (LATE_COMMITTED...; "" when told no outcome)."""
        return Counter(r.late_kind for r in self.records if r.late_outcome)

    @property
    def replay(self) -> str:
        if self.cell is not None:
            return f"python -m dtm.chaos --replay {self.cell}:{self.seed}"
        if self.kind == SOAK:
            return (
                "python -m dtm.chaos --runs 0 --kill-runs 0 --late-runs 0 "
                f"--soak {self.soak_s:g} --seed {self.seed}"
            )
        return f"python -m dtm.chaos --replay {self.kind}:{self.seed}"

    def line(self, total: int) -> str:
        width = len(str(total))
        head = f"[{self.index:>{width}}/{total}]"
        if self.cell is not None:
            what = f"{self.crash_at:<40} {self.cell.component:<12} seed {self.seed:<6}"
            target = self.target
            if self.loses_unsynced and target == "crashed":
                target += f", unsynced writes lost (wal_sync {self.wal_sync})"
            what += f" {target:<11}"
        else:
            kills = ", ".join(f"{n} {name}" for name, n in sorted(self.kills.items()))
            title = _TITLES.get(self.kind, "random SIGKILL under load")
            what = f"{title:<40} {'-':<12} seed {self.seed:<6}"
            what += f" kills: {kills or 'none'};"
        retried = self.retried
        retry = ""
        if retried:
            retry = " (retried: " + ", ".join(f"{n} {o}" for o, n in sorted(retried.items())) + ")"
        orders = (
            f"orders {len(self.records)}: {self.committed} committed, {self.aborted} aborted, "
            f"{self.unknown} unknown{retry}"
        )
        late = self.late
        if late:
            faults = ", ".join(f"{n} {f}" for f, n in sorted(self.late_faults.items()))
            orders += (
                f"; late retries {sum(late.values())}: {late[LATE_COMMITTED]} committed, "
                f"{late[LATE_ABORTED]} aborted, {late[LATE_RERUN]} reruns (known limit)"
                + (f", {late['']} without an outcome" if late[""] else "")
                + f", {self.late_during_faults} during faults ({faults or 'none'})"
            )
        if self.kind == SOAK and self.latencies_ms:
            orders += f"; {latency_summary(self.latencies_ms)}"
        result = "ok" if not self.violations else f"VIOLATIONS: {len(self.violations)}"
        return f"{head} {what} {orders}  {self.elapsed_s:.1f} s  {result}"


def latency_summary(latencies_ms: Sequence[float]) -> str:
    """p50, p99 and max of every Submit at its client, whatever its outcome (a Submit that
    meets a killed process waits for it, so the tail is the faults')."""
    ordered = sorted(latencies_ms)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return (
        f"latency of {len(ordered)} Submits: p50 {at(0.5):.1f} ms, p99 {at(0.99):.1f} ms, "
        f"max {ordered[-1]:.1f} ms"
    )


# ---- the session: one cluster reused across runs ----


class Session:
    """Runs one after another against one cluster, replaced only when it must be."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.soak_s = 0.0  # the fault soak's length (`--soak`)
        self.cluster: Cluster | None = None
        #: Whether `cluster` is the late-retry runs' (its coordinator's memory is small).
        self.cluster_late = False
        self.clusters_started = 0
        #: Order id -> must be CONFIRMED; every order whose outcome is known, for this cluster.
        self.ledger: dict[str, bool] = {}
        #: Heuristic outcomes already reported as violations, for this cluster.
        self.heuristics_reported: set[str] = set()
        self.orders_on_cluster = 0

    # ---- the cluster ----

    def _new_cluster(self, late: bool = False) -> Cluster:
        self.clusters_started += 1
        checkpoints = ["--checkpoint-every-records", str(CHECKPOINT_EVERY_RECORDS)]
        participant_args = ["--in-doubt-after-ms", str(IN_DOUBT_AFTER_MS), *checkpoints]
        coordinator_args = list(checkpoints)
        if late:
            # Every start of it, restarts included: its checkpoints keep the same window.
            coordinator_args += ["--finished-kept", str(LATE_FINISHED_KEPT)]
        return Cluster(
            self.root / f"cluster-{self.clusters_started}",
            Ports.free(),
            initial=INITIAL,
            test_control=True,
            prepare_timeout_ms=PREPARE_TIMEOUT_MS,
            transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
            extra_args={
                COORDINATOR: coordinator_args,
                **{name: participant_args for name in SERVICES},
            },
        )

    async def ensure_cluster(self, late: bool = False) -> Cluster:
        """The cluster for a run: the late-retry runs have their own (see _new_cluster)."""
        if self.cluster is not None and self.orders_on_cluster >= CLUSTER_ORDERS_MAX:
            await self.drop_cluster()
        if self.cluster is not None and self.cluster_late != late:
            await self.drop_cluster()
        if self.cluster is None:
            cluster = self._new_cluster(late)
            await asyncio.to_thread(cluster.start)
            self.cluster = cluster
            self.cluster_late = late
            self.ledger = {}
            self.heuristics_reported = set()
            self.orders_on_cluster = 0
        return self.cluster

    async def drop_cluster(self) -> None:
        """Stop the cluster; the next run starts a fresh one (after a violation, or when it
        has grown big)."""
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await asyncio.to_thread(cluster.stop, 2.0)

    async def close(self) -> None:
        await self.drop_cluster()

    # ---- the pieces of a run ----

    def _next_order_id(self, result: RunResult, number: int) -> str:
        return f"r{result.index}-s{result.seed}-{number}"

    async def burst(
        self, cluster: Cluster, result: RunResult, rng: random.Random, first: int
    ) -> list[ClientRecord]:
        """ORDERS_PER_BURST seeded orders, started at seeded offsets, all concurrent."""
        planned = []
        for number in range(first, first + ORDERS_PER_BURST):
            order_id = self._next_order_id(result, number)
            request, amount, _ = make_order(rng, order_id)
            planned.append((rng.uniform(0.0, BURST_SPREAD_S), order_id, request, amount))
        self.orders_on_cluster += len(planned)
        async with OrderClient(
            cluster.coordinator_address, batch_in_flight=batch_in_flight_of(result.seed)
        ) as client:

            async def one(
                delay: float, order_id: str, request: coordinator_pb2.SubmitRequest, amount: int
            ) -> ClientRecord:
                await asyncio.sleep(delay)
                answer = await client.submit(request, timeout_s=SUBMIT_TIMEOUT_S)
                return record_of(order_id, request, amount, answer)

            return list(await asyncio.gather(*(one(*plan) for plan in planned)))

    def _unexpected_exits(self, cluster: Cluster, expected: Iterable[str]) -> list[str]:
        """Processes that died on their own although nothing was meant to kill them."""
        violations: list[str] = []
        allowed = set(expected)
        for name in PROCESSES:
            if name in allowed or cluster.running(name):
                continue
            code = cluster.exit_code(name)
            violations.append(f"{name} exited on its own with status {code} (not a crash point)")
        return violations

    async def heal(self, cluster: Cluster) -> None:
        """Start every process that is not running; wait until all are ready."""
        await asyncio.to_thread(cluster.start)

    async def nemesis_kill(self, cluster: Cluster, result: RunResult, victim: str) -> bool:
        """SIGKILL `victim` on the nemesis's behalf; True if it was running and is now killed.

        A process already down at this point died on its own: it is reported (and started
        again) first, so that the kill neither hides its death nor is counted for it. Only a
        kill that found the victim running (`Cluster.kill` returned its pid) is counted; if the
        victim died on its own in between, the caller must not exempt it from
        `_unexpected_exits`."""
        found = self._unexpected_exits(cluster, ())
        if found:
            result.violations += found
            await self.heal(cluster)
        pid = await asyncio.to_thread(cluster.kill, victim)
        if pid is None:
            return False
        result.kills[victim] += 1
        return True

    async def settle(self, cluster: Cluster, result: RunResult) -> invariants.Snapshot | None:
        try:
            return await invariants.wait_until_settled(
                cluster.service_addresses, timeout_s=SETTLE_TIMEOUT_S, poll_s=SETTLE_POLL_S
            )
        except TimeoutError as error:
            result.violations.append(f"did not settle: {error}")
        except Exception as error:  # an unreadable service is a failed run, with its reason
            result.violations.append(f"could not read the services: {error!r}")
        return None

    async def settle_and_report(
        self, cluster: Cluster, result: RunResult, when: str
    ) -> invariants.Snapshot | None:
        """Settle again after more orders ran (`when`: "after the retries"...) and hold the
        state to the invariants, each violation named with `when`; None if it never settled."""
        snapshot = await self.settle(cluster, result)
        result.mark(f"settle {when}")
        if snapshot is not None:
            result.violations += [
                f"{when}: {v}"
                for v in invariants.report(snapshot, initial=INITIAL_STATE).violations
            ]
        return snapshot

    async def retry_all(
        self, cluster: Cluster, records: Sequence[ClientRecord]
    ) -> list[SubmitResult]:
        """Submit each record's request again, with the same transaction id, concurrently."""

        async def retry(client: OrderClient, record: ClientRecord) -> SubmitResult:
            assert record.request is not None
            return await client.submit_until_known(
                record.request,
                attempts=RETRY_ATTEMPTS,
                timeout_s=SUBMIT_TIMEOUT_S,
                backoff_s=(RETRY_SPACING_S, RETRY_SPACING_S),
            )

        if not records:
            return []
        async with OrderClient(cluster.coordinator_address) as client:
            return list(await asyncio.gather(*(retry(client, record) for record in records)))

    async def check(self, cluster: Cluster, result: RunResult) -> None:
        """Settle, check everything, retry the unknown outcomes, settle and check again."""
        snapshot = await self.settle(cluster, result)
        result.mark("settle")
        if snapshot is None:
            return
        result.violations += invariants.report(snapshot, initial=INITIAL_STATE).violations
        result.violations += check_client_outcomes(result.records, snapshot)
        for record in result.records:
            if record.known:
                self.ledger[record.order_id] = record.outcome == COMMITTED
        unknown = [record for record in result.records if not record.known]
        answers = await self.retry_all(cluster, unknown)
        result.mark("retry")
        before = orders_by_id(snapshot)
        for record, answer in zip(unknown, answers, strict=True):
            record.retry_outcome = answer.outcome
            found, confirmed = check_retry(record, answer, before)
            result.violations += found
            if confirmed is not None:
                self.ledger[record.order_id] = confirmed
        if unknown:
            # A retry may have run a transaction that never ran before: let it settle too, and
            # see that nothing was applied twice.
            snapshot = await self.settle_and_report(cluster, result, "after the retries")
            if snapshot is None:
                return
        result.violations += check_ledger(self.ledger, snapshot)
        try:
            states = await read_branch_states(cluster)
            # The coordinator keeps a heuristic until an operator forgets it: report it once,
            # in the run that made it, not in every later run on this cluster.
            heuristics = await read_heuristics(cluster)
            result.violations += [h for h in heuristics if h not in self.heuristics_reported]
            self.heuristics_reported.update(heuristics)
        except grpc.aio.AioRpcError as error:
            result.violations.append(f"could not list the branches: {error.code().name}")
            return
        result.violations += check_branch_outcomes(
            (record.transaction_id for record in result.records), states
        )

    async def arm(self, cluster: Cluster, target: str, env: Mapping[str, str]) -> int | None:
        """Restart `target` with `env`; None once it is ready, or its exit status if it died
        while starting (a point reached during start-up)."""
        await asyncio.to_thread(lambda: cluster.restart(target, kill=True, env=env, wait=False))
        try:
            await asyncio.to_thread(cluster.wait_ready, cluster.start_timeout_s)
        except ClusterError:
            code = cluster.exit_code(target)
            if code is None:
                raise
            return code
        return None

    # ---- the two kinds of runs ----

    async def matrix_run(self, index: int, cell: Cell, seed: int) -> RunResult:
        result = RunResult(index=index, kind="matrix", seed=seed, cell=cell)
        rng = random.Random(f"chaos:{cell}:{seed}")
        cluster = await self.ensure_cluster()
        result.mark("cluster")
        target = cell.component
        # Estimate the burst's mix to choose a count it is likely to reach.
        ok = round(ORDERS_PER_BURST * ORDER_KIND_WEIGHTS[0] / sum(ORDER_KIND_WEIGHTS))
        count = crash_count(cell.point, ok, ORDERS_PER_BURST - ok, rng)
        result.crash_at = f"{cell.point}@{count}"
        armed = {crashpoints.ENVIRONMENT_VARIABLE: result.crash_at}
        result.loses_unsynced, thread = run_modes(cell, seed)
        if result.loses_unsynced:
            armed[wal.LOSE_UNSYNCED_VARIABLE] = "1"
        if thread:
            # Half of those with the other group commit, whose fsync runs on its own thread
            # while the loop goes on: what a reply sent too early needs to escape before the
            # power goes (with "loop", the fsync holds the loop that would send it).
            section = "coordinator" if target == COORDINATOR else "participant"
            armed[config.environment_variable(section, "wal_sync")] = "thread"
            result.wal_sync = "thread"
        if cell.during_recovery:
            # Something to recover: SIGKILL the target mid-burst, then restart it armed.
            kill_after = rng.uniform(0.0, BURST_SPREAD_S + 0.1)

            async def kill_later() -> None:
                await asyncio.sleep(kill_after)
                if not await self.nemesis_kill(cluster, result, target):
                    # It died on its own after the check: say so before restarting it armed.
                    others = [name for name in PROCESSES if name != target]
                    result.violations += self._unexpected_exits(cluster, others)

            killer = asyncio.create_task(kill_later())
            result.records += await self.burst(cluster, result, rng, 0)
            await killer
            await asyncio.to_thread(
                lambda: cluster.restart(target, kill=True, env=armed, wait=False)
            )
            code = await asyncio.to_thread(cluster.wait_exit, target, RECOVERY_CRASH_TIMEOUT_S)
        else:
            code = await self.arm(cluster, target, armed)
            result.mark("arm")
            for number in range(BURSTS_MAX if code is None else 0):
                result.records += await self.burst(cluster, result, rng, number * ORDERS_PER_BURST)
                code = await asyncio.to_thread(cluster.wait_exit, target, CRASH_GRACE_S)
                if code is not None:
                    break
        if code is None:
            result.target = "not reached"
            await asyncio.to_thread(cluster.kill, target)  # still armed: restart it plainly
        elif code == CRASH_EXIT_STATUS:
            result.target = "crashed"
        else:
            result.target = f"exit {code}"
            result.violations.append(
                f"{target} exited with status {code}, not {CRASH_EXIT_STATUS} (a crash point)"
            )
        result.mark("burst and crash")
        result.violations += self._unexpected_exits(cluster, [target])
        await self.heal(cluster)
        result.mark("heal")
        await self.check(cluster, result)
        return result

    async def kill_run(self, index: int, seed: int) -> RunResult:
        result = RunResult(index=index, kind="kill", seed=seed)
        cluster = await self.ensure_cluster()
        await self.load_under_kills(cluster, result, f"chaos:kill:{seed}")
        await self.check(cluster, result)
        return result

    async def soak_run(self, index: int, seed: int, seconds: float) -> RunResult:
        result = RunResult(index=index, kind=SOAK, seed=seed, soak_s=seconds)
        cluster = await self.ensure_cluster()
        await self.load_under_kills(
            cluster,
            result,
            f"chaos:soak:{seed}",
            seconds,
            every_s=(SOAK_FAULT_EVERY_S, SOAK_FAULT_EVERY_S),
            clients=SOAK_CLIENTS,
            orders_max=1_000_000,  # bounded by `seconds`
        )
        await self.check(cluster, result)
        return result

    async def load_under_kills(
        self,
        cluster: Cluster,
        result: RunResult,
        name: str,
        load_s: float = LOAD_S,
        *,
        every_s: tuple[float, float] = NEMESIS_INTERVAL_S,
        clients: int = LOAD_CLIENTS,
        orders_max: int = ORDERS_PER_CLIENT_MAX,
    ) -> None:
        """LOAD_CLIENTS clients submit orders back to back for `load_s` while a nemesis
        SIGKILLs processes at random and restarts them; then every process is healed. `name`
        seeds it all (each client too)."""
        rng = random.Random(name)
        seed = result.seed
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        # Batching (odd seeds): every client's orders travel in one shared client's calls.
        # Unused otherwise, it costs nothing: a gRPC channel connects at its first call.
        batching = batch_in_flight_of(seed)
        shared = OrderClient(cluster.coordinator_address, batch_in_flight=batching)

        async def client(number: int) -> None:
            client_rng = random.Random(f"{name}:client:{number}")
            async with contextlib.AsyncExitStack() as stack:
                # Not batching: a client (and a channel) of its own, as before.
                orders = shared
                if not batching:
                    orders = await stack.enter_async_context(
                        OrderClient(cluster.coordinator_address)
                    )
                for count in range(orders_max):
                    if stop.is_set():
                        return
                    order_id = self._next_order_id(result, number * orders_max + count)
                    request, amount, _ = make_order(client_rng, order_id)
                    self.orders_on_cluster += 1
                    sent = time.perf_counter()
                    answer = await orders.submit(request, timeout_s=SUBMIT_TIMEOUT_S)
                    result.latencies_ms.append((time.perf_counter() - sent) * 1000)
                    record = record_of(order_id, request, amount, answer)
                    result.records.append(record)
                    if record.outcome != COMMITTED:
                        # A process may be down: back off a little rather than fail fast in
                        # a tight loop.
                        await asyncio.sleep(CLIENT_ERROR_PAUSE_S)

        async def nemesis() -> None:
            deadline = loop.time() + load_s
            try:
                while True:
                    await asyncio.sleep(rng.uniform(*every_s))
                    if loop.time() >= deadline:
                        return
                    victim = rng.choices(PROCESSES, NEMESIS_WEIGHTS)[0]
                    killed = await self.nemesis_kill(cluster, result, victim)
                    await asyncio.sleep(rng.uniform(*NEMESIS_DOWNTIME_S))
                    # Anything else down now died by itself (the victim too, if the kill
                    # found it gone): say so before restarting it.
                    result.violations += self._unexpected_exits(cluster, [victim] if killed else [])
                    await self.heal(cluster)
            finally:
                stop.set()

        async with shared:
            await asyncio.gather(nemesis(), *(client(number) for number in range(clients)))
        result.mark("load and kills")
        result.violations += self._unexpected_exits(cluster, ())
        await self.heal(cluster)
        result.mark("heal")

    # ---- late retries ----

    async def late_run(self, index: int, seed: int) -> RunResult:
        """A random-kill run on the late-retry cluster, checked as one; then every order of it
        again once the coordinator has forgotten them all, under a nemesis (see the module's
        docstring)."""
        result = RunResult(index=index, kind=LATE, seed=seed)
        cluster = await self.ensure_cluster(late=True)
        await self.load_under_kills(cluster, result, f"chaos:late:{seed}", LATE_LOAD_S)
        await self.check(cluster, result)
        if result.violations:
            return result  # the wave would only bury what is wrong already
        await self.push_out(cluster, result, random.Random(f"chaos:late:{seed}:push"))
        result.mark("push out of memory")
        if result.violations:
            return result
        before = await read_branch_states(cluster)
        await self.late_wave(cluster, result, before, random.Random(f"chaos:late:{seed}:wave"))
        result.mark("late wave")
        healed = time.perf_counter()
        await self.check_late(cluster, result, before, healed)
        return result

    async def push_out(self, cluster: Cluster, result: RunResult, rng: random.Random) -> None:
        """Orders after the run's, until the coordinator remembers none of the run's
        transactions: it keeps its last LATE_FINISHED_KEPT finished ones, and those not
        finished yet (a commit whose phase 2 is still being retried, its participant having
        learned the outcome by its own inquiry) are waited for. The orders are checked with
        the wave, not retried."""
        run_ids = {record.transaction_id for record in result.records}
        deadline = time.perf_counter() + SETTLE_TIMEOUT_S
        rounds = 0
        async with OrderClient(cluster.coordinator_address) as client:
            while True:
                remembered = {
                    transaction_id: state
                    for transaction_id, state in (await remembered_transactions(cluster)).items()
                    if transaction_id in run_ids
                }
                if not remembered:
                    return
                if rounds >= LATE_PUSH_ROUNDS_MAX or time.perf_counter() > deadline:
                    break
                if not FINISHED_STATES & set(remembered.values()):
                    await asyncio.sleep(SETTLE_POLL_S)
                    continue
                rounds += 1
                first = len(result.pushers)
                planned = []
                for number in range(first, first + LATE_FINISHED_KEPT + 2):
                    order_id = f"r{result.index}-s{result.seed}-push-{number}"
                    request, amount, _ = make_order(rng, order_id)
                    planned.append((order_id, request, amount))
                self.orders_on_cluster += len(planned)
                answers = await asyncio.gather(
                    *(client.submit(item[1], timeout_s=SUBMIT_TIMEOUT_S) for item in planned)
                )
                result.pushers += [
                    record_of(order_id, request, amount, answer)
                    for (order_id, request, amount), answer in zip(planned, answers, strict=True)
                ]
                await asyncio.sleep(SETTLE_POLL_S)  # their last acknowledgements finish them
        example, state = sorted(remembered.items())[0]
        result.violations.append(
            f"the coordinator (finished_kept {LATE_FINISHED_KEPT}) still remembers "
            f"{len(remembered)} of the run's transactions after {len(result.pushers)} newer "
            f"orders, e.g. {example} ({coordinator_pb2.TransactionState.Name(state)})"
        )

    async def late_wave(
        self,
        cluster: Cluster,
        result: RunResult,
        before: Mapping[str, Mapping[str, int]],
        rng: random.Random,
    ) -> None:
        """Every order of the run again, same transaction id and content, each at a seeded
        offset within LATE_WAVE_SPREAD_S and retried until its outcome is known, while the
        nemesis harms one process for LATE_NEMESIS_S; then everything is healed and each
        answer checked (`check_late_retry`)."""
        # The nemesis's draws first: they do not depend on how many orders the load made.
        victim = rng.choices(PROCESSES, LATE_VICTIM_WEIGHTS)[0]
        nemesis_rng = random.Random(rng.random())
        records = [record for record in result.records if record.request is not None]
        offsets = [rng.uniform(0.0, LATE_WAVE_SPREAD_S) for _ in records]
        loop = asyncio.get_running_loop()
        faults: list[tuple[float, float]] = []  # (on, off), loop time

        async with OrderClient(
            cluster.coordinator_address, batch_in_flight=batch_in_flight_of(result.seed)
        ) as client:

            async def one(offset: float, record: ClientRecord) -> tuple[SubmitResult, float, float]:
                assert record.request is not None
                await asyncio.sleep(offset)
                started = loop.time()
                answer = await client.submit_until_known(
                    record.request,
                    attempts=LATE_RETRY_ATTEMPTS,
                    timeout_s=SUBMIT_TIMEOUT_S,
                    backoff_s=LATE_RETRY_BACKOFF_S,
                )
                return answer, started, loop.time()

            nemesis = asyncio.create_task(
                self.late_nemesis(cluster, result, victim, nemesis_rng, faults)
            )
            try:
                answers = await asyncio.gather(
                    *(one(offset, record) for offset, record in zip(offsets, records, strict=True))
                )
            except BaseException:
                nemesis.cancel()  # it undoes its fault on the way out
                raise
            finally:
                with contextlib.suppress(asyncio.CancelledError):
                    await nemesis
        result.violations += self._unexpected_exits(cluster, ())
        await self.heal(cluster)
        for record, (answer, started, ended) in zip(records, answers, strict=True):
            record.late_outcome = answer.outcome
            found, record.late_kind = check_late_retry(
                record, answer, abort_records(record.transaction_id, before)
            )
            result.violations += found
            result.late_during_faults += any(on < ended and started < off for on, off in faults)

    async def late_nemesis(
        self,
        cluster: Cluster,
        result: RunResult,
        victim: str,
        rng: random.Random,
        faults: list[tuple[float, float]],
    ) -> None:
        """For LATE_NEMESIS_S from now, one fault after another on `victim` (LATE_FAULTS),
        each for a seeded time; every fault is undone before this returns, cancelled or not.
        Appends each fault's (on, off) loop times to `faults`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LATE_NEMESIS_S
        await asyncio.sleep(rng.uniform(*LATE_FAULT_GAP_S))
        while loop.time() < deadline:
            fault = "kill"
            if victim != COORDINATOR:
                fault = rng.choices(LATE_FAULTS, LATE_FAULT_WEIGHTS)[0]
            duration = rng.uniform(*LATE_FAULT_S)
            on = loop.time()
            if await self.fault_on(cluster, result, victim, fault):
                result.late_faults[f"{fault} {victim}"] += 1
                try:
                    await asyncio.sleep(duration)
                finally:
                    await self.fault_off(cluster, result, victim, fault)
                faults.append((on, loop.time()))
            await asyncio.sleep(rng.uniform(*LATE_FAULT_GAP_S))

    async def fault_on(self, cluster: Cluster, result: RunResult, victim: str, fault: str) -> bool:
        """Start `fault` on `victim`; whether it took (a process found down is reported, as
        one that died on its own, and healed instead)."""
        found = self._unexpected_exits(cluster, ())
        if found:
            result.violations += found
            await self.heal(cluster)
            return False
        if fault == "kill":
            return await asyncio.to_thread(cluster.kill, victim) is not None
        if fault == "stop":
            return cluster.pause(victim) is not None
        await set_fault(cluster, victim, participant_pb2.FAULT_MODE_DOWN)
        return True

    async def fault_off(self, cluster: Cluster, result: RunResult, victim: str, fault: str) -> None:
        if fault == "stop":
            cluster.resume(victim)
        elif fault == "down":
            await set_fault(cluster, victim, participant_pb2.FAULT_MODE_NONE)
        result.violations += self._unexpected_exits(cluster, [victim] if fault == "kill" else [])
        await self.heal(cluster)

    async def check_late(
        self,
        cluster: Cluster,
        result: RunResult,
        before: Mapping[str, Mapping[str, int]],
        healed: float,
    ) -> None:
        """After the wave: settle, then every check of the module's docstring."""
        snapshot = await self.settle_and_report(cluster, result, "after the late retries")
        if snapshot is None:
            return
        result.violations += check_after_late_retries(result.records, snapshot)
        result.violations += check_client_outcomes(result.pushers, snapshot)
        for record in result.records:
            if record.late_kind == LATE_RERUN:
                self.ledger[record.order_id] = True
            elif not learned_outcome(record) and record.late_outcome in (COMMITTED, ABORTED):
                self.ledger[record.order_id] = record.late_outcome == COMMITTED
        for record in result.pushers:
            if record.known:
                self.ledger[record.order_id] = record.outcome == COMMITTED
        result.violations += check_ledger(self.ledger, snapshot)
        # A Rollback still on its way may yet be answered "already committed" (recorded as a
        # heuristic commit before 56c8be8): give the last ones time to arrive.
        await asyncio.sleep(max(0.0, LATE_DRAIN_S - (time.perf_counter() - healed)))
        try:
            after = await read_branch_states(cluster)
            heuristics = await read_heuristics(cluster)
        except grpc.aio.AioRpcError as error:
            result.violations.append(f"could not list the branches: {error.code().name}")
            return
        result.violations += [
            f"made by the late retries: {h}"
            for h in heuristics
            if h not in self.heuristics_reported
        ]
        self.heuristics_reported.update(heuristics)
        transaction_ids = [record.transaction_id for record in result.records]
        result.violations += check_branch_outcomes(transaction_ids, after)
        result.violations += check_branches_kept(transaction_ids, before, after)
        for record in result.records:
            if record.late_kind == LATE_RERUN:
                result.reruns.append(
                    f"order {record.order_id} ({record.transaction_id}) learned ABORTED "
                    f"({record.reason[:80]}); its branches before the wave: "
                    f"{branches_of(record.transaction_id, before)}; the late retry committed it"
                )
        result.mark("check after the wave")

    async def run(self, index: int, cell: Cell | str | None, seed: int) -> RunResult:
        """One run, bounded in time; on a violation, keep the logs and drop the cluster so the
        next run starts clean."""
        started = time.perf_counter()
        if isinstance(cell, Cell):
            result = RunResult(index=index, kind="matrix", seed=seed, cell=cell)
        else:
            kind = cell if cell in (LATE, SOAK) else "kill"
            result = RunResult(index=index, kind=str(kind), seed=seed)
        timeout_s = RUN_TIMEOUT_S
        try:
            if isinstance(cell, Cell):
                work = self.matrix_run(index, cell, seed)
            elif cell == LATE:
                work = self.late_run(index, seed)
            elif cell == SOAK:
                work = self.soak_run(index, seed, self.soak_s)
                timeout_s += self.soak_s
            else:
                work = self.kill_run(index, seed)
            result = await asyncio.wait_for(work, timeout_s)
        except TimeoutError:
            result.violations.append(f"the run did not finish within {timeout_s:g} s")
        except ClusterError as error:
            result.violations.append(f"the cluster failed: {error}")
        except Exception as error:  # reported as a failed run, and the next run starts clean
            detail = "".join(traceback.format_exception(error)[-4:])
            result.violations.append(f"the run failed: {error!r}\n{detail}")
        result.elapsed_s = time.perf_counter() - started
        if result.violations:
            cluster = self.cluster
            if cluster is not None:
                # The target's log and the coordinator's; every log when something is stuck.
                targets = result.kills if result.cell is None else [result.cell.component]
                names = {COORDINATOR, *targets}
                names |= {fault.split()[-1] for fault in result.late_faults}
                if any("settle" in v or "exited" in v for v in result.violations):
                    names = set(PROCESSES)
                result.logs = {
                    name: cluster.log_tail(name, LOG_TAIL_LINES)
                    for name in PROCESSES
                    if name in names
                }
                result.data_dir = str(cluster.data_dir)
            await self.drop_cluster()
        return result


# ---- reporting ----


def print_violation(result: RunResult) -> None:
    what = f"point {result.crash_at} in {result.cell.component}" if result.cell else "kill run"
    if result.kind == LATE:
        what = "late-retry run"
    print(f"  !! run {result.index}: {what}, seed {result.seed}")
    for violation in result.violations:
        print(f"     VIOLATION {violation}")
    mentioned = " ".join(result.violations)
    for record in result.records:
        if any(f"order {record.order_id}{end}" in mentioned for end in " :"):
            print(
                f"     order {record.order_id}: first answered {record.outcome} "
                f"({record.reason[:100]}); retry answered {record.retry_outcome or '-'}"
                + (f"; late retry answered {record.late_outcome}" if record.late_outcome else "")
            )
    for name, tail in result.logs.items():
        print(f"     --- {name}: last lines of its log ---")
        print(tail)
    if result.data_dir:
        print(f"     data dir and full logs: {result.data_dir}")
    print(f"     replay: {result.replay}")


def print_summary(results: Sequence[RunResult], elapsed_s: float) -> None:
    if not results:
        return
    print()
    print("summary (crash matrix: point x component)")
    rows: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    for result in results:
        key = (
            str(result.cell)
            if result.cell
            else _TITLES.get(result.kind, "random SIGKILL under load")
        )
        row = rows[key]
        row[0] += 1
        row[1] += int(result.target == "crashed") if result.cell else sum(result.kills.values())
        row[2] += result.committed
        row[3] += result.aborted
        row[4] += result.unknown
        row[5] += len(result.violations)
    headers = (
        "point:component",
        "runs",
        "crashed",
        "committed",
        "aborted",
        "unknown",
        "violations",
    )
    width = max(len(headers[0]), *(len(key) for key in rows))
    print(f"  {headers[0]:<{width}} " + " ".join(f"{h:>10}" for h in headers[1:]))
    for key, row in rows.items():
        print(f"  {key:<{width}} " + " ".join(f"{value:>10}" for value in row[:6]))
    cut = sum(r.loses_unsynced and r.target == "crashed" for r in results)
    print(f"  crashes that also lost their unsynced log writes (as a power loss): {cut}")
    late_runs = [r for r in results if r.kind == LATE]
    if late_runs:
        late: Counter[str] = Counter()
        faults: Counter[str] = Counter()
        for result in late_runs:
            late.update(result.late)
            faults.update(result.late_faults)
        print(
            f"  late retries (every order again once the coordinator forgot it, "
            f"finished_kept {LATE_FINISHED_KEPT}): {sum(late.values())}: "
            f"{late[LATE_COMMITTED]} answered COMMITTED, {late[LATE_ABORTED]} ABORTED, "
            f"{late[LATE_RERUN]} aborted orders rerun and committed (the known limit), "
            f"{late['']} without an outcome; "
            f"{sum(r.late_during_faults for r in late_runs)} under way during a fault ("
            + ", ".join(f"{n} {fault}" for fault, n in sorted(faults.items()))
            + ")"
        )
    kill_runs = [r for r in results if r.cell is None]
    if kill_runs:
        kills: Counter[str] = Counter()
        for result in kill_runs:
            kills.update(result.kills)
        print(
            f"  random SIGKILLs: {sum(kills.values())} kills ("
            + ", ".join(f"{n} {name}" for name, n in sorted(kills.items()))
            + ")"
        )
    committed = sum(r.committed for r in results)
    aborted = sum(r.aborted for r in results)
    unknown = sum(r.unknown for r in results)
    print(
        f"  orders: {committed} committed, {aborted} aborted, {unknown} unknown (each retried); "
        f"{len(results)} runs in {elapsed_s:.0f} s ({elapsed_s / max(1, len(results)):.1f} s/run)"
    )


#: A cell run this often without one crash is a crash point that no longer fires (a call to
#: `crashpoints.hit` removed, or never reached): a test that did not run, so a failure.
NEVER_REACHED_RUNS = 2


def never_reached(results: Sequence[RunResult]) -> list[str]:
    """The crash-matrix cells that ran NEVER_REACHED_RUNS times or more and never crashed."""
    runs: Counter[str] = Counter()
    crashed: Counter[str] = Counter()
    for result in results:
        if result.cell is not None:
            runs[str(result.cell)] += 1
            crashed[str(result.cell)] += result.target == "crashed"
    return [
        f"{cell}: {count} runs and not one crash (its crash point is never reached)"
        for cell, count in runs.items()
        if count >= NEVER_REACHED_RUNS and crashed[cell] == 0
    ]


def checkpoints_written(root: Path) -> Counter[str]:
    """Per process, the "checkpoint written" lines in the logs of every cluster of the session
    (the logs are appended across restarts, so crashed processes' checkpoints count too)."""
    written: Counter[str] = Counter()
    for log in sorted(root.glob("cluster-*/logs/*.log")):
        with log.open("rb") as lines:
            written[log.stem] += sum(b"checkpoint written" in line for line in lines)
    return written


def run_simulator(seeds: int, base_seed: int) -> tuple[int, int, str]:
    """(seeds run, violations, note) from the deterministic simulator, if it is there."""
    try:
        module = importlib.import_module("dtm.sim")
    except ImportError as error:
        return 0, 0, f"skipped: dtm.sim cannot be imported ({error})"
    run_seed: Callable[[int], object] | None = getattr(module, "run_seed", None)
    if run_seed is None:
        return 0, 0, "skipped: dtm.sim exposes no run_seed(seed)"
    violations = 0
    for seed in range(base_seed, base_seed + seeds):
        try:
            run_seed(seed)
        except Exception as error:
            violations += 1
            print(f"  !! simulator seed {seed}: {error}")
    return seeds, violations, ""


# ---- the command ----


#: A planned run: its cell (a crash-matrix run), None (a random-kill run) or LATE, and its seed.
Planned = tuple[Cell | str | None, int]


def plan(
    runs: int,
    kill_runs: int,
    seed: int,
    cells: Sequence[Cell],
    late_runs: int = 0,
    soaks: int = 0,
) -> list[Planned]:
    """The runs in order: matrix runs round-robin over the cells (run i has seed + i), then
    the random-kill runs, then the late-retry runs (on a cluster of their own), then the
    fault soak."""
    planned: list[Planned] = []
    for number in range(runs):
        planned.append((cells[number % len(cells)], seed + number))
    for number in range(kill_runs):
        planned.append((None, seed + runs + number))
    for number in range(late_runs):
        planned.append((LATE, seed + runs + kill_runs + number))
    for number in range(soaks):
        planned.append((SOAK, seed + runs + kill_runs + late_runs + number))
    return planned


def parse_replay(text: str, cells: Sequence[Cell]) -> Planned:
    head, _, seed_text = text.rpartition(":")
    if not seed_text.isdigit():
        raise argparse.ArgumentTypeError(f"--replay {text!r}: end with :SEED")
    if head == "kill":
        return None, int(seed_text)
    if head == LATE:
        return LATE, int(seed_text)
    point, _, component = head.partition(":")
    cell = Cell(point, component)
    if cell not in matrix(include_wal=True):
        known = ", ".join(str(c) for c in cells[:3])
        raise argparse.ArgumentTypeError(
            f"--replay {text!r}: no such point:component (e.g. {known}, ...)"
        )
    return cell, int(seed_text)


async def run_all(
    planned: Sequence[Planned], root: Path, verbose: bool, soak_s: float = 0.0
) -> list[RunResult]:
    session = Session(root)
    session.soak_s = soak_s
    results: list[RunResult] = []
    try:
        for index, (cell, seed) in enumerate(planned, start=1):
            result = await session.run(index, cell, seed)
            results.append(result)
            print(result.line(len(planned)), flush=True)
            if verbose or result.elapsed_s > SLOW_RUN_S:
                print("      " + ", ".join(f"{name} {s:.2f} s" for name, s in result.phases))
            if verbose:
                for record in result.records:
                    retry = f" -> retry {record.retry_outcome}" if record.retry_outcome else ""
                    if record.late_outcome:
                        retry += f" -> late retry {record.late_outcome}"
                    print(f"      {record.order_id}: {record.outcome}{retry} {record.reason[:90]}")
            for rerun in result.reruns:
                print(f"      known limit, not a violation: {rerun}")
            if result.violations:
                print_violation(result)
    finally:
        await session.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dtm.chaos",
        description=(
            "Crash matrix, random SIGKILLs and late retries over real processes, with every check."
        ),
    )
    parser.add_argument("--runs", type=int, default=200, help="crash-matrix runs (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="run i uses seed S + i")
    parser.add_argument(
        "--kill-runs",
        type=int,
        default=None,
        help="random-SIGKILL-under-load runs, after the matrix (default: runs / 10)",
    )
    parser.add_argument(
        "--late-runs",
        type=int,
        default=None,
        help="late-retry runs, after the random-kill runs (default: kill runs / "
        f"{LATE_RUNS_PER_KILL_RUNS})",
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"then one fault soak this long: {SOAK_CLIENTS} clients, a SIGKILL every "
        f"{SOAK_FAULT_EVERY_S:g} s, every check after it, Submit latencies reported",
    )
    parser.add_argument("--sim-seeds", type=int, default=0, help="also run the simulator")
    parser.add_argument(
        "--only", action="append", default=[], help="only cells whose point:component contains it"
    )
    parser.add_argument(
        "--replay", default=None, help="POINT:COMPONENT:SEED, kill:SEED or late:SEED"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    parser.add_argument("--verbose", action="store_true", help="print every order")
    options = parser.parse_args(argv)

    include_wal = wal_points_wired()
    cells = matrix(include_wal)
    if options.only:
        cells = [c for c in cells if any(part in str(c) for part in options.only)]
        if not cells:
            parser.error(f"--only {options.only}: no cell matches")
    if options.replay is not None:
        try:
            planned = [parse_replay(options.replay, cells)]
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    else:
        kill_runs = options.runs // 10 if options.kill_runs is None else options.kill_runs
        late_runs = options.late_runs
        if late_runs is None:
            late_runs = kill_runs // LATE_RUNS_PER_KILL_RUNS
        if options.runs < 0 or kill_runs < 0 or late_runs < 0 or options.soak < 0:
            parser.error("--runs, --kill-runs, --late-runs and --soak must be >= 0")
        soaks = 1 if options.soak > 0 else 0
        runs = options.runs if cells else 0
        planned = plan(runs, kill_runs, options.seed, cells, late_runs, soaks)

    root = options.data_dir or Path(tempfile.mkdtemp(prefix="dtm-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    points = sorted({c.point for c in cells})
    print(
        f"dtm chaos: {len(planned)} real-process runs over {len(cells)} (point, component) "
        f"cells of {len(points)} crash points; data in {root}"
    )
    if not include_wal:
        print("  (wal.* crash points are not wired into dtm/wal/ yet: left out of the matrix)")
    started = time.perf_counter()
    results = asyncio.run(run_all(planned, root, options.verbose, options.soak))
    elapsed = time.perf_counter() - started
    print_summary(results, elapsed)
    written = checkpoints_written(root)
    print(
        f"  checkpoints written: {sum(written.values())} ("
        + ", ".join(f"{n} {name}" for name, n in sorted(written.items()))
        + f"; one every {CHECKPOINT_EVERY_RECORDS} records, so kills meet them)"
    )
    violations = sum(len(result.violations) for result in results)
    unreached = never_reached(results)
    for line in unreached:
        print(f"  NOT TESTED: {line}")
    violations += len(unreached)
    failed_runs = [result for result in results if result.violations]
    if failed_runs:
        print(f"  runs with violations ({len(failed_runs)}), each replays alone:")
        for result in failed_runs:
            print(f"    run {result.index}: {result.replay}")
    if options.sim_seeds:
        sim_started = time.perf_counter()
        seeds, sim_violations, note = run_simulator(options.sim_seeds, options.seed)
        if note:
            print(f"simulator: {note}")
        else:
            print(
                f"simulator: {seeds} seeds, {sim_violations} violations "
                f"({time.perf_counter() - sim_started:.0f} s; "
                "its violations are added to the line below)"
            )
        violations += sim_violations
    if not failed_runs and not options.keep and options.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    elif failed_runs:
        print(f"logs kept in {root}")
    print(f"chaos: {len(results)} runs, {violations} violations")
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
