"""The participant SDK's servicer, called in process with its branch engine on a log whose
fsyncs can be held back (tests.doubles): persist before you speak (rule 10), for the
batched calls' votes and decisions alike. Each test was written for a planted bug (a
mutation) no other test caught; its docstring names it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import limits
from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
from participants.branches import BranchVote
from participants.server import ParticipantConfig, ParticipantServer, process
from participants.server.servicer import ParticipantServicer
from participants.services.inventory import InventoryService
from tests.doubles import HeldLog, answered_only_after_the_held_fsync
from tests.harness import STOCK, eventually, pack

PREPARED = coordinator_pb2.VOTE_PREPARED


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class Context:
    """What the servicer uses of a gRPC context on the paths tested here."""

    def set_trailing_metadata(self, metadata: Any) -> None:
        raise AssertionError(f"unexpected trailing metadata {metadata}")

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@asynccontextmanager
async def servicer_on(tmp_path: Path, log: HeldLog) -> AsyncIterator[ParticipantServicer]:
    server = ParticipantServer(InventoryService(STOCK), ParticipantConfig(data_dir=tmp_path))
    server.engine.log = log  # nothing was appended to the real one: a fresh log
    try:
        yield ParticipantServicer(server)
    finally:
        await server.wal.close()


def prepare(transaction_id: str) -> participant_pb2.PrepareRequest:
    line = shop_pb2.StockLine(sku="sku-apple", quantity=1)
    operation = pack(shop_pb2.ReserveStock(lines=[line]))
    return participant_pb2.PrepareRequest(
        transaction_id=transaction_id, branch=0, operation=operation
    )


def decision(transaction_id: str, commit: bool) -> participant_pb2.Decision:
    return participant_pb2.Decision(transaction_id=transaction_id, branch=0, commit=commit)


async def exchange(
    servicer: ParticipantServicer,
    prepares: Sequence[participant_pb2.PrepareRequest] = (),
    decisions: Sequence[participant_pb2.Decision] = (),
) -> participant_pb2.ExchangeResponse:
    request = participant_pb2.ExchangeRequest(prepares=prepares, decisions=decisions)
    return await servicer.Exchange(request, Context())  # type: ignore[arg-type]


def test_a_batched_prepared_vote_leaves_only_once_its_record_is_durable(tmp_path: Path) -> None:
    """Mutation: Exchange answered without waiting for the records of its items
    (participants/server/servicer.py, Exchange's wait_durable). A PREPARED vote whose record a crash
    loses: the coordinator commits a branch the participant no longer has (rule 10)."""

    async def scenario() -> None:
        log = HeldLog()
        async with servicer_on(tmp_path, log) as servicer:
            log.hold()
            answer = exchange(servicer, [prepare("t-1")])
            assert await answered_only_after_the_held_fsync(log, answer)

    asyncio.run(scenario())


def test_a_batched_commit_is_acknowledged_only_once_its_record_is_durable(tmp_path: Path) -> None:
    """Mutation: Exchange waited for its prepares' records only, not its decisions'
    (participants/server/servicer.py). A Commit acknowledged and then lost in a crash: the
    coordinator writes its end record and never sends it again, and the branch stays in
    doubt, holding its reservation."""

    async def scenario() -> None:
        log = HeldLog()
        async with servicer_on(tmp_path, log) as servicer:
            [vote] = (await exchange(servicer, [prepare("t-1")])).votes
            assert PREPARED == vote.vote
            log.hold()
            answer = exchange(servicer, decisions=[decision("t-1", commit=True)])
            assert await answered_only_after_the_held_fsync(log, answer)

    asyncio.run(scenario())


def test_a_refused_decision_is_answered_only_once_the_branchs_records_are_durable(
    tmp_path: Path,
) -> None:
    """Mutation: a decision the branch refuses answered at once, while the record its refusal
    speaks of still waited for its fsync (participants/server/servicer.py, _apply_decisions'
    BranchError path). Here the coordinator's probe of a one-phase commit whose answer was
    lost: a Rollback refused as "already committed" makes the client's answer COMMITTED, and a
    crash before the commit record's fsync then loses that commit (seed 7877's bug, on the
    batched path)."""

    async def scenario() -> None:
        log = HeldLog()
        async with servicer_on(tmp_path, log) as servicer:
            log.hold()
            one_phase = prepare("t-1")
            one_phase.one_phase = True
            committing = asyncio.ensure_future(exchange(servicer, [one_phase]))
            probe = exchange(servicer, decisions=[decision("t-1", commit=False)])
            assert await answered_only_after_the_held_fsync(log, probe)
            [vote] = (await committing).votes
            assert coordinator_pb2.VOTE_COMMITTED == vote.vote
            # Its own commit, not an earlier attempt's: the flag goes with two-phase votes
            # only (participant.proto), another mutation no test caught.
            assert not vote.committed_earlier

    asyncio.run(scenario())


class Coordinator:
    """A coordinator stub answering every QueryOutcome with one outcome."""

    def __init__(self, outcome: coordinator_pb2.Outcome) -> None:
        self.outcome = outcome
        self.asked: list[str] = []

    async def QueryOutcome(  # the stub's method: its name, and options such as timeout=
        self, request: coordinator_pb2.QueryOutcomeRequest, **options: object
    ) -> coordinator_pb2.QueryOutcomeResponse:
        self.asked.append(request.transaction_id)
        return coordinator_pb2.QueryOutcomeResponse(outcome=self.outcome)


def test_an_undecided_answer_to_an_inquiry_leaves_the_branch_in_doubt(tmp_path: Path) -> None:
    """Mutation: the SDK took any answer but UNKNOWN for an outcome, so the coordinator's
    "still undecided" (UNSPECIFIED) rolled the prepared branch back (participants/server/process.py,
    _ask). Rule 11: a prepared branch never decides on its own; it asks again later."""

    async def scenario() -> None:
        async with servicer_on(tmp_path, HeldLog()) as servicer:
            [vote] = (await exchange(servicer, [prepare("t-1")])).votes
            assert PREPARED == vote.vote
            server = servicer.server
            coordinator = Coordinator(coordinator_pb2.OUTCOME_UNSPECIFIED)
            await server._ask(coordinator, ("t-1", 0), now=0)  # type: ignore[arg-type]
            assert ["t-1"] == coordinator.asked
            assert ("t-1", 0) in server.engine.open  # still prepared, holding its reservation
            assert ("t-1", 0) in server._next_inquiry_ms  # and asked again later

    asyncio.run(scenario())


def test_a_batch_of_more_items_than_the_limit_is_refused_whole(tmp_path: Path) -> None:
    """Mutation: the SDK's bound on a batched call's items off by one
    (participants/server/servicer.py, _check_batch). The coordinator never sends more than
    BATCH_ITEMS_MAX; anything larger is another client's bad input, refused whole with
    INVALID_ARGUMENT before any item runs."""

    async def scenario() -> None:
        async with servicer_on(tmp_path, HeldLog()) as servicer:
            items = [prepare(f"t-{n}") for n in range(limits.BATCH_ITEMS_MAX + 1)]
            with pytest.raises(Aborted) as refused:
                await exchange(servicer, items)
            assert grpc.StatusCode.INVALID_ARGUMENT == refused.value.code
            assert not servicer.engine.open  # no item ran
            [vote] = (await exchange(servicer, items[:1])).votes  # the servicer still serves
            assert PREPARED == vote.vote

    asyncio.run(scenario())


LEASE_MS = 1_000
IN_DOUBT_AFTER_MS = 2_000
BACKOFF_MS_MAX = 5_000
HOUR_MS = 3_600_000


class Clocks:
    """The participant's two clocks, the test's: the wall clock (`now_ms`, which dates the
    records) and the monotonic one (`monotonic_ms`, for intervals). Patched into the server's
    module before a server is made: it hands both to its branch engine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wall_ms = 1_800_000_000_000
        self.monotonic_ms = 1_000
        monkeypatch.setattr(process, "now_ms", lambda: self.wall_ms)
        monkeypatch.setattr(process, "monotonic_ms", lambda: self.monotonic_ms)

    def advance(self, ms: int, wall_step_ms: int = 0) -> None:
        """`ms` pass; the wall clock is stepped by `wall_step_ms` meanwhile (NTP, an operator)."""
        self.monotonic_ms += ms
        self.wall_ms += ms + wall_step_ms


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    return Clocks(monkeypatch)


