"""The coordinator's transaction lifecycle: a pure state machine (no I/O, no clock).

Every state change of a global transaction happens in `Transaction.handle`, driven by the
`TRANSITIONS` table of (state, event type) -> handler. A pair missing from the table is a
protocol error and changes nothing. Handlers return `Action`s for the I/O layer to carry out in
order, following the persist-before-you-speak rule: the I/O layer makes `PersistDecision`
durable and only then feeds back `DecisionDurable`, which is what releases the Commit messages
and the client's COMMITTED answer.

Presumed abort (R*, Mohan et al. 1986): an abort writes nothing and waits for no
acknowledgement that matters for correctness; all-read-only transactions write nothing; a
single participant gets one-phase commit with no coordinator log write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

from dtm.core.branch import HEURISTIC_COMMIT


class TxnState(Enum):
    PREPARING = "preparing"
    DECIDING = "deciding"  # commit decided, decision record not yet durable
    COMMITTING = "committing"  # commit durable, phase 2 running
    COMMITTED = "committed"
    ABORTED = "aborted"  # presumed abort: rollbacks are sent best-effort, nothing is logged
    # One-phase commit whose answer was lost; being resolved. A transaction also finishes in
    # it when the outcome can no longer be learned (a heuristic hazard: see
    # _on_one_phase_unlearnable).
    UNKNOWN = "unknown"


TERMINAL_STATES = frozenset({TxnState.COMMITTED, TxnState.ABORTED})


class Vote(Enum):
    PREPARED = "prepared"
    READ_ONLY = "read_only"
    REFUSED = "refused"
    COMMITTED = "committed"  # one-phase answer


class Outcome(Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"
    UNKNOWN = "unknown"


def inquiry_answer(txn: Transaction | None) -> Outcome | None:
    """What the coordinator tells a participant in doubt about `txn` (None: it has no record
    of it), or None while it is undecided (the participant asks again later). Presumed abort:
    no record means ABORTED (rule 6). The engine answers with it, and so does the simulator's
    model of the engine, so the rule is tested where it is used."""
    if txn is None:
        return Outcome.ABORTED
    outcome = txn.outcome
    return None if outcome is Outcome.UNKNOWN else outcome


# Rollbacks are best-effort under presumed abort; past this many failures the participant's
# inquiry resolves the branch.
ROLLBACK_ATTEMPTS_MAX = 5


class ProtocolError(Exception):
    """An event that is not legal in the transaction's current state."""


# ---- events (inputs) ----


@dataclass(frozen=True, slots=True)
class VoteReceived:
    branch: int
    vote: Vote
    reason: str = ""
    now_ms: int = 0
    # With COMMITTED to a two-phase Prepare: the participant says an earlier attempt committed
    # the branch (PrepareResponse.committed_earlier). Without it, COMMITTED there is illegal.
    earlier: bool = False


