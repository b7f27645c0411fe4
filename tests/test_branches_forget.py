"""`dtm branches forget` asks the coordinator first, as `dtm force` does. Forgetting a forced
branch stops its participant keeping it for the coordinator, and that branch is how the
coordinator hears of the forced outcome: from the branch's answer to its Commit or Rollback,
or from the participant's inquiry, which reports a contradiction (ReportHeuristic). Before,
the command forgot the branch whatever the coordinator still needed of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dtm import cli, limits
from dtmpb.v1 import coordinator_pb2, participant_pb2
from participants.server.admin import AdminServicer
from tests.cli_runner import dtm
from tests.harness import (
    ASKS_LATER,
    InProcessCluster,
    ask,
    describe_coordinator_as,
    eventually,
    forced_against_a_recorded_abort,
    forced_unknown,
    listed,
    order_branches,
    refuse_reports,
    reserve,
)


async def awaiting(cluster: InProcessCluster, name: str) -> list[tuple[str, int]]:
    """The forced branches `name` keeps for its coordinator."""
    return [key for key, _ in cluster.participants[name].engine.forced_awaiting()]


def test_a_forced_commit_the_coordinator_has_no_record_of_is_kept_until_reported(
    tmp_path: Path,
) -> None:
    """No record: the coordinator aborted (presumed abort). A forced rollback agrees and goes
    at once; a forced commit contradicts it, and is refused (exit 5) until the participant's
    inquiry has reported it to the coordinator, unless --coordinator-lost says that
    coordinator's "no record" decides nothing."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            at = ["--coordinator", cluster.coordinator_address, "branches", "forget"]
            await forced_unknown(cluster, "t-fc", commit=True)
            await forced_unknown(cluster, "t-fr", commit=False)
            await forced_unknown(cluster, "t-lost", commit=True)
            inventory = ["--participant", "inventory"]

            status, out, err = await dtm(*at, "t-fc", "0", *inventory)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert "has no record of t-fc" in err and "presumed abort" in err, err
            assert "reports it at its next inquiry" in err and "--coordinator-lost" in err, err
            assert ("t-fc", 0) in await awaiting(cluster, "inventory")

            status, out, err = await dtm(*at, "t-fr", "0", *inventory)
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-fr/0" in out

            status, out, err = await dtm(*at, "t-lost", "0", *inventory, "--coordinator-lost")
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-lost/0" in out

            # Reported (and so reconciled): the coordinator keeps it, the branch may go.
            await ask(cluster.participants["inventory"], cluster)
            assert [("t-fc", 0)] == [(h.transaction_id, h.branch) for h in await listed(cluster)]
            status, out, err = await dtm(*at, "t-fc", "0", *inventory, "--json")
            assert cli.EXIT_OK == status, err
            assert json.loads(out)["forgotten"]
            assert [] == await awaiting(cluster, "inventory")

    asyncio.run(scenario())


def test_a_coordinator_that_cannot_be_reached_stops_a_forget_unless_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]
) -> None:
    """Unlike a force (which frees locks, and is for a coordinator gone), a forget frees
    nothing that presses, and a coordinator down for now may still decide the branch: it is
    refused (exit 5) unless --coordinator-lost says that coordinator is gone for good."""

    async def scenario() -> None:
        gone = unreachable()
        describe_coordinator_as(monkeypatch, gone)  # before the servers take the method
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-fc", commit=False)
            forget = [
                *("--timeout", "2", "branches", "forget", "t-fc", "0"),
                *("--address", cluster.address("inventory")),
            ]

            status, out, err = await dtm(*forget)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert f"cannot reach the coordinator at {gone}" in err, err
            assert "--coordinator-lost" in err, err
            assert [("t-fc", 0)] == await awaiting(cluster, "inventory")

            status, out, err = await dtm(*forget, "--coordinator-lost")
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-fc/0" in out
            assert [] == await awaiting(cluster, "inventory")

    asyncio.run(scenario())


