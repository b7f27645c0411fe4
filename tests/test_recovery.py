"""1,000 transactions left in doubt by a coordinator crash are all resolved after its restart;
the time it takes is reported.

Real processes (dtm.cluster). Two ways of leaving prepared branches behind a dead coordinator:

(a) decided commits whose phase 2 could not finish: payment and notification take Prepare but
    answer UNAVAILABLE to Commit (FAULT_MODE_REJECT_DECISIONS), so every order is decided,
    durable and answered COMMITTED while those two still hold it prepared; then the coordinator
    is SIGKILLed. After its restart it finds the decisions without an end record in its log and
    sends Commit again. (The services' in-doubt inquiries are pushed far out, so that it is the
    coordinator's own recovery that resolves them.)
(b) undecided transactions: notification is SLOW, so the coordinator is still collecting votes
    when it is SIGKILLed while inventory, orders and payment hold their branches prepared. After
    the restart they ask about them and learn ABORTED (presumed abort: no record).

Each measures the time from the restart (process start included) until no service lists a
PREPARED branch, prints it to the terminal (even without `pytest -s`), and checks every
invariant and what the clients were told.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import chaos, invariants
from dtm.cluster import COORDINATOR, SERVICES, Cluster, Ports
from dtm.orderflow import OrderClient, SubmitResult, order_request
from dtm.records import RecordType
from dtm.wal import WriteAheadLog
from dtmpb.v1 import coordinator_pb2, log_pb2, participant_pb2, participant_pb2_grpc
from participants.services.payment import PaymentService

TRANSACTIONS = 1_000
SUBMIT_CONCURRENCY = 100
PRICE_CENTS = 150
INITIAL = {
    "stock": {"sku-a": 10**12},
    "accounts": {"acct-1": {"balance_cents": 10**13}},
}
START_TIMEOUT_S = 30.0
#: Bounds on the polls below (the servers expose no event for "prepared" or "resolved").
PREPARED_TIMEOUT_S = 60.0
RESOLVE_TIMEOUT_S = 60.0
POLL_S = 0.05


def orders(prefix: str) -> list[tuple[coordinator_pb2.SubmitRequest, chaos.ClientRecord]]:
    made = []
    for number in range(TRANSACTIONS):
        order_id = f"{prefix}-{number}"
        request = order_request(
            order_id, "cust", "acct-1", [("sku-a", 1)], PRICE_CENTS, "cust@example.com"
        )
        record = chaos.ClientRecord(order_id, request.transaction_id, "", PRICE_CENTS)
        made.append((request, record))
    return made


async def submit_all(
    cluster: Cluster,
    requests: Sequence[coordinator_pb2.SubmitRequest],
    timeout_s: float,
    concurrency: int = SUBMIT_CONCURRENCY,
) -> list[SubmitResult]:
    limit = asyncio.Semaphore(concurrency)
    async with OrderClient(cluster.coordinator_address) as client:

        async def one(request: coordinator_pb2.SubmitRequest) -> SubmitResult:
            async with limit:
                return await client.submit(request, timeout_s=timeout_s)

        return list(await asyncio.gather(*(one(request) for request in requests)))


async def set_fault(
    cluster: Cluster, name: str, mode: participant_pb2.FaultMode, delay_ms: int = 0
) -> None:
    async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
        await participant_pb2_grpc.ParticipantAdminStub(channel).SetFault(
            participant_pb2.SetFaultRequest(mode=mode, delay_ms=delay_ms), timeout=5.0
        )


async def in_doubt(cluster: Cluster, names: Sequence[str] = SERVICES) -> dict[str, set[str]]:
    """Service -> transaction ids of the branches it holds prepared (Participant.Recover: the
    whole list, where ListBranches shows at most 1,000)."""
    found: dict[str, set[str]] = {}
    for name in names:
        async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
            response: Any = await participant_pb2_grpc.ParticipantStub(channel).Recover(
                participant_pb2.RecoverRequest(), timeout=10.0
            )
        found[name] = {branch.transaction_id for branch in response.branches}
    return found


async def prepared_listed(cluster: Cluster) -> int:
    """PREPARED branches as ParticipantAdmin.ListBranches shows them, over every service."""
    total = 0
    for name in SERVICES:
        async with grpc.aio.insecure_channel(cluster.address(name)) as channel:
            response: Any = await participant_pb2_grpc.ParticipantAdminStub(channel).ListBranches(
                participant_pb2.ListBranchesRequest(states=[participant_pb2.BRANCH_STATE_PREPARED]),
                timeout=10.0,
            )
        total += len(response.branches)
    return total


async def until_resolved(cluster: Cluster, started: float) -> float:
    """Seconds from `started` until no service lists a PREPARED branch."""
    deadline = started + RESOLVE_TIMEOUT_S
    while await prepared_listed(cluster):
        assert time.perf_counter() < deadline, f"not resolved in {RESOLVE_TIMEOUT_S:g} s"
        await asyncio.sleep(POLL_S)
    return time.perf_counter() - started


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Straight to the terminal, so that `make test` shows the figure without -s."""
    with capsys.disabled():
        print(f"\n{line}")


