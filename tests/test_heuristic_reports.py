"""A contradiction found by inquiry reaches the coordinator (Coordinator.ReportHeuristic): a
participant that asks about a branch an operator forced, and hears the other outcome, reports
it, and `dtm heuristics` lists it like a heuristic heard in phase 2. Before, only the
participant's WARNING line and its dtm_forced_outcomes_total showed it: the coordinator, which
sends no decision for a transaction it has no record of (presumed abort), never heard of it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli, logs
from dtm.coordinator.engine import CoordinatorConfig, Engine, Refused
from dtm.coordinator.registry import Registry
from dtm.core.branch import HEURISTIC_COMMIT, HEURISTIC_ROLLBACK
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2, log_pb2, participant_pb2
from participants.services.inventory import InventoryService
from tests.cli_runner import dtm
from tests.doubles import StockCheck
from tests.harness import (
    ASKS_LATER,
    NEVER_MS,
    STOCK,
    InProcessCluster,
    ask,
    eventually,
    force_heuristic,
    forced_after_commit,
    forced_lines,
    forced_unknown,
    listed,
    order_branches,
    read_only_branch,
)

Code = grpc.StatusCode


def heuristics_counted(cluster: InProcessCluster, outcome: str) -> float:
    registry = cluster.coordinator.engine.observer.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value(
        "dtm_heuristic_outcomes_total", {"participant": "inventory", "outcome": outcome}
    )
    return float(value or 0)


def metered(cluster: InProcessCluster) -> InProcessCluster:
    cluster.coordinator_config = dataclasses.replace(
        cluster.coordinator_config, metrics_listen="127.0.0.1:0"
    )
    return cluster


def test_a_contradiction_found_by_inquiry_is_listed_by_dtm_heuristics_until_forgotten(
    tmp_path: Path,
) -> None:
    """A forced commit of a transaction the coordinator never decided (presumed abort) is
    listed, with the participant, the branch, both outcomes and how it was found, counted,
    kept across a coordinator restart and forgotten by `dtm heuristics forget`. A forced
    rollback, which agrees, is not reported."""

    async def scenario() -> None:
        cluster = metered(InProcessCluster(tmp_path, participant_overrides=ASKS_LATER))
        async with cluster:
            await forced_unknown(cluster, "t-fc", commit=True)
            await forced_unknown(cluster, "t-fr", commit=False)  # agrees with presumed abort
            assert [] == await listed(cluster)
            server = cluster.participants["inventory"]

            await ask(server, cluster)

            [kept] = await listed(cluster)
            assert ("t-fc", 0, "inventory") == (kept.transaction_id, kept.branch, kept.participant)
            assert HEURISTIC_COMMIT == kept.outcome
            assert coordinator_pb2.OUTCOME_ABORTED == kept.decision
            assert kept.found_by_inquiry
            assert "answered OUTCOME_ABORTED to an inquiry" in kept.detail, kept.detail
            assert 1 == heuristics_counted(cluster, HEURISTIC_COMMIT)
            assert [] == server.engine.forced_awaiting()  # both reconciled

            await cluster.restart_coordinator()  # replays HeuristicRecorded
            assert [kept] == await listed(cluster)
            engine = cluster.coordinator.engine
            engine.records_since_checkpoint = engine.config.checkpoint_every_records
            assert await engine.checkpoint_if_due()
            await cluster.restart_coordinator()  # from the checkpoint
            assert [kept] == await listed(cluster)

            at = ["--coordinator", cluster.coordinator_address]
            status, out, _ = await dtm(*at, "heuristics")
            assert cli.EXIT_OK == status
            [row] = [line for line in out.splitlines() if "t-fc" in line]
            assert "heuristic commit" in row and "aborted" in row and "inquiry" in row, row
            status, out, _ = await dtm(*at, "heuristics", "--json")
            [entry] = json.loads(out)
            assert (True, "aborted") == (entry["found_by_inquiry"], entry["decision"])
            status, out, _ = await dtm(*at, "heuristics", "forget", "t-fc", "0")
            assert cli.EXIT_OK == status, out
            assert [] == await listed(cluster)

    asyncio.run(scenario())


@pytest.mark.parametrize("checkpoint", [False, True], ids=["log replay", "checkpoint"])
def test_a_reported_contradiction_is_not_reported_again_after_a_participant_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: bool
) -> None:
    """The participant logs that the coordinator acknowledged its report (BranchReconciled,
    reported), forced: restarted, it neither asks nor reports again. Shown by an operator
    forgetting the heuristic at the coordinator first: a second report would bring it back."""
    logs.configure("inventory", "INFO")

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-fc", commit=True)
            server = cluster.participants["inventory"]
            await ask(server, cluster)
            assert [("t-fc", 0)] == [(h.transaction_id, h.branch) for h in await listed(cluster)]
            await cluster.client.ForgetHeuristic(
                coordinator_pb2.ForgetHeuristicRequest(transaction_id="t-fc", branch=0)
            )
            if checkpoint:
                await server.engine.checkpoint()
            server = await cluster.restart_participant("inventory", InventoryService(dict(STOCK)))
            assert [] == server.engine.forced_awaiting()
            capsys.readouterr()
            await ask(server, cluster)
            assert [] == forced_lines(capsys.readouterr().err)
            assert [] == await listed(cluster)

    asyncio.run(scenario())


def test_a_report_made_twice_is_recorded_once(tmp_path: Path) -> None:
    """A participant that crashed after the coordinator recorded its report, before its own
    record was durable, reports again: the coordinator answers what it keeps and writes
    nothing."""

    async def scenario() -> None:
        cluster = metered(InProcessCluster(tmp_path, participant_overrides=ASKS_LATER))
        async with cluster:
            await forced_unknown(cluster, "t-fc", commit=True)
            report = coordinator_pb2.ReportHeuristicRequest(
                transaction_id="t-fc",
                branch=0,
                participant="inventory",
                incarnation=cluster.participants["inventory"].engine.incarnation,
                forced=coordinator_pb2.OUTCOME_COMMITTED,
                decision=coordinator_pb2.OUTCOME_ABORTED,
                detail="forced commit",
            )
            first = await cluster.client.ReportHeuristic(report)
            writes = cluster.coordinator.engine.counters.forced_writes
            second = await cluster.client.ReportHeuristic(report)
            assert first == second
            assert writes == cluster.coordinator.engine.counters.forced_writes
            assert [first.heuristic] == await listed(cluster)
            assert 1 == heuristics_counted(cluster, HEURISTIC_COMMIT)

    asyncio.run(scenario())


def test_a_report_that_says_otherwise_than_the_kept_outcome_is_refused_not_acknowledged() -> None:
    """Inventory's heuristic rollback of committed t-r/0 is kept; the coordinator has since
    forgotten t-r (presumed abort), and inventory reports a heuristic commit of a t-r/0 it
    now answers ABORTED for (the id used again). Before, the kept outcome was answered as if
    it were this report's: inventory took its report as recorded, and no heuristic commit was
    ever kept. The same fact reported again (in other words) is still acknowledged."""

    async def scenario() -> None:
        log = MemoryLog()
        engine = Engine(log, Registry(), CoordinatorConfig())
        for key, outcome, committed in (
            ("t-r", HEURISTIC_ROLLBACK, True),
            ("t-c", HEURISTIC_COMMIT, False),
        ):
            engine.heuristics.keep(
                log_pb2.HeuristicRecorded(
                    transaction_id=key,
                    branch=0,
                    participant="inventory",
                    outcome=outcome,
                    detail="heard in phase 2",
                    recorded_at_unix_ms=1_000,
                    committed=committed,
                )
            )
        with pytest.raises(Refused) as refused:
            await engine.report_heuristic("t-r", 0, "inventory", forced_commit=True)
        assert Code.FAILED_PRECONDITION == refused.value.code
        message = str(refused.value)
        assert "another heuristic outcome is kept for branch t-r/0" in message, message
        assert "heuristic rollback against OUTCOME_COMMITTED" in message, message
        assert "a heuristic commit against OUTCOME_ABORTED: nothing recorded" in message, message
        assert "dtm heuristics forget t-r 0" in message, message
        kept = engine.heuristics.get(("t-r", 0, b""))
        assert kept is not None and HEURISTIC_ROLLBACK == kept.outcome
        # t-c's heuristic commit, kept from phase 2, reported by inquiry: the same fact.
        same = await engine.report_heuristic(
            "t-c", 0, "inventory", forced_commit=True, detail="forced commit"
        )
        assert (HEURISTIC_COMMIT, "heard in phase 2") == (same.outcome, same.detail)
        assert 0 == log.appended_lsn  # nothing written for either

    asyncio.run(scenario())


def test_a_commit_that_cannot_reach_a_forced_rollback_ends_on_its_report(
    tmp_path: Path,
) -> None:
    """The coordinator committed t1, but its Commits cannot reach inventory, whose branch an
    operator rolled back; inventory's inquiry reaches the coordinator. Before, the
    contradiction showed only at inventory, and the coordinator retried its Commit for as
    long as it could not get through. Now the report records it, and phase 2 of that branch
    stops: the commit is over."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            participant_overrides=ASKS_LATER,
            coordinator_overrides={"backoff_ms_min": 20, "backoff_ms_max": 100},
        ) as cluster:
            await forced_after_commit(cluster, commit=False)  # inventory rejects decisions
            server = cluster.participants["inventory"]
            assert cluster.coordinator.engine.knows("t1")
            await ask(server, cluster)

            [kept] = await listed(cluster)
            assert ("t1", 0, HEURISTIC_ROLLBACK) == (kept.transaction_id, kept.branch, kept.outcome)
            assert coordinator_pb2.OUTCOME_COMMITTED == kept.decision
            assert kept.found_by_inquiry

            async def over() -> bool:
                return "t1" not in cluster.coordinator.engine.active

            await eventually(over)
            status = await cluster.client.GetTransaction(
                coordinator_pb2.GetTransactionRequest(transaction_id="t1")
            )
            assert coordinator_pb2.TRANSACTION_STATE_COMMITTED == status.state
            assert HEURISTIC_ROLLBACK == status.branches[0].heuristic
            assert [] == server.engine.forced_awaiting()

    asyncio.run(scenario())


