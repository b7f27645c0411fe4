"""The coordinator engine's I/O shell, against fake ports and a log whose fsyncs can be held
back (tests.doubles): what it answers, sends and resumes. Each test here was written for
a planted bug (a mutation) that no other test caught; its docstring names it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf import any_pb2

from dtm.coordinator.engine import CoordinatorConfig, Engine, Left, SubmitRejected
from dtm.coordinator.ports import DecideItem, DecideResult, PrepareItem, PrepareResult
from dtm.coordinator.registry import Registry
from dtm.core.branch import HEURISTIC_HAZARD
from dtm.core.transaction import Vote
from dtm.records import RecordType
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2, log_pb2
from tests.doubles import Answering, AnsweringRegistry, HeldLog, answered_only_after_the_held_fsync
from tests.harness import eventually

COMMITTED = coordinator_pb2.OUTCOME_COMMITTED
ABORTED = coordinator_pb2.OUTCOME_ABORTED


class Recording(Answering):
    """Answers as Answering does, and records each Commit and Rollback it is sent."""

    def __init__(self, vote: Vote, sent: list[str], name: str, earlier: bool = False) -> None:
        super().__init__(vote, sent)
        self.name = name
        self.earlier = earlier

    def prepare(self, item: PrepareItem) -> None:
        if not self.earlier:
            super().prepare(item)
            return
        self.sent.append(f"prepare {item.transaction_id}")
        result = PrepareResult(Vote.COMMITTED, "", earlier=True)
        asyncio.get_running_loop().call_soon(item.done, result)

    def decide(self, item: DecideItem) -> None:
        verb = "commit" if item.commit else "rollback"
        self.sent.append(f"{verb} {item.transaction_id} {self.name}")
        super().decide(item)


class RecordingRegistry(AnsweringRegistry):
    """AnsweringRegistry's participants, recording decisions, plus "committed-before", which
    answers every Prepare COMMITTED by an earlier attempt, "read-only", and "no", which
    refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.answering = {
            "yes-a": Recording(Vote.PREPARED, self.sent, "yes-a"),
            "yes-b": Recording(Vote.PREPARED, self.sent, "yes-b"),
            "committed-before": Recording(Vote.PREPARED, self.sent, "committed-before", True),
            "read-only": Recording(Vote.READ_ONLY, self.sent, "read-only"),
            "no": Recording(Vote.REFUSED, self.sent, "no"),
        }
        for name in self.answering:
            self.put(coordinator_pb2.ParticipantInfo(name=name, address="127.0.0.1:1"))


def engine_on(log: HeldLog) -> tuple[Engine, RecordingRegistry]:
    registry = RecordingRegistry()
    return Engine(log, registry, CoordinatorConfig()), registry


async def over(engine: Engine, transaction_id: str) -> None:
    async def finished() -> bool:
        return transaction_id not in engine.active

    await eventually(finished)


def test_an_attempt_that_found_its_transaction_committed_is_aborted_to_an_inquiry() -> None:
    """Mutation: query_outcome answered COMMITTED for an attempt that found its transaction
    committed by an earlier one (engine.py, `if finished.committed_earlier`). That attempt
    decided abort and rolled back what it prepared again: a participant asking about its
    branch of it (its Rollback lost) must hear ABORTED, or it commits the same effects twice."""

    async def scenario() -> None:
        engine, registry = engine_on(HeldLog())
        branches = [(name, any_pb2.Any()) for name in ("committed-before", "yes-a")]
        view = await engine.submit("t-again", branches, 5_000, b"fp")
        await over(engine, "t-again")
        # The client hears the earlier commit; this attempt's own decision is abort.
        assert COMMITTED == view.answer
        assert "rollback t-again yes-a" in registry.sent
        assert ABORTED == engine.query_outcome("t-again", b"fp")
        await engine.close()

    asyncio.run(scenario())


def test_an_inquiry_hears_whether_its_abort_is_on_record_or_presumed() -> None:
    """An abort the coordinator keeps (decided, or by an attempt that found its transaction
    committed before) is on record; no record of the id, or one of another attempt under it,
    is presumed abort. An operator's coordinator_lost forces a commit past the second only
    (QueryOutcomeResponse.presumed_abort)."""

    async def scenario() -> None:
        engine, _ = engine_on(HeldLog())
        await engine.submit(
            "t-abort", [("yes-a", any_pb2.Any()), ("no", any_pb2.Any())], 5_000, b"fp"
        )
        await over(engine, "t-abort")
        assert (ABORTED, False) == engine.answer_inquiry("t-abort", b"fp")
        assert (ABORTED, True) == engine.answer_inquiry("t-abort", b"another attempt")
        assert (ABORTED, True) == engine.answer_inquiry("t-never", b"fp")
        branches = [(name, any_pb2.Any()) for name in ("committed-before", "yes-a")]
        await engine.submit("t-again", branches, 5_000, b"fp")
        await over(engine, "t-again")
        assert (ABORTED, False) == engine.answer_inquiry("t-again", b"fp")
        await engine.close()

    asyncio.run(scenario())