@pytest.mark.slow
def test_1000_decided_commits_in_doubt_are_resumed_after_a_coordinator_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = Cluster(
        tmp_path,
        Ports.free(),
        initial=INITIAL,
        test_control=True,
        # Only the coordinator's recovery resolves these: no service asks on its own.
        extra_args={name: ["--in-doubt-after-ms", "600000"] for name in SERVICES},
        start_timeout_s=START_TIMEOUT_S,
    )
    stuck = ("payment", "notification")
    made = orders("a")

    async def scenario() -> None:
        for name in stuck:
            await set_fault(cluster, name, participant_pb2.FAULT_MODE_REJECT_DECISIONS)
        results = await submit_all(cluster, [request for request, _ in made], timeout_s=60.0)
        outcomes = [result.outcome for result in results]
        assert [chaos.COMMITTED] * TRANSACTIONS == outcomes, set(outcomes)
        for (_, record), result in zip(made, results, strict=True):
            record.outcome = result.outcome
        # Phase 2 runs after the replies: let it finish wherever it can (inventory, orders).
        deadline = time.perf_counter() + PREPARED_TIMEOUT_S
        while any((await in_doubt(cluster, ("inventory", "orders"))).values()):
            assert time.perf_counter() < deadline, "phase 2 did not reach inventory and orders"
            await asyncio.sleep(POLL_S)

        await asyncio.to_thread(cluster.kill, COORDINATOR)
        for name in stuck:
            await set_fault(cluster, name, participant_pb2.FAULT_MODE_NONE)
        doubt = await in_doubt(cluster)
        transactions = set().union(*doubt.values())
        branches = sum(len(ids) for ids in doubt.values())
        expected = {name: TRANSACTIONS if name in stuck else 0 for name in SERVICES}
        assert expected == {name: len(ids) for name, ids in doubt.items()}
        assert TRANSACTIONS == len(transactions)

        started = time.perf_counter()
        await asyncio.to_thread(cluster.restart, COORDINATOR)
        ready = time.perf_counter() - started
        resolved = await until_resolved(cluster, started)
        report(
            capsys,
            f"recovery (a) decided commits: {len(transactions)} transactions ({branches} branches) "
            f"in doubt after the coordinator's SIGKILL; all resolved {resolved:.2f} s after the "
            f"restart began (process start and log replay included; the coordinator was ready "
            f"after {ready:.2f} s)",
        )

        snapshot = await invariants.wait_until_settled(cluster.service_addresses, timeout_s=30.0)
        assert [] == invariants.report(snapshot).violations
        records = [record for _, record in made]
        assert [] == chaos.check_client_outcomes(records, snapshot)
        assert TRANSACTIONS == sum(o.state == invariants.CONFIRMED for o in snapshot.orders)
        assert {} == {name: ids for name, ids in (await in_doubt(cluster)).items() if ids}

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