@asynccontextmanager
async def waiting_for_a_lock(
    tmp_path: Path,
) -> AsyncIterator[tuple[ParticipantServer, asyncio.Future[tuple[BranchVote, str]]]]:
    """A participant whose branch t-waiter is unvoted (PREPARING), waiting for t-holder's
    lock: the server, and the waiter's vote to come."""
    config = ParticipantConfig(data_dir=tmp_path, lease_unvoted_ms=LEASE_MS)
    # lock_skus: a second Prepare of the same SKU waits, unvoted, for the first's lock.
    server = ParticipantServer(InventoryService(STOCK, lock_skus=True), config)
    try:
        engine = server.engine
        holder = engine.begin_prepare("t-holder", 0, prepare("t-holder").operation, False)
        assert isinstance(holder, tuple) and holder[0] is BranchVote.PREPARED
        waiting = engine.begin_prepare(
            "t-waiter", 0, prepare("t-waiter").operation, False, lock_wait_s=60
        )
        assert not isinstance(waiting, tuple)
        waiter = asyncio.ensure_future(waiting)
        yield server, waiter
        waiter.cancel()
    finally:
        await server.wal.close()


def test_an_unvoted_branch_is_refused_once_unvoted_for_exactly_its_lease(
    tmp_path: Path, clocks: Clocks
) -> None:
    """Mutation: the lease compared with > instead of >=, so a branch unvoted for exactly
    lease_unvoted_ms kept its locks until a later tick. The clocks are the test's (the
    housekeeping tick and the branch engine both read them); one tick runs at the lease
    less 1 ms, one at the lease."""

    async def scenario() -> None:
        async with waiting_for_a_lock(tmp_path) as (server, waiter):
            engine = server.engine
            clocks.advance(LEASE_MS - 1)
            await server._housekeeping_tick(None)  # type: ignore[arg-type]
            assert [("t-waiter", 0)] == [info.branch.key for info in engine.preparing()]
            assert not waiter.done()

            clocks.advance(1)
            await server._housekeeping_tick(None)  # type: ignore[arg-type]
            assert [] == engine.preparing()
            vote, reason = await waiter
            assert BranchVote.REFUSED is vote, reason

    asyncio.run(scenario())