def test_a_resumed_commit_is_sent_only_to_the_branches_not_yet_acknowledged() -> None:
    """Mutation: resume() sent Commit again to branches a checkpoint recorded as acknowledged
    (engine.py, the filter of the recovered actions). Such a branch may be forgotten by its
    participant since, which answers NOT_FOUND: a false heuristic hazard, besides the wasted
    calls of a restart with many commits recovered."""

    async def scenario() -> None:
        engine, registry = engine_on(HeldLog())
        decided = log_pb2.CommitDecided(
            transaction_id="t-recovered",
            branches=[
                log_pb2.DecisionBranch(branch=0, participant="yes-a", acknowledged=True),
                log_pb2.DecisionBranch(branch=1, participant="yes-b"),
            ],
            decided_at_unix_ms=1,
            fingerprint=b"fp",
        )
        assert 1 == engine.resume([decided])
        await over(engine, "t-recovered")
        assert ["commit t-recovered yes-b"] == registry.sent
        await engine.close()

    asyncio.run(scenario())


def test_no_commit_leaves_and_no_client_hears_before_the_decision_is_durable() -> None:
    """Mutation: the decision fed to the core as durable without waiting for its fsync
    (engine.py, _persist_decision's when_durable). Rules 3 and 15: the Commits and the
    client's answer wait for the decision record; a crash before its fsync must leave a
    transaction nobody was told committed. (Only test_finished's count of fsyncs noticed.)"""

    async def scenario() -> None:
        log = HeldLog()
        engine, registry = engine_on(log)
        log.hold()
        branches = [(name, any_pb2.Any()) for name in ("yes-a", "yes-b")]
        submit = asyncio.ensure_future(engine.submit("t-commit", branches, 5_000, b"fp"))

        async def decision_waits_or_answered() -> bool:
            return submit.done() or bool(log.waited)

        await eventually(decision_waits_or_answered)
        assert not submit.done()
        assert not [sent for sent in registry.sent if sent.startswith("commit")]
        log.release()
        assert COMMITTED == (await submit).answer
        await engine.close()

    asyncio.run(scenario())


def info(name: str) -> coordinator_pb2.ParticipantInfo:
    return coordinator_pb2.ParticipantInfo(name=name, address="127.0.0.1:1", incarnation="i-1")


def test_a_registration_is_answered_only_once_its_record_is_durable() -> None:
    """Mutation: register() returned without waiting for its record's fsync. A crash then
    loses a registration the participant believes made: a commit decided with a branch there
    could not be resumed after a restart (no address)."""

    async def scenario() -> None:
        log = HeldLog()
        engine, _ = engine_on(log)
        log.hold()
        assert await answered_only_after_the_held_fsync(log, engine.register(info("new")))
        assert "new" in engine.registry.participants
        await engine.close()

    asyncio.run(scenario())


def test_an_unregistration_is_answered_only_once_its_record_is_durable() -> None:
    """Mutation: unregister() answered before its record's fsync: after a crash the
    participant an operator was told is gone is registered again."""

    async def scenario() -> None:
        log = HeldLog()
        engine, _ = engine_on(log)
        log.hold()
        assert await answered_only_after_the_held_fsync(log, engine.unregister("yes-a"))
        assert "yes-a" not in engine.registry.participants
        await engine.close()

    asyncio.run(scenario())


def test_forgetting_a_heuristic_outcome_is_answered_only_once_its_record_is_durable() -> None:
    """Mutation: forget_heuristic() answered before its record's fsync: after a crash the
    heuristic outcome an operator was told is forgotten is listed again."""

    async def scenario() -> None:
        log = HeldLog()
        engine, _ = engine_on(log)
        engine.heuristics.keep(
            log_pb2.HeuristicRecorded(
                transaction_id="t-h", branch=0, participant="yes-a", outcome=HEURISTIC_HAZARD
            )
        )
        log.hold()
        assert await answered_only_after_the_held_fsync(log, engine.forget_heuristic("t-h", 0))
        assert not list(engine.heuristics)
        await engine.close()

    asyncio.run(scenario())


