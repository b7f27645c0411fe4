"""Both state tables, exhaustively: every legal (state, event) pair reaches the expected state,
and every pair missing from a table is refused without changing anything."""

from __future__ import annotations

import itertools
import typing

import pytest

from dtm.core import branch as bcore
from dtm.core import transaction as tcore
from dtm.core.branch import Branch, BranchProtocolError, BranchState, BranchVote
from dtm.core.transaction import ProtocolError, Transaction, TxnState, Vote

# ---- the coordinator's transaction table ----


def txn_in(state: TxnState) -> Transaction:
    """A two-branch transaction driven into `state` through legal events only."""
    one_phase = state is TxnState.UNKNOWN
    txn, _ = Transaction.begin(
        "t", ["a"] if one_phase else ["a", "b"], now_ms=0, timeout_ms=1_000, one_phase_capable=True
    )
    if state is TxnState.UNKNOWN:
        txn.handle(tcore.PrepareFailed(0, "deadline"))
    elif state is TxnState.ABORTED:
        txn.handle(tcore.VoteReceived(0, Vote.REFUSED, "no"))
    elif state is not TxnState.PREPARING:
        txn.handle(tcore.VoteReceived(0, Vote.PREPARED))
        txn.handle(tcore.VoteReceived(1, Vote.PREPARED))
        if state is not TxnState.DECIDING:
            txn.handle(tcore.DecisionDurable(10))
        if state is TxnState.COMMITTED:
            txn.handle(tcore.PhaseTwoAcked(0))
            txn.handle(tcore.PhaseTwoAcked(1))
    assert state == txn.state
    return txn


TXN_EVENTS: dict[type, tcore.Event] = {
    tcore.VoteReceived: tcore.VoteReceived(0, Vote.PREPARED),
    tcore.PrepareFailed: tcore.PrepareFailed(0, "unavailable"),
    tcore.TimedOut: tcore.TimedOut(10**9),
    tcore.DecisionDurable: tcore.DecisionDurable(20),
    tcore.PhaseTwoAcked: tcore.PhaseTwoAcked(0),
    tcore.PhaseTwoFailed: tcore.PhaseTwoFailed(0, "unavailable"),
    tcore.OnePhaseResolved: tcore.OnePhaseResolved(committed=True),
    tcore.HeuristicReported: tcore.HeuristicReported(0, "heuristic rollback"),
}

T = TxnState
# (state, event) -> the state that event leads to, from the fixtures above.
TXN_EXPECTED: dict[tuple[TxnState, type], TxnState] = {
    (T.PREPARING, tcore.VoteReceived): T.PREPARING,  # one of two votes
    (T.PREPARING, tcore.PrepareFailed): T.ABORTED,
    (T.PREPARING, tcore.TimedOut): T.ABORTED,
    (T.DECIDING, tcore.DecisionDurable): T.COMMITTING,
    (T.DECIDING, tcore.VoteReceived): T.DECIDING,
    (T.DECIDING, tcore.PrepareFailed): T.DECIDING,
    (T.DECIDING, tcore.TimedOut): T.DECIDING,
    (T.COMMITTING, tcore.PhaseTwoAcked): T.COMMITTING,  # one of two acks
    (T.COMMITTING, tcore.PhaseTwoFailed): T.COMMITTING,
    (T.COMMITTING, tcore.VoteReceived): T.COMMITTING,
    (T.COMMITTING, tcore.PrepareFailed): T.COMMITTING,
    (T.COMMITTING, tcore.TimedOut): T.COMMITTING,
    (T.COMMITTING, tcore.HeuristicReported): T.COMMITTING,  # branch 1 still owes its ack
    (T.COMMITTED, tcore.PhaseTwoAcked): T.COMMITTED,
    (T.COMMITTED, tcore.PhaseTwoFailed): T.COMMITTED,
    (T.COMMITTED, tcore.VoteReceived): T.COMMITTED,
    (T.COMMITTED, tcore.PrepareFailed): T.COMMITTED,
    (T.COMMITTED, tcore.TimedOut): T.COMMITTED,
    (T.COMMITTED, tcore.HeuristicReported): T.COMMITTED,
    (T.ABORTED, tcore.PhaseTwoAcked): T.ABORTED,
    (T.ABORTED, tcore.PhaseTwoFailed): T.ABORTED,
    (T.ABORTED, tcore.VoteReceived): T.ABORTED,
    (T.ABORTED, tcore.PrepareFailed): T.ABORTED,
    (T.ABORTED, tcore.TimedOut): T.ABORTED,
    (T.ABORTED, tcore.HeuristicReported): T.ABORTED,
    (T.UNKNOWN, tcore.OnePhaseResolved): T.COMMITTED,
    (T.UNKNOWN, tcore.PhaseTwoFailed): T.UNKNOWN,
    (T.UNKNOWN, tcore.HeuristicReported): T.UNKNOWN,  # finished so: the outcome is unknown
    (T.UNKNOWN, tcore.VoteReceived): T.UNKNOWN,
    (T.UNKNOWN, tcore.TimedOut): T.UNKNOWN,
}


