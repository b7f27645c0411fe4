"""The coordinator's pure transaction core, transition by transition (no I/O)."""

from __future__ import annotations

import pytest

from dtm.core import transaction as core
from dtm.core.branch import HEURISTIC_COMMIT, HEURISTIC_HAZARD, HEURISTIC_ROLLBACK
from dtm.core.transaction import (
    TRANSITIONS,
    Outcome,
    ProtocolError,
    Transaction,
    TxnState,
    Vote,
)


def begin(n: int = 2, one_phase_capable: bool = True) -> tuple[Transaction, list[core.Action]]:
    return Transaction.begin(
        "t1",
        [f"p{i}" for i in range(n)],
        now_ms=1_000,
        timeout_ms=5_000,
        one_phase_capable=one_phase_capable,
    )


def prepared_all(n: int = 2) -> Transaction:
    txn, _ = begin(n)
    for i in range(n):
        txn.handle(core.VoteReceived(i, Vote.PREPARED))
    return txn


def test_begin_sends_prepare_to_every_branch_in_parallel() -> None:
    txn, actions = begin(3)
    assert [
        core.SendPrepare(0, False),
        core.SendPrepare(1, False),
        core.SendPrepare(2, False),
    ] == actions
    assert TxnState.PREPARING == txn.state


def test_commit_is_decided_only_after_every_vote_and_logged_before_commit_messages() -> None:
    txn, _ = begin(2)
    assert [] == txn.handle(core.VoteReceived(0, Vote.PREPARED))
    assert TxnState.PREPARING == txn.state
    actions = txn.handle(core.VoteReceived(1, Vote.PREPARED))
    assert [core.PersistDecision(((0, "p0"), (1, "p1")))] == actions
    assert TxnState.DECIDING == txn.state
    # No Commit and no reply before the decision is durable (rules 3 and 15).
    actions = txn.handle(core.DecisionDurable(2_000))
    assert [
        core.SendCommit(0),
        core.SendCommit(1),
        core.Reply(Outcome.COMMITTED, ""),
    ] == actions
    assert TxnState.COMMITTING == txn.state


def test_all_acks_end_the_transaction_with_a_lazy_end_record() -> None:
    txn = prepared_all(2)
    txn.handle(core.DecisionDurable(2_000))
    assert [] == txn.handle(core.PhaseTwoAcked(0))
    assert [core.PersistEnd(), core.Finished()] == txn.handle(core.PhaseTwoAcked(1))
    assert TxnState.COMMITTED == txn.state


def test_commit_failure_is_retried_forever_with_attempts_recorded() -> None:
    txn = prepared_all(2)
    txn.handle(core.DecisionDurable(2_000))
    for attempt in range(1, 30):
        actions = txn.handle(core.PhaseTwoFailed(1, "unavailable"))
        assert [core.RetryPhaseTwo(1, attempt)] == actions
    assert 29 == txn.branches[1].phase_two_attempts
    assert "unavailable" == txn.branches[1].last_error
    assert TxnState.COMMITTING == txn.state


def test_refusal_aborts_without_logging_and_rolls_back_every_branch_that_may_have_prepared() -> (
    None
):
    txn, _ = begin(3)
    txn.handle(core.VoteReceived(0, Vote.PREPARED))
    actions = txn.handle(core.VoteReceived(1, Vote.REFUSED, "out of stock"))
    # Branch 0 voted PREPARED and branch 2 has not answered: both may hold a prepared state.
    assert [core.SendRollback(0), core.SendRollback(2)] == actions
    assert TxnState.ABORTED == txn.state
    # The client's answer waits for branch 2's vote: it could say an earlier attempt committed.
    late = txn.handle(core.VoteReceived(2, Vote.PREPARED))
    assert [core.Reply(Outcome.ABORTED, "p1 refused: out of stock"), core.Finished()] == late
    assert not any(isinstance(a, core.PersistDecision) for a in [*actions, *late])


def test_prepare_failure_aborts_and_rolls_back_the_failed_branch_too() -> None:
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.PREPARED))
    actions = txn.handle(core.PrepareFailed(1, "no answer within the 500 ms deadline"))
    assert core.SendRollback(1) in actions and core.SendRollback(0) in actions
    assert Outcome.ABORTED == txn.outcome


def test_global_timeout_aborts_only_while_undecided() -> None:
    txn, _ = begin(2)
    assert [] == txn.handle(core.TimedOut(5_999))  # early timer: nothing
    actions = txn.handle(core.TimedOut(6_000))
    assert core.Reply(Outcome.ABORTED, txn.reason) in actions
    assert "transaction timeout" in txn.reason

    decided = prepared_all(2)
    assert [] == decided.handle(core.TimedOut(10**9))
    assert TxnState.DECIDING == decided.state


