"""The simulated nodes: the two pure protocol cores, wrapped the way the real I/O layers wrap them.

`CoordinatorNode` carries out `Transaction` actions as dtm/coordinator/engine.py does (calls with
deadlines, a forced decision record before DecisionDurable, a lazy end record, backed-off
phase-2 retries, presumed-abort answers to inquiries, recovery of commit decisions without an
end record). `ParticipantNode` carries out `Branch` actions as participants/branches.py and
participants/server.py do (replies only once the branch's forced records are durable, leases on
unvoted branches, inquiries for in-doubt ones, replay of the log after a restart, tombstones).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeAlias

from dtm.core import branch as bcore
from dtm.core import transaction as tcore
from dtm.core.branch import Branch, BranchState, BranchVote, ErrorKind
from dtm.core.transaction import Outcome, Transaction, TxnState, Vote
from dtm.sim import messages as msg
from dtm.sim.disk import Disk

if TYPE_CHECKING:
    from dtm.sim.world import World

CallKind: TypeAlias = Literal["prepare", "commit", "rollback", "probe"]
BranchKey: TypeAlias = tuple[str, int]


def _after_interval(
    node: CoordinatorNode | ParticipantNode, delay_ms: int, label: str, run: Callable[[], None]
) -> None:
    """Run `run` once `delay_ms` have passed: on the simulated monotonic clock, as the real
    engines count intervals (the transaction timer, leases, inquiry delays). With
    NodeModel.intervals_on_monotonic_clock False, the bug they had: the timer compares the
    node's wall clock with the moment it is due by it and, finding itself early, is armed
    again for the rest, so a step back postpones it by the length of the step."""
    world = node.world
    if world.model.intervals_on_monotonic_clock:
        world.after(delay_ms, node, label, run)
        return
    due_wall_ms = node.wall_ms() + delay_ms

    def fire() -> None:
        early_ms = due_wall_ms - node.wall_ms()
        if early_ms > 0:
            world.after(early_ms, node, label, fire)
        else:
            run()

    world.after(delay_ms, node, label, fire)


def _reported_heuristic(commit: bool, reply: msg.Reply) -> str:
    """dtm.coordinator.ports.reported_heuristic, on the simulator's error kinds."""
    if not isinstance(reply, msg.ErrorReply):
        return ""
    if reply.kind is ErrorKind.FAILED_PRECONDITION or reply.kind is ErrorKind.HEURISTIC:
        return bcore.HEURISTIC_ROLLBACK if commit else bcore.HEURISTIC_COMMIT
    if reply.kind is ErrorKind.NOT_FOUND and commit:
        return bcore.HEURISTIC_HAZARD
    return ""


_VOTES = {
    BranchVote.PREPARED: Vote.PREPARED,
    BranchVote.READ_ONLY: Vote.READ_ONLY,
    BranchVote.REFUSED: Vote.REFUSED,
    BranchVote.COMMITTED: Vote.COMMITTED,
}
_RECORD_KINDS: dict[bcore.RecordKind, msg.BranchRecordKind] = {
    bcore.RecordKind.PREPARED: "prepared",
    bcore.RecordKind.COMMITTED: "committed",
    bcore.RecordKind.ROLLED_BACK: "rolled_back",
}


# ---- the coordinator ----


@dataclass(slots=True)
class CoordinatorRun:
    txn: Transaction
    # engine.Run.due_s: when the transaction times out by the simulated monotonic clock, what
    # its timer and its prepares' timeouts count down to (txn.deadline_ms is the wall clock's).
    began_ms: int = 0
    due_ms: int = 0
    timer_token: int = 0  # 0: no transaction timer armed
    finished: bool = False
    # Votes this incarnation actually received, first one per branch: what the checker holds
    # a commit decision against (never the core's own bookkeeping).
    votes_received: dict[int, Vote] = field(default_factory=dict)
    answer: Outcome | None = None  # what the Reply told the client, once it did
    attempt: int = 0  # which attempt of its transaction this is (the checker's count)
    # engine.Run.decisions_open: Commits and Rollbacks in flight or waiting to be retried. A
    # forgotten aborted attempt's Rollbacks go on; a new attempt waits for them to end.
    decisions_open: int = 0
    settle_waiters: list[Callable[[], None]] = field(default_factory=list)
    end_lsn: int = 0  # its lazy end record, once appended

    def answer_now(self) -> Outcome:
        """engine.Run.answer: what a Submit joining after the Reply is told, the outcome as
        known now (a one-phase UNKNOWN is answered COMMITTED or ABORTED once resolved; an
        attempt that found its transaction committed by an earlier one, COMMITTED)."""
        outcome = self.txn.answer
        if outcome is Outcome.COMMITTED or outcome is Outcome.ABORTED:
            return outcome
        assert self.answer is not None
        return self.answer


@dataclass(frozen=True, slots=True)
class Call:
    call_id: int
    run: CoordinatorRun  # the attempt that made it (its id may run a later attempt by now)
    kind: CallKind
    branch: int


