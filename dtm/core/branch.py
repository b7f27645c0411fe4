"""A participant's branch lifecycle: a pure state machine (no I/O, no clock).

A branch is one participant's share of one global transaction, keyed by (transaction id,
branch index). Every state change of a branch happens in `Branch.handle`, driven by the
`TRANSITIONS` table. A missing (state, event) pair is a protocol error and changes nothing.

The SDK carries out the returned actions in order. `Persist` records are appended to the log;
every `Reply` waits until the branch's forced records are durable (persist before you speak), so
a PREPARED vote or a commit acknowledgement never leaves before its record is on disk.

Rules held here (protocol.md): a participant may abort on its own only before it votes (lease
on an unvoted branch); once PREPARED it waits for the decision and asks the coordinator when it
has waited too long (rule 11); a Rollback before its Prepare leaves a tombstone so the late
Prepare is refused (rule 14); duplicates get the first answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias


class BranchState(Enum):
    PREPARING = "preparing"  # business logic running (possibly waiting for locks)
    PREPARED = "prepared"  # voted PREPARED: in doubt until the decision
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"  # voted REFUSED: nothing held
    READ_ONLY = "read_only"  # voted READ_ONLY: nothing held, nothing to do in phase 2


DECIDED_STATES = frozenset(
    {BranchState.COMMITTED, BranchState.ROLLED_BACK, BranchState.REFUSED, BranchState.READ_ONLY}
)


class BranchVote(Enum):
    PREPARED = "prepared"
    READ_ONLY = "read_only"
    REFUSED = "refused"
    COMMITTED = "committed"  # one-phase, or a repeated Prepare of a committed branch


# Heuristic outcomes (XA's HEURCOM, HEURRB, HEURHAZ): a branch that did not follow the
# decision, or whose outcome is unknown. Forced by an operator here (HeuristicForced); the
# coordinator also records them from a participant's contradicting answer (dtm.coordinator.ports).
HEURISTIC_COMMIT = "heuristic commit"
HEURISTIC_ROLLBACK = "heuristic rollback"
HEURISTIC_HAZARD = "heuristic hazard"
HEURISTIC_OUTCOMES = frozenset({HEURISTIC_COMMIT, HEURISTIC_ROLLBACK, HEURISTIC_HAZARD})


class ErrorKind(Enum):
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    # The branch was forced by an operator and the decision that arrives disagrees with it.
    HEURISTIC = "heuristic"


class BranchProtocolError(Exception):
    """An event that is not legal in the branch's current state."""


# ---- events ----


@dataclass(frozen=True, slots=True)
class PrepareRequested:
    one_phase: bool


@dataclass(frozen=True, slots=True)
class PrepareVoted:
    """The service's business logic answered (after any lock waits)."""

    vote: BranchVote
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CommitRequested:
    pass


@dataclass(frozen=True, slots=True)
class RollbackRequested:
    pass


@dataclass(frozen=True, slots=True)
class LeaseExpired:
    """The branch held its locks past its lease (the SDK's timer fired)."""


@dataclass(frozen=True, slots=True)
class OutcomeLearned:
    """The coordinator answered an inquiry about a prepared branch."""

    commit: bool


@dataclass(frozen=True, slots=True)
class HeuristicForced:
    """An operator forced a prepared branch whose coordinator is gone for good."""

    commit: bool


BranchEvent: TypeAlias = (
    PrepareRequested
    | PrepareVoted
    | CommitRequested
    | RollbackRequested
    | LeaseExpired
    | OutcomeLearned
    | HeuristicForced
)

# ---- actions ----


class RecordKind(Enum):
    PREPARED = "prepared"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class RunPrepare:
    """Run the service's prepare (take locks, validate, tentatively apply)."""

    one_phase: bool


@dataclass(frozen=True, slots=True)
class AwaitPrepare:
    """A duplicate Prepare while the first is still running: answer with the first's answer."""


@dataclass(frozen=True, slots=True)
class CancelPrepare:
    """Stop a prepare still waiting for locks; release whatever it holds."""


@dataclass(frozen=True, slots=True)
class Persist:
    kind: RecordKind
    # Forced records must be durable before the next reply; lazy ones ride the next fsync.
    forced: bool
    heuristic: str = ""