@pytest.mark.slow
def test_1000_undecided_transactions_in_doubt_are_presumed_aborted_after_a_coordinator_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The coordinator waits for the slow votes instead of aborting at its usual deadlines.
    cluster = voting_stalled_cluster(tmp_path)
    slow = "notification"
    holding = tuple(name for name in SERVICES if name != slow)
    made = orders("b")

    async def scenario() -> None:
        await set_fault(cluster, slow, participant_pb2.FAULT_MODE_SLOW, delay_ms=600_000)

        async def crash_once_all_prepared() -> None:
            # Every order prepared at the three others, the coordinator still waiting for the
            # slow votes: then it dies undecided, and the slow service with its sleeping
            # prepares (none of them was recorded, so it holds nothing).
            deadline = time.perf_counter() + PREPARED_TIMEOUT_S
            while True:
                doubt = await in_doubt(cluster, holding)
                if all(len(ids) == TRANSACTIONS for ids in doubt.values()):
                    break
                assert time.perf_counter() < deadline, {n: len(i) for n, i in doubt.items()}
                await asyncio.sleep(POLL_S)
            await asyncio.to_thread(cluster.kill, COORDINATOR)
            await asyncio.to_thread(cluster.kill, slow)

        requests = [request for request, _ in made]
        results, _ = await asyncio.gather(
            # All at once: each waits for its slow vote until the crash.
            submit_all(cluster, requests, timeout_s=600.0, concurrency=TRANSACTIONS),
            crash_once_all_prepared(),
        )
        unknown = [r.outcome for r in results if r.outcome not in (chaos.COMMITTED, chaos.ABORTED)]
        assert TRANSACTIONS == len(unknown), "the clients cannot have learned an outcome"
        for (_, record), result in zip(made, results, strict=True):
            record.outcome = result.outcome
        doubt = await in_doubt(cluster, holding)
        transactions = set().union(*doubt.values())
        branches = sum(len(ids) for ids in doubt.values())
        assert {name: TRANSACTIONS for name in holding} == {n: len(i) for n, i in doubt.items()}
        assert TRANSACTIONS == len(transactions)

        started = time.perf_counter()
        await asyncio.to_thread(cluster.start)  # the coordinator, then notification
        ready = time.perf_counter() - started
        resolved = await until_resolved(cluster, started)
        report(
            capsys,
            f"recovery (b) undecided: {len(transactions)} transactions ({branches} branches) in "
            f"doubt after the coordinator's SIGKILL; all resolved (presumed abort, by the "
            f"services' inquiries) {resolved:.2f} s after the restart began (process start "
            f"included; ready after {ready:.2f} s)",
        )

        snapshot = await invariants.wait_until_settled(cluster.service_addresses, timeout_s=30.0)
        assert [] == invariants.report(snapshot).violations
        assert 0 == sum(o.state == invariants.CONFIRMED for o in snapshot.orders)
        assert 0 == len(snapshot.captures) == len(snapshot.sent)
        assert {} == {name: ids for name, ids in (await in_doubt(cluster)).items() if ids}

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


LINGER_ATTEMPTS = 5


def lingering_cluster(directory: Path) -> Cluster:
    """A cluster whose coordinator holds the last commits back for a second (the most
    allowed), waiting for a prepare to ride with: only a stop that finishes phase 2 itself
    sends them before that."""
    return Cluster(
        directory,
        Ports.free(),
        initial=INITIAL,
        extra_args={COORDINATOR: ["--batch-decision-linger-ms", "1000"]},
        start_timeout_s=START_TIMEOUT_S,
    )


async def commit_orders(cluster: Cluster, prefix: str, count: int = 50) -> None:
    requests = [request for request, _ in orders(prefix)[:count]]
    results = await submit_all(cluster, requests, timeout_s=30.0)
    assert {chaos.COMMITTED} == {result.outcome for result in results}


def test_a_sigterm_leaves_no_participant_in_doubt(tmp_path: Path) -> None:
    """A graceful stop (SIGTERM, as `make down` or an orchestrator sends it) finishes phase 2
    before the coordinator exits, lingering commits included: unlike after a SIGKILL, the
    services hold nothing prepared while it is down."""
    cluster = lingering_cluster(tmp_path)

    async def scenario() -> None:
        # Until the last commits are seen lingering (one service asked, quickly: the linger
        # lasts 1 s, which a busy machine can overrun between the answers and the look).
        for attempt in range(LINGER_ATTEMPTS):
            await commit_orders(cluster, f"t{attempt}")
            if any((await in_doubt(cluster, ["inventory"])).values()):
                break
        else:
            raise AssertionError(f"no commit seen lingering in {LINGER_ATTEMPTS} attempts")
        pid = cluster.pid(COORDINATOR)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        assert 0 == await asyncio.to_thread(cluster.wait_exit, COORDINATOR, 10.0)
        assert {} == {name: ids for name, ids in (await in_doubt(cluster)).items() if ids}
        assert "left_to_recovery=0" in cluster.log_tail(COORDINATOR)

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