def test_a_graceful_stop_aborts_a_transaction_still_collecting_votes_before_its_deadline() -> None:
    """The stop's grace ends the wait as the deadline would: the branch that voted is rolled
    back and the client answered, and the reason says the coordinator stopped."""
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.PREPARED, now_ms=1_010))
    actions = txn.handle(core.TimedOut(1_020, stopping=True))
    assert core.SendRollback(0) in actions and core.Reply(Outcome.ABORTED, txn.reason) in actions
    assert "no vote from p1 within the coordinator's grace" in txn.reason, txn.reason
    assert 1_020 == txn.decided_at_ms

    one_phase, _ = begin(1)  # its outcome is the participant's: never guessed
    assert [] == one_phase.handle(core.TimedOut(1_020, stopping=True))


def test_decision_never_changes_late_votes_are_ignored() -> None:
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.REFUSED, "no"))
    answered = txn.handle(core.VoteReceived(1, Vote.PREPARED))  # the last vote out
    assert [core.Reply(Outcome.ABORTED, "p0 refused: no"), core.Finished()] == answered
    assert [] == txn.handle(core.PrepareFailed(1, "late"))
    assert [] == txn.handle(core.VoteReceived(1, Vote.COMMITTED))
    assert (TxnState.ABORTED, Outcome.ABORTED) == (txn.state, txn.answer)

    committing = prepared_all(2)
    committing.handle(core.DecisionDurable(1))
    assert [] == committing.handle(core.VoteReceived(0, Vote.REFUSED, "too late"))
    assert TxnState.COMMITTING == committing.state


def test_a_branch_committed_by_an_earlier_attempt_makes_the_answer_committed() -> None:
    """A late retry of a transaction the coordinator forgot: a participant answers that its
    branch is committed already. The client is told COMMITTED; this attempt decides abort, so
    what it prepared (a participant that forgot the commit ran its branch again) rolls back,
    and an inquiry about it hears ABORTED."""
    txn, _ = begin(3)
    txn.handle(core.VoteReceived(0, Vote.PREPARED))
    earlier = core.VoteReceived(1, Vote.COMMITTED, "committed earlier", earlier=True)
    actions = txn.handle(earlier)
    assert "committed by an earlier attempt" in txn.reason
    assert [
        core.SendRollback(0),  # prepared by this attempt: again, by a participant that forgot
        core.SendRollback(2),  # still out
        core.Reply(Outcome.COMMITTED, txn.reason),
        core.Finished(),
    ] == actions
    assert (TxnState.ABORTED, Outcome.ABORTED, Outcome.COMMITTED) == (
        txn.state,
        txn.outcome,
        txn.answer,
    )
    assert Outcome.ABORTED == core.inquiry_answer(txn)


def test_committed_to_a_two_phase_prepare_must_say_an_earlier_attempt_committed() -> None:
    """A participant that commits on a two-phase Prepare on its own is not taken for an
    earlier commit: its client would be told COMMITTED while the other branches roll back."""
    txn, _ = begin(2)
    with pytest.raises(ProtocolError):
        txn.handle(core.VoteReceived(1, Vote.COMMITTED))
    assert txn.branches[1].vote is None
    actions = txn.handle(core.PrepareFailed(1, "protocol error"))  # what the engine feeds
    assert TxnState.ABORTED == txn.state and core.SendRollback(1) in actions


def test_an_abort_answers_once_no_prepare_is_out_or_at_the_deadline() -> None:
    """A participant down fails at once, one that forgot the earlier commit refuses (its
    stock went to it): the answer waits for the others' votes, which may say an earlier
    attempt committed the transaction, but never past the deadline."""
    for first in (core.PrepareFailed(0, "unavailable"), core.VoteReceived(0, Vote.REFUSED, "x")):
        txn, _ = begin(2)
        assert [core.SendRollback(1)] == [
            a for a in txn.handle(first) if not isinstance(a, core.SendRollback) or a.branch
        ]
        answered = txn.handle(core.VoteReceived(1, Vote.COMMITTED, "earlier", earlier=True))
        assert [core.Reply(Outcome.COMMITTED, txn.reason), core.Finished()] == answered

    plain, _ = begin(2)
    plain.handle(core.PrepareFailed(0, "unavailable"))
    answered = plain.handle(core.VoteReceived(1, Vote.PREPARED))
    assert [core.Reply(Outcome.ABORTED, plain.reason), core.Finished()] == answered

    slow, _ = begin(2)
    slow.handle(core.PrepareFailed(0, "unavailable"))
    assert [] == slow.handle(core.TimedOut(5_999))
    reason = "p0 failed to prepare: unavailable"
    assert [core.Reply(Outcome.ABORTED, reason), core.Finished()] == slow.handle(
        core.TimedOut(6_000)
    )


