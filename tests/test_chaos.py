"""The short chaos run of `make test`: the crash matrix at its key points and a few random
SIGKILLs under load, over real processes (dtm.chaos), some of them with services served unary
calls, with zero violations allowed; and proof
that the run checker does report a violation when the services contradict a client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections import Counter
from pathlib import Path

import grpc
import pytest

from dtm import chaos, crashpoints, invariants
from dtm.chaos import ABORTED, COMMITTED, Cell, ClientRecord, RunResult, Session
from dtm.chaos import command as chaos_command
from dtm.chaos import session as chaos_session
from dtm.chaos.settings import EXIT_ENVIRONMENT
from dtm.cluster import PROCESSES, SERVICES, PortTakenError
from dtm.invariants import CANCELLED, CONFIRMED, Capture, Notification, Order, Snapshot
from dtm.orderflow import SubmitResult
from dtmpb.v1 import coordinator_pb2, participant_pb2

SEED = 7_000
KILL_RUNS = 3

#: The points where a crash decides whether a commit survives: around the coordinator's
#: decision record and its fsync, between the reply and phase 2, in phase 2, in recovery; and
#: around the participants' prepare record, its fsync, the vote and the commit.
KEY_COORDINATOR_POINTS = (
    "coordinator.before_decision_write",
    "coordinator.after_decision_write",
    "coordinator.after_decision_durable",
    "coordinator.after_client_reply",
    "coordinator.mid_phase_two",
    "coordinator.during_recovery",
)
KEY_PARTICIPANT_POINTS = (
    "participant.before_prepare_record",
    "participant.after_prepare_record",
    "participant.after_prepare_durable",
    "participant.after_commit_durable",
)


def key_cells() -> list[Cell]:
    """20 cells: each key coordinator point twice; each key participant point in two
    services (rotating, so all four services are hit)."""
    cells = [Cell(point, "coordinator") for point in KEY_COORDINATOR_POINTS for _ in range(2)]
    services = list(SERVICES)
    for number, point in enumerate(KEY_PARTICIPANT_POINTS):
        cells.append(Cell(point, services[(2 * number) % len(services)]))
        cells.append(Cell(point, services[(2 * number + 1) % len(services)]))
    return cells


def test_key_crash_points_and_random_kills_lose_nothing(tmp_path: Path) -> None:
    cells = key_cells()
    assert len(cells) >= 20
    # Run i of the cells has seed SEED + i, then the random-kill runs; each kind grouped by
    # how its services start (a few unary, a few mixed: `unary_services`).
    planned = chaos.plan(len(cells), KILL_RUNS, SEED, cells)

    async def scenario() -> tuple[list[RunResult], RunResult]:
        session = Session(tmp_path)
        results: list[RunResult] = []
        try:
            for index, (cell, seed) in enumerate(planned, start=1):
                result = await session.run(index, cell, seed)
                print(result.line(len(planned)), flush=True)
                if result.violations:
                    chaos.print_violation(result)
                results.append(result)
            # The checker can fail: a client record claiming COMMITTED for an order that no
            # service has, checked against the live services.
            cluster = await session.ensure_cluster()
            fabricated = RunResult(index=0, kind="matrix", seed=0)
            fabricated.records.append(
                ClientRecord("never-placed", "txn-never-placed", COMMITTED, 100)
            )
            await session.check(cluster, fabricated)
            # The per-transaction check reads the branches of the runs' transactions.
            states = await chaos.read_branch_states(cluster)
            last = {record.transaction_id for record in results[-1].records}
            assert all(last & set(seen) for seen in states.values()), sorted(last)[:3]
        finally:
            await session.close()
        return results, fabricated

    results, fabricated = asyncio.run(scenario())

    violations = [f"{r.replay}: {v}" for r in results for v in r.violations]
    assert [] == violations
    matrix_runs = [r for r in results if r.cell is not None]
    crashed = [r for r in matrix_runs if r.target == "crashed"]
    # A seeded crash count may exceed what a burst reaches; most runs must really crash.
    assert len(crashed) >= 0.75 * len(matrix_runs), [r.line(len(results)) for r in matrix_runs]
    assert {r.cell.point for r in crashed if r.cell} >= set(KEY_COORDINATOR_POINTS)
    kill_runs = [r for r in results if r.cell is None]
    assert sum(sum(r.kills.values()) for r in kill_runs) >= 1
    # The coordinator's unary port and the services' unary handlers, under crashes too (each
    # run's check saw every service registered as it was started: check_participant_modes).
    unary = [r for r in results if r.unary == frozenset(SERVICES)]
    assert any(r.target == "crashed" and r.committed for r in unary), [r.line(1) for r in unary]
    assert any(r.unary and r not in unary for r in results)
    assert sum(r.committed for r in results) > 0
    assert sum(r.aborted for r in results) > 0

    assert any("never-placed" in v and "does not have it" in v for v in fabricated.violations), (
        fabricated.violations
    )


# ---- the checks alone: each one fails when it should ----


def settled_state() -> Snapshot:
    """o-1 confirmed (300 cents), o-2 cancelled."""
    return Snapshot(
        stock=[invariants.StockLevel("sku-a", available=7, reserved=0, sold=3, received=10)],
        accounts=[
            invariants.Account(
                "acct-1", balance_cents=700, held_cents=0, captured_cents=300, initial_cents=1000
            )
        ],
        captures=[Capture("o-1", "acct-1", 300, "txn-o-1")],
        orders=[
            Order("o-1", "cust", (("sku-a", 3),), 300, CONFIRMED, "txn-o-1"),
            Order("o-2", "cust", (("sku-a", 1),), 100, CANCELLED, "txn-o-2"),
        ],
        sent=[Notification("o-1", "cust@example.com", "confirmed", "txn-o-1")],
    )


def answer(outcome: str, transaction_id: str = "txn") -> SubmitResult:
    if outcome in (COMMITTED, ABORTED):
        response = coordinator_pb2.SubmitResponse(
            transaction_id=transaction_id,
            outcome=f"OUTCOME_{outcome}",
        )
        return SubmitResult(transaction_id, response, grpc.StatusCode.OK, "", 0.0)
    return SubmitResult(transaction_id, None, grpc.StatusCode[outcome], "refused", 0.0)


def test_client_outcomes_that_match_the_services_pass() -> None:
    records = [
        ClientRecord("o-1", "txn-o-1", COMMITTED, 300),
        ClientRecord("o-2", "txn-o-2", ABORTED, 100),
        ClientRecord("o-3", "txn-o-3", ABORTED, 100),  # never reached the orders service
        ClientRecord("o-4", "txn-o-4", "UNAVAILABLE", 100),  # may land either way
    ]
    assert [] == chaos.check_client_outcomes(records, settled_state())
    assert [] == chaos.check_ledger({"o-1": True, "o-2": False, "o-9": False}, settled_state())


def test_a_commit_the_services_do_not_have_is_a_violation() -> None:
    record = ClientRecord("ghost", "txn-ghost", COMMITTED, 100)
    violations = chaos.check_client_outcomes([record], settled_state())
    assert 1 == len(violations)
    assert "ghost" in violations[0] and "COMMITTED" in violations[0]


def test_a_reversed_commit_or_a_confirmed_abort_is_a_violation() -> None:
    reversed_commit = ClientRecord("o-2", "txn-o-2", COMMITTED, 100)
    confirmed_abort = ClientRecord("o-1", "txn-o-1", ABORTED, 300)
    wrong_amount = ClientRecord("o-1", "txn-o-1", COMMITTED, 999)
    violations = chaos.check_client_outcomes(
        [reversed_commit, confirmed_abort, wrong_amount], settled_state()
    )
    assert 3 == len(violations), violations
    assert "CANCELLED" in violations[0]
    assert "told ABORTED" in violations[1]
    assert "999" in violations[2]


def test_a_committed_free_order_is_expected_without_a_capture() -> None:
    """A free order has no payment branch: told COMMITTED, it is confirmed with its message
    and no capture; a capture for it is a violation."""
    free = Order("o-3", "cust", (("sku-a", 1),), 0, CONFIRMED, "txn-o-3")
    message = Notification("o-3", "cust@example.com", "confirmed", "txn-o-3")
    state = settled_state()
    state = dataclasses.replace(state, orders=[*state.orders, free], sent=[*state.sent, message])
    record = ClientRecord("o-3", "txn-o-3", COMMITTED, 0)
    assert [] == chaos.check_client_outcomes([record], state)
    charged = dataclasses.replace(state, captures=[*state.captures, Capture("o-3", "acct-1", 5)])
    violations = chaos.check_client_outcomes([record], charged)
    assert 1 == len(violations), violations
    assert "o-3" in violations[0] and "free order" in violations[0]


def test_a_later_loss_of_a_known_outcome_is_a_violation() -> None:
    violations = chaos.check_ledger({"o-1": False, "o-2": True}, settled_state())
    assert 2 == len(violations), violations


@pytest.mark.parametrize(
    ("order_id", "retry", "expected_violation", "confirmed"),
    [
        ("o-1", COMMITTED, "", True),
        ("o-2", ABORTED, "", False),
        ("o-9", COMMITTED, "", True),  # left no trace: the retry may run it now
        ("o-9", ABORTED, "", False),
        ("o-1", ABORTED, "but the order is CONFIRMED", False),
        ("o-2", COMMITTED, "but the order was CANCELLED", True),
        ("o-1", "ALREADY_EXISTS", "not the outcome", None),
        ("o-1", "UNAVAILABLE", "not the outcome", None),
    ],
)
def test_retry_of_an_unknown_outcome_must_tell_what_happened(
    order_id: str, retry: str, expected_violation: str, confirmed: bool | None
) -> None:
    record = ClientRecord(order_id, f"txn-{order_id}", "DEADLINE_EXCEEDED", 100)
    violations, learned = chaos.check_retry(
        record, answer(retry), chaos.orders_by_id(settled_state())
    )
    if expected_violation:
        assert 1 == len(violations) and expected_violation in violations[0], violations
    else:
        assert [] == violations
    assert confirmed == learned


# ---- late retries: each check of the wave fails when it should ----

ROLLED_BACK = participant_pb2.BRANCH_STATE_ROLLED_BACK
REFUSED = participant_pb2.BRANCH_STATE_REFUSED
BRANCH_COMMITTED = participant_pb2.BRANCH_STATE_COMMITTED


def learned(outcome: str, retry_outcome: str = "", order_id: str = "o-1") -> ClientRecord:
    return ClientRecord(order_id, f"txn-{order_id}", outcome, 300, retry_outcome=retry_outcome)


def test_what_a_client_learned_is_its_first_answer_or_its_retry_after_recovery() -> None:
    assert COMMITTED == chaos.learned_outcome(learned(COMMITTED))
    assert ABORTED == chaos.learned_outcome(learned("UNAVAILABLE", ABORTED))
    assert "" == chaos.learned_outcome(learned("DEADLINE_EXCEEDED", "UNAVAILABLE"))


@pytest.mark.parametrize(
    ("first", "retry", "aborts_recorded", "expected_violation", "kind"),
    [
        (COMMITTED, COMMITTED, [], "", chaos.LATE_COMMITTED),
        (ABORTED, ABORTED, ["payment BRANCH_STATE_REFUSED"], "", chaos.LATE_ABORTED),
        (ABORTED, ABORTED, [], "", chaos.LATE_ABORTED),
        # The known limit: no participant kept a record of the abort, the retry ran afresh.
        (ABORTED, COMMITTED, [], "", chaos.LATE_RERUN),
        ("UNAVAILABLE", COMMITTED, [], "", chaos.LATE_COMMITTED),
        ("UNAVAILABLE", ABORTED, [], "", chaos.LATE_ABORTED),
        # What 56c8be8 fixed: a committed order's late retry told ABORTED (a participant down).
        (COMMITTED, ABORTED, [], "learned COMMITTED, retried after", chaos.LATE_ABORTED),
        # A participant that remembers the abort refuses the retry: it cannot commit.
        (
            ABORTED,
            COMMITTED,
            ["orders BRANCH_STATE_ROLLED_BACK"],
            "but orders BRANCH_STATE_ROLLED_BACK held a record of its abort",
            chaos.LATE_RERUN,
        ),
        (
            "UNAVAILABLE",
            COMMITTED,
            ["payment BRANCH_STATE_REFUSED"],
            "held a record of its abort",
            chaos.LATE_COMMITTED,
        ),
        (COMMITTED, "UNAVAILABLE", [], "answered UNAVAILABLE: refused (after 1 Submits)", ""),
        (ABORTED, "ALREADY_EXISTS", [], "not the outcome", ""),
    ],
)
def test_a_late_retry_must_answer_what_the_client_learned(
    first: str, retry: str, aborts_recorded: list[str], expected_violation: str, kind: str
) -> None:
    record = learned(first)
    violations, found = chaos.check_late_retry(record, answer(retry), aborts_recorded)
    if expected_violation:
        assert 1 == len(violations) and expected_violation in violations[0], violations
    else:
        assert [] == violations
    assert kind == found


def test_the_records_of_an_abort_are_rolled_back_or_refused_branches() -> None:
    states = {
        "inventory": {"t-1": ROLLED_BACK, "t-2": BRANCH_COMMITTED},
        "orders": {"t-1": BRANCH_COMMITTED},
        "payment": {"t-1": REFUSED, "t-3": participant_pb2.BRANCH_STATE_PREPARED},
    }
    assert ["inventory BRANCH_STATE_ROLLED_BACK", "payment BRANCH_STATE_REFUSED"] == (
        chaos.abort_records("t-1", states)
    )
    assert [] == chaos.abort_records("t-2", states)
    assert [] == chaos.abort_records("t-3", states)
    assert [] == chaos.abort_records("t-never", states)
    assert "inventory COMMITTED, orders -, payment -" == chaos.branches_of("t-2", states)


def test_a_branch_decided_before_the_late_retries_must_stay_as_it_was() -> None:
    before = {
        "inventory": {"t-1": BRANCH_COMMITTED, "t-2": ROLLED_BACK, "t-3": REFUSED},
        "payment": {"t-1": BRANCH_COMMITTED},
    }
    kept = {
        "inventory": {"t-1": BRANCH_COMMITTED, "t-2": ROLLED_BACK, "t-3": REFUSED, "t-4": 3},
        "payment": {"t-1": BRANCH_COMMITTED, "t-2": BRANCH_COMMITTED},  # new there: allowed
    }
    assert [] == chaos.check_branches_kept(["t-1", "t-2", "t-3", "t-4"], before, kept)
    changed = {
        "inventory": {"t-1": ROLLED_BACK, "t-2": BRANCH_COMMITTED},
        "payment": {"t-1": BRANCH_COMMITTED},
    }
    assert [
        "transaction t-1: inventory held its branch BRANCH_STATE_COMMITTED before the late "
        "retries, BRANCH_STATE_ROLLED_BACK after them",
        "transaction t-2: inventory held its branch BRANCH_STATE_ROLLED_BACK before the late "
        "retries, BRANCH_STATE_COMMITTED after them",
        "transaction t-3: inventory held its branch BRANCH_STATE_REFUSED before the late "
        "retries, absent after them",
    ] == chaos.check_branches_kept(["t-1", "t-2", "t-3"], before, changed)


def late(record: ClientRecord, outcome: str, kind: str) -> ClientRecord:
    record.late_outcome, record.late_kind = outcome, kind
    return record


def test_after_the_late_retries_each_order_shows_the_outcome_it_has_now() -> None:
    """settled_state: o-1 confirmed (one capture of 300 cents, one notification), o-2
    cancelled. A rerun (known limit) must now be confirmed, once; an abort not rerun must not
    be confirmed."""
    state = settled_state()
    fine = [
        late(learned(COMMITTED), COMMITTED, chaos.LATE_COMMITTED),
        late(learned(ABORTED, order_id="o-2"), ABORTED, chaos.LATE_ABORTED),
        late(learned(ABORTED), COMMITTED, chaos.LATE_RERUN),  # rerun: now CONFIRMED, once
        late(learned("UNAVAILABLE", order_id="o-9"), ABORTED, chaos.LATE_ABORTED),
    ]
    assert [] == chaos.check_after_late_retries(fine, state)
    wrong = [
        late(learned(ABORTED), ABORTED, chaos.LATE_ABORTED),  # o-1 is CONFIRMED
        late(learned(ABORTED, order_id="o-2"), COMMITTED, chaos.LATE_RERUN),  # not confirmed
        late(learned("UNAVAILABLE", order_id="o-9"), COMMITTED, chaos.LATE_COMMITTED),
    ]
    violations = chaos.check_after_late_retries(wrong, state)
    assert 3 == len(violations), violations
    assert all(v.startswith("after the late retries: order o-") for v in violations)
    assert "o-1 (txn-o-1) told ABORTED" in violations[0]
    assert "o-2 (txn-o-2) told COMMITTED: the order is CANCELLED" in violations[1]
    assert "o-9 (txn-o-9) told COMMITTED: the orders service does not have it" in violations[2]
    twice = Snapshot(
        stock=state.stock,
        accounts=state.accounts,
        captures=[*state.captures, Capture("o-1", "acct-1", 300, "txn-o-1")],
        orders=state.orders,
        sent=[*state.sent, *state.sent],
    )
    rerun = [late(learned(ABORTED), COMMITTED, chaos.LATE_RERUN)]
    violations = chaos.check_after_late_retries(rerun, twice)
    assert 2 == len(violations), violations
    assert "expected exactly one of 300" in violations[0]
    assert "2 notifications sent" in violations[1]


def test_late_retry_runs_come_last_and_replay_alone() -> None:
    cells = chaos.matrix()
    planned = chaos.plan(3, 2, 10, cells, late_runs=2)
    # The matrix runs, then the random-kill runs, each kind grouped by how its services start.
    assert {(cells[0], 10), (cells[1], 11), (cells[2], 12)} == set(planned[:3])
    assert {(None, 13), (None, 14)} == set(planned[3:5])
    assert [(chaos.LATE, 15), (chaos.LATE, 16)] == planned[5:]
    assert (chaos.LATE, 15) == chaos.parse_replay("late:15", cells)
    assert "python -m dtm.chaos --replay late:15" == RunResult(0, chaos.LATE, 15).replay


def test_the_fault_soak_comes_last_reports_latencies_and_says_how_to_run_it_again() -> None:
    cells = chaos.matrix()
    planned = chaos.plan(1, 1, 10, cells, late_runs=1, soaks=1)
    assert [(cells[0], 10), (None, 11), (chaos.LATE, 12), (chaos.SOAK, 13)] == planned
    soak = RunResult(0, chaos.SOAK, 13, soak_s=180)
    assert (
        "python -m dtm.chaos --runs 0 --kill-runs 0 --late-runs 0 --soak 180 --seed 13"
        == soak.replay
    )
    soak.latencies_ms = [float(n) for n in range(1, 201)]  # 1..200 ms
    summary = chaos.latency_summary(soak.latencies_ms)
    assert "200 Submits: p50 101.0 ms, p99 199.0 ms, max 200.0 ms" in summary
    assert summary in soak.line(1)
    assert "fault soak: a SIGKILL every 10 s" in soak.line(1)


def test_the_matrix_covers_every_point_in_every_component_it_applies_to() -> None:
    cells = chaos.matrix(include_wal=True)
    assert {cell.point for cell in cells} == set(crashpoints.POINTS)
    assert {c.component for c in cells if c.point.startswith("participant.")} == set(SERVICES)
    points = crashpoints.POINTS
    components = {"coordinator": 1, "participant": len(SERVICES), "wal": 1 + len(SERVICES)}
    assert sum(components[point.split(".")[0]] for point in points) == len(cells)
    planned = chaos.plan(200, 0, 1, cells)
    per_cell = {cell: sum(1 for c, _ in planned if c == cell) for cell in cells}
    assert min(per_cell.values()) >= 4
    assert len({seed for _, seed in planned}) == 200


def test_a_cell_that_never_crashes_is_a_failure_not_a_pass() -> None:
    cells = chaos.matrix()
    reached, unreached = cells[0], cells[1]
    results = []
    for seed, (cell, target) in enumerate(
        [(reached, "crashed"), (reached, "not reached"), (unreached, "not reached")] * 2
    ):
        result = RunResult(index=seed, kind="matrix", seed=seed, cell=cell)
        result.target = target
        results.append(result)
    assert [f"{unreached}: 2 runs and not one crash (its crash point is never reached)"] == (
        chaos.never_reached(results)
    )
    assert [] == chaos.never_reached(results[:3])  # one run of the unreached cell: too few


def test_a_transaction_split_across_services_is_a_violation() -> None:
    """Two splits of the same size on one SKU cancel out in the per-SKU totals; the branches
    themselves do not."""
    from dtmpb.v1 import participant_pb2

    committed = participant_pb2.BRANCH_STATE_COMMITTED
    rolled_back = participant_pb2.BRANCH_STATE_ROLLED_BACK
    states = {
        "inventory": {"t-1": rolled_back, "t-2": committed, "t-3": committed},
        "orders": {"t-1": committed, "t-2": rolled_back, "t-3": committed},
        "payment": {"t-1": committed, "t-3": participant_pb2.BRANCH_STATE_READ_ONLY},
    }
    assert [
        "transaction t-1 split across the services: inventory BRANCH_STATE_ROLLED_BACK, "
        "orders BRANCH_STATE_COMMITTED, payment BRANCH_STATE_COMMITTED",
        "transaction t-2 split across the services: inventory BRANCH_STATE_COMMITTED, "
        "orders BRANCH_STATE_ROLLED_BACK",
    ] == chaos.check_branch_outcomes(["t-1", "t-2", "t-3", "t-never"], states)


def test_every_cell_gets_every_crash_mode_whatever_the_number_of_cells() -> None:
    cells = [c for c in chaos.matrix() if "inventory" in str(c)]  # an even number of them
    assert len(cells) % 2 == 0
    planned = chaos.plan(200, 0, 1, cells)
    for cell in cells:
        modes = {chaos.run_modes(c, seed) for c, seed in planned if c == cell}
        assert {(False, False), (True, False), (True, True)} == modes, cell


# ---- participants served unary calls ----


def test_a_seeded_share_of_runs_starts_its_services_unary_and_replays_so() -> None:
    cells = chaos.matrix()
    planned = chaos.plan(200, 100, 1, cells, late_runs=3, soaks=1)
    modes = [chaos.participants_text(chaos.unary_services(*run)) for run in planned]
    matrix_modes = modes[:200]
    kill_modes = modes[200:300]
    for share in (matrix_modes, kill_modes):
        unary = share.count("unary")
        mixed = sum(mode.startswith("mixed") for mode in share)
        # PARTICIPANTS_UNARY_SHARE 1 in 5, PARTICIPANTS_MIXED_SHARE 1 in 10 (seeded draws)
        assert 0.1 <= unary / len(share) <= 0.3, share
        assert 0.03 <= mixed / len(share) <= 0.2, share
    assert {"batched"} == set(modes[300:]), "late-retry and soak runs batch"
    # Drawn per run, not by parity: both parities of seed get each mode.
    for mode in ("unary", "batched"):
        parities = {seed % 2 for (_, seed), m in zip(planned, modes, strict=True) if m == mode}
        assert {0, 1} == parities, mode
    # Runs of one mode run one after another: a switch restarts services.
    switches = sum(a != b for a, b in itertools.pairwise(matrix_modes))
    assert switches == len(set(matrix_modes)) - 1
    assert kill_modes[0] == matrix_modes[-1] == "unary"  # no switch between the two kinds
    # A run's replay line draws the same mode, and its line and report say which.
    for run in planned[:300]:
        cell, seed = run
        kind = "kill" if cell is None else "matrix"
        result = RunResult(1, kind, seed, cell=cell, unary=chaos.unary_services(*run))
        replayed = chaos.parse_replay(result.replay.split("--replay ")[1], cells)
        assert result.unary == chaos.unary_services(*replayed)
        if result.unary == frozenset(SERVICES):
            assert "participants unary;" in result.line(1)
        elif not result.unary:
            assert "participants" not in result.line(1)


def test_a_service_registered_otherwise_than_the_run_started_it_is_a_violation() -> None:
    batching = {name: name != "payment" for name in SERVICES}
    assert [] == chaos.check_participant_modes({"payment"}, batching)
    assert [] == chaos.check_participant_modes(set(SERVICES), dict.fromkeys(SERVICES, False))
    found = chaos.check_participant_modes(set(), batching)
    assert 1 == len(found)
    assert "payment was started without --no-batch but registered batch = false" in found[0]
    missing = {name: True for name in SERVICES if name != "orders"}
    assert ["participants: orders is not registered at the coordinator"] == (
        chaos.check_participant_modes(set(), missing)
    )


# ---- the nemesis: a process that died on its own is reported, not counted as a kill ----


class DeadOnItsOwnCluster:
    """A stand-in for Cluster in which `dead` has already died on its own (status 1)."""

    coordinator_address = "127.0.0.1:1"
    service_addresses: dict[str, str] = {}

    def __init__(self, dead: str) -> None:
        self.up = {name: True for name in PROCESSES}
        self.codes: dict[str, int | None] = {name: None for name in PROCESSES}
        self.up[dead], self.codes[dead] = False, 1
        self.killed: list[str] = []

    def kill(self, name: str) -> int | None:
        if not self.up[name]:
            return None  # as Cluster.kill does for a process that is not running
        self.up[name], self.codes[name] = False, -9
        self.killed.append(name)
        return 4242

    def running(self, name: str) -> bool:
        return self.up[name]

    def exit_code(self, name: str) -> int | None:
        return self.codes[name]

    def start(self) -> None:
        for name in PROCESSES:
            if not self.up[name]:
                self.up[name], self.codes[name] = True, None

    def restart(self, name: str, **_: object) -> None:
        self.up[name], self.codes[name] = True, None

    def wait_exit(self, name: str, timeout_s: float) -> int | None:
        # The armed restart reaches its crash point at once.
        self.up[name], self.codes[name] = False, chaos.CRASH_EXIT_STATUS
        return chaos.CRASH_EXIT_STATUS


class CommittingClient:
    """A stand-in for OrderClient: every order commits."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def __aenter__(self) -> CommittingClient:
        return self

    async def __aexit__(self, *args: object) -> None:
        pass

    async def submit(
        self, request: coordinator_pb2.SubmitRequest, timeout_s: float | None = None
    ) -> SubmitResult:
        await asyncio.sleep(0)
        response = coordinator_pb2.SubmitResponse(
            transaction_id=request.transaction_id, outcome=coordinator_pb2.OUTCOME_COMMITTED
        )
        return SubmitResult(request.transaction_id, response, grpc.StatusCode.OK, "", 0.0)