@dataclass(frozen=True, slots=True)
class PrepareFailed:
    """The Prepare call failed (error, unreachable, deadline): it may or may not have prepared,
    unless `not_reached`."""

    branch: int
    reason: str
    now_ms: int = 0
    # Definitely not run: whatever answered refused the call before touching any branch, as
    # meant for another participant (participant.proto, PrepareRequest.participant) or, in a
    # batch, as an invalid operation. A one-phase transaction then aborts at once: its Prepare
    # is sent once, so nothing can have committed.
    not_reached: bool = False
    # The participant answered, outside the contract (no vote it defines, a vote not allowed
    # here): its error, not a lost answer. A one-phase Prepare is still probed: it may have run.
    protocol_error: bool = False


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The global transaction timeout expired (the I/O layer's timer fired), or, with
    `stopping`, the coordinator's graceful stop ends the wait as the deadline would: a
    two-phase transaction still waiting for votes is aborted (presumed abort: nothing of it is
    in the log for a restart to finish), so that its client is answered and the branches that
    prepared are rolled back rather than left in doubt while the coordinator is down."""

    now_ms: int
    stopping: bool = False


@dataclass(frozen=True, slots=True)
class DecisionDurable:
    now_ms: int


@dataclass(frozen=True, slots=True)
class PhaseTwoAcked:
    branch: int


@dataclass(frozen=True, slots=True)
class PhaseTwoFailed:
    branch: int
    error: str


@dataclass(frozen=True, slots=True)
class OnePhaseResolved:
    """A lost one-phase answer was resolved by asking the participant (a Rollback probe)."""

    committed: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class HeuristicReported:
    """A branch's outcome is not the decision's, or is unknown: an operator forced it, or the
    participant's own record contradicts phase 2. Recorded, shown in status, never silent;
    phase 2 of that branch stops, since no retry can change it. In UNKNOWN: the one-phase
    outcome can no longer be learned (the engine found the participant's log replaced)."""

    branch: int
    outcome: str
    detail: str = ""  # what the participant answered
    # Named by the participant (an operator forced the branch), not inferred from its record
    # contradicting the decision: a Rollback answered "already committed" in an attempt that
    # found its transaction committed earlier is that commit (`Transaction.committed_earlier`).
    forced: bool = False
    # Reported by the participant after an inquiry (Coordinator.ReportHeuristic), not heard
    # in phase 2: the record says so.
    found_by_inquiry: bool = False


Event: TypeAlias = (
    VoteReceived
    | PrepareFailed
    | TimedOut
    | DecisionDurable
    | PhaseTwoAcked
    | PhaseTwoFailed
    | OnePhaseResolved
    | HeuristicReported
)

# ---- actions (outputs) ----


@dataclass(frozen=True, slots=True)
class SendPrepare:
    branch: int
    one_phase: bool


@dataclass(frozen=True, slots=True)
class PersistDecision:
    """Force the commit decision (with the updating branches) to the log."""

    branches: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class SendCommit:
    branch: int


@dataclass(frozen=True, slots=True)
class SendRollback:
    branch: int


@dataclass(frozen=True, slots=True)
class RetryPhaseTwo:
    """Send the branch's phase-2 message again after a backoff chosen by the I/O layer."""

    branch: int
    attempt: int


@dataclass(frozen=True, slots=True)
class ProbeOnePhase:
    """Ask the single participant what happened to a one-phase commit (by sending Rollback)."""

    branch: int


@dataclass(frozen=True, slots=True)
class Reply:
    outcome: Outcome
    reason: str


@dataclass(frozen=True, slots=True)
class PersistEnd:
    """Lazily log that every updating branch acknowledged the commit."""


@dataclass(frozen=True, slots=True)
class PersistHeuristic:
    """Log (lazily) that a participant reported a heuristic outcome for a branch."""

    branch: int
    outcome: str
    detail: str = ""
    found_by_inquiry: bool = False  # as in HeuristicReported


@dataclass(frozen=True, slots=True)
class Finished:
    """The transaction needs nothing more; the I/O layer may forget it."""


Action: TypeAlias = (
    SendPrepare
    | PersistDecision
    | SendCommit
    | SendRollback
    | RetryPhaseTwo
    | ProbeOnePhase
    | Reply
    | PersistEnd
    | PersistHeuristic
    | Finished
)


@dataclass(slots=True)
class BranchProgress:
    index: int
    participant: str
    vote: Vote | None = None
    reason: str = ""
    # True once this branch may hold a prepared state that phase 2 must resolve.
    needs_phase_two: bool = False
    acknowledged: bool = False
    phase_two_attempts: int = 0
    last_error: str = ""
    heuristic: str = ""
    prepare_failed: bool = False  # its Prepare call failed: no vote will come


@dataclass(slots=True)
class Transaction:
    transaction_id: str
    branches: list[BranchProgress]
    created_at_ms: int
    deadline_ms: int
    one_phase: bool
    state: TxnState = TxnState.PREPARING
    reason: str = ""
    decided_at_ms: int = 0
    replied: bool = False
    # Rebuilt from the log after a restart (it did not start in this process).
    recovered: bool = False
    # A participant holds a branch of this transaction committed by its own record: an
    # earlier attempt under this id and content committed it, and the coordinator has since
    # forgotten that attempt (a late retry). The transaction is committed, and the client is
    # told so; this attempt itself commits nothing and rolls back what it prepared (a
    # participant that forgot the earlier commit prepared its branch again). The participant.
    committed_earlier: str = ""
    # Aborted while some Prepare was still out: the client's answer waits for it (or the
    # deadline), since a late vote may show that an earlier attempt committed.
    answer_pending: bool = False
    # Rollbacks answered "already committed" (not forced) while the answer waits: the earlier
    # commit if a COMMITTED vote comes, else heuristic commits; settled with the answer. At
    # most one per branch (a contradicted branch's phase 2 stops).
    held_heuristics: list[HeuristicReported] | None = None

    # ---- construction ----

    @classmethod
    def begin(
        cls,
        transaction_id: str,
        participants: Sequence[str],
        *,
        now_ms: int,
        timeout_ms: int,
        one_phase_capable: bool,
    ) -> tuple[Transaction, list[Action]]:
        """Start phase 1. One branch whose participant allows it gets one-phase commit."""
        assert participants, "an empty transaction is rejected before it reaches the core"
        one_phase = len(participants) == 1 and one_phase_capable
        branches = [BranchProgress(i, name) for i, name in enumerate(participants)]
        txn = cls(transaction_id, branches, now_ms, now_ms + timeout_ms, one_phase)
        return txn, [SendPrepare(b.index, one_phase) for b in branches]

    @classmethod
    def recovered_commit(
        cls,
        transaction_id: str,
        branches: Sequence[tuple[int, str]],
        *,
        decided_at_ms: int,
        created_at_ms: int = 0,
        timeout_ms: int = 0,
    ) -> tuple[Transaction, list[Action]]:
        """A durable commit decision found on restart without its end record: finish phase 2.
        `created_at_ms` and `timeout_ms` are the decision record's (0 in a record older than
        them: then it reads as begun when decided, with no timeout)."""
        progress = [
            BranchProgress(i, name, Vote.PREPARED, needs_phase_two=True) for i, name in branches
        ]
        created = created_at_ms or decided_at_ms
        txn = cls(transaction_id, progress, created, created + timeout_ms, one_phase=False)
        txn.state = TxnState.COMMITTING
        txn.decided_at_ms = decided_at_ms
        txn.replied = True  # whoever asked before the crash was answered, or may ask again
        txn.recovered = True
        return txn, [SendCommit(b.index) for b in progress]

    # ---- the one entry point for every state change ----

    def handle(self, event: Event) -> list[Action]:
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise ProtocolError(
                f"transaction {self.transaction_id}: {type(event).__name__} is not legal "
                f"in state {self.state.value}"
            )
        return handler(self, event)

    @property
    def outcome(self) -> Outcome | None:
        """This attempt's outcome: what its branches are told (phase 2, inquiries)."""
        if self.state in (TxnState.COMMITTING, TxnState.COMMITTED):
            return Outcome.COMMITTED
        if self.state is TxnState.ABORTED:
            return Outcome.ABORTED
        if self.state is TxnState.UNKNOWN:
            return Outcome.UNKNOWN
        return None

    @property
    def answer(self) -> Outcome | None:
        """The transaction's outcome, as its client is told: this attempt's, unless an
        earlier attempt committed it."""
        if self.committed_earlier and self.state is TxnState.ABORTED:
            return Outcome.COMMITTED
        return self.outcome

    # ---- helpers used by the handlers ----

    def _move(self, state: TxnState) -> None:
        self.state = state

    def _reply(self, outcome: Outcome, reason: str) -> list[Action]:
        if self.replied:
            return []
        self.replied = True
        return [Reply(outcome, reason)]

    def branch(self, index: int) -> BranchProgress:
        # Positional in a live transaction; a recovered one lists only its updating branches.
        if 0 <= index < len(self.branches) and self.branches[index].index == index:
            return self.branches[index]
        for branch in self.branches:
            if branch.index == index:
                return branch
        raise ProtocolError(f"transaction {self.transaction_id}: no branch {index}")

    def _abort(self, reason: str, now_ms: int, *, timed_out: bool = False) -> list[Action]:
        """Decide abort (only ever from PREPARING). Rollback every branch that may have prepared.

        Presumed abort: nothing is logged. Rollbacks are delivered best-effort (a bounded number
        of tries); a participant that misses them asks the coordinator, which answers ABORTED
        for any transaction it has no commit record of. The client is answered, and the
        transaction finished, once no Prepare is out any more (at once at the deadline): a vote
        still out may show that an earlier attempt committed the transaction. A late retry
        was told ABORTED when a participant was down, or when one that had forgotten the
        commit refused (out of stock: the earlier attempt took it), before the others' votes.
        """
        self.reason = reason
        self.decided_at_ms = now_ms
        actions: list[Action] = []
        for branch in self.branches:
            # A PREPARED vote, a failed call or no answer yet: it may hold a prepared state.
            if branch.vote in (None, Vote.PREPARED):
                branch.needs_phase_two = True
                actions.append(SendRollback(branch.index))
        self._move(TxnState.ABORTED)
        if timed_out or self.committed_earlier or not self._prepares_out():
            return [*actions, *self._answer_abort()]
        self.answer_pending = True
        return actions

    def _prepares_out(self) -> bool:
        return any(b.vote is None and not b.prepare_failed for b in self.branches)

    def _answer_abort(self) -> list[Action]:
        self.answer_pending = False
        answer = Outcome.COMMITTED if self.committed_earlier else Outcome.ABORTED
        held, self.held_heuristics = self.held_heuristics or [], None
        settled: list[Action] = []
        for report in held:
            settled += _on_heuristic_after_abort(self, report)
        return [*self._reply(answer, self.reason), *settled, Finished()]

    def _found_committed(self, branch: BranchProgress) -> None:
        """`branch`'s participant holds it committed: see `committed_earlier`. Only until the
        client is answered: an answer once given never changes (a retried Submit and the
        status say the same)."""
        if not self.committed_earlier and not self.replied:
            self.committed_earlier = branch.participant
            self.reason = (
                f"committed by an earlier attempt of this transaction ({branch.participant} "
                "holds its branch committed); this attempt rolled back what it prepared"
            )

    def _all_acknowledged(self) -> bool:
        return all(b.acknowledged for b in self.branches if b.needs_phase_two)


# ---- handlers: one per legal (state, event) pair ----


def _on_vote(txn: Transaction, event: VoteReceived) -> list[Action]:
    branch = txn.branch(event.branch)
    if branch.vote is not None:
        return []  # a duplicate answer changes nothing
    # An illegal vote changes nothing (the engine then counts it as a failed prepare): a
    # vote stored first would make that failure a no-op, and leave the transaction waiting
    # for an answer it already has (a one-phase one forever: it has no timeout).
    if txn.one_phase and event.vote is Vote.PREPARED:
        raise ProtocolError(f"{branch.participant} answered PREPARED to a one-phase prepare")
    _check_committed_earlier(txn, branch, event)
    branch.vote = event.vote
    branch.reason = event.reason
    if txn.one_phase:
        return _on_one_phase_vote(txn, event)
    if event.vote is Vote.COMMITTED:
        # Already committed, by an earlier attempt (a participant answers a repeated Prepare
        # of a committed branch so): this attempt must not decide anything of its own.
        txn._found_committed(branch)
        return txn._abort(txn.reason, event.now_ms)
    if event.vote is Vote.REFUSED:
        return txn._abort(_refusal(branch.participant, event.reason), event.now_ms)
    if any(b.vote is None for b in txn.branches):
        return []
    updating = tuple((b.index, b.participant) for b in txn.branches if b.vote is Vote.PREPARED)
    if not updating:
        # Every branch read-only: nothing to log, nothing to send in phase 2 (rule 8).
        txn._move(TxnState.COMMITTED)
        return [*txn._reply(Outcome.COMMITTED, "all branches read-only"), Finished()]
    for b in txn.branches:
        b.needs_phase_two = b.vote is Vote.PREPARED
    txn._move(TxnState.DECIDING)
    return [PersistDecision(updating)]


def _refusal(participant: str, reason: str) -> str:
    """Why a transaction a participant refused aborted. PrepareResponse.reason may be left
    empty: it read "p refused: ", which looked like a message cut short."""
    if reason.strip():
        return f"{participant} refused: {reason}"
    return f"{participant} refused (no reason given)"


def _on_one_phase_vote(txn: Transaction, event: VoteReceived) -> list[Action]:
    if event.vote in (Vote.COMMITTED, Vote.READ_ONLY):
        txn._move(TxnState.COMMITTED)
        return [*txn._reply(Outcome.COMMITTED, ""), Finished()]
    if event.vote is Vote.REFUSED:
        txn._move(TxnState.ABORTED)
        reason = _refusal(txn.branches[0].participant, event.reason)
        txn.reason = reason
        return [*txn._reply(Outcome.ABORTED, reason), Finished()]
    raise AssertionError(f"one-phase vote {event.vote.value} passed _on_vote's check")


def _on_prepare_failed(txn: Transaction, event: PrepareFailed) -> list[Action]:
    branch = txn.branch(event.branch)
    if branch.vote is not None:
        return []
    branch.reason = event.reason
    branch.prepare_failed = True
    if txn.one_phase and event.not_reached:
        # Refused before any branch was touched, and never sent again: nothing committed, and
        # nothing is left to roll back or to ask about.
        txn.reason = event.reason
        txn.decided_at_ms = event.now_ms
        txn._move(TxnState.ABORTED)
        return [*txn._reply(Outcome.ABORTED, txn.reason), Finished()]
    if txn.one_phase:
        # The participant may have committed: never guess (rule 9). Ask it.
        branch.last_error = event.reason
        # An answer outside the contract was not lost: say whose error it was.
        answer = "unusable" if event.protocol_error else "lost"
        txn.reason = f"one-phase answer {answer}: {event.reason}"
        txn._move(TxnState.UNKNOWN)
        return [ProbeOnePhase(branch.index)]
    return txn._abort(f"{branch.participant} failed to prepare: {event.reason}", event.now_ms)


def _on_timeout(txn: Transaction, event: TimedOut) -> list[Action]:
    if event.now_ms < txn.deadline_ms and not event.stopping:
        return []
    if txn.one_phase:
        return []  # the single Prepare's own deadline reports the failure
    waiting = ", ".join(b.participant for b in txn.branches if b.vote is None) or "nobody"
    if event.stopping:
        within = "the coordinator's grace period as it stopped"
    else:
        within = f"{txn.deadline_ms - txn.created_at_ms} ms"
    reason = f"transaction timeout: no vote from {waiting} within {within}"
    return txn._abort(reason, event.now_ms, timed_out=True)


def _ignore(txn: Transaction, event: Event) -> list[Action]:
    # Late votes, timers and duplicates after a decision: a decision never changes (rule 4).
    return []


def _on_decision_durable(txn: Transaction, event: DecisionDurable) -> list[Action]:
    txn.decided_at_ms = event.now_ms
    txn._move(TxnState.COMMITTING)
    commits: list[Action] = [SendCommit(b.index) for b in txn.branches if b.needs_phase_two]
    return [*commits, *txn._reply(Outcome.COMMITTED, "")]


def _on_commit_ack(txn: Transaction, event: PhaseTwoAcked) -> list[Action]:
    branch = txn.branch(event.branch)
    if not branch.needs_phase_two or branch.acknowledged:
        return []
    branch.acknowledged = True
    branch.last_error = ""
    if not txn._all_acknowledged():
        return []
    txn._move(TxnState.COMMITTED)
    return [PersistEnd(), Finished()]


def _on_commit_failed(txn: Transaction, event: PhaseTwoFailed) -> list[Action]:
    # A commit decision is never lost: retried until acknowledged, forever (rule 13).
    branch = txn.branch(event.branch)
    if not branch.needs_phase_two or branch.acknowledged:
        return []
    branch.phase_two_attempts += 1
    branch.last_error = event.error
    return [RetryPhaseTwo(branch.index, branch.phase_two_attempts)]


def _check_committed_earlier(txn: Transaction, branch: BranchProgress, event: VoteReceived) -> None:
    if not txn.one_phase and event.vote is Vote.COMMITTED and not event.earlier:
        # A participant that committed on a two-phase Prepare on its own: taken for an earlier
        # attempt's commit, it would have the client told COMMITTED while the others roll back.
        raise ProtocolError(
            f"{branch.participant} answered COMMITTED to a two-phase prepare without saying "
            "an earlier attempt committed it"
        )


def _on_vote_after_abort(txn: Transaction, event: VoteReceived) -> list[Action]:
    # The decision stands (rule 4: its Rollback already went to this branch). What the vote
    # tells is whether the client's answer, if it still waits, is that of an earlier attempt.
    branch = txn.branch(event.branch)
    if branch.vote is not None or branch.prepare_failed or txn.one_phase:
        return []
    _check_committed_earlier(txn, branch, event)
    branch.vote = event.vote
    branch.reason = event.reason
    if event.vote is Vote.COMMITTED:
        txn._found_committed(branch)
    return _answer_when_no_prepare_is_out(txn)


def _on_prepare_failed_after_abort(txn: Transaction, event: PrepareFailed) -> list[Action]:
    branch = txn.branch(event.branch)
    if branch.vote is not None or branch.prepare_failed:
        return []
    branch.prepare_failed = True
    branch.reason = event.reason
    return _answer_when_no_prepare_is_out(txn)


def _on_timeout_after_abort(txn: Transaction, event: TimedOut) -> list[Action]:
    if not txn.answer_pending or (event.now_ms < txn.deadline_ms and not event.stopping):
        return []
    return txn._answer_abort()  # a Prepare still out: the deadline bounds the wait for it


def _answer_when_no_prepare_is_out(txn: Transaction) -> list[Action]:
    if txn.answer_pending and (txn.committed_earlier or not txn._prepares_out()):
        return txn._answer_abort()
    return []


def _on_heuristic_after_abort(txn: Transaction, event: HeuristicReported) -> list[Action]:
    if event.outcome == HEURISTIC_COMMIT and not event.forced and txn.answer_pending:
        # Its Rollback overtook its Prepare (a unary call, or decisions applied first in an
        # Exchange): the COMMITTED vote that says whether this is an earlier commit may follow.
        txn.held_heuristics = [*(txn.held_heuristics or []), event]
        return []
    if event.outcome != HEURISTIC_COMMIT or event.forced or not txn.committed_earlier:
        return _on_heuristic(txn, event)
    # A Rollback answered "already committed" by the branch's own record, in an attempt a
    # participant said an earlier one committed: that commit, not a heuristic outcome (a
    # participant that was down when this attempt prepared, and remembers). Without that
    # vote, the same answer stays a heuristic commit: a participant may not name a heuristic
    # it was forced to, and only its vote says that an earlier attempt committed.
    branch = txn.branch(event.branch)
    branch.acknowledged = True
    branch.last_error = ""
    return []


def _on_rollback_ack(txn: Transaction, event: PhaseTwoAcked) -> list[Action]:
    branch = txn.branch(event.branch)
    branch.acknowledged = True
    branch.last_error = ""
    return []


def _on_rollback_failed(txn: Transaction, event: PhaseTwoFailed) -> list[Action]:
    # Best-effort: a few tries, then the participant's own inquiry (presumed abort) takes over.
    branch = txn.branch(event.branch)
    if branch.acknowledged:
        return []
    branch.phase_two_attempts += 1
    branch.last_error = event.error
    if branch.phase_two_attempts >= ROLLBACK_ATTEMPTS_MAX:
        return []
    return [RetryPhaseTwo(branch.index, branch.phase_two_attempts)]


def _on_one_phase_resolved(txn: Transaction, event: OnePhaseResolved) -> list[Action]:
    branch = txn.branches[0]
    branch.acknowledged = True
    if event.committed:
        branch.vote = Vote.COMMITTED
        txn.reason = ""
        txn._move(TxnState.COMMITTED)
        return [*txn._reply(Outcome.COMMITTED, ""), Finished()]
    txn.reason = event.reason or txn.reason
    txn._move(TxnState.ABORTED)
    return [*txn._reply(Outcome.ABORTED, txn.reason), Finished()]


def _on_one_phase_probe_failed(txn: Transaction, event: PhaseTwoFailed) -> list[Action]:
    # The probe could not reach the participant either: the client hears UNKNOWN, we keep asking.
    branch = txn.branches[0]
    branch.phase_two_attempts += 1
    branch.last_error = event.error
    return [
        *txn._reply(Outcome.UNKNOWN, f"{txn.reason}; outcome not yet known, retry later"),
        RetryPhaseTwo(0, branch.phase_two_attempts),
    ]


def _on_one_phase_unlearnable(txn: Transaction, event: HeuristicReported) -> list[Action]:
    # The participant that ran the one-phase Prepare can no longer be asked: its log was
    # replaced (another incarnation took its name, by an operator's override), and the
    # replacement's answer to the probe would say nothing about what the lost log did. The
    # outcome stays unknown for good: recorded (a heuristic hazard, for an operator to
    # reconcile), the client's answer stays UNKNOWN, and nothing more is asked.
    branch = txn.branch(event.branch)
    branch.heuristic = event.outcome
    branch.acknowledged = True
    branch.last_error = event.detail or branch.last_error
    if event.detail:
        txn.reason = f"{txn.reason}; {event.detail}"
    return [
        PersistHeuristic(branch.index, event.outcome, event.detail),
        *txn._reply(Outcome.UNKNOWN, txn.reason),
        Finished(),
    ]


def _on_heuristic(txn: Transaction, event: HeuristicReported) -> list[Action]:
    # Phase 2 cannot change this branch (forced by an operator, or contradicted by the
    # participant's record): stop retrying, and make the outcome visible in the transaction's
    # status and in the log (rule 17: never silent).
    branch = txn.branch(event.branch)
    if branch.heuristic == event.outcome:
        return []
    branch.heuristic = event.outcome
    branch.last_error = event.detail or branch.last_error
    actions: list[Action] = [
        PersistHeuristic(branch.index, event.outcome, event.detail, event.found_by_inquiry)
    ]
    if txn.state is TxnState.COMMITTING and not branch.acknowledged:
        branch.acknowledged = True
        if txn._all_acknowledged():
            txn._move(TxnState.COMMITTED)
            actions += [PersistEnd(), Finished()]
    else:
        branch.acknowledged = True
    return actions


Handler: TypeAlias = Callable[[Transaction, "Event"], list[Action]]

S = TxnState
TRANSITIONS: dict[tuple[TxnState, type], Handler] = {
    (S.PREPARING, VoteReceived): _on_vote,  # type: ignore[dict-item]
    (S.PREPARING, PrepareFailed): _on_prepare_failed,  # type: ignore[dict-item]
    (S.PREPARING, TimedOut): _on_timeout,  # type: ignore[dict-item]
    (S.DECIDING, DecisionDurable): _on_decision_durable,  # type: ignore[dict-item]
    (S.DECIDING, VoteReceived): _ignore,
    (S.DECIDING, PrepareFailed): _ignore,
    (S.DECIDING, TimedOut): _ignore,
    (S.COMMITTING, PhaseTwoAcked): _on_commit_ack,  # type: ignore[dict-item]
    (S.COMMITTING, PhaseTwoFailed): _on_commit_failed,  # type: ignore[dict-item]
    (S.COMMITTING, VoteReceived): _ignore,
    (S.COMMITTING, PrepareFailed): _ignore,
    (S.COMMITTING, TimedOut): _ignore,
    (S.COMMITTING, HeuristicReported): _on_heuristic,  # type: ignore[dict-item]
    (S.COMMITTED, PhaseTwoAcked): _ignore,
    (S.COMMITTED, PhaseTwoFailed): _ignore,
    (S.COMMITTED, VoteReceived): _ignore,
    (S.COMMITTED, PrepareFailed): _ignore,
    (S.COMMITTED, TimedOut): _ignore,
    (S.COMMITTED, HeuristicReported): _on_heuristic,  # type: ignore[dict-item]
    (S.ABORTED, PhaseTwoAcked): _on_rollback_ack,  # type: ignore[dict-item]
    (S.ABORTED, PhaseTwoFailed): _on_rollback_failed,  # type: ignore[dict-item]
    (S.ABORTED, VoteReceived): _on_vote_after_abort,  # type: ignore[dict-item]
    (S.ABORTED, PrepareFailed): _on_prepare_failed_after_abort,  # type: ignore[dict-item]
    (S.ABORTED, TimedOut): _on_timeout_after_abort,  # type: ignore[dict-item]
    (S.ABORTED, HeuristicReported): _on_heuristic_after_abort,  # type: ignore[dict-item]
    (S.UNKNOWN, OnePhaseResolved): _on_one_phase_resolved,  # type: ignore[dict-item]
    (S.UNKNOWN, PhaseTwoFailed): _on_one_phase_probe_failed,  # type: ignore[dict-item]
    (S.UNKNOWN, HeuristicReported): _on_one_phase_unlearnable,  # type: ignore[dict-item]
    (S.UNKNOWN, VoteReceived): _ignore,
    (S.UNKNOWN, TimedOut): _ignore,
}
