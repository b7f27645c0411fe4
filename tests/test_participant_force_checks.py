"""The participant itself holds an operator's ForceOutcome and ForgetBranch to the rules `dtm
force` and `dtm branches forget` check: it asks its coordinator first. Before, only the
command asked, so a direct call (another tool, a script, grpcurl) forced commit of a branch
whose attempt the coordinator had aborted, breaking atomicity, or forgot a forced branch whose
contradiction the coordinator had not heard of."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import StatusCode as Code

from dtm import cli, grpc_edge, limits
from dtm.coordinator.server import CoordinatorServicer
from dtm.core.branch import BranchState
from dtmpb.v1 import coordinator_pb2, participant_pb2
from participants.server import process
from participants.server.admin import AdminServicer
from participants.server.process import CoordinatorAnswer
from participants.server.servicer import ParticipantServicer
from tests.cli_runner import dtm
from tests.harness import (
    ASKS_LATER,
    InProcessCluster,
    ask,
    describe_coordinator_as,
    eventually,
    force_heuristic,
    forced_against_a_recorded_abort,
    heuristic_force,
    listed,
    order_branches,
    refuse_reports,
    reserve,
)


def force(txn: str, branch: int, commit: bool, lost: bool = False) -> Any:
    """A confirmed ForceOutcome, checked against the coordinator unless `lost`."""
    request = heuristic_force(txn, branch, commit)
    request.coordinator_lost = lost
    return request


async def refused_unsafe(call: Any, *fragments: str) -> str:
    """The call's refusal: FAILED_PRECONDITION, marked unsafe (what `dtm` exits 5 on), its
    message naming each of `fragments`."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        details = error.details() or ""
        assert Code.FAILED_PRECONDITION == error.code(), details
        metadata = error.trailing_metadata() or ()
        assert any(key == grpc_edge.UNSAFE_METADATA_KEY for key, _ in metadata), details
        for fragment in fragments:
            assert fragment in details, details
        return details
    raise AssertionError("the call was not refused")


def state(cluster: InProcessCluster, name: str, txn: str, branch: int) -> BranchState:
    info = cluster.participants[name].engine.branch((txn, branch))
    assert info is not None
    return info.branch.state


async def prepared_unknown(cluster: InProcessCluster, txn: str) -> None:
    """Inventory prepares branch 0 of `txn`, which the coordinator has no record of."""
    vote = await cluster.participant_stub("inventory").Prepare(
        participant_pb2.PrepareRequest(transaction_id=txn, branch=0, operation=reserve())
    )
    assert coordinator_pb2.VOTE_PREPARED == vote.vote


def test_a_direct_forced_commit_of_an_aborted_branch_is_refused_while_its_coordinator_answers(
    tmp_path: Path,
) -> None:
    """The coordinator aborted t-a (payment refused) and its Rollback did not reach orders'
    branch, still prepared. A ForceOutcome commit straight to the participant is refused, and
    the branch stays prepared; coordinator_lost included: that coordinator keeps its abort on
    record, so it did not lose its log (before, the override skipped the question, and the
    branch committed against the abort). Once the coordinator cannot be reached, the
    override goes through, as forcing is for."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REFUSE)
            response = await cluster.submit(order_branches("o-a", [("sku-apple", 1)]), "t-a")
            assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
            admin = cluster.admin("orders")

            await refused_unsafe(
                admin.ForceOutcome(force("t-a", 1, commit=True)),
                "answers ABORTED for the attempt of t-a",
                "would break atomicity",
                "coordinator_lost",
            )
            await refused_unsafe(
                admin.ForceOutcome(force("t-a", 1, commit=True, lost=True)),
                "keeps a record of its abort of the attempt of t-a",
                "coordinator_lost does not apply",
                "would break atomicity",
            )
            assert BranchState.PREPARED is state(cluster, "orders", "t-a", 1)

            await cluster.coordinator.stop(0)
            forced = await admin.ForceOutcome(force("t-a", 1, commit=True, lost=True))
            assert participant_pb2.BRANCH_STATE_COMMITTED == forced.branch.state

    asyncio.run(scenario())


def test_a_direct_forced_rollback_of_a_commit_is_refused_coordinator_lost_included(
    tmp_path: Path,
) -> None:
    """The coordinator committed t-c while orders rejects its Commit. A forced rollback with
    coordinator_lost is refused: that coordinator has the commit on record, so it did not
    lose its log (before, the override skipped the question, and the branch rolled back
    against the commit)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            response = await cluster.submit(order_branches("o-c", [("sku-apple", 1)]), "t-c")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome

            await refused_unsafe(
                cluster.admin("orders").ForceOutcome(force("t-c", 1, commit=False, lost=True)),
                "decided commit for t-c",
                "coordinator_lost does not apply",
            )
            assert BranchState.PREPARED is state(cluster, "orders", "t-c", 1)

    asyncio.run(scenario())