def test_a_forced_commit_of_an_abort_whose_rollbacks_were_given_up_shows_in_its_status(
    tmp_path: Path,
) -> None:
    """The coordinator aborted t-a (payment declined) while inventory rejected decisions: its
    Rollbacks to inventory were given up (ROLLBACK_ATTEMPTS_MAX), and an operator then forced
    inventory's prepared branch to commit. Its inquiry hears ABORTED; the report is recorded,
    and the finished transaction's status shows the branch's heuristic too."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            participant_overrides=ASKS_LATER,
            coordinator_overrides={"backoff_ms_min": 5, "backoff_ms_max": 20},
        ) as cluster:
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            declined = order_branches("o-a", [("sku-apple", 1)], account="acct-blocked")
            assert (
                coordinator_pb2.OUTCOME_ABORTED == (await cluster.submit(declined, "t-a")).outcome
            )
            engine = cluster.coordinator.engine

            async def given_up() -> bool:
                return "t-a" not in engine.active and "t-a" not in engine._settling

            await eventually(given_up)
            await force_heuristic(cluster, "inventory", "t-a", 0, commit=True)
            get = coordinator_pb2.GetTransactionRequest(transaction_id="t-a")
            assert "" == (await cluster.client.GetTransaction(get)).branches[0].heuristic
            await ask(cluster.participants["inventory"], cluster)

            [kept] = await listed(cluster)
            assert ("t-a", 0, HEURISTIC_COMMIT) == (kept.transaction_id, kept.branch, kept.outcome)
            assert (coordinator_pb2.OUTCOME_ABORTED, True) == (kept.decision, kept.found_by_inquiry)
            status = await cluster.client.GetTransaction(get)
            assert coordinator_pb2.TRANSACTION_STATE_ABORTED == status.state
            assert HEURISTIC_COMMIT == status.branches[0].heuristic

    asyncio.run(scenario())


class ScriptedCoordinator:
    """A coordinator stub: QueryOutcome answers `outcome`, ReportHeuristic fails with `code`
    (None: acknowledges)."""

    def __init__(self, outcome: int, code: Code | None) -> None:
        self.outcome = outcome
        self.code = code
        self.reports: list[coordinator_pb2.ReportHeuristicRequest] = []

    async def QueryOutcome(self, request: Any, timeout: float) -> Any:  # noqa: ASYNC109 (the stub's signature)
        return coordinator_pb2.QueryOutcomeResponse(outcome=self.outcome)  # type: ignore[arg-type]

    async def ReportHeuristic(self, request: Any, timeout: float) -> Any:  # noqa: ASYNC109
        self.reports.append(request)
        if self.code is None:
            return coordinator_pb2.ReportHeuristicResponse()
        raise grpc.aio.AioRpcError(
            self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"{self.code.name} details"
        )


def test_a_report_not_acknowledged_is_made_again_and_an_old_coordinator_is_not_waited_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unreachable (or refusing for now), the report is retried with the inquiry, after its
    backoff, and the branch awaits meanwhile; a coordinator from before ReportHeuristic
    (UNIMPLEMENTED) ends the wait as before, the WARNING saying it was not told."""
    logs.configure("inventory", "INFO")

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-fc", commit=True)
            server = cluster.participants["inventory"]
            down = ScriptedCoordinator(coordinator_pb2.OUTCOME_ABORTED, Code.UNAVAILABLE)
            for rounds in (1, 2):  # each past the backoff of the one before
                now = server.engine.monotonic_ms() + rounds * NEVER_MS + 1
                await server._ask_about_in_doubt(down, now)  # type: ignore[arg-type]
            assert 2 == len(down.reports)
            assert [("t-fc", 0)] == [key for key, _ in server.engine.forced_awaiting()]
            assert 0 == server.engine.counters.forced_contradicted
            [report] = {(r.forced, r.decision, r.participant) for r in down.reports}
            assert (
                coordinator_pb2.OUTCOME_COMMITTED,
                coordinator_pb2.OUTCOME_ABORTED,
                "inventory",
            ) == report

            old = ScriptedCoordinator(coordinator_pb2.OUTCOME_ABORTED, Code.UNIMPLEMENTED)
            capsys.readouterr()
            now = server.engine.monotonic_ms() + 3 * NEVER_MS
            await server._ask_about_in_doubt(old, now)  # type: ignore[arg-type]
            assert [] == server.engine.forced_awaiting()
            assert 1 == server.engine.counters.forced_contradicted
            [warning] = forced_lines(capsys.readouterr().err)
            assert "takes no reports" in warning and "txn=t-fc" in warning

    asyncio.run(scenario())