@dataclass(frozen=True, slots=True)
class ApplyCommit:
    """Make the tentative effects permanent and release the branch's locks."""


@dataclass(frozen=True, slots=True)
class ApplyRollback:
    """Undo the tentative effects and release the branch's locks."""


@dataclass(frozen=True, slots=True)
class ReleaseLatePrepare:
    """A prepare ran on past its cancel and voted: give back what it took (its tentative
    effects, and any lock it was granted after the cancel released the branch's). The branch
    stays as it is: decided, recorded and kept when it was cancelled."""


@dataclass(frozen=True, slots=True)
class ReplyVote:
    vote: BranchVote
    reason: str


@dataclass(frozen=True, slots=True)
class ReplyAck:
    pass


@dataclass(frozen=True, slots=True)
class ReplyError:
    kind: ErrorKind
    message: str
    heuristic: str = ""


@dataclass(frozen=True, slots=True)
class AskCoordinator:
    """Prepared for too long: ask the coordinator for the outcome (and keep asking)."""


# The events and actions every branch goes through, built once: they are immutable, and a
# frozen dataclass sets each field through object.__setattr__, which made building them anew
# for each branch a measurable part of a participant's CPU per branch. By `one_phase`:
PREPARE_REQUESTED = (PrepareRequested(one_phase=False), PrepareRequested(one_phase=True))
RUN_PREPARE = (RunPrepare(one_phase=False), RunPrepare(one_phase=True))
PREPARE_VOTED = PrepareVoted(BranchVote.PREPARED)
_PERSIST_PREPARED = Persist(RecordKind.PREPARED, forced=True)
_PERSIST_COMMITTED = Persist(RecordKind.COMMITTED, forced=True)
_APPLY_COMMIT = ApplyCommit()
_REPLY_PREPARED = ReplyVote(BranchVote.PREPARED, "")
_REPLY_ACK = ReplyAck()

BranchAction: TypeAlias = (
    RunPrepare
    | AwaitPrepare
    | CancelPrepare
    | Persist
    | ApplyCommit
    | ApplyRollback
    | ReleaseLatePrepare
    | ReplyVote
    | ReplyAck
    | ReplyError
    | AskCoordinator
)


@dataclass(slots=True)
class Branch:
    transaction_id: str
    index: int
    state: BranchState
    # The first answer given to Prepare, returned to every duplicate.
    vote: BranchVote | None = None
    reason: str = ""
    one_phase: bool = False
    heuristic: str = ""

    @classmethod
    def on_first_message(
        cls, transaction_id: str, index: int, event: BranchEvent
    ) -> tuple[Branch | None, list[BranchAction]]:
        """A message for a branch this participant has never seen (or has forgotten)."""
        if isinstance(event, PrepareRequested):
            branch = cls(transaction_id, index, BranchState.PREPARING, one_phase=event.one_phase)
            return branch, [RUN_PREPARE[event.one_phase]]
        if isinstance(event, RollbackRequested):
            # Tombstone: a Prepare arriving later is refused, so no reservation can hang. Forced:
            # if it were lost in a crash, a late one-phase Prepare would commit a transaction
            # the client was told aborted (found by the simulator, seed 454 --stale-delivery).
            branch = cls(transaction_id, index, BranchState.ROLLED_BACK)
            branch.reason = "rolled back before prepare"
            return branch, [Persist(RecordKind.ROLLED_BACK, forced=True), ReplyAck()]
        if isinstance(event, CommitRequested):
            return None, [
                ReplyError(
                    ErrorKind.NOT_FOUND,
                    f"branch {transaction_id}/{index} is unknown here: it was never prepared",
                )
            ]
        raise BranchProtocolError(f"{type(event).__name__} for unknown branch")

    def handle(self, event: BranchEvent) -> list[BranchAction]:
        handler = TRANSITIONS.get((self.state, type(event)))
        if handler is None:
            raise BranchProtocolError(
                f"branch {self.transaction_id}/{self.index}: {type(event).__name__} is not "
                f"legal in state {self.state.value}"
            )
        return handler(self, event)

    @property
    def key(self) -> tuple[str, int]:
        return (self.transaction_id, self.index)


# ---- handlers ----