def test_a_direct_force_agreeing_with_presumed_abort_goes_and_one_against_it_is_refused(
    tmp_path: Path,
) -> None:
    """No record of the transaction: the coordinator answers ABORTED (presumed abort). A
    forced rollback agrees and goes; a forced commit is refused, unless coordinator_lost."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-c")
            await prepared_unknown(cluster, "t-r")
            admin = cluster.admin("inventory")

            await refused_unsafe(admin.ForceOutcome(force("t-c", 0, commit=True)), "presumed abort")
            assert BranchState.PREPARED is state(cluster, "inventory", "t-c", 0)
            forced = await admin.ForceOutcome(force("t-r", 0, commit=False))
            assert participant_pb2.BRANCH_STATE_ROLLED_BACK == forced.branch.state
            # Its "no record" is all a coordinator that lost its log can say: the override
            # forces a commit past it.
            forced = await admin.ForceOutcome(force("t-c", 0, commit=True, lost=True))
            assert participant_pb2.BRANCH_STATE_COMMITTED == forced.branch.state

    asyncio.run(scenario())


def test_a_direct_force_is_refused_while_the_coordinator_is_still_deciding(
    tmp_path: Path,
) -> None:
    """Orders prepared t-d while payment is slow to vote: the coordinator answers that it has
    not decided, and a force, either way (coordinator_lost included), could contradict what
    it decides."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, prepare_timeout_ms=10_000) as cluster:
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=2_000)
            order = order_branches("o-d", [("sku-apple", 1)])
            running = asyncio.ensure_future(cluster.submit(order, "t-d", timeout_ms=10_000))
            orders = cluster.participants["orders"].engine

            async def orders_prepared() -> bool:
                return ("t-d", 1) in orders.open

            await eventually(orders_prepared)
            await refused_unsafe(
                cluster.admin("orders").ForceOutcome(force("t-d", 1, commit=False)),
                "still deciding t-d",
            )
            # Nor with coordinator_lost: a coordinator that runs the transaction has its log.
            await refused_unsafe(
                cluster.admin("orders").ForceOutcome(force("t-d", 1, commit=True, lost=True)),
                "still deciding t-d",
                "coordinator_lost does not apply",
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == (await running).outcome

    asyncio.run(scenario())


def test_a_coordinator_slower_than_an_inquiry_but_answering_still_stops_a_forced_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live coordinator that takes longer than the housekeeping's one-second inquiry (a
    loaded event loop, a GC pause) is not a lost one: the force's question waits as long as
    `dtm force` does, hears presumed abort and refuses the commit. With the inquiry's second
    it counted as unreachable and the forced commit went through unchecked."""
    slow_s = process.INQUIRY_TIMEOUT_S + 0.5
    assert slow_s < limits.FORCE_CHECK_TIMEOUT_S
    answer_in_time = CoordinatorServicer._refuse_if_replaced

    async def slow_inquiry(
        self: CoordinatorServicer, request: Any, context: Any, *args: Any
    ) -> None:
        await asyncio.sleep(slow_s)
        await answer_in_time(self, request, context, *args)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-slow")
            monkeypatch.setattr(CoordinatorServicer, "_refuse_if_replaced", slow_inquiry)
            admin = cluster.admin("inventory")
            await refused_unsafe(
                admin.ForceOutcome(force("t-slow", 0, commit=True)), "presumed abort"
            )
            assert BranchState.PREPARED is state(cluster, "inventory", "t-slow", 0)

    asyncio.run(scenario())


def test_a_coordinator_that_cannot_be_reached_lets_a_force_go_but_stops_a_forget(
    tmp_path: Path,
) -> None:
    """As the commands do: forcing is for a coordinator that cannot be reached, so its
    silence does not stop a force; a forget frees nothing that presses, and a coordinator down
    for now may still need the branch, so it is refused unless coordinator_lost."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-fc")
            await cluster.coordinator.stop(0)
            admin = cluster.admin("inventory")

            forced = await admin.ForceOutcome(force("t-fc", 0, commit=True))
            assert participant_pb2.BRANCH_STATE_COMMITTED == forced.branch.state

            forget = participant_pb2.ForgetBranchRequest(transaction_id="t-fc", branch=0)
            await refused_unsafe(
                admin.ForgetBranch(forget),
                "still awaits its coordinator",
                "UNAVAILABLE",
                "coordinator_lost",
            )
            assert cluster.participants["inventory"].engine.awaiting_coordinator(("t-fc", 0))

            forget.coordinator_lost = True
            forgotten = await admin.ForgetBranch(forget)
            assert forgotten.branch.forgotten

    asyncio.run(scenario())


