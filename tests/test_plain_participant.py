"""A participant that does not use the SDK, written from the protos and the docs alone
(tests/plain_participant.py: the unary Prepare, Commit and Rollback, RegisterParticipant and
QueryOutcome), run as a real process beside the SDK's four services under the real
coordinator (dtm.cluster): commits, aborts, its own refusal, its deadline passing, duplicate
decisions, its restart while prepared, and the coordinator's restart while it is prepared.

tests/doubles.py's ScriptedParticipant is in-process and keeps nothing: it answers
phase 2 with a scripted status. This one keeps its branches on disk and follows the contract.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli
from dtm.cluster import COORDINATOR, Cluster, Ports, free_ports
from dtmpb.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    participant_pb2,
    participant_pb2_grpc,
    shop_pb2,
)
from tests.cli_runner import dtm
from tests.harness import eventually, pack

ROOT = Path(__file__).resolve().parent.parent
INITIAL = {"stock": {"sku-a": 1_000}, "accounts": {"acct-1": {"balance_cents": 10**9}}}
PREPARE_TIMEOUT_MS = 3_000
START_TIMEOUT_S = 30.0
Code = grpc.StatusCode


class PlainProcess:
    """tests/plain_participant.py as its own process (own session: a SIGKILL is its crash)."""

    def __init__(self, directory: Path, coordinator: str) -> None:
        self.directory = directory
        self.coordinator = coordinator
        self.popen: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(
        self, in_doubt_after_ms: int, one_phase: bool = False, batch_without_exchange: bool = False
    ) -> None:
        """On a new port each time, as a restarted process in a container would be."""
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'generated'}", "PYTHONUNBUFFERED": "1"}
        with (self.directory / "plain.log").open("ab") as log:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "tests" / "plain_participant.py"),
                    *("--listen", self.address, "--coordinator", self.coordinator),
                    *("--data-dir", str(self.directory)),
                    *("--in-doubt-after-ms", str(in_doubt_after_ms)),
                    *(["--one-phase"] if one_phase else []),
                    *(["--batch-without-exchange"] if batch_without_exchange else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def branches(self) -> dict[str, dict[str, Any]]:
        """Its durable state, as the file it replaces atomically says."""
        path = self.directory / "plain.json"
        if not path.exists():
            return {}
        state: dict[str, dict[str, Any]] = json.loads(path.read_text())["branches"]
        return state

    def state(self, transaction_id: str, index: int = 1) -> str | None:
        branch = self.branches().get(f"{transaction_id}/{index}")
        return None if branch is None else str(branch["state"])

    def hold(self, on: bool) -> None:
        """Its Commits and Rollbacks of "hold" branches answer UNAVAILABLE while on."""
        hold = self.directory / "hold"
        if on:
            hold.touch()
        else:
            hold.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("plain-cluster")
    running = Cluster(
        directory,
        Ports.free(),
        initial=INITIAL,
        test_control=True,
        prepare_timeout_ms=PREPARE_TIMEOUT_MS,
        start_timeout_s=START_TIMEOUT_S,
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def plain(cluster: Cluster, tmp_path: Path) -> Iterator[PlainProcess]:
    process = PlainProcess(tmp_path, cluster.coordinator_address)
    try:
        yield process
    finally:
        process.kill()


async def registered(cluster: Cluster, plain: PlainProcess) -> None:
    """Until the coordinator lists "plain" at the address it listens on now."""
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        async def listed() -> bool:
            try:
                answer = await stub.ListParticipants(coordinator_pb2.ListParticipantsRequest())
            except grpc.aio.AioRpcError:
                return False
            return any(
                p.name == "plain" and p.address == plain.address for p in answer.participants
            )

        await eventually(listed, timeout_s=START_TIMEOUT_S)


def branches(sku: str, points: int = 5) -> list[coordinator_pb2.BranchRequest]:
    """Inventory's branch 0, the plain participant's branch 1."""
    reserve = shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-a", quantity=1)])
    return [
        coordinator_pb2.BranchRequest(participant="inventory", operation=pack(reserve)),
        coordinator_pb2.BranchRequest(
            participant="plain", operation=pack(shop_pb2.StockLine(sku=sku, quantity=points))
        ),
    ]


async def submit(
    cluster: Cluster, transaction_id: str, branch_list: list[coordinator_pb2.BranchRequest]
) -> coordinator_pb2.SubmitResponse:
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = coordinator_pb2.SubmitRequest(transaction_id=transaction_id, branches=branch_list)
        response: coordinator_pb2.SubmitResponse = await stub.Submit(request, timeout=30)
        return response


async def transaction(cluster: Cluster, transaction_id: str) -> coordinator_pb2.Transaction:
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        request = coordinator_pb2.GetTransactionRequest(transaction_id=transaction_id)
        answer: coordinator_pb2.Transaction = await stub.GetTransaction(request, timeout=10)
        return answer


async def finished(cluster: Cluster, transaction_id: str, state: int) -> None:
    """Until the coordinator shows `transaction_id` in `state` (phase 2 over)."""

    async def reached() -> bool:
        try:
            return (await transaction(cluster, transaction_id)).state == state
        except grpc.aio.AioRpcError:  # the coordinator is restarting
            return False

    await eventually(reached, timeout_s=30)


async def plain_reaches(
    plain: PlainProcess, transaction_id: str, state: str, index: int = 1
) -> None:
    async def reached() -> bool:
        return plain.state(transaction_id, index) == state

    await eventually(reached, timeout_s=30)


def test_a_commit_reaches_the_plain_participant_and_duplicates_are_answered(
    cluster: Cluster, plain: PlainProcess
) -> None:
    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        answer = await submit(cluster, "plain-commit", branches("ok"))
        assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
        await finished(cluster, "plain-commit", coordinator_pb2.TRANSACTION_STATE_COMMITTED)
        assert "committed" == plain.state("plain-commit")
        # A duplicate Commit is acknowledged; a Rollback of the committed branch is refused.
        async with grpc.aio.insecure_channel(plain.address) as channel:
            stub = participant_pb2_grpc.ParticipantStub(channel)
            await stub.Commit(
                participant_pb2.CommitRequest(transaction_id="plain-commit", branch=1)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Rollback(
                    participant_pb2.RollbackRequest(transaction_id="plain-commit", branch=1)
                )
            assert Code.FAILED_PRECONDITION == refused.value.code()

    asyncio.run(scenario())


def test_its_refusal_and_an_sdk_participant_s_both_abort_and_roll_it_back(
    cluster: Cluster, plain: PlainProcess
) -> None:
    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        refused = await submit(cluster, "plain-refuses", branches("refuse"))
        assert coordinator_pb2.OUTCOME_ABORTED == refused.outcome
        assert "points available" in refused.reason
        # Inventory refuses (no such SKU): the plain participant's prepared branch rolls back.
        sdk_refuses = branches("ok")
        unknown = shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-none", quantity=1)])
        sdk_refuses[0].operation.CopyFrom(pack(unknown))
        aborted = await submit(cluster, "sdk-refuses", sdk_refuses)
        assert coordinator_pb2.OUTCOME_ABORTED == aborted.outcome
        await plain_reaches(plain, "sdk-refuses", "rolled_back")

    asyncio.run(scenario())


def test_a_prepare_answered_with_no_vote_aborts_as_the_participant_s_protocol_error(
    cluster: Cluster, plain: PlainProcess
) -> None:
    """Before, the coordinator took the answer for a bug of its own: an ERROR "Prepare failed
    inside the coordinator" with a traceback, and the client was told "internal error:
    ValueError: ...". The participant broke the contract (the vote is required): say so."""

    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        answer = await submit(cluster, "plain-novote", branches("novote"))
        assert coordinator_pb2.OUTCOME_ABORTED == answer.outcome
        assert "internal error" not in answer.reason
        assert "protocol error: plain answered Prepare with no vote" in answer.reason
        assert "failed inside the coordinator" not in cluster.log_tail(COORDINATOR, 200)

    asyncio.run(scenario())