def test_a_contradiction_of_a_decision_on_record_is_kept_until_the_coordinator_has_it(
    tmp_path: Path,
) -> None:
    """An abort on record whose Rollback did not reach the branch, forced to commit meanwhile:
    refused (exit 5), --coordinator-lost included (that coordinator has the transaction on
    record: it lost nothing), until the coordinator has heard the heuristic commit."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await forced_against_a_recorded_abort(cluster)
            forget = [*at, "branches", "forget", "t-a", "1", "--participant", "orders"]
            # The branch is of the attempt on record: the check compares their fingerprints.
            on_record = await cluster.client.GetTransaction(
                coordinator_pb2.GetTransactionRequest(transaction_id="t-a")
            )
            kept = await cluster.admin("orders").ListBranches(
                participant_pb2.ListBranchesRequest(transaction_id="t-a")
            )
            assert on_record.transaction_fingerprint
            assert [on_record.transaction_fingerprint] == [
                b.transaction_fingerprint for b in kept.branches
            ]

            for lost in ([], ["--coordinator-lost"]):
                status, out, err = await dtm(*forget, *lost)
                assert (cli.EXIT_UNSAFE, "") == (status, out), err
                assert "decided abort for t-a, and branch t-a/1 was forced to commit" in err, err
                assert "has not recorded yet" in err, err
                assert ("on record: not lost" in err) == bool(lost), err
            assert [("t-a", 1)] == await awaiting(cluster, "orders")

            # Heard, by the Rollback's retry or the participant's report: it may go now.
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_NONE)
            await ask(cluster.participants["orders"], cluster)

            async def reconciled() -> bool:
                return [] == await awaiting(cluster, "orders")

            await eventually(reconciled)
            assert [("t-a", 1)] == [(h.transaction_id, h.branch) for h in await listed(cluster)]
            status, out, err = await dtm(*forget)
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-a/1" in out

    asyncio.run(scenario())


def test_a_participant_that_lists_only_its_newest_branches_does_not_let_a_forget_skip_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A participant from before ListBranchesRequest.transaction_id lists its newest branches,
    whatever the transaction. Before, a forced branch older than the newest listed was read as
    not kept, the coordinator was not asked, and ForgetBranch dropped a forced commit the
    coordinator (no record: presumed abort) had not heard of yet: the check failed open."""
    original = AdminServicer.ListBranches

    async def from_before_the_field(
        self: AdminServicer, request: participant_pb2.ListBranchesRequest, context: Any
    ) -> participant_pb2.ListBranchesResponse:
        request.ClearField("transaction_id")
        return await original(self, request, context)

    monkeypatch.setattr(AdminServicer, "ListBranches", from_before_the_field)
    monkeypatch.setattr(limits, "LIST_TRANSACTIONS_LIMIT_MAX", 1)  # its newest one only

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-fc", commit=True)
            await forced_unknown(cluster, "t-newer", commit=False)
            forget = ["--coordinator", cluster.coordinator_address, "branches", "forget"]

            status, out, err = await dtm(*forget, "t-fc", "0", "--participant", "inventory")
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert "cannot tell whether inventory keeps" in err, err
            assert ("t-fc", 0) in await awaiting(cluster, "inventory")

    asyncio.run(scenario())


def test_a_forced_branch_of_another_attempt_than_the_one_on_record_has_no_record(
    tmp_path: Path,
) -> None:
    """The coordinator forgot an attempt of a transaction whose branch inventory forced, and a
    later attempt under the same id, with other content (another fingerprint), committed
    without inventory. Of the forced branch's own attempt the coordinator has no record
    (presumed abort: its inquiry hears ABORTED): a forced commit is refused (exit 5) until
    reported, as for no record at all (--coordinator-lost passes it), and a forced rollback
    agrees. Before, the check asked by id only: the commit on record passed the forced commit
    ("decided as forced", a heuristic commit the coordinator never heard of), and refused the
    forced rollback."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            first = b"attempt-1-of-txn"  # 16 bytes, as the coordinator's digest
            await forced_unknown(cluster, "t-c", commit=True, fingerprint=first)
            await forced_unknown(cluster, "t-r", commit=False, fingerprint=first)
            await forced_unknown(cluster, "t-lost", commit=True, fingerprint=first)
            # Without inventory, which keeps the first attempt's branch (it refuses the id).
            for txn in ("t-c", "t-r", "t-lost"):
                response = await cluster.submit(
                    order_branches(f"o-{txn}", [("sku-apple", 1)])[1:], txn
                )
                assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome, response
                on_record = await cluster.client.GetTransaction(
                    coordinator_pb2.GetTransactionRequest(transaction_id=txn)
                )
                assert on_record.transaction_fingerprint not in (b"", first)
            branches = await cluster.admin("inventory").ListBranches(
                participant_pb2.ListBranchesRequest(transaction_id="t-c")
            )
            assert [first] == [b.transaction_fingerprint for b in branches.branches]
            forget = ["--coordinator", cluster.coordinator_address, "branches", "forget"]
            inventory = ["--participant", "inventory"]

            status, out, err = await dtm(*forget, "t-c", "0", *inventory)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert "has no record of the attempt of t-c that branch t-c/0 belongs to" in err
            assert "another fingerprint" in err and "reports it at its next inquiry" in err, err
            assert ("t-c", 0) in await awaiting(cluster, "inventory")

            status, out, err = await dtm(*forget, "t-r", "0", *inventory)
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-r/0" in out

            # As for no record at all: only if that coordinator lost its log.
            status, out, err = await dtm(*forget, "t-lost", "0", *inventory, "--coordinator-lost")
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-lost/0" in out

            # Reported at the inquiry (with the branch's fingerprint): it may go now.
            await ask(cluster.participants["inventory"], cluster)
            assert [] == await awaiting(cluster, "inventory")
            assert ("t-c", 0) in [(h.transaction_id, h.branch) for h in await listed(cluster)]
            status, out, err = await dtm(*forget, "t-c", "0", *inventory)
            assert cli.EXIT_OK == status, err

    asyncio.run(scenario())


def test_a_branch_without_a_fingerprint_is_taken_for_the_attempt_on_record(
    tmp_path: Path,
) -> None:
    """A branch whose fingerprint is not known (a participant from before
    BranchInfo.transaction_fingerprint, or a Prepare that carried none) cannot be told from
    the attempt on record: the check takes it for that attempt, as it did before it compared
    them. Here the commit on record agrees with the forced commit, so it goes."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-c", commit=True, fingerprint=b"")
            response = await cluster.submit(order_branches("o-c", [("sku-apple", 1)])[1:], "t-c")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome, response
            forget = ["--coordinator", cluster.coordinator_address, "branches", "forget"]

            status, out, err = await dtm(*forget, "t-c", "0", "--participant", "inventory")
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-c/0" in out

    asyncio.run(scenario())