async def until_prepared(cluster: Cluster, names: Sequence[str], count: int) -> None:
    """Until each of `names` holds `count` branches prepared."""
    deadline = time.perf_counter() + PREPARED_TIMEOUT_S
    while not all(len(ids) == count for ids in (await in_doubt(cluster, names)).values()):
        assert time.perf_counter() < deadline, f"{count} orders never prepared at {names}"
        await asyncio.sleep(POLL_S)


def voting_stalled_cluster(directory: Path) -> Cluster:
    """A cluster whose coordinator waits for slow votes (as long as `set_fault` makes them),
    not its usual deadlines."""
    return Cluster(
        directory,
        Ports.free(),
        initial=INITIAL,
        test_control=True,
        prepare_timeout_ms=300_000,
        transaction_timeout_ms=600_000,
        start_timeout_s=START_TIMEOUT_S,
    )


def test_a_service_stopped_by_sigterm_says_so_last_with_what_it_leaves_in_doubt(
    tmp_path: Path,
) -> None:
    """Its log ended on whatever came before (a registration, an inquiry), so a graceful stop
    looked like a kill, and the branches it kept prepared went unmentioned (an operator's
    hunt): the coordinator's log ends on `coordinator stopping`."""
    count = 4
    cluster = voting_stalled_cluster(tmp_path)

    async def scenario() -> None:
        await set_fault(cluster, "notification", participant_pb2.FAULT_MODE_SLOW, 600_000)
        async with OrderClient(cluster.coordinator_address) as client:
            requests = [request for request, _ in orders("s")[:count]]
            submits = [asyncio.ensure_future(client.submit(r, timeout_s=600.0)) for r in requests]
            await until_prepared(cluster, ["inventory"], count)
            pid = cluster.pid("inventory")
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            assert 0 == await asyncio.to_thread(cluster.wait_exit, "inventory", 10.0)
            for submit in submits:
                submit.cancel()
            await asyncio.gather(*submits, return_exceptions=True)
        last = cluster.log_path("inventory").read_text().splitlines()[-1]
        assert "WARNING" in last and "participant stopping" in last, last
        assert f"in_doubt={count}" in last, last

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_a_sigterm_aborts_what_still_waits_for_votes_and_rolls_its_branches_back(
    tmp_path: Path,
) -> None:
    """A graceful stop while a vote is still out (notification slow): the clients were cut
    off with UNAVAILABLE "Cancelling all calls" and the services that voted held their
    branches prepared, reservations and locks included, until the coordinator was back (an
    operator's hunt). Nothing of such a transaction is in the log: it is aborted as its
    deadline would, answered ABORTED, and rolled back before the coordinator exits."""
    count = 8
    cluster = voting_stalled_cluster(tmp_path)  # only the stop ends the wait for the votes
    slow = "notification"
    holding = tuple(name for name in SERVICES if name != slow)

    async def scenario() -> None:
        await set_fault(cluster, slow, participant_pb2.FAULT_MODE_SLOW, delay_ms=600_000)

        async def stop_once_all_prepared() -> None:
            await until_prepared(cluster, holding, count)
            pid = cluster.pid(COORDINATOR)
            assert pid is not None
            os.kill(pid, signal.SIGTERM)

        requests = [request for request, _ in orders("g")[:count]]
        results, _ = await asyncio.gather(
            submit_all(cluster, requests, timeout_s=600.0), stop_once_all_prepared()
        )
        assert 0 == await asyncio.to_thread(cluster.wait_exit, COORDINATOR, 10.0)
        assert [chaos.ABORTED] * count == [result.outcome for result in results], results[0]
        assert f"no vote from {slow} within the coordinator's grace" in results[0].reason
        assert {} == {name: ids for name, ids in (await in_doubt(cluster, holding)).items() if ids}
        assert "left_to_recovery=0" in cluster.log_tail(COORDINATOR)

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