def test_its_slow_prepare_aborts_and_the_late_vote_meets_its_tombstone(
    cluster: Cluster, plain: PlainProcess
) -> None:
    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        answer = await submit(cluster, "plain-slow", branches(f"slow:{PREPARE_TIMEOUT_MS + 1_000}"))
        assert coordinator_pb2.OUTCOME_ABORTED == answer.outcome
        assert "deadline" in answer.reason
        # The Rollback came before the vote: a tombstone, and the late Prepare refused there.
        await plain_reaches(plain, "plain-slow", "rolled_back")
        assert 0 == plain.branches()["plain-slow/1"]["points"]

    asyncio.run(scenario())


def test_one_phase_commits_and_a_lost_one_phase_answer_is_resolved_by_its_probe(
    cluster: Cluster, plain: PlainProcess
) -> None:
    """A transaction of the plain participant alone, which registered one_phase: one Prepare
    commits it. One whose Prepare outlasts its deadline is UNKNOWN to the coordinator, which
    asks with a Rollback (the probe): it arrives first, leaves a tombstone and is
    acknowledged, so the outcome is ABORTED, and the late Prepare is refused there."""

    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000, one_phase=True)
        await registered(cluster, plain)
        alone = branches("ok")[1:]
        answer = await submit(cluster, "one-phase", alone)
        assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
        assert "committed" == plain.state("one-phase", 0)
        slow = branches(f"slow:{PREPARE_TIMEOUT_MS + 1_000}")[1:]
        answer = await submit(cluster, "one-phase-slow", slow)
        assert answer.outcome in (coordinator_pb2.OUTCOME_UNKNOWN, coordinator_pb2.OUTCOME_ABORTED)
        await finished(cluster, "one-phase-slow", coordinator_pb2.TRANSACTION_STATE_ABORTED)
        assert "rolled_back" == plain.state("one-phase-slow", 0)
        assert 0 == plain.branches()["one-phase-slow/0"]["points"]

    asyncio.run(scenario())