def test_bad_reports_get_precise_status_codes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            mine = cluster.participants["inventory"].engine.incarnation
            await forced_after_commit(cluster, commit=False)  # t1: committed, inventory at 0

            def report(**fields: Any) -> coordinator_pb2.ReportHeuristicRequest:
                request = coordinator_pb2.ReportHeuristicRequest(
                    transaction_id="t-x",
                    branch=0,
                    participant="inventory",
                    incarnation=mine,
                    forced=coordinator_pb2.OUTCOME_COMMITTED,
                    decision=coordinator_pb2.OUTCOME_ABORTED,
                )
                for name, value in fields.items():
                    setattr(request, name, value)
                return request

            async def refused(request: coordinator_pb2.ReportHeuristicRequest) -> Any:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await cluster.client.ReportHeuristic(request)
                return caught.value

            malformed = [
                (report(transaction_id="bad id!"), "malformed"),
                (report(branch=32), "out of range"),
                (report(participant=""), "participant is required"),
                (report(participant="Inventory"), "malformed"),
                (report(incarnation="x" * 65), "malformed"),
                (report(transaction_fingerprint=b"f" * 65), "at most 64"),
                (report(forced=coordinator_pb2.OUTCOME_UNSPECIFIED), "must be OUTCOME_COMMITTED"),
                (report(decision=coordinator_pb2.OUTCOME_UNKNOWN), "must be OUTCOME_COMMITTED"),
                (report(decision=coordinator_pb2.OUTCOME_COMMITTED), "agrees"),
                (report(detail="d" * 1025), "at most 1024"),
            ]
            for request, expected in malformed:
                error = await refused(request)
                assert Code.INVALID_ARGUMENT == error.code(), (request, error)
                assert expected in (error.details() or ""), (expected, error.details())

            # The coordinator's outcome is not the one reported: t-x is aborted (presumed), t1
            # committed.
            contradicting = [
                report(forced=coordinator_pb2.OUTCOME_ABORTED, decision=1),
                report(transaction_id="t1"),
            ]
            for request in contradicting:
                error = await refused(request)
                assert Code.FAILED_PRECONDITION == error.code(), error
                assert "ask again" in (error.details() or ""), error.details()
            # t1's branch 1 is orders', and t1 has no branch 9.
            rollback = {"forced": coordinator_pb2.OUTCOME_ABORTED, "decision": 1}
            for branch, says in ((1, "it is 'orders''s"), (9, "it has 4 branches")):
                error = await refused(report(transaction_id="t1", branch=branch, **rollback))
                assert Code.FAILED_PRECONDITION == error.code(), error
                assert says in (error.details() or ""), error.details()

            # A replaced incarnation: refused before anything is looked up, as its inquiries.
            await cluster.client.RegisterParticipant(
                coordinator_pb2.RegisterParticipantRequest(
                    name="loyalty", address="127.0.0.1:1", incarnation="a" * 16
                )
            )
            error = await refused(report(participant="loyalty", incarnation="b" * 16))
            assert Code.FAILED_PRECONDITION == error.code(), error
            assert "was replaced" in (error.details() or ""), error.details()
            metadata: Any = error.trailing_metadata() or ()
            assert ["a" * 16] == [v for k, v in metadata if k == "dtm-replaced"]
            assert [] == await listed(cluster)

    asyncio.run(scenario())