class CoordinatorNode:
    name = "coordinator"

    def __init__(self, world: World) -> None:
        self.world = world
        self.alive = True
        self.incarnation = 0
        # The machine's wall clock: the simulated monotonic time plus this offset, which the
        # world's clock steps change (a restart of the process keeps it).
        self.clock_offset_ms = 0
        self.disk = _disk(world, self)
        # Running attempts and the finished ones kept (all of them, unless memory is bounded).
        self.runs: dict[str, CoordinatorRun] = {}
        self.calls: dict[int, Call] = {}
        # The client calls waiting for a Reply, by transaction: this incarnation's connections.
        self.waiting: dict[str, list[int]] = {}
        # engine.FinishedWindow's order (oldest first), and engine._settling: forgotten aborted
        # attempts whose Rollbacks go on. Used only when memory.finished_kept is set.
        self.finished: dict[str, None] = {}
        self.settling: dict[str, CoordinatorRun] = {}
        self.settle_waiting: dict[str, list[int]] = {}  # client calls waiting for those
        self.forgotten: dict[str, None] = {}  # what the window forgot (and no attempt since)

    # ---- client side ----

    def submit(
        self, transaction_id: str, participants: list[str], timeout_ms: int, call: int
    ) -> None:
        """engine.submit: a Submit joins the attempt still running, a finished one is answered
        again, and a transaction with no run (never seen, or forgotten in a restart before its
        commit was decided: presumed abort) is begun."""
        run = self.runs.get(transaction_id)
        earlier = self.settling.get(transaction_id)
        if run is None and earlier is not None:
            # engine.submit: an attempt no longer kept still has Rollbacks on their way (one
            # would roll back the new attempt's prepared branch): wait for them to end.
            self.world.cover("coordinator: a Submit waited for a forgotten attempt's Rollbacks")
            self.settle_waiting.setdefault(transaction_id, []).append(call)
            earlier.settle_waiters.append(
                functools.partial(self._settled, transaction_id, participants, timeout_ms, call)
            )
            return
        if run is None:
            self.waiting[transaction_id] = [call]
            self.begin(transaction_id, participants, timeout_ms)
        elif run.answer is None:
            self.world.cover("coordinator: a Submit again joined the running attempt")
            self.waiting.setdefault(transaction_id, []).append(call)
        else:
            self.world.cover("coordinator: a Submit again was answered from the finished run")
            outcome = run.answer_now()
            self.world.answer_client(transaction_id, call, outcome, "answered again")

    def _settled(
        self, transaction_id: str, participants: list[str], timeout_ms: int, call: int
    ) -> None:
        calls = self.settle_waiting.get(transaction_id, [])
        if call in calls:
            calls.remove(call)
            if not calls:
                del self.settle_waiting[transaction_id]
            self.submit(transaction_id, participants, timeout_ms, call)

    def _keep_finished(self, run: CoordinatorRun) -> None:
        """engine._finish: the finished attempt joins the window of finished transactions,
        which forgets its oldest beyond `finished_kept`: a Submit again runs a new attempt, an
        inquiry hears ABORTED (no record: presumed abort)."""
        kept = self.world.memory.finished_kept
        if kept is None:
            return
        transaction_id = run.txn.transaction_id
        if run.decisions_open and run.txn.state is TxnState.ABORTED:
            self.settling[transaction_id] = run
        self.finished[transaction_id] = None
        while len(self.finished) > kept:
            oldest = next(iter(self.finished))
            if self.runs[oldest].end_lsn > self.disk.durable:
                # Not before its end record is on disk, as FinishedWindow.trim holds it
                # (the engine also asks for that fsync; the model waits for the next one).
                # Forgotten first and then lost in a crash, the commit was resumed from its
                # decision record, and its Commit met a branch a participant had forgotten
                # and a late retry had rolled back: a false heuristic (seed 3389).
                break
            del self.finished[oldest]
            forgotten = self.runs.pop(oldest)
            self.forgotten[oldest] = None
            self.world.log(
                f"  coordinator forgets {oldest} ({_outcome_of(forgotten)}): {kept} newer finished"
            )
            outcome = _outcome_of(forgotten)
            self.world.cover(f"coordinator: forgot a finished transaction ({outcome})")

    def _decision_opened(self, run: CoordinatorRun) -> None:
        run.decisions_open += 1

    def _decision_closed(self, run: CoordinatorRun) -> None:
        """engine._decision_closed: a finished attempt's last Commit or Rollback ended."""
        run.decisions_open -= 1
        assert run.decisions_open >= 0
        if run.decisions_open or not run.finished:
            return
        transaction_id = run.txn.transaction_id
        if self.settling.get(transaction_id) is run:
            del self.settling[transaction_id]
        waiters, run.settle_waiters = run.settle_waiters, []
        for waiter in waiters:
            label = f"coordinator: {transaction_id}'s forgotten attempt settled: Submit again"
            self.world.after(0, self, label, waiter)

    def begin(self, transaction_id: str, participants: list[str], timeout_ms: int) -> None:
        world = self.world
        one_phase_capable = len(participants) == 1 and world.participants[participants[0]].one_phase
        txn, actions = Transaction.begin(
            transaction_id,
            participants,
            now_ms=self.wall_ms(),
            timeout_ms=timeout_ms,
            one_phase_capable=one_phase_capable,
        )
        run = CoordinatorRun(txn, began_ms=world.now_ms, due_ms=world.now_ms + timeout_ms)
        self.runs[transaction_id] = run
        self.forgotten.pop(transaction_id, None)
        world.checker.began(txn)
        run.attempt = world.checker.txns[transaction_id].attempts
        token = world.next_id()
        run.timer_token = token
        label = f"coordinator: {transaction_id} timer"
        _after_interval(self, timeout_ms, label, lambda: self._timer(run, token))
        self._execute(run, actions)

    def wall_ms(self) -> int:
        """engine.clock_ms: the wall clock, which dates what the core and the log record."""
        return self.world.now_ms + self.clock_offset_ms

    def _timer(self, run: CoordinatorRun, token: int) -> None:
        if run.timer_token != token:
            return
        run.timer_token = 0
        # engine._on_timer: due by the clock it counts down, so due for the core too, whatever
        # the wall clock says now.
        self._feed(run, tcore.TimedOut(max(self.wall_ms(), run.txn.deadline_ms)))

    # ---- the one place where events reach the core ----

    def _feed(self, run: CoordinatorRun, event: tcore.Event) -> None:
        before = run.txn.state
        try:
            actions = run.txn.handle(event)
        except tcore.ProtocolError as error:
            raise self.world.fail(f"coordinator core: ProtocolError: {error}") from error
        after = run.txn.state
        if after is not before:
            self.world.log(f"  {run.txn.transaction_id}: {before.value} -> {after.value}")
            if before is TxnState.PREPARING and not run.txn.answer_pending:
                # As engine.py: phase 1 is over, the timer is cancelled, unless an aborted
                # transaction's answer waits for a Prepare still out (the deadline bounds it).
                run.timer_token = 0
            # The coordinator's status shows the new state: it stands by this outcome now.
            outcome = run.txn.outcome
            if outcome is Outcome.COMMITTED or outcome is Outcome.ABORTED:
                self.world.checker.coordinator_said(
                    run.txn.transaction_id, outcome is Outcome.COMMITTED, f"moved to {after.value}"
                )
        self._execute(run, actions)

    def _execute(self, run: CoordinatorRun, actions: list[tcore.Action]) -> None:
        world = self.world
        txn = run.txn
        checker = world.checker
        for action in actions:
            world.log(f"  {txn.transaction_id} action {action}")
            if isinstance(action, tcore.SendPrepare):
                if world.model.intervals_on_monotonic_clock:
                    remaining = max(1, run.due_ms - world.now_ms)
                else:  # by the wall clock: a step forward leaves the prepares 1 ms
                    remaining = max(1, txn.deadline_ms - self.wall_ms())
                timeout = min(world.timing.prepare_timeout_ms, remaining)
                self._call(run, "prepare", action.branch, timeout, one_phase=action.one_phase)
            elif isinstance(action, tcore.PersistDecision):
                checker.decision_persisted(run, action.branches)
                record = msg.DecisionRecord(txn.transaction_id, action.branches, self.wall_ms())
                lsn = self.disk.append(record)
                self.disk.wait_durable(
                    lsn, lambda: self._feed(run, tcore.DecisionDurable(self.wall_ms()))
                )
            elif isinstance(action, tcore.SendCommit):
                checker.coordinator_said(
                    txn.transaction_id, True, f"sent Commit to branch {action.branch}"
                )
                self._call(run, "commit", action.branch, world.timing.phase_two_timeout_ms)
            elif isinstance(action, tcore.SendRollback):
                checker.coordinator_said(
                    txn.transaction_id, False, f"sent Rollback to branch {action.branch}"
                )
                self._call(run, "rollback", action.branch, world.timing.phase_two_timeout_ms)
            elif isinstance(action, tcore.RetryPhaseTwo):
                self._retry_later(run, action.branch, action.attempt)
            elif isinstance(action, tcore.ProbeOnePhase):
                self._call(run, "probe", action.branch, world.timing.phase_two_timeout_ms)
            elif isinstance(action, tcore.Reply):
                checker.client_answered(run, action.outcome, action.reason)
                run.answer = action.outcome
                for call in self.waiting.pop(txn.transaction_id, []):
                    world.answer_client(txn.transaction_id, call, action.outcome, action.reason)
            elif isinstance(action, tcore.PersistHeuristic):
                # No operator forces anything here: a branch that contradicts the decision is
                # an atomicity bug, whatever the checker would find later (but for the limits
                # of a late retry, which the checker counts).
                checker.heuristic_reported(run, action.branch, action.outcome, action.detail)
            elif isinstance(action, tcore.PersistEnd):
                checker.end_persisted(run)
                # lazy: no fsync awaited
                run.end_lsn = self.disk.append(msg.EndRecord(txn.transaction_id))
            elif isinstance(action, tcore.Finished):
                run.finished = True
                run.timer_token = 0
                self._keep_finished(run)
        checker.touch(txn.transaction_id)

    # ---- calls: a request, a reply or a deadline, whichever comes first ----

    def _call(
        self,
        run: CoordinatorRun,
        kind: CallKind,
        branch: int,
        timeout_ms: int,
        *,
        one_phase: bool = False,
    ) -> None:
        world = self.world
        txn = run.txn
        call_id = world.next_id()
        self.calls[call_id] = Call(call_id, run, kind, branch)
        if kind == "commit" or kind == "rollback":
            self._decision_opened(run)
        request: msg.Message
        if kind == "prepare":
            request = msg.PrepareRequest(call_id, txn.transaction_id, branch, one_phase)
        elif kind == "commit":
            request = msg.CommitRequest(call_id, txn.transaction_id, branch)
        else:  # a rollback, or the one-phase probe, which is a Rollback too
            request = msg.RollbackRequest(call_id, txn.transaction_id, branch)
        participant = txn.branch(branch).participant
        if world.send(self, participant, request):
            label = f"coordinator: deadline of call #{call_id}"
            deadline_ms = timeout_ms
        else:
            label = f"coordinator: call #{call_id} refused (UNAVAILABLE)"
            deadline_ms = world.rng.randint(1, world.timing.connect_refused_ms_max)
        world.after(deadline_ms, self, label, lambda: self._call_failed(call_id, label))

    def _call_failed(self, call_id: int, reason: str) -> None:
        call = self.calls.pop(call_id, None)
        if call is None:
            return  # answered in time
        run = call.run
        if call.kind == "prepare":
            self._feed(run, tcore.PrepareFailed(call.branch, reason, self.wall_ms()))
        else:
            self._feed(run, tcore.PhaseTwoFailed(call.branch, reason))
            if call.kind != "probe":
                self._decision_closed(run)

    def _answered(self, reply: msg.Reply) -> None:
        call = self.calls.pop(reply.call, None)
        if call is None:
            self.world.log("  late or duplicate reply: the call is over")
            self.world.cover("coordinator: late or duplicate reply ignored")
            return
        run = call.run
        world = self.world
        if call.kind == "commit" or call.kind == "rollback":
            self._decided(run, call, reply)
            self._decision_closed(run)
            return
        if call.kind == "prepare":
            if isinstance(reply, msg.VoteReply):
                vote = _VOTES[reply.vote]
                run.votes_received.setdefault(call.branch, vote)
                # (PrepareResponse.committed_earlier: our participants answer COMMITTED to a
                # two-phase Prepare only for a branch an earlier attempt committed)
                earlier = vote is tcore.Vote.COMMITTED
                received = tcore.VoteReceived(
                    call.branch, vote, reply.reason, self.wall_ms(), earlier
                )
                self._feed(run, received)
            else:
                self._feed(run, tcore.PrepareFailed(call.branch, str(reply), self.wall_ms()))
        elif call.kind == "probe":
            # engine._probe: FAILED_PRECONDITION means "already committed"; an ack means the
            # Rollback rolled it back or left a tombstone, so it can never commit.
            world.cover(f"coordinator: one-phase probe answered {reply.__class__.__name__}")
            if isinstance(reply, msg.AckReply):
                reason = f"{run.txn.reason}; rolled back"
                self._feed(run, tcore.OnePhaseResolved(False, reason))
            elif isinstance(reply, msg.ErrorReply) and reply.kind is ErrorKind.FAILED_PRECONDITION:
                self._feed(run, tcore.OnePhaseResolved(committed=True))
            else:
                self._feed(run, tcore.PhaseTwoFailed(call.branch, str(reply)))

    def _decided(self, run: CoordinatorRun, call: Call, reply: msg.Reply) -> None:
        if isinstance(reply, msg.AckReply):
            self._feed(run, tcore.PhaseTwoAcked(call.branch))
        elif heuristic := _reported_heuristic(call.kind == "commit", reply):
            # ports.reported_heuristic: a contradicting answer is recorded, not retried.
            self._feed(run, tcore.HeuristicReported(call.branch, heuristic, str(reply)))
        else:
            self._feed(run, tcore.PhaseTwoFailed(call.branch, str(reply)))

    def _retry_later(self, run: CoordinatorRun, branch: int, attempt: int) -> None:
        # engine._retry: capped exponential backoff with full jitter.
        world = self.world
        timing = world.timing
        ceiling = min(timing.backoff_ms_max, timing.backoff_ms_min * 2 ** min(attempt, 16))
        delay = world.rng.randint(timing.backoff_ms_min, ceiling)

        state = run.txn.state
        deciding = state in (TxnState.COMMITTING, TxnState.ABORTED)
        if deciding:
            self._decision_opened(run)  # engine: open until the retry task ends

        def retry() -> None:
            state = run.txn.state
            if state is TxnState.UNKNOWN:
                self._call(run, "probe", branch, timing.phase_two_timeout_ms)
            elif state in (TxnState.COMMITTING, TxnState.ABORTED):
                kind: CallKind = "commit" if state is TxnState.COMMITTING else "rollback"
                self._call(run, kind, branch, timing.phase_two_timeout_ms)
            if deciding:
                self._decision_closed(run)

        world.cover(f"coordinator: retry in state {run.txn.state.value}")
        label = f"coordinator: retry {run.txn.transaction_id}/{branch} (attempt {attempt})"
        world.after(delay, self, label, retry)

    # ---- the participants' inquiry ----

    def _answer_query(self, source: str, query: msg.OutcomeQuery) -> None:
        # engine.query_outcome: no record at all means aborted (presumed abort).
        run = self.runs.get(query.transaction_id)
        outcome = tcore.inquiry_answer(run.txn if run is not None else None)
        answer: msg.Answer = "unspecified"
        if outcome is not None:
            answer = "committed" if outcome is Outcome.COMMITTED else "aborted"
        self.world.cover(f"coordinator: inquiry answered {answer}")
        if run is None and query.transaction_id in self.forgotten:
            # Presumed abort about what the window forgot: a finished transaction, so no branch
            # of it is left in doubt by it (a commit finishes on its last acknowledgement). Not
            # a decision of any attempt; what the answer does to a branch is checked there.
            self.world.cover("coordinator: inquiry about a forgotten transaction")
        elif answer != "unspecified":
            self.world.checker.coordinator_said(
                query.transaction_id, answer == "committed", f"answered {source}'s inquiry {answer}"
            )
        self.world.send(self, source, msg.OutcomeAnswer(query.call, answer))

    def receive(self, source: str, message: msg.Message) -> None:
        if isinstance(message, msg.OutcomeQuery):
            self._answer_query(source, message)
        elif isinstance(message, msg.VoteReply | msg.AckReply | msg.ErrorReply):
            self._answered(message)
        else:
            raise AssertionError(f"coordinator got {message}")

    # ---- crash and recovery ----

    def crash(self) -> None:
        lost = self.disk.crash()
        self.world.log(f"CRASH coordinator: {lost} unsynced record(s) lost")
        self.alive = False
        self.incarnation += 1
        self.runs.clear()
        self.calls.clear()
        self.finished.clear()
        self.settling.clear()
        self.forgotten.clear()
        for transaction_id, calls in self.settle_waiting.items():
            self.waiting.setdefault(transaction_id, []).extend(calls)
        self.settle_waiting.clear()
        waiting, self.waiting = self.waiting, {}
        for transaction_id, calls in waiting.items():
            for call in calls:
                self.world.client_cut_off(transaction_id, call)

    def restart(self) -> None:
        """engine.replay + engine.resume: commit decisions without an end record are driven to
        completion; ended ones are remembered as committed; everything else is forgotten."""
        self.alive = True
        pending: dict[str, msg.DecisionRecord] = {}
        ended: dict[str, msg.DecisionRecord] = {}
        for record in self.disk.records:
            if isinstance(record, msg.DecisionRecord):
                pending[record.transaction_id] = record
            elif isinstance(record, msg.EndRecord):
                decided = pending.pop(record.transaction_id, None)
                if decided is not None:
                    ended[record.transaction_id] = decided
        self.world.log(f"RESTART coordinator: {len(pending)} commit(s) to resume")
        if pending:
            self.world.cover("coordinator: commit resumed after restart")
        for transaction_id, decided in ended.items():
            txn, _ = Transaction.recovered_commit(
                transaction_id, decided.branches, decided_at_ms=decided.decided_at_ms
            )
            txn.state = TxnState.COMMITTED
            for progress in txn.branches:
                progress.acknowledged = True
            run = CoordinatorRun(txn, finished=True, answer=Outcome.COMMITTED)
            self.runs[transaction_id] = run
            # engine.replay: the window again, in the order they ended (its checkpoints keep
            # it across restarts; the simulator's log replays the ended commits only).
            self._keep_finished(run)
        for transaction_id, decided in pending.items():
            txn, actions = Transaction.recovered_commit(
                transaction_id, decided.branches, decided_at_ms=decided.decided_at_ms
            )
            # engine.resume: a Submit again is answered COMMITTED at once.
            run = CoordinatorRun(txn, answer=Outcome.COMMITTED)
            self.runs[transaction_id] = run
            self.forgotten.pop(transaction_id, None)
            run.attempt = self.world.checker.resumed(transaction_id)
            self.world.checker.coordinator_said(transaction_id, True, "resumed its commit")
            self._execute(run, actions)