def test_a_checkpoint_owes_a_commit_only_to_the_branches_that_prepared() -> None:
    """Mutation: checkpoint_records() kept every branch of a commit as owed phase 2, a
    read-only one included (engine.py, `if b.needs_phase_two`). A restart from that
    checkpoint sends the read-only participant a Commit (rule 7), which it answers NOT_FOUND
    (it kept no branch): a false heuristic hazard."""

    async def scenario() -> None:
        log = HeldLog()
        engine, _ = engine_on(log)
        log.hold()  # the commit stays DECIDING: its decision waits for the fsync
        branches = [(name, any_pb2.Any()) for name in ("read-only", "yes-a")]
        submit = asyncio.ensure_future(engine.submit("t-mixed", branches, 5_000, b"fp"))

        async def deciding() -> bool:
            return bool(log.waited)

        await eventually(deciding)
        checkpointed = MemoryLog()
        await engine.checkpoints.write(
            checkpointed, RecordType.COORDINATOR_CHECKPOINT, engine.checkpoint_records
        )
        restarted, _ = engine_on(HeldLog())
        [pending] = restarted.replay(checkpointed.records)
        assert [(1, "yes-a")] == [(b.branch, b.participant) for b in pending.branches]
        log.release()
        await submit
        await engine.close()

    asyncio.run(scenario())


class LostOnePhase(Answering):
    """A participant capable of one-phase commit whose answer to the Prepare is lost; the
    Rollback probe that follows is answered with `probe_code` (None: rolled back)."""

    def __init__(self, probe_code: grpc.StatusCode | None) -> None:
        super().__init__(Vote.PREPARED, [])
        self.probe_code = probe_code
        self.client = SimpleNamespace(incarnation="")

    def prepare(self, item: PrepareItem) -> None:
        lost = PrepareResult(None, "unavailable (connection reset)")
        asyncio.get_running_loop().call_soon(item.done, lost)

    def probe(
        self,
        transaction_id: str,
        fingerprint: bytes,
        timeout_s: float,
        done: Callable[[grpc.StatusCode | None, str], None],
    ) -> None:
        asyncio.get_running_loop().call_soon(done, self.probe_code, "already committed")


def test_a_lost_one_phase_answer_probed_as_already_committed_is_committed() -> None:
    """Mutation: the probe's FAILED_PRECONDITION ("already committed") read as rolled back
    (engine.py, _probe's done). The client, told UNKNOWN, then hears ABORTED on its retry for
    a commit that happened (rule 9: never guessed)."""

    async def scenario() -> None:
        engine, registry = engine_on(HeldLog())
        registry.answering["single"] = LostOnePhase(grpc.StatusCode.FAILED_PRECONDITION)
        capable = coordinator_pb2.Capabilities(one_phase=True)
        registry.put(
            coordinator_pb2.ParticipantInfo(
                name="single", address="127.0.0.1:1", capabilities=capable
            )
        )
        await engine.submit("t-one", [("single", any_pb2.Any())], 5_000, b"fp")
        await over(engine, "t-one")
        resolved = engine.lookup("t-one")
        assert resolved is not None and COMMITTED == resolved.answer
        assert COMMITTED == engine.query_outcome("t-one", b"fp")
        await engine.close()

    asyncio.run(scenario())


class Illegal(Answering):
    """Answers a two-phase Prepare COMMITTED without saying an earlier attempt committed it."""

    def prepare(self, item: PrepareItem) -> None:
        illegal = PrepareResult(Vote.COMMITTED, "")
        asyncio.get_running_loop().call_soon(item.done, illegal)


def test_an_illegal_vote_fails_its_prepare_at_once() -> None:
    """Mutation: a vote the protocol does not allow was dropped instead of counted as a failed
    prepare (engine.py, _feed's ProtocolError path): the transaction then waited for its
    deadline (a one-phase one, for a vote that never comes) and aborted as timed out."""

    async def scenario() -> None:
        engine, registry = engine_on(HeldLog())
        registry.answering["illegal"] = Illegal(Vote.COMMITTED, registry.sent)
        registry.put(coordinator_pb2.ParticipantInfo(name="illegal", address="127.0.0.1:1"))
        branches = [(name, any_pb2.Any()) for name in ("illegal", "yes-a")]
        view = await engine.submit("t-illegal", branches, 2_000, b"fp")
        assert ABORTED == view.answer
        assert "protocol error" in view.reason
        await engine.close()

    asyncio.run(scenario())


