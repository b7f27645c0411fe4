"""Heuristic outcomes are kept per attempt of a transaction id, not per (id, branch) alone.

A client that retries very late runs a transaction id again (README, "a client retries very
late"), and other content under a spent id is another attempt (its transaction fingerprint
differs). Before, the coordinator kept one heuristic outcome per (transaction id, branch):
the second attempt's report was refused FAILED_PRECONDITION as contradicting the first's
(and its participant retried it for ever), and a second attempt's heuristic heard in phase 2
replaced the first's silently. Both are kept now, each under its attempt's fingerprint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from dtm import cli
from dtm.coordinator.engine import CoordinatorConfig, Engine, Refused
from dtm.coordinator.registry import Registry
from dtm.core.branch import HEURISTIC_COMMIT, HEURISTIC_ROLLBACK, BranchVote
from dtm.records import RecordType
from dtm.wal import MemoryLog
from dtm.wal.errors import LogRecord
from dtmpb.v1 import coordinator_pb2, log_pb2, participant_pb2
from participants.branches import BranchEngine, IdReused
from participants.locks import LockManager
from participants.services.inventory import InventoryService
from tests.cli_runner import dtm
from tests.harness import (
    ASKS_LATER,
    InProcessCluster,
    ask,
    eventually,
    expect_status,
    forced_after_commit,
    listed,
    reserve,
)

#: The fingerprint of an earlier attempt of t1 (PrepareRequest.transaction_fingerprint):
#: the coordinator's are 16 bytes (dtm.coordinator.server._fingerprint).
EARLIER = bytes.fromhex("0123456789abcdef0123456789abcdef")

FAST_RETRIES = {"backoff_ms_min": 20, "backoff_ms_max": 100}


async def earlier_attempt_reported(cluster: InProcessCluster) -> None:
    """An earlier attempt of t1 was prepared at inventory's branch 0, never decided by the
    coordinator (presumed abort) and forced to commit there: inventory reported it."""
    report = coordinator_pb2.ReportHeuristicRequest(
        transaction_id="t1",
        branch=0,
        participant="inventory",
        incarnation=cluster.participants["inventory"].engine.incarnation,
        transaction_fingerprint=EARLIER,
        forced=coordinator_pb2.OUTCOME_COMMITTED,
        decision=coordinator_pb2.OUTCOME_ABORTED,
        detail="the earlier attempt, forced to commit",
    )
    await cluster.client.ReportHeuristic(report)


def kept_by_attempt(
    heuristics: list[coordinator_pb2.HeuristicOutcome],
) -> list[tuple[str, int, str, str]]:
    return [(h.transaction_id, h.branch, h.outcome, h.participant) for h in heuristics]


def test_a_report_from_a_later_attempt_of_an_id_is_recorded_beside_the_earlier_one(
    tmp_path: Path,
) -> None:
    """The earlier attempt's heuristic commit of t1/0 is kept; the later attempt (committed,
    its Commits cannot reach inventory, whose branch an operator rolled back) is reported by
    inventory's inquiry. Before, that report was refused (another outcome kept for t1/0): the
    branch stayed awaiting at inventory, and phase 2 went on retrying."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, participant_overrides=ASKS_LATER, coordinator_overrides=FAST_RETRIES
        ) as cluster:
            await earlier_attempt_reported(cluster)
            await forced_after_commit(cluster, commit=False)  # the later attempt of t1
            server = cluster.participants["inventory"]
            await ask(server, cluster)

            assert [] == server.engine.forced_awaiting()  # acknowledged
            assert [
                ("t1", 0, HEURISTIC_COMMIT, "inventory"),
                ("t1", 0, HEURISTIC_ROLLBACK, "inventory"),
            ] == kept_by_attempt(await listed(cluster))

    asyncio.run(scenario())