@pytest.mark.parametrize("how", ["deadline", "timeout"])
def test_an_answer_given_never_changes_when_a_committed_vote_comes_later(how: str) -> None:
    """The answer is the one a retried Submit and the status give afterwards too (rules 4,
    14): a COMMITTED vote after the client was told ABORTED changes nothing (a review found
    that it turned the status and every later answer to COMMITTED)."""
    txn, _ = begin(3)
    if how == "deadline":
        txn.handle(core.PrepareFailed(0, "unavailable"))
    else:
        txn.handle(core.VoteReceived(0, Vote.PREPARED))
    told = txn.handle(core.TimedOut(6_000))
    assert any(isinstance(a, core.Reply) and a.outcome is Outcome.ABORTED for a in told)
    txn.handle(core.VoteReceived(1, Vote.COMMITTED, "earlier", 6_001, earlier=True))
    assert (Outcome.ABORTED, "") == (txn.answer, txn.committed_earlier)


def test_a_rollback_answered_already_committed_in_an_earlier_commit_is_no_heuristic() -> None:
    """An abort sends its Rollbacks at once, also to branches whose Prepare is out, so a
    participant that remembers the commit may answer the Rollback "already committed"
    before its COMMITTED vote comes (unary calls; or in one Exchange, whose decisions are
    answered first). Held while the answer waits: that earlier commit if the vote comes
    (before, recorded as a heuristic commit), a heuristic commit if not. Forced by an
    operator, it is recorded at once."""
    contradicted = core.HeuristicReported(1, HEURISTIC_COMMIT, "branch t1/1 is already committed")
    txn, _ = begin(2)
    txn.handle(core.PrepareFailed(0, "unavailable"))
    assert [] == txn.handle(contradicted)
    answered = txn.handle(core.VoteReceived(1, Vote.COMMITTED, "earlier", earlier=True))
    assert [core.Reply(Outcome.COMMITTED, txn.reason), core.Finished()] == answered
    assert (True, "") == (txn.branches[1].acknowledged, txn.branches[1].heuristic)
    forced = core.HeuristicReported(0, HEURISTIC_COMMIT, "forced", forced=True)
    assert [core.PersistHeuristic(0, HEURISTIC_COMMIT, "forced")] == txn.handle(forced)

    plain, _ = begin(2)
    plain.handle(core.PrepareFailed(0, "unavailable"))
    assert [] == plain.handle(contradicted)
    answered = plain.handle(core.PrepareFailed(1, "unavailable"))
    persisted = core.PersistHeuristic(1, HEURISTIC_COMMIT, contradicted.detail)
    assert [core.Reply(Outcome.ABORTED, plain.reason), persisted, core.Finished()] == answered


def test_a_heuristic_reported_after_an_inquiry_stops_phase_two_and_is_recorded_once() -> None:
    """A participant reports a forced rollback it found by inquiry (Coordinator.
    ReportHeuristic) while the commit is still in phase 2: recorded as found by inquiry, the
    branch's phase 2 is over, and its Commit answered later with the same heuristic records
    nothing more."""
    txn = prepared_all(2)
    txn.handle(core.DecisionDurable(2_000))
    txn.handle(core.PhaseTwoAcked(1))
    report = core.HeuristicReported(
        0, HEURISTIC_ROLLBACK, "forced", forced=True, found_by_inquiry=True
    )
    assert [
        core.PersistHeuristic(0, HEURISTIC_ROLLBACK, "forced", found_by_inquiry=True),
        core.PersistEnd(),
        core.Finished(),
    ] == txn.handle(report)
    assert TxnState.COMMITTED is txn.state
    heard = core.HeuristicReported(0, HEURISTIC_ROLLBACK, "Commit answered", forced=True)
    assert [] == txn.handle(heard)


def test_duplicate_vote_changes_nothing() -> None:
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.PREPARED))
    assert [] == txn.handle(core.VoteReceived(0, Vote.REFUSED, "dup"))
    assert Vote.PREPARED == txn.branches[0].vote


def test_all_read_only_commits_without_log_or_phase_two() -> None:
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.READ_ONLY))
    actions = txn.handle(core.VoteReceived(1, Vote.READ_ONLY))
    assert [core.Reply(Outcome.COMMITTED, "all branches read-only"), core.Finished()] == actions
    assert TxnState.COMMITTED == txn.state