def test_the_expectations_cover_the_whole_transaction_table() -> None:
    assert set(tcore.TRANSITIONS) == set(TXN_EXPECTED)


@pytest.mark.parametrize(
    ("state", "event_type"), list(TXN_EXPECTED), ids=lambda x: getattr(x, "__name__", str(x))
)
def test_every_legal_transaction_transition(state: TxnState, event_type: type) -> None:
    txn = txn_in(state)
    txn.handle(TXN_EVENTS[event_type])
    assert TXN_EXPECTED[(state, event_type)] == txn.state


ILLEGAL_TXN = [
    (state, event_type)
    for state, event_type in itertools.product(TxnState, TXN_EVENTS)
    if (state, event_type) not in tcore.TRANSITIONS
]


@pytest.mark.parametrize(
    ("state", "event_type"), ILLEGAL_TXN, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_every_illegal_transaction_pair_is_refused(state: TxnState, event_type: type) -> None:
    txn = txn_in(state)
    before = (txn.state, [(b.vote, b.acknowledged, b.heuristic) for b in txn.branches])
    with pytest.raises(ProtocolError):
        txn.handle(TXN_EVENTS[event_type])
    assert before == (txn.state, [(b.vote, b.acknowledged, b.heuristic) for b in txn.branches])


# ---- the participant's branch table ----

B = BranchState
# The legal events that lead a new branch (PREPARING) into each state.
BRANCH_SETUP: dict[BranchState, list[bcore.BranchEvent]] = {
    B.PREPARING: [],
    B.PREPARED: [bcore.PrepareVoted(BranchVote.PREPARED)],
    B.COMMITTED: [bcore.PrepareVoted(BranchVote.PREPARED), bcore.CommitRequested()],
    B.ROLLED_BACK: [bcore.RollbackRequested()],
    B.REFUSED: [bcore.PrepareVoted(BranchVote.REFUSED, "no")],
    B.READ_ONLY: [bcore.PrepareVoted(BranchVote.READ_ONLY)],
}


def branch_in(state: BranchState) -> Branch:
    branch, _ = Branch.on_first_message("t", 0, bcore.PrepareRequested(one_phase=False))
    assert branch is not None
    for event in BRANCH_SETUP[state]:
        branch.handle(event)
    assert state == branch.state
    return branch


BRANCH_EVENTS: dict[type, bcore.BranchEvent] = {
    bcore.PrepareRequested: bcore.PrepareRequested(one_phase=False),
    bcore.PrepareVoted: bcore.PrepareVoted(BranchVote.PREPARED),
    bcore.CommitRequested: bcore.CommitRequested(),
    bcore.RollbackRequested: bcore.RollbackRequested(),
    bcore.LeaseExpired: bcore.LeaseExpired(),
    bcore.OutcomeLearned: bcore.OutcomeLearned(commit=True),
    bcore.HeuristicForced: bcore.HeuristicForced(commit=False),
}

BRANCH_EXPECTED: dict[tuple[BranchState, type], BranchState] = {
    (B.PREPARING, bcore.PrepareVoted): B.PREPARED,
    (B.PREPARING, bcore.PrepareRequested): B.PREPARING,  # a duplicate waits for the first
    (B.PREPARING, bcore.RollbackRequested): B.ROLLED_BACK,
    (B.PREPARING, bcore.CommitRequested): B.PREPARING,  # refused: not prepared
    (B.PREPARING, bcore.LeaseExpired): B.ROLLED_BACK,
    (B.PREPARING, bcore.OutcomeLearned): B.PREPARING,  # an earlier life's answer: ignored
    (B.PREPARED, bcore.PrepareRequested): B.PREPARED,
    (B.PREPARED, bcore.CommitRequested): B.COMMITTED,
    (B.PREPARED, bcore.RollbackRequested): B.ROLLED_BACK,
    (B.PREPARED, bcore.LeaseExpired): B.PREPARED,  # asks; never decides alone
    (B.PREPARED, bcore.OutcomeLearned): B.COMMITTED,
    (B.PREPARED, bcore.HeuristicForced): B.ROLLED_BACK,
    (B.COMMITTED, bcore.PrepareRequested): B.COMMITTED,
    (B.COMMITTED, bcore.CommitRequested): B.COMMITTED,
    (B.COMMITTED, bcore.RollbackRequested): B.COMMITTED,  # refused: already committed
    (B.COMMITTED, bcore.LeaseExpired): B.COMMITTED,
    (B.COMMITTED, bcore.OutcomeLearned): B.COMMITTED,
    (B.ROLLED_BACK, bcore.PrepareRequested): B.ROLLED_BACK,  # the tombstone refuses it
    (B.ROLLED_BACK, bcore.PrepareVoted): B.ROLLED_BACK,
    (B.ROLLED_BACK, bcore.CommitRequested): B.ROLLED_BACK,  # refused
    (B.ROLLED_BACK, bcore.RollbackRequested): B.ROLLED_BACK,
    (B.ROLLED_BACK, bcore.LeaseExpired): B.ROLLED_BACK,
    (B.ROLLED_BACK, bcore.OutcomeLearned): B.ROLLED_BACK,
    (B.REFUSED, bcore.PrepareRequested): B.REFUSED,
    (B.REFUSED, bcore.RollbackRequested): B.REFUSED,
    (B.REFUSED, bcore.CommitRequested): B.REFUSED,  # refused
    (B.REFUSED, bcore.LeaseExpired): B.REFUSED,
    (B.REFUSED, bcore.OutcomeLearned): B.REFUSED,
    (B.READ_ONLY, bcore.PrepareRequested): B.READ_ONLY,
    (B.READ_ONLY, bcore.RollbackRequested): B.READ_ONLY,
    (B.READ_ONLY, bcore.CommitRequested): B.READ_ONLY,
    (B.READ_ONLY, bcore.LeaseExpired): B.READ_ONLY,
    (B.READ_ONLY, bcore.OutcomeLearned): B.READ_ONLY,
}


def test_the_expectations_cover_the_whole_branch_table() -> None:
    assert set(bcore.TRANSITIONS) == set(BRANCH_EXPECTED)


@pytest.mark.parametrize(
    ("state", "event_type"), list(BRANCH_EXPECTED), ids=lambda x: getattr(x, "__name__", str(x))
)
def test_every_legal_branch_transition(state: BranchState, event_type: type) -> None:
    branch = branch_in(state)
    branch.handle(BRANCH_EVENTS[event_type])
    assert BRANCH_EXPECTED[(state, event_type)] == branch.state


ILLEGAL_BRANCH = [
    (state, event_type)
    for state, event_type in itertools.product(BranchState, BRANCH_EVENTS)
    if (state, event_type) not in bcore.TRANSITIONS
]


@pytest.mark.parametrize(
    ("state", "event_type"), ILLEGAL_BRANCH, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_every_illegal_branch_pair_is_refused(state: BranchState, event_type: type) -> None:
    branch = branch_in(state)
    before = (branch.state, branch.vote, branch.reason, branch.heuristic)
    with pytest.raises(BranchProtocolError):
        branch.handle(BRANCH_EVENTS[event_type])
    assert before == (branch.state, branch.vote, branch.reason, branch.heuristic)


# ---- the I/O layers' action tables ----


def test_the_coordinator_engine_carries_out_every_action_the_core_can_return() -> None:
    from dtm.coordinator.engine import Engine

    assert set(typing.get_args(tcore.Action)) == set(Engine._effects)


def test_the_branch_engine_has_an_effect_for_every_action_but_the_replies() -> None:
    from participants.branches import BranchEngine

    replies = {
        bcore.RunPrepare,
        bcore.AwaitPrepare,
        bcore.ReplyVote,
        bcore.ReplyAck,
        bcore.ReplyError,
    }
    actions = set(typing.get_args(bcore.BranchAction))
    assert actions - replies == set(BranchEngine._effects)
    assert replies <= actions