def test_a_later_attempts_heuristic_heard_in_phase_two_does_not_replace_the_earlier_one(
    tmp_path: Path,
) -> None:
    """The later attempt's Commit reaches inventory's branch rolled back by an operator: phase
    2 records the heuristic rollback. Before, it replaced the earlier attempt's heuristic
    commit of t1/0, which was no longer listed, though nobody had reconciled it."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, participant_overrides=ASKS_LATER, coordinator_overrides=FAST_RETRIES
        ) as cluster:
            await earlier_attempt_reported(cluster)
            await forced_after_commit(cluster, commit=False)
            engine = cluster.coordinator.engine
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

            async def over() -> bool:  # the retried Commit heard the heuristic rollback
                return "t1" not in engine.active

            await eventually(over)

            assert [
                ("t1", 0, HEURISTIC_COMMIT, "inventory"),
                ("t1", 0, HEURISTIC_ROLLBACK, "inventory"),
            ] == kept_by_attempt(await listed(cluster))

    asyncio.run(scenario())


def test_both_attempts_outlive_restarts_and_an_operator_forgets_them_one_by_one(
    tmp_path: Path,
) -> None:
    """Each kept with its attempt's fingerprint through a log replay and a checkpoint;
    `dtm heuristics` shows the ATTEMPT; `dtm heuristics forget t1 0` cannot tell which is
    meant and names them, `--attempt` (the start of the fingerprint) picks one, durably."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, participant_overrides=ASKS_LATER, coordinator_overrides=FAST_RETRIES
        ) as cluster:
            await earlier_attempt_reported(cluster)
            await forced_after_commit(cluster, commit=False)
            await ask(cluster.participants["inventory"], cluster)
            later = (
                await cluster.client.GetTransaction(
                    coordinator_pb2.GetTransactionRequest(transaction_id="t1")
                )
            ).transaction_fingerprint
            kept = await listed(cluster)
            assert [EARLIER, later] == [h.transaction_fingerprint for h in kept]

            await cluster.restart_coordinator()  # replays both HeuristicRecorded
            assert kept == await listed(cluster)
            engine = cluster.coordinator.engine
            engine.records_since_checkpoint = engine.config.checkpoint_every_records
            assert await engine.checkpoint_if_due()
            await cluster.restart_coordinator()  # from the checkpoint
            assert kept == await listed(cluster)

            at = ["--coordinator", cluster.coordinator_address]
            status, out, _ = await dtm(*at, "heuristics")
            assert cli.EXIT_OK == status
            rows = [line for line in out.splitlines() if line.startswith("t1 ")]
            assert [EARLIER.hex()[:12], later.hex()[:12]] == [row.split()[2] for row in rows]
            status, out, _ = await dtm(*at, "heuristics", "--json")
            assert [EARLIER.hex(), later.hex()] == [
                entry["transaction_fingerprint"] for entry in json.loads(out)
            ]

            status, _, err = await dtm(*at, "heuristics", "forget", "t1", "0")
            assert cli.EXIT_OK != status
            assert "2 heuristic outcomes are kept for branch t1/0" in err, err
            assert EARLIER.hex() in err and later.hex() in err, err
            assert 2 == len(await listed(cluster))
            forget = ["heuristics", "forget", "t1", "0", "--attempt", EARLIER.hex()[:12]]
            status, out, _ = await dtm(*at, *forget)
            assert cli.EXIT_OK == status, out
            assert [later] == [h.transaction_fingerprint for h in await listed(cluster)]
            status, _, err = await dtm(*at, *forget)  # forgotten already
            assert "no heuristic outcome of attempt" in err, err

            await cluster.restart_coordinator()  # replays HeuristicForgotten: that one only
            assert [later] == [h.transaction_fingerprint for h in await listed(cluster)]
            status, out, _ = await dtm(*at, "heuristics", "forget", "t1", "0")  # the only one
            assert cli.EXIT_OK == status, out
            assert [] == await listed(cluster)

    asyncio.run(scenario())


LATER = bytes.fromhex("fedcba9876543210fedcba9876543210")


