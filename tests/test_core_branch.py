"""The participant's pure branch core, transition by transition (no I/O)."""

from __future__ import annotations

import pytest

from dtm.core import branch as core
from dtm.core.branch import (
    TRANSITIONS,
    Branch,
    BranchProtocolError,
    BranchState,
    BranchVote,
    RecordKind,
)


def preparing(one_phase: bool = False) -> Branch:
    branch, actions = Branch.on_first_message("t1", 0, core.PrepareRequested(one_phase))
    assert branch is not None
    assert [core.RunPrepare(one_phase)] == actions
    return branch


def prepared() -> Branch:
    branch = preparing()
    branch.handle(core.PrepareVoted(BranchVote.PREPARED))
    return branch


def test_prepare_record_is_forced_before_the_prepared_vote() -> None:
    branch = preparing()
    actions = branch.handle(core.PrepareVoted(BranchVote.PREPARED))
    assert [
        core.Persist(RecordKind.PREPARED, forced=True),
        core.ReplyVote(BranchVote.PREPARED, ""),
    ] == actions
    assert BranchState.PREPARED == branch.state


@pytest.mark.parametrize("one_phase", [False, True])
def test_a_refusal_releases_and_is_recorded_forced_only_in_one_phase(one_phase: bool) -> None:
    """Recorded, so that a restarted participant answers the same Prepare the same way (before,
    it ran it anew, and a one-phase order refused for want of stock committed once stock came
    back). Forced in one phase, where the refusal is the transaction's abort; lazy otherwise,
    which keeps the cost table's "abort after a refusal" free of writes at the refuser."""
    branch = preparing(one_phase)
    actions = branch.handle(core.PrepareVoted(BranchVote.REFUSED, "out of stock"))
    assert [
        core.ApplyRollback(),
        core.Persist(RecordKind.ROLLED_BACK, forced=one_phase),
        core.ReplyVote(BranchVote.REFUSED, "out of stock"),
    ] == actions
    assert BranchState.REFUSED == branch.state


def test_a_commit_before_the_vote_is_refused_as_not_prepared_and_changes_nothing() -> None:
    """Before, the answer said the branch was "already rolled back" while it still prepared,
    and the coordinator reads that as a heuristic rollback."""
    branch = preparing()
    (error,) = branch.handle(core.CommitRequested())
    assert isinstance(error, core.ReplyError)
    assert core.ErrorKind.FAILED_PRECONDITION == error.kind
    assert "still preparing" in error.message and "rolled back" not in error.message
    assert BranchState.PREPARING == branch.state


def test_read_only_vote_needs_no_record() -> None:
    branch = preparing()
    actions = branch.handle(core.PrepareVoted(BranchVote.READ_ONLY))
    assert not any(isinstance(a, core.Persist) for a in actions)
    assert BranchState.READ_ONLY == branch.state


def test_one_phase_forces_a_single_commit_record() -> None:
    branch = preparing(one_phase=True)
    actions = branch.handle(core.PrepareVoted(BranchVote.PREPARED))
    assert [
        core.Persist(RecordKind.COMMITTED, forced=True),
        core.ApplyCommit(),
        core.ReplyVote(BranchVote.COMMITTED, ""),
    ] == actions


def test_commit_is_forced_and_idempotent() -> None:
    branch = prepared()
    actions = branch.handle(core.CommitRequested())
    assert [
        core.Persist(RecordKind.COMMITTED, forced=True),
        core.ApplyCommit(),
        core.ReplyAck(),
    ] == actions
    assert [core.ReplyAck()] == branch.handle(core.CommitRequested())


def test_rollback_is_lazy_and_idempotent() -> None:
    branch = prepared()
    actions = branch.handle(core.RollbackRequested())
    assert [
        core.Persist(RecordKind.ROLLED_BACK, forced=False),
        core.ApplyRollback(),
        core.ReplyAck(),
    ] == actions
    assert [core.ReplyAck()] == branch.handle(core.RollbackRequested())


def test_duplicate_prepare_while_running_gets_the_first_answer() -> None:
    running = preparing()
    assert [core.AwaitPrepare()] == running.handle(core.PrepareRequested(False))


def test_a_prepare_for_a_prepared_branch_is_refused_and_changes_nothing() -> None:
    """It comes from a later attempt, after the coordinator forgot the first (presumed
    abort): that attempt's ABORTED may be on its way here, so its vote cannot be reused."""
    branch = prepared()
    reply = branch.handle(core.PrepareRequested(False))
    assert [core.ReplyVote(BranchVote.REFUSED, core.EARLIER_ATTEMPT)] == reply
    assert BranchState.PREPARED == branch.state and BranchVote.PREPARED == branch.vote


def test_rollback_before_prepare_leaves_a_tombstone_that_refuses_the_late_prepare() -> None:
    branch, actions = Branch.on_first_message("t1", 0, core.RollbackRequested())
    assert branch is not None
    # Forced: a lost tombstone would let a late one-phase Prepare commit after a crash.
    assert [core.Persist(RecordKind.ROLLED_BACK, forced=True), core.ReplyAck()] == actions
    reply = branch.handle(core.PrepareRequested(False))
    assert 1 == len(reply)
    assert isinstance(reply[0], core.ReplyVote)
    assert BranchVote.REFUSED == reply[0].vote