# ---- the participants ----


@dataclass(slots=True)
class PrepareWork:
    """The business logic running for one branch (after any lock waits)."""

    token: int
    started_ms: int  # by the simulated monotonic clock: the lease counts from here
    waiters: list[tuple[str, int]] = field(default_factory=list)  # (caller, call id)


class ParticipantNode:
    def __init__(self, world: World, name: str, *, slow: bool, one_phase: bool) -> None:
        self.world = world
        self.name = name
        self.slow = slow
        self.one_phase = one_phase  # registered as one-phase capable
        self.alive = True
        self.incarnation = 0
        self.clock_offset_ms = 0  # as the coordinator's: its wall clock's, across restarts
        self.disk = _disk(world, self)
        self.branches: dict[BranchKey, Branch] = {}
        self.work: dict[BranchKey, PrepareWork] = {}
        # The tokens of cancelled prepares whose business logic ran on past the cancel
        # (FaultConfig.prepare_past_cancel_probability): their votes still come.
        self.past_cancel: set[int] = set()
        self.forced_lsn: dict[BranchKey, int] = {}
        self.inquiries: dict[BranchKey, int] = {}  # the call id of the inquiry in flight
        self.inquiry_attempts: dict[BranchKey, int] = {}
        # In-doubt branches waiting to be asked about, since when (by the simulated monotonic
        # clock): they became so, or their last inquiry ended. The checker bounds the wait.
        self.unasked_since_ms: dict[BranchKey, int] = {}
        # participants/decided.py, when memory.decided_kept is set: the decided branches kept,
        # oldest first. One beyond the window is forgotten once its records are durable, as
        # a checkpoint then drops them from the log: `forgotten_upto` (durable, as that
        # checkpoint is) hides them from a replay.
        self.decided: dict[BranchKey, None] = {}
        self.last_lsn: dict[BranchKey, int] = {}
        self.forgotten_upto: dict[BranchKey, int] = {}
        self._trim_waiting = False
        self._replies_pending: dict[BranchKey, int] = {}  # replies waiting for durability
        # What each branch holds (participants/branches.py): its locks from the prepare's start
        # until CancelPrepare, ApplyCommit or ApplyRollback; its reservation (`_applied`: the
        # service prepared it) from a PREPARED answer until ApplyCommit or ApplyRollback (or
        # ReleaseLatePrepare, for a vote that came after its prepare was cancelled).
        self.locked: set[BranchKey] = set()
        self.reserved: set[BranchKey] = set()

    # ---- requests from the coordinator ----

    def receive(self, source: str, message: msg.Message) -> None:
        if isinstance(message, msg.PrepareRequest):
            self._prepare(source, message)
        elif isinstance(message, msg.CommitRequest | msg.RollbackRequest):
            self._decide(source, message)
        elif isinstance(message, msg.OutcomeAnswer):
            self._learn(message)
        else:
            raise AssertionError(f"{self.name} got {message}")

    def _handle(self, branch: Branch, event: bcore.BranchEvent) -> list[bcore.BranchAction]:
        try:
            return branch.handle(event)
        except bcore.BranchProtocolError as error:
            raise self.world.fail(
                f"{self.name} branch core: BranchProtocolError: {error}"
            ) from error

    def _prepare(self, source: str, request: msg.PrepareRequest) -> None:
        key = (request.transaction_id, request.branch)
        event = bcore.PrepareRequested(request.one_phase)
        branch = self.branches.get(key)
        self.world.checker.prepare_delivered(
            key, request.call, branch.state if branch is not None else None
        )
        if branch is None:
            new, actions = Branch.on_first_message(key[0], key[1], event)
            assert new is not None
            branch = new
            self.branches[key] = branch
            self.world.checker.branch_created(key)
        else:
            self.world.cover(f"participant: duplicate Prepare on {branch.state.value}")
            actions = self._handle(branch, event)
        reply = self._execute(branch, actions)
        if isinstance(reply, bcore.ReplyVote):
            self._reply_when_durable(
                key, source, msg.VoteReply(request.call, reply.vote, reply.reason)
            )
        else:
            # RunPrepare or AwaitPrepare: answered with the (first) prepare's vote.
            assert reply is None, reply
            self.work[key].waiters.append((source, request.call))

    def _decide(self, source: str, request: msg.CommitRequest | msg.RollbackRequest) -> None:
        key = (request.transaction_id, request.branch)
        event: bcore.BranchEvent = (
            bcore.CommitRequested()
            if isinstance(request, msg.CommitRequest)
            else bcore.RollbackRequested()
        )
        branch = self.branches.get(key)
        if branch is None:
            try:
                new, actions = Branch.on_first_message(key[0], key[1], event)
            except bcore.BranchProtocolError as error:
                raise self.world.fail(f"{self.name} branch core: {error}") from error
            if new is None:
                reply = next(a for a in actions if isinstance(a, bcore.ReplyError))
                self.world.send(
                    self, source, msg.ErrorReply(request.call, reply.kind, reply.message)
                )
                return
            branch = new
            self.branches[key] = branch
            self.world.checker.branch_created(key)
            self.world.cover("participant: tombstone (Rollback before Prepare)")
            answer = self._execute(branch, actions)
        else:
            answer = self._execute(branch, self._handle(branch, event))
        if isinstance(answer, bcore.ReplyError):
            error_reply = msg.ErrorReply(request.call, answer.kind, answer.message)
            if self.world.model.error_reply_waits_for_durability:
                self._reply_when_durable(key, source, error_reply)
            else:
                self.world.send(self, source, error_reply)  # what participants/branches.py does
        else:
            assert isinstance(answer, bcore.ReplyAck), answer
            commit = isinstance(request, msg.CommitRequest)
            self._reply_when_durable(key, source, msg.AckReply(request.call), commit_ack=commit)

    def _reply_when_durable(
        self, key: BranchKey, destination: str, reply: msg.Reply, *, commit_ack: bool = False
    ) -> None:
        """Persist before you speak: a reply waits for the branch's last forced record."""

        def send() -> None:
            self._replies_pending[key] -= 1
            if not self._replies_pending[key]:
                del self._replies_pending[key]
            if isinstance(reply, msg.VoteReply):
                self.world.checker.vote_sent(self, key, reply.vote)
            if commit_ack:
                self.world.checker.commit_ack_sent(self, key)
            self.world.send(self, destination, reply)

        self._replies_pending[key] = self._replies_pending.get(key, 0) + 1
        lsn = self.forced_lsn.get(key)
        if lsn is None:
            send()
        else:
            self.disk.wait_durable(lsn, send)

    # ---- carrying out the core's actions ----

    def _execute(
        self, branch: Branch, actions: list[bcore.BranchAction]
    ) -> bcore.BranchAction | None:
        """Everything but the reply, at once; the reply is returned to the caller."""
        world = self.world
        key = branch.key
        reply: bcore.BranchAction | None = None
        cancelled: PrepareWork | None = None
        for action in actions:
            world.log(f"  {self.name} {key[0]}/{key[1]} action {action}")
            if isinstance(action, bcore.RunPrepare):
                self.locked.add(key)
                self._start_prepare(branch)
            elif isinstance(action, bcore.AwaitPrepare):
                pass  # the caller joins the waiters of the prepare already running
            elif isinstance(action, bcore.CancelPrepare):
                cancelled = self.work.pop(key, None)
                self.locked.discard(key)
                world.cover("participant: prepare cancelled")
                if (
                    cancelled is not None
                    and world.rng.random() < world.faults.prepare_past_cancel_probability
                ):
                    world.log(f"  {self.name} {key[0]}/{key[1]}: its prepare runs on")
                    self.past_cancel.add(cancelled.token)
            elif isinstance(action, bcore.Persist):
                record = msg.BranchRecord(
                    _RECORD_KINDS[action.kind],
                    key[0],
                    key[1],
                    one_phase=branch.one_phase,
                    at_ms=self.wall_ms(),
                )
                lsn = self.disk.append(record)
                self.last_lsn[key] = lsn
                if action.forced:
                    self.forced_lsn[key] = lsn
            elif isinstance(action, bcore.ApplyCommit):
                world.checker.branch_committing(self, branch)
                if key not in self.reserved:
                    raise world.fail(
                        f"{self.name} commits {key[0]}/{key[1]}, which holds no reservation"
                    )
                self.reserved.discard(key)
                self.locked.discard(key)
            elif isinstance(action, bcore.ApplyRollback | bcore.ReleaseLatePrepare):
                # The service gives back what the prepare took (nothing after a refusal or a
                # read-only answer) and the locks go; a late vote's too (ReleaseLatePrepare).
                self.reserved.discard(key)
                self.locked.discard(key)
            elif isinstance(action, bcore.AskCoordinator):
                self._ask(key)
            else:
                reply = action
        if cancelled is not None:
            # branches.py settle(): the callers of a cancelled prepare hear REFUSED.
            for source, call in cancelled.waiters:
                reason = branch.reason or "prepare cancelled"
                self._reply_when_durable(
                    key, source, msg.VoteReply(call, BranchVote.REFUSED, reason)
                )
        world.checker.branch_holds(self, branch)
        world.checker.touch(key[0])
        if (
            world.memory.decided_kept is not None
            and branch.state in bcore.DECIDED_STATES
            and key not in self.decided
            and self.branches.get(key) is branch
        ):
            self.decided[key] = None
            self._trim()
        return reply

    # ---- the window of decided branches (participants/decided.py) ----

    def _trim(self) -> None:
        kept = self.world.memory.decided_kept
        assert kept is not None
        # Bounded: each pass forgets one branch, or waits and stops.
        while len(self.decided) > kept:
            oldest = next(iter(self.decided))
            lsn = self.last_lsn.get(oldest, 0)
            if self._trim_waiting:
                return
            if lsn > self.disk.durable:
                self._trim_waiting = True
                self.disk.wait_durable(lsn, self._trim_resume)
                return
            if oldest in self._replies_pending:
                # Its answer leaves in this step (its record just became durable): after it.
                self._trim_waiting = True
                label = f"{self.name}: forget decided branches"
                self.world.after(0, self, label, self._trim_resume)
                return
            self._forget(oldest)

    def _trim_resume(self) -> None:
        self._trim_waiting = False
        self._trim()

    def _forget(self, key: BranchKey) -> None:
        self.world.checker.branch_forgotten(self, key)
        del self.decided[key]
        del self.branches[key]
        self.forced_lsn.pop(key, None)
        self.work.pop(key, None)
        self.inquiries.pop(key, None)
        self.inquiry_attempts.pop(key, None)
        self.unasked_since_ms.pop(key, None)
        lsn = self.last_lsn.pop(key, 0)
        if lsn:
            self.forgotten_upto[key] = lsn

    def _start_prepare(self, branch: Branch) -> None:
        world = self.world
        key = branch.key
        token = world.next_id()
        self.work[key] = PrepareWork(token, world.now_ms)
        limit = (
            world.timing.slow_prepare_work_ms_max if self.slow else world.timing.prepare_work_ms_max
        )
        world.after(
            world.rng.randint(0, limit),
            self,
            f"{self.name}: business logic of {key[0]}/{key[1]} answers",
            lambda: self._prepared(branch, token),
        )
        label = f"{self.name}: lease of {key[0]}/{key[1]}"
        _after_interval(
            self, world.timing.lease_unvoted_ms, label, lambda: self._lease(branch, token)
        )

    def _prepared(self, branch: Branch, token: int) -> None:
        key = branch.key
        work = self.work.get(key)
        current = self.branches.get(key) is branch
        if work is not None and work.token == token and current:
            del self.work[key]
            waiters = work.waiters
        elif token in self.past_cancel:
            # Cancelled (rolled back or lease expired) after its business logic ran: the
            # vote comes all the same, to a branch that is no longer preparing. Its callers
            # heard REFUSED at the cancel. A branch forgotten meanwhile is not this one.
            self.past_cancel.discard(token)
            if not current:
                return
            self.world.cover("participant: a vote after its prepare was cancelled")
            waiters = []
        else:
            return  # cancelled (rolled back or lease expired) before it answered
        vote, reason = self.world.checker.business_vote(key)
        if vote is BranchVote.PREPARED:
            self.reserved.add(key)  # the service prepared it: its effects are tentative now
        reply = self._execute(branch, self._handle(branch, bcore.PrepareVoted(vote, reason)))
        assert isinstance(reply, bcore.ReplyVote), reply
        for source, call in waiters:
            self._reply_when_durable(key, source, msg.VoteReply(call, reply.vote, reply.reason))
        if branch.state is BranchState.PREPARED:
            self._inquire_later(key, self.world.timing.in_doubt_after_ms)

    def _lease(self, branch: Branch, token: int) -> None:
        key = branch.key
        work = self.work.get(key)
        if work is None or work.token != token or branch.state is not BranchState.PREPARING:
            return
        self._execute(branch, self._handle(branch, bcore.LeaseExpired()))

    # ---- the in-doubt inquiry (participants/server.py _ask_about_in_doubt) ----

    def wall_ms(self) -> int:
        """branches.py clock_ms: the wall clock, which dates the records."""
        return self.world.now_ms + self.clock_offset_ms

    def _inquire_later(self, key: BranchKey, delay_ms: int) -> None:
        self.unasked_since_ms[key] = self.world.now_ms
        label = f"{self.name}: {key[0]}/{key[1]} in doubt?"
        _after_interval(self, delay_ms, label, lambda: self._in_doubt(key))

    def _in_doubt(self, key: BranchKey) -> None:
        branch = self.branches.get(key)
        if branch is None or branch.state is not BranchState.PREPARED:
            self.unasked_since_ms.pop(key, None)  # decided meanwhile: nothing to ask
            return
        if key in self.inquiries:
            return
        # The lease of a prepared branch ran out: the core says ask, never decide (rule 11).
        self._execute(branch, self._handle(branch, bcore.LeaseExpired()))

    def _ask(self, key: BranchKey) -> None:
        world = self.world
        if key in self.inquiries:
            return
        self.unasked_since_ms.pop(key, None)
        call_id = world.next_id()
        self.inquiries[key] = call_id
        if world.send(self, "coordinator", msg.OutcomeQuery(call_id, key[0])):
            timeout = world.timing.inquiry_timeout_ms
        else:
            timeout = world.rng.randint(1, world.timing.connect_refused_ms_max)
        world.after(
            timeout,
            self,
            f"{self.name}: inquiry #{call_id} deadline",
            lambda: self._inquiry_failed(key, call_id),
        )

    def _inquiry_failed(self, key: BranchKey, call_id: int) -> None:
        if self.inquiries.get(key) != call_id:
            return
        del self.inquiries[key]
        self._back_off(key)

    def _back_off(self, key: BranchKey) -> None:
        world = self.world
        timing = world.timing
        attempts = self.inquiry_attempts.get(key, 0)
        self.inquiry_attempts[key] = attempts + 1
        delay = min(
            timing.inquiry_backoff_ms_max, timing.inquiry_backoff_ms_base * 2 ** min(attempts, 10)
        )
        self._inquire_later(key, world.rng.randint(delay // 2, delay))

    def _learn(self, answer: msg.OutcomeAnswer) -> None:
        key = next((k for k, c in self.inquiries.items() if c == answer.call), None)
        if key is None:
            self.world.log("  late or duplicate answer: the inquiry is over")
            self.world.cover("participant: late or duplicate inquiry answer ignored")
            return
        del self.inquiries[key]
        branch = self.branches.get(key)
        if answer.outcome == "unspecified" or branch is None:
            self._back_off(key)
            return
        self.inquiry_attempts.pop(key, None)
        self.world.cover(f"participant: in-doubt branch learned {answer.outcome}")
        commit = answer.outcome == "committed"
        self._execute(branch, self._handle(branch, bcore.OutcomeLearned(commit)))

    # ---- crash and recovery ----

    def crash(self) -> None:
        lost = self.disk.crash()
        self.world.log(f"CRASH {self.name}: {lost} unsynced record(s) lost")
        self.world.checker.participant_crashed(self)
        self.alive = False
        self.incarnation += 1
        self.branches.clear()
        self.work.clear()
        self.past_cancel.clear()
        self.forced_lsn.clear()
        self.inquiries.clear()
        self.inquiry_attempts.clear()
        self.unasked_since_ms.clear()
        self.decided.clear()
        self.last_lsn.clear()
        self._trim_waiting = False
        self._replies_pending.clear()
        self.locked.clear()
        self.reserved.clear()

    def restart(self) -> None:
        """branches.py replay: prepared, committed and rolled-back branches and tombstones
        (but those a window of decided branches forgot), and that window again."""
        self.alive = True
        prepared_at_ms: dict[BranchKey, int] = {}
        for lsn, record in enumerate(self.disk.records, 1):
            assert isinstance(record, msg.BranchRecord)
            key = (record.transaction_id, record.branch)
            if lsn <= self.forgotten_upto.get(key, 0):
                continue
            self.last_lsn[key] = lsn
            branch = self.branches.get(key)
            if record.kind == "prepared":
                self.branches[key] = Branch(
                    key[0], key[1], BranchState.PREPARED, BranchVote.PREPARED
                )
                prepared_at_ms[key] = record.at_ms
            elif record.kind == "committed":
                if record.one_phase:
                    branch = Branch(key[0], key[1], BranchState.PREPARED, BranchVote.PREPARED)
                    branch.one_phase = True
                    if self.world.model.one_phase_replay_votes_committed:
                        branch.vote = BranchVote.COMMITTED
                    self.branches[key] = branch
                if branch is None or branch.state is not BranchState.PREPARED:
                    raise self.world.fail(
                        f"{self.name} recovery: commit record for {key[0]}/{key[1]} not prepared"
                    )
                branch.state = BranchState.COMMITTED
            elif branch is None:
                tombstone = Branch(key[0], key[1], BranchState.ROLLED_BACK)
                tombstone.reason = "rolled back before prepare"
                self.branches[key] = tombstone
            elif branch.state is BranchState.PREPARED:
                branch.state = BranchState.ROLLED_BACK
            self.decided.pop(key, None)
            if self.branches[key].state in bcore.DECIDED_STATES:
                self.decided[key] = None  # in the order they were decided
        if self.world.memory.decided_kept is None:
            self.decided.clear()
        else:
            self._trim()  # all replayed records are durable: at once
        in_doubt = [key for key, b in self.branches.items() if b.state is BranchState.PREPARED]
        self.locked.update(in_doubt)  # branches.py replay: the service's state and the locks
        self.reserved.update(in_doubt)
        self.world.log(
            f"RESTART {self.name}: {len(self.branches)} branch(es), {len(in_doubt)} in doubt"
        )
        if in_doubt:
            self.world.cover("participant: in-doubt branch replayed")
        for key in in_doubt:
            # branches.py _recover_prepared: as old as its record's wall-clock moment says,
            # never in the future (a step back since), so asked at most in_doubt_after_ms on.
            age_ms = max(0, self.wall_ms() - prepared_at_ms.get(key, 0))
            self._inquire_later(key, max(0, self.world.timing.in_doubt_after_ms - age_ms))


def _outcome_of(run: CoordinatorRun) -> str:
    answer = run.txn.answer
    return answer.value if answer is not None else run.txn.state.value


def _disk(world: World, owner: CoordinatorNode | ParticipantNode) -> Disk:
    return Disk(world, owner, lambda records: world.checker.durable(owner.name, records))