class _Silent(Registry):
    """ "one-phase" is one-phase capable and never answers its Prepare; "yes" votes PREPARED
    and acknowledges; "held" votes PREPARED and never answers a decision."""

    def __init__(self) -> None:
        super().__init__()
        one_phase = coordinator_pb2.Capabilities(one_phase=True)
        self.put(
            coordinator_pb2.ParticipantInfo(
                name="one-phase", address="127.0.0.1:1", capabilities=one_phase
            )
        )
        for name in ("yes", "held"):
            self.put(coordinator_pb2.ParticipantInfo(name=name, address="127.0.0.1:1"))
        self.prepares = 0

    def port(self, name: str) -> Any:
        ports = self

        class Port:
            client = SimpleNamespace(incarnation="")  # not known: not checked

            def prepare(self, item: PrepareItem) -> None:
                ports.prepares += 1
                if name != "one-phase":
                    result = PrepareResult(Vote.PREPARED, "")
                    asyncio.get_running_loop().call_soon(item.done, result)

            def decide(self, item: DecideItem) -> None:
                if name == "yes":
                    asyncio.get_running_loop().call_soon(item.done, DecideResult(ok=True))

        return Port()


def test_a_stop_counts_apart_what_the_log_resumes_and_the_one_phase_commits_it_cannot() -> None:
    """The stopping line's left_to_recovery counted a one-phase commit still out, which the
    next start does not recover (only commit decisions are in the log: its participant alone
    knows its outcome; found by a bug hunt). drain() counts them apart."""

    async def scenario() -> None:
        registry = _Silent()
        engine = Engine(MemoryLog(), registry, CoordinatorConfig())
        one_phase = asyncio.ensure_future(
            engine.submit("t-1p", [("one-phase", any_pb2.Any())], 60_000, b"t-1p")
        )
        branches = [(name, any_pb2.Any()) for name in ("yes", "held")]
        view = await engine.submit("t-2p", branches, 60_000, b"t-2p")
        assert COMMITTED == view.answer  # its Commit to "held" never answered

        async def prepared() -> bool:
            return registry.prepares == 3

        await eventually(prepared)
        assert Left(to_recovery=1, one_phase_unknown=1, presumed_aborted=0) == await engine.drain(0)
        one_phase.cancel()
        await engine.close()

    asyncio.run(scenario())


class _Manual(Registry):
    """Participants "a" and "b" (two-phase only), whose calls the test answers: each Prepare
    and Rollback is kept, by participant, with the callback that answers it."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("a", "b"):
            self.put(coordinator_pb2.ParticipantInfo(name=name, address="127.0.0.1:1"))
        self.prepares: list[tuple[str, PrepareItem]] = []
        self.decides: list[tuple[str, DecideItem]] = []

    def port(self, name: str) -> Any:
        ports = self

        class Port:
            client = SimpleNamespace(incarnation="")  # not known: not checked

            def prepare(self, item: PrepareItem) -> None:
                ports.prepares.append((name, item))

            def decide(self, item: DecideItem) -> None:
                ports.decides.append((name, item))

        return Port()


def test_a_submit_that_waited_for_an_earlier_attempt_does_not_start_once_the_stop_ends_waits() -> (
    None
):
    """A Submit waiting for the Rollbacks of an earlier attempt under its id (forgotten by a
    window of 0) started its own attempt once they ended, after stop_waiting had aborted what
    collected votes: its Prepares went out, nothing aborted it without a vote, and the server's
    grace then cut its call off (UNAVAILABLE, "Cancelling all calls"), leaving what prepared in
    doubt until the next start. It is refused as the coordinator stops, before any Prepare."""

    async def scenario() -> None:
        registry = _Manual()
        engine = Engine(MemoryLog(), registry, CoordinatorConfig(finished_kept=0))
        branches = [(name, any_pb2.Any()) for name in ("a", "b")]
        first = asyncio.ensure_future(engine.submit("t-x", branches, 60_000, b"t-x"))

        async def both_prepares_out() -> bool:
            return len(registry.prepares) == 2

        await eventually(both_prepares_out)
        (_, a_prepare), (_, b_prepare) = registry.prepares
        a_prepare.done(PrepareResult(Vote.REFUSED, "out of stock"))
        b_prepare.done(PrepareResult(Vote.PREPARED, ""))
        assert coordinator_pb2.OUTCOME_ABORTED == (await first).answer
        [(_, b_rollback)] = registry.decides  # still out: the attempt settles when it ends
        retry = asyncio.ensure_future(engine.submit("t-x", branches, 60_000, b"t-x"))
        await asyncio.sleep(0)  # the retry waits for the first attempt's Rollback
        assert not retry.done() and len(registry.prepares) == 2
        engine.stop_waiting()  # the stop's grace runs out
        b_rollback.done(DecideResult(ok=True))
        try:
            await asyncio.wait_for(retry, 10)
        except SubmitRejected as refused:
            assert refused.code is grpc.StatusCode.UNAVAILABLE, refused.code
            assert "stopping" in str(refused), refused
        else:
            raise AssertionError("the retry ran an attempt while the coordinator stopped")
        assert len(registry.prepares) == 2  # no Prepare of a new attempt went out
        assert Left(0, 0, 0) == await engine.drain(0)
        await engine.close()

    asyncio.run(scenario())