def recorded(fingerprint: bytes, outcome: str, committed: bool) -> log_pb2.HeuristicRecorded:
    return log_pb2.HeuristicRecorded(
        transaction_id="t-r",
        branch=0,
        participant="inventory",
        outcome=outcome,
        detail="heard in phase 2",
        recorded_at_unix_ms=1_000,
        committed=committed,
        transaction_fingerprint=fingerprint,
    )


def test_a_report_that_says_otherwise_for_the_same_attempt_is_still_refused() -> None:
    """The earlier attempt's heuristic rollback of committed t-r/0 is kept. The same attempt
    reporting a heuristic commit against abort is refused, as before; so is a report that
    carries no fingerprint, which cannot tell attempts apart. The later attempt's report is
    recorded beside it."""

    async def scenario() -> None:
        log = MemoryLog()
        engine = Engine(log, Registry(), CoordinatorConfig())
        engine.heuristics.keep(recorded(EARLIER, HEURISTIC_ROLLBACK, committed=True))
        for fingerprint in (EARLIER, b""):
            with pytest.raises(Refused) as refused:
                await engine.report_heuristic(
                    "t-r", 0, "inventory", forced_commit=True, fingerprint=fingerprint
                )
            assert grpc.StatusCode.FAILED_PRECONDITION == refused.value.code
            message = str(refused.value)
            assert "another heuristic outcome is kept for branch t-r/0" in message, message
            assert f"dtm heuristics forget t-r 0 --attempt {EARLIER.hex()}" in message, message
        assert 0 == log.appended_lsn

        later = await engine.report_heuristic(
            "t-r", 0, "inventory", forced_commit=True, fingerprint=LATER
        )
        assert (LATER, HEURISTIC_COMMIT) == (later.transaction_fingerprint, later.outcome)
        assert [(EARLIER, HEURISTIC_ROLLBACK), (LATER, HEURISTIC_COMMIT)] == [
            (h.transaction_fingerprint, h.outcome) for h in engine.heuristics
        ]
        # Made again, by either attempt (or without a fingerprint): the kept one, nothing new.
        appended = log.appended_lsn
        again = await engine.report_heuristic(
            "t-r", 0, "inventory", forced_commit=True, fingerprint=LATER
        )
        unknown = await engine.report_heuristic("t-r", 0, "inventory", forced_commit=True)
        assert later == again == unknown
        assert appended == log.appended_lsn

    asyncio.run(scenario())


def test_records_written_before_the_attempt_was_kept_still_replay() -> None:
    """A HeuristicRecorded and a HeuristicForgotten without a fingerprint (a log from before
    the field) replay as before: kept, then forgotten, without touching another attempt's.
    Kept with no fingerprint, an outcome is taken as any attempt's by a report."""

    async def scenario() -> None:
        def record(lsn: int, kind: RecordType, payload: bytes) -> LogRecord:
            return LogRecord(lsn, kind, payload)

        legacy = recorded(b"", HEURISTIC_ROLLBACK, committed=True).SerializeToString()
        later = recorded(LATER, HEURISTIC_COMMIT, committed=False).SerializeToString()
        forgotten = log_pb2.HeuristicForgotten(transaction_id="t-r", branch=0)
        records = [
            record(1, RecordType.HEURISTIC_RECORDED, legacy),
            record(2, RecordType.HEURISTIC_RECORDED, later),
            record(3, RecordType.HEURISTIC_FORGOTTEN, forgotten.SerializeToString()),
        ]
        engine = Engine(MemoryLog(), Registry(), CoordinatorConfig())
        engine.replay(records)
        assert [LATER] == [h.transaction_fingerprint for h in engine.heuristics]

        restarted = Engine(MemoryLog(), Registry(), CoordinatorConfig())
        restarted.replay([*records, record(4, RecordType.HEURISTIC_RECORDED, legacy)])
        assert [LATER, b""] == [h.transaction_fingerprint for h in restarted.heuristics]
        with pytest.raises(Refused):  # the legacy one may be EARLIER's: it says otherwise
            await restarted.report_heuristic(
                "t-r", 0, "inventory", forced_commit=True, fingerprint=EARLIER
            )

    asyncio.run(scenario())