def test_a_direct_forget_of_an_unreported_contradiction_reports_it_first(
    tmp_path: Path,
) -> None:
    """Inventory's branch of t-fc, which the coordinator has no record of (presumed abort),
    was forced to commit: a heuristic commit the coordinator has not heard of, since it sends
    no decision, and the participant's inquiry is not due yet. A ForgetBranch asks now, as
    that inquiry would: the contradiction is reported (the coordinator lists it), and only
    then is the branch forgotten. Before, it was forgotten unreported."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-fc")
            admin = cluster.admin("inventory")
            await admin.ForceOutcome(force("t-fc", 0, commit=True, lost=True))
            assert [] == await listed(cluster)

            forget = participant_pb2.ForgetBranchRequest(transaction_id="t-fc", branch=0)
            forgotten = await admin.ForgetBranch(forget)
            assert forgotten.branch.forgotten
            heuristics = await listed(cluster)
            assert [("t-fc", 0, True)] == [
                (h.transaction_id, h.branch, h.found_by_inquiry) for h in heuristics
            ]

    asyncio.run(scenario())


def test_the_command_exits_unsafe_on_the_participants_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]
) -> None:
    """`dtm force` that cannot reach the coordinator the participant names goes on unchecked
    (forcing is for that case); the participant, which reaches its own, refuses a forced
    commit its coordinator aborted: the command says why and exits 5, as when its own check
    refuses."""

    async def scenario() -> None:
        describe_coordinator_as(monkeypatch, unreachable())
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-fc")
            command = [
                *("--timeout", "2", "force", "t-fc", "0"),
                *("--address", cluster.address("inventory"), "--commit", "--i-understand"),
            ]

            status, out, err = await dtm(*command)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert "answers ABORTED for the attempt of t-fc" in err, err
            assert BranchState.PREPARED is state(cluster, "inventory", "t-fc", 0)

            status, out, err = await dtm(*command, "--coordinator-lost")
            assert cli.EXIT_OK == status, err
            assert "branch t-fc/0 forced to committed" in out, out

    asyncio.run(scenario())


def test_the_command_gives_the_participants_check_its_whole_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The participant may wait FORCE_CHECK_TIMEOUT_S (5 s) for its coordinator before forcing;
    `dtm --timeout 1 force` gave its ForceOutcome call 1 s, so a slow coordinator ended the
    call while the participant still asked, and the operator could not tell whether the branch
    was forced. The call now gets the check's wait and a margin, whatever --timeout says."""
    deadlines: list[float | None] = []
    force_outcome = AdminServicer.ForceOutcome

    async def spied(self: AdminServicer, request: Any, context: Any) -> Any:
        deadlines.append(context.time_remaining())
        return await force_outcome(self, request, context)

    monkeypatch.setattr(AdminServicer, "ForceOutcome", spied)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-w")
            at = ["--coordinator", cluster.coordinator_address, "--timeout", "1"]
            command = [*at, "force", "t-w", "0", "--participant", "inventory"]
            status, out, err = await dtm(*command, "--rollback", "--i-understand")
            assert cli.EXIT_OK == status, err
            assert "branch t-w/0 forced to rolled_back" in out, out

    asyncio.run(scenario())
    [remaining] = deadlines
    assert remaining is not None and remaining > limits.FORCE_CHECK_TIMEOUT_S


def forget_lost(txn: str, branch: int) -> participant_pb2.ForgetBranchRequest:
    return participant_pb2.ForgetBranchRequest(
        transaction_id=txn, branch=branch, coordinator_lost=True
    )