def test_a_force_judges_the_branchs_own_attempt_not_another_on_record(tmp_path: Path) -> None:
    """`dtm force` asks the coordinator as `branches forget` does, and had the same gap: with a
    later attempt under the id committed (another fingerprint), the force of a branch of the
    earlier attempt, which aborted (presumed abort: its inquiry hears ABORTED), was judged by
    the later one's record: a forced commit went through (exit 0, atomicity broken) and a
    forced rollback was refused ("decided commit"). Found by a bug hunt."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            first = b"attempt-1-of-txn"
            for txn in ("t-c", "t-r"):
                await cluster.participant_stub("inventory").Prepare(
                    participant_pb2.PrepareRequest(
                        transaction_id=txn,
                        branch=0,
                        operation=reserve(),
                        transaction_fingerprint=first,
                    )
                )
                response = await cluster.submit(
                    order_branches(f"o-{txn}", [("sku-apple", 1)])[1:], txn
                )
                assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome, response
            force = ["--coordinator", cluster.coordinator_address, "force"]
            inventory = ["--participant", "inventory", "--i-understand"]

            status, out, err = await dtm(*force, "t-c", "0", *inventory, "--commit")
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert "has no record of the attempt of t-c that branch 0 belongs to" in err, err

            status, out, err = await dtm(*force, "t-r", "0", *inventory, "--rollback")
            assert cli.EXIT_OK == status, err
            assert "branch t-r/0 forced to rolled_back" in out, out

    asyncio.run(scenario())


def test_the_command_with_coordinator_lost_is_held_to_the_participants_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]
) -> None:
    """`dtm branches forget --coordinator-lost` that cannot reach the coordinator the
    participant names goes past its own check; the participant, which reaches its own
    coordinator, hears the abort it keeps on record of t-a: it reports orders' forced commit
    first, and refuses (exit 5) while the coordinator does not take the report. Before, the
    override's forget went through unreported."""

    async def scenario() -> None:
        describe_coordinator_as(monkeypatch, unreachable())
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_against_a_recorded_abort(cluster)
            forget = [
                *("--timeout", "2", "branches", "forget"),
                *("t-a", "1", "--address", cluster.address("orders"), "--coordinator-lost"),
            ]
            with monkeypatch.context() as patched:
                refuse_reports(patched, cluster)
                status, out, err = await dtm(*forget)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert "forced branch t-a/1 still awaits its coordinator" in err, err
            assert "coordinator_lost does not apply" in err, err
            assert [("t-a", 1)] == await awaiting(cluster, "orders")

            status, out, err = await dtm(*forget)
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-a/1" in out
            assert [("t-a", 1)] == [(h.transaction_id, h.branch) for h in await listed(cluster)]

    asyncio.run(scenario())


def test_the_command_gives_a_forget_the_participants_whole_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forget with coordinator_lost may wait FORCE_CHECK_TIMEOUT_S for the participant's
    question to its coordinator, then report a contradiction: `dtm --timeout 1 branches
    forget` gave its call 1 s, which could end while the participant still asked. It gets the
    force's deadline now, whatever --timeout says."""
    deadlines: list[float | None] = []
    forget_branch = AdminServicer.ForgetBranch

    async def spied(self: AdminServicer, request: Any, context: Any) -> Any:
        deadlines.append(context.time_remaining())
        return await forget_branch(self, request, context)

    monkeypatch.setattr(AdminServicer, "ForgetBranch", spied)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-w", commit=False)
            at = ["--coordinator", cluster.coordinator_address, "--timeout", "1"]
            command = [*at, "branches", "forget", "t-w", "0", "--participant", "inventory"]
            status, out, err = await dtm(*command, "--coordinator-lost")
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-w/0" in out

    asyncio.run(scenario())
    [remaining] = deadlines
    assert remaining is not None and remaining > limits.FORCE_CHECK_TIMEOUT_S