def test_rollback_while_preparing_cancels_the_prepare() -> None:
    branch = preparing()
    actions = branch.handle(core.RollbackRequested())
    assert core.CancelPrepare() in actions
    assert BranchState.ROLLED_BACK == branch.state
    # If the service had already answered, its effects are undone and the vote is REFUSED;
    # the branch, finished by the cancel, is not finished again (no ApplyRollback).
    late = branch.handle(core.PrepareVoted(BranchVote.PREPARED))
    assert [core.ReleaseLatePrepare(), core.ReplyVote(BranchVote.REFUSED, branch.reason)] == late
    assert BranchState.ROLLED_BACK == branch.state


def test_commit_of_unknown_branch_is_not_found() -> None:
    branch, actions = Branch.on_first_message("t1", 0, core.CommitRequested())
    assert branch is None
    assert isinstance(actions[0], core.ReplyError)
    assert core.ErrorKind.NOT_FOUND == actions[0].kind


def test_conflicting_decisions_are_refused() -> None:
    committed = prepared()
    committed.handle(core.CommitRequested())
    (error,) = committed.handle(core.RollbackRequested())
    assert isinstance(error, core.ReplyError)
    assert core.ErrorKind.FAILED_PRECONDITION == error.kind
    rolled = prepared()
    rolled.handle(core.RollbackRequested())
    (error,) = rolled.handle(core.CommitRequested())
    assert isinstance(error, core.ReplyError)


def test_lease_before_the_vote_aborts_after_the_vote_only_asks() -> None:
    unvoted = preparing()
    actions = unvoted.handle(core.LeaseExpired())
    assert core.CancelPrepare() in actions
    assert BranchState.ROLLED_BACK == unvoted.state
    voted = prepared()
    assert [core.AskCoordinator()] == voted.handle(core.LeaseExpired())
    assert BranchState.PREPARED == voted.state  # never decides alone (rule 11)


def test_outcome_learned_applies_the_decision() -> None:
    branch = prepared()
    actions = branch.handle(core.OutcomeLearned(commit=True))
    assert core.ApplyCommit() in actions
    assert BranchState.COMMITTED == branch.state


@pytest.mark.parametrize("commit", [True, False])
def test_an_outcome_learned_before_the_vote_is_ignored(commit: bool) -> None:
    """An inquiry answer about an earlier life of the key (decided, dropped from the window
    of decided branches, prepared again while the inquiry was in flight) raised
    BranchProtocolError. Ignored: committing would apply a prepare that never voted, and
    aborting would take another attempt's outcome for this one's."""
    branch = preparing()
    assert [] == branch.handle(core.OutcomeLearned(commit))
    assert (BranchState.PREPARING, None, "") == (branch.state, branch.vote, branch.reason)
    # Its own vote still counts.
    assert core.ReplyVote(BranchVote.PREPARED, "") in branch.handle(
        core.PrepareVoted(BranchVote.PREPARED)
    )


def test_an_outcome_learned_is_legal_in_every_state() -> None:
    assert {state for state, event in TRANSITIONS if event is core.OutcomeLearned} == set(
        BranchState
    )


def test_a_prepare_for_a_committed_branch_says_an_earlier_attempt_committed_it() -> None:
    """It comes from a later attempt, after the coordinator forgot the committed one: PREPARED
    let that attempt abort on a failure elsewhere and tell its client ABORTED. A branch an
    operator forced, whose decision nobody knows, still answers its vote."""
    branch = prepared()
    branch.handle(core.CommitRequested())
    reply = branch.handle(core.PrepareRequested(False))
    assert [core.ReplyVote(BranchVote.COMMITTED, core.COMMITTED_EARLIER)] == reply
    assert (BranchState.COMMITTED, BranchVote.PREPARED) == (branch.state, branch.vote)
    forced = prepared()
    forced.handle(core.HeuristicForced(commit=True))
    assert [core.ReplyVote(BranchVote.PREPARED, "")] == forced.handle(core.PrepareRequested(False))
    one_phase = preparing(one_phase=True)
    one_phase.handle(core.PrepareVoted(BranchVote.PREPARED))
    assert [core.ReplyVote(BranchVote.COMMITTED, "")] == one_phase.handle(
        core.PrepareRequested(True)
    )


def test_heuristic_is_forced_and_recorded() -> None:
    branch = prepared()
    actions = branch.handle(core.HeuristicForced(commit=False))
    assert (
        core.Persist(RecordKind.ROLLED_BACK, forced=True, heuristic="heuristic rollback") in actions
    )
    assert "heuristic rollback" == branch.heuristic


ILLEGAL = [
    (BranchState.PREPARED, core.PrepareVoted(BranchVote.PREPARED)),
    (BranchState.COMMITTED, core.HeuristicForced(True)),
    (BranchState.REFUSED, core.HeuristicForced(True)),
    (BranchState.READ_ONLY, core.HeuristicForced(False)),
    (BranchState.PREPARING, core.HeuristicForced(True)),
]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_illegal_pairs_raise_and_change_nothing(
    state: BranchState, event: core.BranchEvent
) -> None:
    assert (state, type(event)) not in TRANSITIONS
    branch = Branch("t1", 0, state, BranchVote.PREPARED)
    with pytest.raises(BranchProtocolError):
        branch.handle(event)
    assert state == branch.state