def test_another_attempts_heuristic_does_not_end_a_resumed_commit() -> None:
    """Replay: a commit of t-r (the later attempt) is owed phase 2 when a heuristic rollback
    of t-r/0 is read that belongs to the earlier attempt. Phase 2 of the later attempt's
    branch 0 is not over: resumed, the commit still sends it its Commit."""
    decided = log_pb2.CommitDecided(
        transaction_id="t-r",
        branches=[log_pb2.DecisionBranch(branch=0, participant="inventory")],
        fingerprint=LATER,
    )
    records = [
        LogRecord(1, RecordType.COMMIT_DECIDED, decided.SerializeToString()),
        LogRecord(
            2,
            RecordType.HEURISTIC_RECORDED,
            recorded(EARLIER, HEURISTIC_ROLLBACK, committed=True).SerializeToString(),
        ),
    ]
    engine = Engine(MemoryLog(), Registry(), CoordinatorConfig())
    [pending] = engine.replay(records)
    assert [(0, False, "")] == [(b.branch, b.acknowledged, b.heuristic) for b in pending.branches]


def test_a_malformed_attempt_is_refused_before_anything_is_forgotten(tmp_path: Path) -> None:
    """`--attempt` not in hex is a usage error; a fingerprint longer than any is
    INVALID_ARGUMENT; one no kept outcome starts with is NOT_FOUND, naming it."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await earlier_attempt_reported(cluster)
            at = ["--coordinator", cluster.coordinator_address]
            for attempt in ("xyz", "abc", ""):
                status, _, err = await dtm(
                    *at, "heuristics", "forget", "t1", "0", "--attempt", attempt
                )
                assert cli.EXIT_USAGE == status, (attempt, err)
            forget = coordinator_pb2.ForgetHeuristicRequest(
                transaction_id="t1", branch=0, transaction_fingerprint=b"f" * 65
            )
            await expect_status(
                cluster.client.ForgetHeuristic(forget),
                grpc.StatusCode.INVALID_ARGUMENT,
                "transaction_fingerprint is 65 bytes; at most 64",
            )
            forget.transaction_fingerprint = LATER[:6]
            await expect_status(
                cluster.client.ForgetHeuristic(forget),
                grpc.StatusCode.NOT_FOUND,
                f"no heuristic outcome of attempt {LATER[:6].hex()}... is kept for t1/0",
            )
            assert [EARLIER] == [h.transaction_fingerprint for h in await listed(cluster)]

    asyncio.run(scenario())


def test_a_participant_forces_and_reports_two_attempts_of_one_id_one_after_the_other() -> None:
    """The participant side, as it stands (no change needed): its branches are keyed by
    (id, branch), one attempt at a time. While the earlier attempt's forced branch awaits its
    coordinator, the later attempt's Prepare is refused as a reused id (it cannot be forced
    meanwhile); once the earlier one was reported and left the window of decided branches,
    the later one prepares, is forced and awaits in its turn, under its own fingerprint,
    which its report carries."""

    async def scenario() -> None:
        engine = BranchEngine(
            InventoryService(),
            MemoryLog(),
            LockManager(wait_timeout_s=0.5),
            clock_ms=lambda: 0,
            decided_kept=1,
        )
        key = ("t1", 0)
        assert (BranchVote.PREPARED, "") == await engine.prepare(
            *key, reserve(), False, fingerprint=EARLIER
        )
        await engine.force(key, commit=True)
        engine.decide_now("t-other", 0, commit=False)  # past the window: kept, awaiting
        with pytest.raises(IdReused):
            engine.begin_prepare(*key, reserve(), False, fingerprint=LATER)
        assert engine.reconcile_forced(key, commit=False, reported=True) is not None
        engine.decide_now("t-another", 0, commit=False)  # the reported one leaves the window
        assert engine.branch(key) is None

        assert (BranchVote.PREPARED, "") == await engine.prepare(
            *key, reserve(), False, fingerprint=LATER
        )
        forced = await engine.force(key, commit=False)
        assert [key] == [awaiting for awaiting, _ in engine.forced_awaiting()]
        assert LATER == forced.fingerprint  # what its inquiry and report carry

    asyncio.run(scenario())


def test_an_outcome_whose_attempt_is_not_known_is_forgotten_alone(tmp_path: Path) -> None:
    """Kept for t1/0: an outcome with no fingerprint (a record from before the field, or a
    report without one) beside another attempt's. No `--attempt HEX` names an empty
    fingerprint, and without one both matched, so the first could be forgotten only after the
    other attempt's, reconciled or not; the refusal listed it as "(none)", which no option
    could say. `--attempt -` (the ATTEMPT column's "-"; ForgetHeuristicRequest
    .transaction_fingerprint set and empty) names it."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await earlier_attempt_reported(cluster)
            unknown = recorded(b"", HEURISTIC_ROLLBACK, committed=True)
            unknown.transaction_id = "t1"
            cluster.coordinator.engine.heuristics.keep(unknown)  # as a legacy record replays
            at = ["--coordinator", cluster.coordinator_address]

            status, _, err = await dtm(*at, "heuristics", "forget", "t1", "0")
            assert cli.EXIT_OK != status
            assert "--attempt -" in err, err
            status, out, err = await dtm(*at, "heuristics", "forget", "t1", "0", "--attempt", "-")
            assert cli.EXIT_OK == status, err
            assert "(attempt -)" in out, out
            assert [EARLIER] == [h.transaction_fingerprint for h in await listed(cluster)]

            # Over the API: the field set, and empty. Forgotten already: NOT_FOUND, saying so.
            forget = coordinator_pb2.ForgetHeuristicRequest(
                transaction_id="t1", branch=0, transaction_fingerprint=b""
            )
            await expect_status(
                cluster.client.ForgetHeuristic(forget),
                grpc.StatusCode.NOT_FOUND,
                "no heuristic outcome of an unknown attempt is kept for t1/0",
            )
            # Its HeuristicForgotten (no fingerprint) replays without touching EARLIER's.
            await cluster.restart_coordinator()
            assert [EARLIER] == [h.transaction_fingerprint for h in await listed(cluster)]

    asyncio.run(scenario())