def _on_vote(branch: Branch, event: PrepareVoted) -> list[BranchAction]:
    branch.vote = event.vote
    branch.reason = event.reason
    if event.vote is BranchVote.PREPARED:
        if branch.one_phase:
            # Prepared and committed in one step: one forced record (the commit).
            branch.state = BranchState.COMMITTED
            branch.vote = BranchVote.COMMITTED
            return [
                Persist(RecordKind.COMMITTED, forced=True),
                ApplyCommit(),
                ReplyVote(BranchVote.COMMITTED, ""),
            ]
        branch.state = BranchState.PREPARED
        return [_PERSIST_PREPARED, _REPLY_PREPARED]
    if event.vote is BranchVote.READ_ONLY:
        branch.state = BranchState.READ_ONLY
        return [ApplyRollback(), ReplyVote(BranchVote.READ_ONLY, event.reason)]
    if event.vote is BranchVote.REFUSED:
        branch.state = BranchState.REFUSED
        # Recorded, so that after a restart the same Prepare gets the same answer instead of
        # running anew (and perhaps committing, stock having come back meanwhile). Forced for
        # a one-phase branch: its refusal is its transaction's abort, told to the client with
        # this answer. Lazy otherwise: presumed abort makes the coordinator's answer ABORTED
        # whatever this participant remembers, and the cost table has no write for a refusal.
        return [
            ApplyRollback(),
            Persist(RecordKind.ROLLED_BACK, forced=branch.one_phase),
            ReplyVote(BranchVote.REFUSED, event.reason),
        ]
    raise BranchProtocolError("a service votes PREPARED, READ_ONLY or REFUSED")


def _on_vote_after_rollback(branch: Branch, event: PrepareVoted) -> list[BranchAction]:
    # A Rollback (or the lease) overtook the prepare, whose cancel did not stop it: whatever
    # it took is given back, whichever its vote. Not ApplyRollback: that finishes the branch,
    # which its cancel did already (its record, its entry among the decided ones).
    return [ReleaseLatePrepare(), ReplyVote(BranchVote.REFUSED, branch.reason)]


def _on_duplicate_prepare_while_running(
    branch: Branch, event: PrepareRequested
) -> list[BranchAction]:
    return [AwaitPrepare()]


# A coordinator sends each Prepare once per attempt of a transaction, and a retried Submit
# joins the attempt it still runs. So a Prepare for a branch already PREPARED comes from a
# later attempt, started because the coordinator forgot the earlier one (it crashed before
# deciding: presumed abort). That earlier attempt may already be answered ABORTED, to this
# participant's inquiry among others, and the answer may still be on its way here: voting
# PREPARED again would let the new attempt commit on a branch about to be rolled back.
# Refused, the new attempt aborts (the outcome the first one has), and the branch waits for
# its own resolution. Nothing changes here, so a network duplicate of the first Prepare is
# harmless too: the coordinator counts only the first answer (rule 4).
EARLIER_ATTEMPT = (
    "this branch was prepared by an earlier attempt of the transaction, whose outcome is "
    "not known here yet (presumed abort); a new attempt cannot use its vote"
)


# A Prepare for a branch already COMMITTED comes from a later attempt too: the coordinator
# committed the transaction and then forgot it (its window of finished transactions is
# bounded), and the client retried. Voting PREPARED again would let that attempt abort on a
# failure elsewhere and tell its client ABORTED, a committed branch's Rollback answered as a
# heuristic commit. COMMITTED tells the coordinator the transaction is committed already.
COMMITTED_EARLIER = "committed by an earlier attempt of the transaction"


def _on_duplicate_prepare(branch: Branch, event: PrepareRequested) -> list[BranchAction]:
    if branch.state is BranchState.ROLLED_BACK:
        return [ReplyVote(BranchVote.REFUSED, branch.reason or "branch already rolled back")]
    if branch.state is BranchState.PREPARED:
        return [ReplyVote(BranchVote.REFUSED, EARLIER_ATTEMPT)]
    if (
        branch.state is BranchState.COMMITTED
        and branch.vote is BranchVote.PREPARED
        and not branch.heuristic  # forced by an operator: no decision is known
    ):
        return [ReplyVote(BranchVote.COMMITTED, COMMITTED_EARLIER)]
    assert branch.vote is not None
    return [ReplyVote(branch.vote, branch.reason)]