def test_a_direct_forget_with_coordinator_lost_reports_a_contradiction_on_record_first(
    tmp_path: Path,
) -> None:
    """The coordinator keeps its abort of t-a on record, and orders' branch, whose Rollback it
    rejected, was forced to commit: a heuristic commit the coordinator has not heard of. A
    ForgetBranch with coordinator_lost asks anyway: a coordinator that answers from its record
    did not lose its log, so the forget behaves as without the override, and the
    contradiction is reported (`dtm heuristics` lists it) before the branch is forgotten.
    Before, the override skipped the question and the branch was forgotten unreported: the
    heuristic commit then rested on the coordinator's Rollback reaching the forgotten branch,
    and a coordinator restarted meanwhile (aborts are not logged) sends none, so the only
    record of the broken atomicity the operator could see was gone."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_against_a_recorded_abort(cluster)
            assert [] == await listed(cluster)

            forgotten = await cluster.admin("orders").ForgetBranch(forget_lost("t-a", 1))
            assert forgotten.branch.forgotten
            await cluster.restart_coordinator()
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_NONE)
            await ask(cluster.participants["orders"], cluster)
            assert [("t-a", 1, True)] == [
                (h.transaction_id, h.branch, h.found_by_inquiry) for h in await listed(cluster)
            ]

    asyncio.run(scenario())


def test_a_direct_forget_with_coordinator_lost_is_refused_while_the_report_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with a coordinator that answers from its record but does not take the report
    yet: the branch still awaits it, so the forget is refused (dtm-unsafe), coordinator_lost
    included, and goes once the report is taken. Before, it went unreported."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_against_a_recorded_abort(cluster)
            admin = cluster.admin("orders")
            with monkeypatch.context() as patched:
                refuse_reports(patched, cluster)
                await refused_unsafe(
                    admin.ForgetBranch(forget_lost("t-a", 1)),
                    "still awaits its coordinator",
                    "report: UNAVAILABLE",
                    "coordinator_lost does not apply",
                )
            assert cluster.participants["orders"].engine.awaiting_coordinator(("t-a", 1))
            assert [] == await listed(cluster)

            forgotten = await admin.ForgetBranch(forget_lost("t-a", 1))
            assert forgotten.branch.forgotten
            assert [("t-a", 1)] == [(h.transaction_id, h.branch) for h in await listed(cluster)]

    asyncio.run(scenario())


def test_a_direct_forget_with_coordinator_lost_is_refused_while_the_coordinator_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orders' branch of t-d, forced to roll back while payment has not voted yet: the
    coordinator runs t-d, so its decision is still to reach the branch, which answers it with
    the forced outcome. A ForgetBranch with coordinator_lost is refused (a coordinator that
    runs the transaction did not lose its log); once t-d has committed, phase 2 hears the
    heuristic rollback, and the branch may go. Before, it was forgotten while undecided."""
    vote = asyncio.Event()  # payment's prepares wait for it: the decision waits for the test
    prepare_items = ParticipantServicer._prepare_items

    async def held(self: ParticipantServicer, prepares: Any) -> Any:
        if prepares and self.server.service.name == "payment":
            await vote.wait()
        return await prepare_items(self, prepares)

    monkeypatch.setattr(ParticipantServicer, "_prepare_items", held)

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, participant_overrides=ASKS_LATER, prepare_timeout_ms=60_000
        ) as cluster:
            order = order_branches("o-d", [("sku-apple", 1)])
            running = asyncio.ensure_future(cluster.submit(order, "t-d", timeout_ms=60_000))
            orders = cluster.participants["orders"].engine

            async def orders_prepared() -> bool:
                return ("t-d", 1) in orders.open

            await eventually(orders_prepared)
            await force_heuristic(cluster, "orders", "t-d", 1, commit=False)
            admin = cluster.admin("orders")
            await refused_unsafe(
                admin.ForgetBranch(forget_lost("t-d", 1)),
                "still awaits its coordinator",
                "still undecided",
                "coordinator_lost does not apply",
            )
            assert orders.awaiting_coordinator(("t-d", 1))

            vote.set()
            assert coordinator_pb2.OUTCOME_COMMITTED == (await running).outcome

            async def heard() -> bool:
                return not orders.awaiting_coordinator(("t-d", 1))

            await eventually(heard)

            # The participant stops awaiting once it has answered the Commit; the coordinator
            # records the heuristic when that answer arrives, a moment later.
            async def reported() -> bool:
                return [("t-d", 1)] == [(h.transaction_id, h.branch) for h in await listed(cluster)]

            await eventually(reported)
            assert (await admin.ForgetBranch(forget_lost("t-d", 1))).branch.forgotten

    asyncio.run(scenario())


def test_a_direct_forget_with_coordinator_lost_is_refused_when_the_question_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The override passes a coordinator that cannot be reached or has no record of the
    branch's attempt; a question refused for another reason (here PERMISSION_DENIED, as a
    failed TLS handshake would be) tells neither, so the forget is refused, as a force is:
    the check does not fail open. Before, the override skipped the question."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_against_a_recorded_abort(cluster)
            server = cluster.participants["orders"]

            async def refused(key: tuple[str, int]) -> CoordinatorAnswer:
                return CoordinatorAnswer(None, "PERMISSION_DENIED: refused by the test")

            monkeypatch.setattr(server, "ask_outcome", refused)
            await refused_unsafe(
                cluster.admin("orders").ForgetBranch(forget_lost("t-a", 1)),
                "PERMISSION_DENIED: refused by the test",
                "not a failure to ask it for another reason",
            )
            assert server.engine.awaiting_coordinator(("t-a", 1))

    asyncio.run(scenario())