def test_stopping_a_cluster_stops_the_coordinator_first(tmp_path: Path) -> None:
    """`make down` (Cluster.stop): the services stay up until the coordinator has finished
    phase 2, so its last, lingering commits reach them and nothing is left to recovery."""
    cluster = lingering_cluster(tmp_path)
    cluster.start()
    try:
        asyncio.run(commit_orders(cluster, "d"))
    finally:
        cluster.stop()
    last = cluster.log_path(COORDINATOR).read_text().splitlines()[-1]
    assert "coordinator stopping" in last and "left_to_recovery=0" in last, last


def test_a_second_process_on_a_live_data_directory_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Two processes on one log would each recover it, cutting and deleting what the other
    writes. The second start is refused, naming the holder, before it touches the log; the
    first keeps committing, and its log replays whole after a restart."""
    cluster = Cluster(tmp_path, Ports.free(), initial=INITIAL, start_timeout_s=START_TIMEOUT_S)
    cluster.start()
    try:
        asyncio.run(commit_orders(cluster, "a", count=10))
        for module, name in (
            ("dtm.coordinator.server", COORDINATOR),
            *((f"participants.services.{service}", service) for service in SERVICES[:1]),
        ):
            second = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    module,
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    str(tmp_path),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert 1 == second.returncode, second.stderr
            assert "Traceback" not in second.stderr, second.stderr
            assert f"is in use by another process (pid {cluster.pid(name)})" in second.stderr
        asyncio.run(commit_orders(cluster, "b", count=10))
        cluster.restart(COORDINATOR, kill=True)  # SIGKILL, start again: replays every record
        asyncio.run(commit_orders(cluster, "c", count=10))
        requests = [request for request, _ in orders("a")[:10]]
        again = asyncio.run(submit_all(cluster, requests, timeout_s=30.0))
        assert {chaos.COMMITTED} == {result.outcome for result in again}  # remembered
    finally:
        cluster.stop()


def log_holding(directory: Path, record_type: int, payload: bytes) -> None:
    log, _ = WriteAheadLog.open(directory)
    log.append(record_type, payload)
    log.sync()
    log.close()


# A log the WAL layer accepts (every checksum holds) that the replay cannot apply:
# case -> (the server's module, its log's directory name, the one record's type and payload).
UNREPLAYABLE = {
    "participant: a record type of a newer build": (
        "participants.services.orders",
        "orders",
        max(RecordType) + 1,  # the next one this build does not know yet
        b"",
        f"type {max(RecordType) + 1}",
    ),
    "participant: a commit without its prepare": (
        "participants.services.orders",
        "orders",
        RecordType.BRANCH_COMMITTED,
        log_pb2.BranchCommitted(transaction_id="t", branch=0).SerializeToString(),
        "BRANCH_COMMITTED",
    ),
    "participant: another service's snapshot": (
        "participants.services.orders",
        "orders",
        RecordType.PARTICIPANT_CHECKPOINT,
        log_pb2.ParticipantCheckpoint(
            service_state=PaymentService().snapshot()
        ).SerializeToString(),
        "PARTICIPANT_CHECKPOINT",
    ),
    "coordinator: a record type of a newer build": (
        "dtm.coordinator.server",
        COORDINATOR,
        8,
        b"",
        "type 8",
    ),
    "coordinator: a payload that does not parse": (
        "dtm.coordinator.server",
        COORDINATOR,
        RecordType.COMMIT_DECIDED,
        b"\xff\xff\xff",
        "COMMIT_DECIDED",
    ),
}


@pytest.mark.parametrize("case", list(UNREPLAYABLE))
def test_a_log_the_replay_cannot_apply_stops_the_start_with_one_line(
    tmp_path: Path, case: str
) -> None:
    """An intact record that replay cannot apply (a type from a newer version, after a
    downgrade; a payload that does not parse; a commit without its prepare; a snapshot the
    service refuses) refuses the start as a corrupted log does: one line naming the log, the
    record's LSN and its type, exit status 1. Before, each ended the process with a 30-line
    traceback (ValueError, DecodeError, RecoveryError) naming neither the log nor the LSN."""
    module, name, record_type, payload, kind = UNREPLAYABLE[case]
    wal = tmp_path / name / "wal"
    log_holding(wal, record_type, payload)
    done = subprocess.run(
        [sys.executable, "-m", module, "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 1 == done.returncode, done.stderr
    assert 1 == len(done.stderr.strip().splitlines()), done.stderr
    assert f"cannot replay the write-ahead log {wal}: record at LSN 1 ({kind}): " in done.stderr