def test_a_report_about_a_recovered_commit_finds_its_branch_by_number_not_place(
    tmp_path: Path,
) -> None:
    """A commit resumed after a coordinator restart lists only its updating branches: here
    inventory's branch 1, behind the read-only branch 0 of a stock check. Its Commits cannot
    reach inventory, whose branch an operator rolled back; inventory's report of it names
    branch 1, which is the resumed transaction's first (and only) entry."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            extra_services=[StockCheck("check-a")],
            participant_overrides=ASKS_LATER,
            coordinator_overrides={"backoff_ms_min": 20, "backoff_ms_max": 100},
        ) as cluster:
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            reserve_apple = order_branches("o-1", [("sku-apple", 1)])[0]
            branches = [read_only_branch("check-a"), reserve_apple]
            assert (
                coordinator_pb2.OUTCOME_COMMITTED == (await cluster.submit(branches, "t1")).outcome
            )
            await force_heuristic(cluster, "inventory", "t1", 1, commit=False)
            await cluster.restart_coordinator()  # resumes t1: Commits to branch 1 only
            engine = cluster.coordinator.engine
            assert [1] == [b.index for b in engine.active["t1"].txn.branches]
            server = cluster.participants["inventory"]
            await ask(server, cluster)

            [kept] = await listed(cluster)
            assert ("t1", 1, HEURISTIC_ROLLBACK) == (kept.transaction_id, kept.branch, kept.outcome)
            assert [] == server.engine.forced_awaiting()

            async def over() -> bool:
                return "t1" not in engine.active

            await eventually(over)

    asyncio.run(scenario())