def test_one_that_declares_batch_without_serving_exchange_is_called_unary_instead(
    cluster: Cluster, plain: PlainProcess
) -> None:
    """Before, each of its Prepares went in an Exchange, answered UNIMPLEMENTED: every
    transaction with a branch there aborted, for ever. Now the coordinator falls back to the
    unary calls (one WARNING): the prepare of the first transaction is sent again over Prepare,
    and the commits, rollbacks and prepares after it go unary too."""

    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000, batch_without_exchange=True)
        await registered(cluster, plain)
        answer = await submit(cluster, "no-exchange-commit", branches("ok", points=7))
        assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
        await finished(cluster, "no-exchange-commit", coordinator_pb2.TRANSACTION_STATE_COMMITTED)
        assert "committed" == plain.state("no-exchange-commit")
        # Inventory refuses (no such SKU): the plain participant's prepared branch rolls back.
        sdk_refuses = branches("ok")
        unknown = shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-none", quantity=1)])
        sdk_refuses[0].operation.CopyFrom(pack(unknown))
        aborted = await submit(cluster, "no-exchange-abort", sdk_refuses)
        assert coordinator_pb2.OUTCOME_ABORTED == aborted.outcome
        await plain_reaches(plain, "no-exchange-abort", "rolled_back")
        balance = json.loads((plain.directory / "plain.json").read_text())["balance"]
        assert 1_000 - 7 == balance  # the commit counted once, the rollback took nothing
        warning = "plain registered the batch capability but does not serve"
        assert 1 == cluster.log_tail(COORDINATOR, 10_000).count(warning)
        # Registered again, unchanged (as after an upgrade in place): batched again, so the
        # next transaction tries Exchange first, falls back again and still commits.
        async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            capabilities = coordinator_pb2.Capabilities(
                batch=True, operation_types=["dtm.v1.StockLine"]
            )
            again = coordinator_pb2.RegisterParticipantRequest(
                name="plain", address=plain.address, capabilities=capabilities
            )
            assert not (await stub.RegisterParticipant(again, timeout=10)).changed
        answer = await submit(cluster, "no-exchange-again", branches("ok", points=2))
        assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
        assert 2 == cluster.log_tail(COORDINATOR, 10_000).count(warning)
        await finished(cluster, "no-exchange-again", coordinator_pb2.TRANSACTION_STATE_COMMITTED)

    asyncio.run(scenario())