def _commit(branch: Branch, heuristic: str) -> list[BranchAction]:
    branch.state = BranchState.COMMITTED
    branch.heuristic = heuristic
    persist = Persist(RecordKind.COMMITTED, True, heuristic) if heuristic else _PERSIST_COMMITTED
    return [persist, _APPLY_COMMIT]


def _rollback(branch: Branch, heuristic: str, reason: str) -> list[BranchAction]:
    branch.state = BranchState.ROLLED_BACK
    branch.heuristic = heuristic
    branch.reason = reason
    # Presumed abort: the rollback record need not be forced (a lost one is re-asked and
    # answered "aborted"), unless it is a heuristic decision, which must never be forgotten.
    return [
        Persist(RecordKind.ROLLED_BACK, forced=bool(heuristic), heuristic=heuristic),
        ApplyRollback(),
    ]


def _on_commit(branch: Branch, event: CommitRequested) -> list[BranchAction]:
    return [*_commit(branch, ""), _REPLY_ACK]


def _on_rollback_prepared(branch: Branch, event: RollbackRequested) -> list[BranchAction]:
    return [*_rollback(branch, "", "rolled back by the coordinator"), ReplyAck()]


def _on_rollback_preparing(branch: Branch, event: RollbackRequested) -> list[BranchAction]:
    branch.state = BranchState.ROLLED_BACK
    branch.reason = "rolled back while preparing"
    # Forced, like a tombstone: the prepare it cancelled must stay refused after a crash.
    return [CancelPrepare(), Persist(RecordKind.ROLLED_BACK, forced=True), ReplyAck()]


def _ack(branch: Branch, event: BranchEvent) -> list[BranchAction]:
    return [ReplyAck()]


def _conflict(branch: Branch, message: str) -> list[BranchAction]:
    if branch.heuristic:
        # XA's HEURRB/HEURCOM: the coordinator must hear that an operator decided otherwise.
        return [
            ReplyError(ErrorKind.HEURISTIC, f"{message} ({branch.heuristic})", branch.heuristic)
        ]
    return [ReplyError(ErrorKind.FAILED_PRECONDITION, message)]


def _on_rollback_read_only(branch: Branch, event: RollbackRequested) -> list[BranchAction]:
    if branch.one_phase:
        # A one-phase read-only branch is its transaction's whole outcome, and that outcome is
        # committed (rule 8). A Rollback here is the coordinator probing a lost answer:
        # acknowledging it would report the transaction ABORTED.
        return _conflict(
            branch,
            f"branch {branch.transaction_id}/{branch.index} already completed (read-only, "
            "in one phase): nothing to roll back",
        )
    return [ReplyAck()]


def _already_committed(branch: Branch, event: BranchEvent) -> list[BranchAction]:
    return _conflict(branch, f"branch {branch.transaction_id}/{branch.index} is already committed")


def _already_rolled_back(branch: Branch, event: BranchEvent) -> list[BranchAction]:
    return _conflict(
        branch,
        f"branch {branch.transaction_id}/{branch.index} is already rolled back "
        f"({branch.reason or 'no reason recorded'}); it cannot commit",
    )


def _not_prepared_yet(branch: Branch, event: BranchEvent) -> list[BranchAction]:
    # Only a coordinator that broke rule 2 sends this; the prepare goes on, unchanged.
    return [
        ReplyError(
            ErrorKind.FAILED_PRECONDITION,
            f"branch {branch.transaction_id}/{branch.index} is still preparing (it has not "
            "voted); it cannot commit",
        )
    ]


def _on_lease_unvoted(branch: Branch, event: LeaseExpired) -> list[BranchAction]:
    # Allowed only before the vote: reclaim the locks; the late Prepare answer is REFUSED.
    branch.state = BranchState.ROLLED_BACK
    branch.reason = "lease expired before the vote"
    return [CancelPrepare(), Persist(RecordKind.ROLLED_BACK, forced=True)]


def _on_lease_prepared(branch: Branch, event: LeaseExpired) -> list[BranchAction]:
    return [AskCoordinator()]  # never decide alone (rule 11)