def fake_session(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dead: str) -> Session:
    async def no_check(self: Session, cluster: object, result: RunResult) -> None:
        pass

    async def no_switch(self: Session, cluster: object, unary: frozenset[str]) -> None:
        pass  # the stand-in has no services to restart unary

    monkeypatch.setattr(chaos_session, "OrderClient", CommittingClient)
    monkeypatch.setattr(Session, "check", no_check)
    monkeypatch.setattr(Session, "switch_participants", no_switch)
    session = Session(tmp_path)
    session.cluster = DeadOnItsOwnCluster(dead)  # type: ignore[assignment]
    return session


def test_a_kill_run_reports_a_process_that_died_on_its_own_and_counts_only_real_kills(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def first_victim(seed: int) -> str:
        rng = random.Random(f"chaos:kill:{seed}")  # as kill_run draws it
        rng.uniform(*chaos.NEMESIS_INTERVAL_S)
        return rng.choices(PROCESSES, chaos.NEMESIS_WEIGHTS)[0]

    # A seed whose nemesis first picks the process that is already dead.
    seed = next(seed for seed in range(0, 1000, 2) if first_victim(seed) == "payment")
    session = fake_session(monkeypatch, tmp_path, "payment")
    result = asyncio.run(session.kill_run(1, seed))
    cluster = session.cluster
    assert isinstance(cluster, DeadOnItsOwnCluster)
    assert any(v.startswith("payment exited on its own with status 1") for v in result.violations)
    assert result.kills == Counter(cluster.killed)


def test_a_recovery_cell_reports_a_target_that_died_on_its_own_before_the_kill(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    session = fake_session(monkeypatch, tmp_path, "payment")
    cell = Cell("participant.during_recovery", "payment")
    result = asyncio.run(session.matrix_run(1, cell, SEED))
    cluster = session.cluster
    assert isinstance(cluster, DeadOnItsOwnCluster)
    assert any(v.startswith("payment exited on its own with status 1") for v in result.violations)
    assert result.kills == Counter(cluster.killed)


# ---- the environment: a port another program took is not dtm's violation ----


class PortTakenOnRestartCluster(DeadOnItsOwnCluster):
    """A stand-in for Cluster where all five run, and where the target, restarted on its port,
    exits with status 1 because another program took that port while it was down."""

    data_dir = Path("/nonexistent-chaos-data-dir")

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.up[target], self.codes[target] = True, None  # none died on its own

    def wait_exit(self, name: str, timeout_s: float) -> int | None:
        self.up[name], self.codes[name] = False, 1
        return 1

    def port_taken(self, name: str) -> PortTakenError | None:
        if self.codes[name] != 1:
            return None
        return PortTakenError(f"{name} could not start: port 1 is held by pid 2", name, 1)

    def log_tail(self, name: str, lines: int = 0) -> str:
        return "    (a log line)"

    def stop(self, grace_s: float = 0.0) -> None:
        pass


def test_a_restart_whose_port_was_taken_is_an_environment_problem_not_a_violation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A crash run restarts its target on its port; another program may have taken it in
    between. That run said "payment exited with status 1, not 86 (a crash point)", a
    violation of dtm's, when it was the machine's doing: it is reported as an environment
    problem (what stopped the run, what to do), the cluster dropped, no violation counted."""
    session = fake_session(monkeypatch, tmp_path, "payment")
    session.cluster = PortTakenOnRestartCluster("payment")  # type: ignore[assignment]
    result = asyncio.run(session.run(1, Cell("participant.during_recovery", "payment"), SEED))
    assert [] == result.violations
    assert ["payment could not start: port 1 is held by pid 2"] == result.environment
    assert result.line(1).endswith("STOPPED by the environment (1, not a violation)")
    assert session.cluster is None  # dropped: the next run starts a fresh one


def test_runs_stopped_by_the_environment_alone_exit_3_and_a_violation_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A session whose only problems were the machine's (a port another program took) exited
    1, as one with a violation of dtm's: a script could not tell "dtm lost an order" from
    "run it again". Now 3, said on the last line; any violation still makes it 1."""
    stopped = RunResult(index=1, kind="kill", seed=SEED, environment=["port 1 is held by pid 2"])
    violated = RunResult(index=2, kind="kill", seed=SEED + 1, violations=["order o-1 lost"])
    passed = RunResult(index=3, kind="kill", seed=SEED + 2)

    def session(*results: RunResult) -> tuple[int, str]:
        async def run_all(*args: object, **kwargs: object) -> list[RunResult]:
            return list(results)

        monkeypatch.setattr(chaos_command, "run_all", run_all)
        status = chaos.main(["--runs", "0", "--kill-runs", "0", "--data-dir", str(tmp_path)])
        return status, capsys.readouterr().out.strip().splitlines()[-1]

    status, last = session(passed, stopped)
    assert EXIT_ENVIRONMENT == status == 3
    assert last == (
        "chaos: 2 runs, 0 violations, 1 environment problems "
        "(not violations; exit status 3: replay those runs)"
    )
    status, last = session(stopped, violated)
    assert 1 == status
    assert last == "chaos: 2 runs, 1 violations, 1 environment problems (not violations)"
    assert (0, "chaos: 1 runs, 0 violations") == session(passed)
    with pytest.raises(SystemExit):
        chaos.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "3 with no violation but runs stopped by the environment" in help_text