def test_a_restarted_plain_participant_on_a_new_address_is_sent_its_commit_again(
    cluster: Cluster, plain: PlainProcess
) -> None:
    async def scenario() -> None:
        plain.hold(True)
        plain.start(in_doubt_after_ms=0)  # never asks: the coordinator must come back to it
        await registered(cluster, plain)
        answer = await submit(cluster, "plain-restart", branches("hold"))
        assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
        assert "prepared" == plain.state("plain-restart")
        old_address = plain.address
        plain.kill()
        plain.hold(False)
        plain.start(in_doubt_after_ms=0)
        await registered(cluster, plain)
        await plain_reaches(plain, "plain-restart", "committed")
        await finished(cluster, "plain-restart", coordinator_pb2.TRANSACTION_STATE_COMMITTED)
        # Accepted though owed (no incarnation: a restart cannot be told from a second
        # process), and said so: an operator can check that the old process is gone.
        moved = f"participant plain moved from {old_address} to {plain.address} while"
        [warning] = [
            line for line in cluster.log_tail(COORDINATOR, 10_000).splitlines() if moved in line
        ]
        # (Which transactions it names depends on the earlier tests' still running.)
        assert "transaction(s) not yet finished have branches at it" in warning, warning
        assert "RegisterParticipantRequest.incarnation" in warning, warning

    asyncio.run(scenario())


def test_a_restarted_coordinator_sends_its_commit_to_the_plain_participant(
    cluster: Cluster, plain: PlainProcess
) -> None:
    async def scenario() -> None:
        plain.hold(True)
        plain.start(in_doubt_after_ms=0)
        await registered(cluster, plain)
        answer = await submit(cluster, "coord-restart", branches("hold"))
        assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
        await asyncio.to_thread(cluster.kill, COORDINATOR)
        plain.hold(False)
        await asyncio.to_thread(cluster.restart, COORDINATOR)
        await plain_reaches(plain, "coord-restart", "committed")
        await finished(cluster, "coord-restart", coordinator_pb2.TRANSACTION_STATE_COMMITTED)

    asyncio.run(scenario())


def test_a_plain_participant_in_doubt_learns_presumed_abort_after_the_coordinator_restarts(
    cluster: Cluster, plain: PlainProcess
) -> None:
    async def scenario() -> None:
        plain.start(in_doubt_after_ms=500)
        await registered(cluster, plain)
        async with grpc.aio.insecure_channel(cluster.address("inventory")) as channel:
            admin = participant_pb2_grpc.ParticipantAdminStub(channel)
            slow = participant_pb2.SetFaultRequest(
                mode=participant_pb2.FAULT_MODE_SLOW, delay_ms=60_000
            )
            await admin.SetFault(slow)
            try:
                pending = asyncio.ensure_future(submit(cluster, "undecided", branches("ok")))
                await plain_reaches(plain, "undecided", "prepared")
                await asyncio.to_thread(cluster.kill, COORDINATOR)
                with pytest.raises(grpc.aio.AioRpcError):
                    await pending
            finally:
                await admin.SetFault(participant_pb2.SetFaultRequest())
        await asyncio.to_thread(cluster.restart, COORDINATOR)
        await plain_reaches(plain, "undecided", "rolled_back")

    asyncio.run(scenario())


def test_the_dtm_command_tells_a_participant_without_the_optional_services_from_one_down(
    cluster: Cluster, plain: PlainProcess
) -> None:
    """The plain participant serves neither grpc.health.v1.Health nor ParticipantAdmin, both
    optional. Before, `dtm participants` showed it UNREACHABLE (UNIMPLEMENTED) and exited 3,
    as for a participant that is down, though it had answered; and `dtm branches` asked "is
    that address a dtm participant?" of a registered participant."""

    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        coordinator = ("--coordinator", cluster.coordinator_address)
        status, out, err = await dtm(*coordinator, "participants")
        [row] = [line for line in out.splitlines() if line.startswith("plain ")]
        assert "NO HEALTH SERVICE" in row, out
        assert 0 == status, (out, err)
        status, out, err = await dtm(*coordinator, "branches")
        assert 1 == status  # the listing is incomplete: said, not hidden
        assert "ParticipantAdmin is optional" in err, err

    asyncio.run(scenario())