def test_a_wall_clock_step_back_does_not_hold_an_unvoted_branch_past_its_lease(
    tmp_path: Path, clocks: Clocks
) -> None:
    """The lease compared the wall clock with the branch's last change: with the wall clock
    stepped back an hour, an unvoted branch kept its locks (and its lock wait) an hour past
    its lease. It runs on the monotonic clock."""

    async def scenario() -> None:
        async with waiting_for_a_lock(tmp_path) as (server, waiter):
            clocks.advance(LEASE_MS, wall_step_ms=-HOUR_MS)
            await server._housekeeping_tick(None)  # type: ignore[arg-type]
            assert [] == server.engine.preparing()
            vote, reason = await waiter
            assert BranchVote.REFUSED is vote, reason
            assert not server.locks.held_by("t-waiter/0")

    asyncio.run(scenario())


def test_a_wall_clock_step_forward_does_not_end_an_unvoted_branchs_lease(
    tmp_path: Path, clocks: Clocks
) -> None:
    """By the wall clock, a step forward of an hour ended every unvoted branch's lease at the
    next tick: each aborted, refused, a millisecond into its prepare."""

    async def scenario() -> None:
        async with waiting_for_a_lock(tmp_path) as (server, waiter):
            clocks.advance(1, wall_step_ms=HOUR_MS)
            await server._housekeeping_tick(None)  # type: ignore[arg-type]
            assert [("t-waiter", 0)] == [info.branch.key for info in server.engine.preparing()]
            assert not waiter.done()

    asyncio.run(scenario())