def test_read_only_branch_gets_no_phase_two() -> None:
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.READ_ONLY))
    assert [core.PersistDecision(((1, "p1"),))] == txn.handle(core.VoteReceived(1, Vote.PREPARED))
    actions = txn.handle(core.DecisionDurable(5))
    assert [core.SendCommit(1), core.Reply(Outcome.COMMITTED, "")] == actions


def test_single_participant_gets_one_phase_commit_with_no_log() -> None:
    txn, actions = begin(1)
    assert [core.SendPrepare(0, True)] == actions
    actions = txn.handle(core.VoteReceived(0, Vote.COMMITTED))
    assert [core.Reply(Outcome.COMMITTED, ""), core.Finished()] == actions


def test_single_participant_without_the_capability_gets_two_phases() -> None:
    txn, actions = begin(1, one_phase_capable=False)
    assert [core.SendPrepare(0, False)] == actions
    assert [core.PersistDecision(((0, "p0"),))] == txn.handle(core.VoteReceived(0, Vote.PREPARED))


def test_one_phase_lost_answer_is_unknown_then_resolved_never_guessed() -> None:
    txn, _ = begin(1)
    actions = txn.handle(core.PrepareFailed(0, "deadline"))
    assert [core.ProbeOnePhase(0)] == actions
    assert TxnState.UNKNOWN == txn.state
    # The probe fails too: the client hears UNKNOWN and the probe is retried.
    actions = txn.handle(core.PhaseTwoFailed(0, "unavailable"))
    assert isinstance(actions[0], core.Reply) and Outcome.UNKNOWN == actions[0].outcome
    assert core.RetryPhaseTwo(0, 1) == actions[1]
    assert [core.Finished()] == txn.handle(core.OnePhaseResolved(committed=True))
    assert TxnState.COMMITTED == txn.state


def test_one_phase_prepare_not_reached_aborts_at_once_and_probes_nothing() -> None:
    # Refused by the wrong participant before any branch was touched: nothing ran, so the
    # outcome is known (it was UNKNOWN, probed forever while the wrong participant answered).
    txn, _ = begin(1)
    reason = "not reached: the wrong participant answered (this is participant 'q', not 'p0')"
    actions = txn.handle(core.PrepareFailed(0, reason, 2_000, not_reached=True))
    assert [core.Reply(Outcome.ABORTED, reason), core.Finished()] == actions
    assert (TxnState.ABORTED, reason, 2_000) == (txn.state, txn.reason, txn.decided_at_ms)
    # Two-phase: aborted as any failed prepare is, with a Rollback to every branch.
    two, _ = begin(2)
    actions = two.handle(core.PrepareFailed(0, reason, 2_000, not_reached=True))
    assert TxnState.ABORTED == two.state
    assert [core.SendRollback(0), core.SendRollback(1)] == actions


def test_one_phase_outcome_that_cannot_be_learned_finishes_unknown_with_a_hazard() -> None:
    # The engine found the participant's log replaced: no probe can tell what the lost log did.
    txn, _ = begin(1)
    txn.handle(core.PrepareFailed(0, "deadline"))
    detail = "participant p0's log was replaced: the outcome is unknown"
    actions = txn.handle(core.HeuristicReported(0, HEURISTIC_HAZARD, detail))
    reason = f"one-phase answer lost: deadline; {detail}"
    assert [
        core.PersistHeuristic(0, HEURISTIC_HAZARD, detail),
        core.Reply(Outcome.UNKNOWN, reason),
        core.Finished(),
    ] == actions
    assert (TxnState.UNKNOWN, Outcome.UNKNOWN, reason) == (txn.state, txn.answer, txn.reason)
    assert (HEURISTIC_HAZARD, True) == (txn.branches[0].heuristic, txn.branches[0].acknowledged)
    # Already told UNKNOWN (a failed probe): no second answer, the hazard still recorded.
    told, _ = begin(1)
    told.handle(core.PrepareFailed(0, "deadline"))
    told.handle(core.PhaseTwoFailed(0, "unavailable"))
    actions = told.handle(core.HeuristicReported(0, HEURISTIC_HAZARD, detail))
    assert [core.PersistHeuristic(0, HEURISTIC_HAZARD, detail), core.Finished()] == actions


def test_one_phase_refusal_aborts() -> None:
    txn, _ = begin(1)
    actions = txn.handle(core.VoteReceived(0, Vote.REFUSED, "declined"))
    assert [core.Reply(Outcome.ABORTED, "p0 refused: declined"), core.Finished()] == actions