def test_a_report_against_its_own_attempts_outcome_is_refused_beside_an_unknown_one() -> None:
    """Kept for t-r/0: EARLIER's heuristic rollback of a commit, and an outcome of an unknown
    attempt that says what EARLIER's report says. EARLIER's report contradicts its own
    attempt's outcome, and is refused as without the unknown one: that one only may be
    EARLIER's, the other is. It was acknowledged from the unknown one, nothing recorded."""

    async def scenario() -> None:
        log = MemoryLog()
        engine = Engine(log, Registry(), CoordinatorConfig())
        engine.heuristics.keep(recorded(EARLIER, HEURISTIC_ROLLBACK, committed=True))
        engine.heuristics.keep(recorded(b"", HEURISTIC_COMMIT, committed=False))
        with pytest.raises(Refused) as refused:
            await engine.report_heuristic(
                "t-r", 0, "inventory", forced_commit=True, fingerprint=EARLIER
            )
        assert grpc.StatusCode.FAILED_PRECONDITION == refused.value.code
        assert f"--attempt {EARLIER.hex()}" in str(refused.value), str(refused.value)
        # Without a fingerprint the report cannot tell either: the unknown one answers it.
        unknown = await engine.report_heuristic("t-r", 0, "inventory", forced_commit=True)
        assert b"" == unknown.transaction_fingerprint
        assert 0 == log.appended_lsn

    asyncio.run(scenario())