def test_a_wall_clock_step_back_does_not_postpone_inquiries(tmp_path: Path, clocks: Clocks) -> None:
    """The inquiry schedule compared the wall clock with the prepare (the forcing) and with
    the time of the next attempt: with the wall clock stepped back an hour, an in-doubt
    branch was not asked about for an hour, holding its locks and reservation (a coordinator
    that crashed before deciding never sends a decision: presumed abort), nor a forced one
    reconciled. Both are asked about once in_doubt_after_ms has passed on the monotonic
    clock, and again once the backoff has."""

    async def scenario() -> None:
        config = ParticipantConfig(
            data_dir=tmp_path,
            in_doubt_after_ms=IN_DOUBT_AFTER_MS,
            inquiry_backoff_ms_max=BACKOFF_MS_MAX,
        )
        server = ParticipantServer(InventoryService(STOCK), config)
        try:
            engine = server.engine
            for txn in ("t-in-doubt", "t-forced"):
                voted = engine.begin_prepare(txn, 0, prepare(txn).operation, False)
                assert isinstance(voted, tuple) and voted[0] is BranchVote.PREPARED
            await engine.force(("t-forced", 0), commit=False)
            coordinator = Coordinator(coordinator_pb2.OUTCOME_UNSPECIFIED)

            clocks.advance(IN_DOUBT_AFTER_MS, wall_step_ms=-HOUR_MS)
            await server._housekeeping_tick(coordinator)  # type: ignore[arg-type]
            assert ["t-in-doubt", "t-forced"] == coordinator.asked

            coordinator.asked.clear()
            clocks.advance(BACKOFF_MS_MAX, wall_step_ms=-HOUR_MS)  # past any jittered backoff
            await server._housekeeping_tick(coordinator)  # type: ignore[arg-type]
            assert ["t-in-doubt", "t-forced"] == coordinator.asked
            assert ("t-in-doubt", 0) in engine.open  # still in doubt: never guessed
        finally:
            await server.wal.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("down_ms", "wall_step_ms", "asked_at_once"),
    [(10, -HOUR_MS, False), (HOUR_MS, 0, True)],
    ids=["wall-clock-stepped-back", "down-an-hour"],
)
def test_a_recovered_in_doubt_branch_is_as_old_as_its_logged_prepare(
    tmp_path: Path, clocks: Clocks, down_ms: int, wall_step_ms: int, asked_at_once: bool
) -> None:
    """A branch recovered in doubt is as old as its logged prepared_at_unix_ms says (the one
    clock that outlives a process), never younger than 0: prepared an hour before the
    restart, it is asked about at once; restarted after the wall clock stepped back an hour,
    it was asked about an hour late (the tick's wall-clock now was before the logged
    prepare), and is asked in_doubt_after_ms after the restart."""
    config = ParticipantConfig(data_dir=tmp_path, in_doubt_after_ms=IN_DOUBT_AFTER_MS)

    async def prepared_before_the_restart() -> None:
        server = ParticipantServer(InventoryService(STOCK), config)
        try:
            voted = server.engine.begin_prepare("t-1", 0, prepare("t-1").operation, False)
            assert isinstance(voted, tuple) and voted[0] is BranchVote.PREPARED
            await server.engine.wait_durable([("t-1", 0)])
        finally:
            await server.wal.close()

    async def restarted() -> None:
        server = ParticipantServer(InventoryService(STOCK), config)
        try:
            coordinator = Coordinator(coordinator_pb2.OUTCOME_UNSPECIFIED)
            await server._housekeeping_tick(coordinator)  # type: ignore[arg-type]
            assert (["t-1"] if asked_at_once else []) == coordinator.asked
            if not asked_at_once:
                clocks.advance(IN_DOUBT_AFTER_MS)
                await server._housekeeping_tick(coordinator)  # type: ignore[arg-type]
                assert ["t-1"] == coordinator.asked
        finally:
            await server.wal.close()

    asyncio.run(prepared_before_the_restart())
    clocks.advance(down_ms, wall_step_ms)
    clocks.monotonic_ms = 5  # another process: its monotonic clock starts anew
    asyncio.run(restarted())


def test_a_service_whose_coordinator_address_is_another_server_says_so_while_it_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--coordinator at a service's port (a slip of one digit): the registration is answered
    UNIMPLEMENTED, retried for ever with gRPC's "Method not found!" alone, which says
    nothing of what to fix (an operator's hunt). Each WARNING now says what is there."""

    async def scenario() -> None:
        other = ParticipantServer(InventoryService(), ParticipantConfig(data_dir=tmp_path))
        await other.start()
        address = f"127.0.0.1:{other.port}"
        service = ParticipantServer(
            InventoryService(), ParticipantConfig(data_dir=tmp_path / "b", coordinator=address)
        )
        err: list[str] = []

        async def warned() -> bool:
            err.append(capsys.readouterr().err)
            return "registration failed; retrying" in "".join(err)

        try:
            await service.start()
            await eventually(warned)
        finally:
            await service.stop(0.1)
            await other.stop(0.1)
        retries = [line for line in "".join(err).splitlines() if "registration failed" in line]
        hint = retries[0].partition(" hint=")[2]
        assert f"the server at {address} is not a dtm coordinator" in hint, retries[0]
        assert "check --coordinator" in hint, retries[0]

    asyncio.run(scenario())