@pytest.mark.parametrize("reason", ["", "  "])
def test_a_refusal_without_a_reason_says_none_was_given(reason: str) -> None:
    # PrepareResponse.reason may be empty: the reason read "p0 refused: ", cut short it seemed.
    one, _ = begin(1)
    actions = one.handle(core.VoteReceived(0, Vote.REFUSED, reason))
    assert [core.Reply(Outcome.ABORTED, "p0 refused (no reason given)"), core.Finished()] == actions
    two, _ = begin(2)
    two.handle(core.VoteReceived(1, Vote.REFUSED, reason))
    answered = two.handle(core.VoteReceived(0, Vote.PREPARED))
    assert core.Reply(Outcome.ABORTED, "p1 refused (no reason given)") in answered
    assert "p1 refused (no reason given)" == two.reason


def test_rollback_is_best_effort_and_bounded() -> None:
    txn, _ = begin(2)
    txn.handle(core.VoteReceived(0, Vote.PREPARED))
    txn.handle(core.VoteReceived(1, Vote.REFUSED, "no"))
    retries = []
    for _ in range(20):
        retries += txn.handle(core.PhaseTwoFailed(0, "down"))
    assert core.ROLLBACK_ATTEMPTS_MAX - 1 == len(retries)
    assert [] == txn.handle(core.PhaseTwoAcked(0))
    assert txn.branches[0].acknowledged


def test_recovered_commit_resends_commit_to_every_updating_branch() -> None:
    txn, actions = Transaction.recovered_commit("t9", [(0, "a"), (2, "c")], decided_at_ms=7)
    assert [core.SendCommit(0), core.SendCommit(2)] == actions
    assert TxnState.COMMITTING == txn.state
    txn.handle(core.PhaseTwoAcked(0))
    assert [core.PersistEnd(), core.Finished()] == txn.handle(core.PhaseTwoAcked(2))


def test_recovered_commit_keeps_when_it_began_and_its_timeout() -> None:
    txn, _ = Transaction.recovered_commit(
        "t9", [(0, "a")], decided_at_ms=1_500, created_at_ms=1_000, timeout_ms=5_000
    )
    assert (1_000, 1_500, 6_000) == (txn.created_at_ms, txn.decided_at_ms, txn.deadline_ms)
    # A decision record written before those fields: begun when decided, no timeout.
    old, _ = Transaction.recovered_commit("t9", [(0, "a")], decided_at_ms=1_500)
    assert (1_500, 1_500, 1_500) == (old.created_at_ms, old.decided_at_ms, old.deadline_ms)


ILLEGAL = [
    (TxnState.PREPARING, core.DecisionDurable(1)),
    (TxnState.PREPARING, core.PhaseTwoAcked(0)),
    (TxnState.PREPARING, core.OnePhaseResolved(True)),
    (TxnState.DECIDING, core.PhaseTwoAcked(0)),
    (TxnState.COMMITTING, core.DecisionDurable(1)),
    (TxnState.COMMITTED, core.DecisionDurable(1)),
    (TxnState.ABORTED, core.DecisionDurable(1)),
    (TxnState.ABORTED, core.OnePhaseResolved(True)),
]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_illegal_pairs_raise_and_change_nothing(state: TxnState, event: core.Event) -> None:
    assert (state, type(event)) not in TRANSITIONS
    txn, _ = begin(2)
    txn.state = state
    with pytest.raises(ProtocolError):
        txn.handle(event)
    assert state == txn.state


def test_an_illegal_vote_changes_nothing_so_a_failed_prepare_still_counts() -> None:
    # A PREPARED vote to a one-phase prepare: the engine feeds PrepareFailed after the
    # ProtocolError, which must then lead to the probe, not be ignored as "already voted".
    one, _ = begin(1)
    assert one.one_phase
    with pytest.raises(ProtocolError):
        one.handle(core.VoteReceived(0, Vote.PREPARED))
    assert (TxnState.PREPARING, None) == (one.state, one.branches[0].vote)
    assert [core.ProbeOnePhase(0)] == one.handle(core.PrepareFailed(0, "protocol error"))
    assert TxnState.UNKNOWN == one.state


def test_unknown_branch_index_is_a_protocol_error() -> None:
    txn, _ = begin(2)
    with pytest.raises(ProtocolError):
        txn.handle(core.VoteReceived(7, Vote.PREPARED))


def test_every_table_entry_is_reachable_by_a_known_state() -> None:
    # The table is the single source of truth for the state diagram: no entry for a state
    # or event type that does not exist.
    events = set(core.Event.__args__)  # type: ignore[attr-defined]
    for state, event_type in TRANSITIONS:
        assert state in TxnState
        assert event_type in events