def _on_outcome(branch: Branch, event: OutcomeLearned) -> list[BranchAction]:
    if event.commit:
        return _commit(branch, "")
    return _rollback(branch, "", "aborted (learned from the coordinator)")


def _outcome_before_the_vote(branch: Branch, event: OutcomeLearned) -> list[BranchAction]:
    # Inquiries are only made about PREPARED branches, so the answer is about an earlier life
    # of this key: decided, dropped from the window of decided branches, and prepared again
    # (a late or retried Prepare) while the inquiry was in flight. Ignored, changing nothing
    # (not even the lease). A commit would apply a prepare that never voted, and may yet
    # refuse (rule 2); an abort would be safe (an unvoted branch may abort on its own) but
    # is another attempt's outcome: this prepare's vote and its own decision settle it.
    return []


def _on_heuristic(branch: Branch, event: HeuristicForced) -> list[BranchAction]:
    if event.commit:
        return _commit(branch, HEURISTIC_COMMIT)
    return _rollback(branch, HEURISTIC_ROLLBACK, "forced by an operator")


def _nothing(branch: Branch, event: BranchEvent) -> list[BranchAction]:
    return []


BranchHandler: TypeAlias = Callable[[Branch, "BranchEvent"], list[BranchAction]]

B = BranchState
TRANSITIONS: dict[tuple[BranchState, type], BranchHandler] = {
    (B.PREPARING, PrepareVoted): _on_vote,  # type: ignore[dict-item]
    (B.PREPARING, PrepareRequested): _on_duplicate_prepare_while_running,  # type: ignore[dict-item]
    (B.PREPARING, RollbackRequested): _on_rollback_preparing,  # type: ignore[dict-item]
    (B.PREPARING, CommitRequested): _not_prepared_yet,
    (B.PREPARING, LeaseExpired): _on_lease_unvoted,  # type: ignore[dict-item]
    (B.PREPARING, OutcomeLearned): _outcome_before_the_vote,  # type: ignore[dict-item]
    (B.PREPARED, PrepareRequested): _on_duplicate_prepare,  # type: ignore[dict-item]
    (B.PREPARED, CommitRequested): _on_commit,  # type: ignore[dict-item]
    (B.PREPARED, RollbackRequested): _on_rollback_prepared,  # type: ignore[dict-item]
    (B.PREPARED, LeaseExpired): _on_lease_prepared,  # type: ignore[dict-item]
    (B.PREPARED, OutcomeLearned): _on_outcome,  # type: ignore[dict-item]
    (B.PREPARED, HeuristicForced): _on_heuristic,  # type: ignore[dict-item]
    (B.COMMITTED, PrepareRequested): _on_duplicate_prepare,  # type: ignore[dict-item]
    (B.COMMITTED, CommitRequested): _ack,
    (B.COMMITTED, RollbackRequested): _already_committed,
    (B.COMMITTED, LeaseExpired): _nothing,
    (B.COMMITTED, OutcomeLearned): _nothing,
    (B.ROLLED_BACK, PrepareRequested): _on_duplicate_prepare,  # type: ignore[dict-item]
    (B.ROLLED_BACK, PrepareVoted): _on_vote_after_rollback,  # type: ignore[dict-item]
    (B.ROLLED_BACK, CommitRequested): _already_rolled_back,
    (B.ROLLED_BACK, RollbackRequested): _ack,
    (B.ROLLED_BACK, LeaseExpired): _nothing,
    (B.ROLLED_BACK, OutcomeLearned): _nothing,
    (B.REFUSED, PrepareRequested): _on_duplicate_prepare,  # type: ignore[dict-item]
    (B.REFUSED, RollbackRequested): _ack,
    (B.REFUSED, CommitRequested): _already_rolled_back,
    (B.REFUSED, LeaseExpired): _nothing,
    (B.REFUSED, OutcomeLearned): _nothing,  # an earlier life's answer, as for PREPARING
    (B.READ_ONLY, PrepareRequested): _on_duplicate_prepare,  # type: ignore[dict-item]
    (B.READ_ONLY, RollbackRequested): _on_rollback_read_only,  # type: ignore[dict-item]
    (B.READ_ONLY, CommitRequested): _ack,
    (B.READ_ONLY, LeaseExpired): _nothing,
    (B.READ_ONLY, OutcomeLearned): _nothing,  # likewise
}