def plain_alone(points: int) -> list[coordinator_pb2.BranchRequest]:
    """A transaction of the plain participant's branch alone (at index 0)."""
    line = shop_pb2.StockLine(sku="ok", quantity=points)
    return [coordinator_pb2.BranchRequest(participant="plain", operation=pack(line))]


async def forgotten(cluster: Cluster, transaction_id: str) -> None:
    """Until the coordinator no longer knows `transaction_id` (pushed out of its window)."""

    async def gone() -> bool:
        try:
            await transaction(cluster, transaction_id)
        except grpc.aio.AioRpcError as error:
            return error.code() is Code.NOT_FOUND
        return False

    await eventually(gone, timeout_s=30)


def test_a_reused_id_and_a_late_retry_are_answered_from_the_plain_participant_s_record(
    tmp_path: Path,
) -> None:
    """A coordinator that remembers 2 finished transactions forgets a commit of the plain
    participant's; then its id comes again. With other content (a client that reused the id)
    the plain participant, which keeps the fingerprint, refuses it: ALREADY_EXISTS, nothing
    run. Without the check, as participant.proto allowed ("a participant may ignore the
    field"), it answered COMMITTED (committed earlier) from its record of the first, and the
    client was told COMMITTED for points never taken. With the same content (a late retry)
    it answers COMMITTED earlier: the client is told COMMITTED, and nothing is taken twice."""
    cluster = Cluster(
        tmp_path / "cluster",
        Ports.free(),
        initial=INITIAL,
        extra_env={"DTM_COORDINATOR_FINISHED_KEPT": "2"},
        start_timeout_s=START_TIMEOUT_S,
    )
    plain = PlainProcess(tmp_path, cluster.coordinator_address)

    async def scenario() -> None:
        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        first = await submit(cluster, "late", plain_alone(5))
        assert coordinator_pb2.OUTCOME_COMMITTED == first.outcome, first.reason
        await finished(cluster, "late", coordinator_pb2.TRANSACTION_STATE_COMMITTED)
        for number in range(3):
            newer = await submit(cluster, f"newer-{number}", plain_alone(1))
            assert coordinator_pb2.OUTCOME_COMMITTED == newer.outcome, newer.reason
        await forgotten(cluster, "late")
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await submit(cluster, "late", plain_alone(7))
        assert Code.ALREADY_EXISTS == reused.value.code(), reused.value.details()
        again = await submit(cluster, "late", plain_alone(5))
        assert coordinator_pb2.OUTCOME_COMMITTED == again.outcome, again.reason
        balance = json.loads((tmp_path / "plain.json").read_text())["balance"]
        assert 1_000 - 5 - 3 == balance

    cluster.start()
    try:
        asyncio.run(scenario())
    finally:
        plain.kill()
        cluster.stop()


def test_dtm_force_by_address_asks_the_participant_which_coordinator_to_check_with(
    cluster: Cluster,
    plain: PlainProcess,
    monkeypatch: pytest.MonkeyPatch,
    unreachable: Callable[[], str],
) -> None:
    """Real processes. `dtm force --address` without --coordinator was a usage error: the
    participant could not say which coordinator it uses. The SDK's inventory now says
    (ParticipantAdmin.Describe, its configured coordinator), and the check asks that one, not
    the CLI's own (here one that cannot be reached); the plain participant, which serves no
    ParticipantAdmin, still needs --coordinator, and the usage error says why."""
    monkeypatch.setenv("DTM_PARTICIPANT_COORDINATOR", unreachable())

    async def scenario() -> None:
        force = ["--timeout", "5", "force", "t-never-ran", "0", "--commit", "--i-understand"]
        status, out, err = await dtm(*force, "--address", cluster.address("inventory"))
        assert (cli.EXIT_UNSAFE, "") == (status, out), err
        assert f"the coordinator at {cluster.coordinator_address} has no record" in err, err

        plain.start(in_doubt_after_ms=1_000)
        await registered(cluster, plain)
        status, out, err = await dtm(*force, "--address", plain.address)
        assert (cli.EXIT_USAGE, "") == (status, out), err
        assert "--coordinator HOST:PORT" in err and "Describe UNIMPLEMENTED" in err, err

    asyncio.run(scenario())
