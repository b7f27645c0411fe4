"""A transaction as the engine runs it (`Run`: the core's Transaction and what the engine keeps
beside it, its record for the finished window and its view), and what holds the slots of the
transactions in flight (`slots_held`). The maps from the core's states, outcomes and votes to
the API's live here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass

from google.protobuf import any_pb2

from dtm.coordinator.finished import Head, Record, TransactionView, pack, unpack
from dtm.coordinator.heuristics import same_attempt
from dtm.core import transaction as core
from dtm.core.transaction import (
    Outcome,
    Transaction,
    TxnState,
)
from dtmpb.v1 import coordinator_pb2, log_pb2

STATE_TO_PB = {
    TxnState.PREPARING: coordinator_pb2.TRANSACTION_STATE_PREPARING,
    TxnState.DECIDING: coordinator_pb2.TRANSACTION_STATE_DECIDING,
    TxnState.COMMITTING: coordinator_pb2.TRANSACTION_STATE_COMMITTING,
    TxnState.COMMITTED: coordinator_pb2.TRANSACTION_STATE_COMMITTED,
    TxnState.ABORTED: coordinator_pb2.TRANSACTION_STATE_ABORTED,
    TxnState.UNKNOWN: coordinator_pb2.TRANSACTION_STATE_UNKNOWN,
}
OUTCOME_TO_PB = {
    Outcome.COMMITTED: coordinator_pb2.OUTCOME_COMMITTED,
    Outcome.ABORTED: coordinator_pb2.OUTCOME_ABORTED,
    Outcome.UNKNOWN: coordinator_pb2.OUTCOME_UNKNOWN,
}
VOTE_TO_PB = {
    core.Vote.PREPARED: coordinator_pb2.VOTE_PREPARED,
    core.Vote.READ_ONLY: coordinator_pb2.VOTE_READ_ONLY,
    core.Vote.REFUSED: coordinator_pb2.VOTE_REFUSED,
    core.Vote.COMMITTED: coordinator_pb2.VOTE_COMMITTED,
}

#: Committed transactions owed phase 2 that make the limit the participants' doing, not the
#: load's: at least this share of the slots.
_OWED_SHARE_TO_NAME = 0.5


@dataclass
class Run:
    """One transaction as the engine drives it: the core plus what only the I/O layer needs."""

    txn: Transaction
    fingerprint: bytes
    operations: list[any_pb2.Any]
    reply: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = None
    # The deadline by the engine's monotonic clock (`Engine.monotonic_s`), what its timer and
    # the prepares' timeouts count down to. The core's `deadline_ms` is the wall clock's, for
    # the log and the next process; this one a wall-clock step cannot move.
    due_s: float = 0.0
    # Its start by the same clock, what its latencies are timed from (`Engine._elapsed_ms`);
    # 0.0 for one recovered after a restart, which did not start in this process.
    started_s: float = 0.0
    # Set when a participant said the operation itself is invalid: the client gets
    # INVALID_ARGUMENT (after the abort), not a plain ABORTED.
    invalid_argument: str = ""
    # Set when a participant knows this id as another transaction's: ALREADY_EXISTS.
    id_reused: str = ""
    outcome_pb: int = coordinator_pb2.OUTCOME_UNSPECIFIED
    decision: bytes = b""  # the CommitDecided record, once written
    end_lsn: int = 0  # the TransactionEnded record's, once written (lazily)
    finished: bool = False
    # Phase-2 retries waiting out their backoff, by branch (made on first use: most
    # transactions never retry). At most one per branch: see retry_phase_two_now.
    retrying: dict[int, asyncio.Task[None]] | None = None
    # Commits and Rollbacks in flight or waiting to be retried. An aborted attempt finishes at
    # once (presumed abort) while its Rollbacks go on: a new attempt under the id waits for
    # them (`settled`), or one of them would roll back the new attempt's prepared branch.
    decisions_open: int = 0
    settled: asyncio.Future[None] | None = None
    # Other Submits under its id waiting for it (_wait_on): at most
    # SUBMITS_WAITING_PER_TRANSACTION_MAX.
    waiting: int = 0
    # The incarnation a one-phase Prepare was sent to (its port's): only that incarnation's
    # answer to the probe tells the outcome (see _probe). Empty: not known (not checked).
    one_phase_incarnation: str = ""

    @property
    def kept(self) -> bool:
        """Whether the finished window keeps it. An attempt the participants refused as a reuse
        of the id is not kept: under its id the coordinator would then refuse the transaction
        the id belongs to. Unless another participant said an earlier attempt committed it:
        then this is that transaction (a participant that forgot it had seen another content
        under the id since), and its COMMITTED answer must stay the answer."""
        return not self.id_reused or bool(self.txn.committed_earlier)

    def answer(self) -> int:
        """The outcome to tell a (retried) Submit: the outcome as known now. A one-phase commit
        first answered UNKNOWN is answered COMMITTED or ABORTED once resolved."""
        outcome = self.txn.answer
        if outcome is Outcome.COMMITTED or outcome is Outcome.ABORTED:
            return OUTCOME_TO_PB[outcome]
        return self.outcome_pb

    def record(self) -> Record:
        """The transaction as clients and operators see it, in the form the finished window
        keeps (a flat tuple of atoms: see dtm.coordinator.finished)."""
        txn = self.txn
        unspecified = coordinator_pb2.VOTE_UNSPECIFIED
        head: Head = (
            txn.transaction_id,
            _state_pb(txn),
            self.answer(),
            txn.reason,
            txn.created_at_ms,
            txn.decided_at_ms,
            max(0, txn.deadline_ms - txn.created_at_ms),
            self.fingerprint,
            self.invalid_argument,
            self.id_reused,
            self.decision,
            txn.committed_earlier,
        )
        rows = [
            (
                b.index,
                b.participant,
                VOTE_TO_PB[b.vote] if b.vote else unspecified,
                b.reason,
                b.acknowledged,
                b.phase_two_attempts,
                b.last_error,
                b.heuristic,
            )
            for b in txn.branches
        ]
        return pack(head, rows)

    def view(self) -> TransactionView:
        return unpack(self.record())


def _state_pb(txn: Transaction) -> int:
    """What the transaction is, as clients and operators see it: ABORTING while an abort's
    answer waits for a Prepare still out, COMMITTED when an earlier attempt committed it
    (this attempt's own abort is what query_outcome answers), else its core state."""
    if txn.answer_pending:
        return coordinator_pb2.TRANSACTION_STATE_ABORTING
    if txn.committed_earlier:
        return coordinator_pb2.TRANSACTION_STATE_COMMITTED
    return STATE_TO_PB[txn.state]


def slots_held(runs: Collection[Run]) -> str:
    """What the transactions in flight are waiting for, as the end of the refusal at the
    limit: "retry shortly" when they are running (the load will pass), else the participant
    whose missing acknowledgements hold most of them, which retrying cannot help with."""
    owed: dict[str, int] = {}
    last_error: dict[str, str] = {}
    holding = 0  # committed (or one-phase, outcome unknown): the client has its answer
    # Bounded by the limit of transactions in flight, and made at most once per
    # SLOTS_RECOUNT_MS.
    for run in runs:
        txn = run.txn
        if txn.state is TxnState.COMMITTING:
            owing = [b for b in txn.branches if b.needs_phase_two and not b.acknowledged]
        elif txn.state is TxnState.UNKNOWN:  # a lost one-phase answer, probed until learned
            owing = txn.branches[:1]
        else:
            continue
        holding += 1
        for branch in owing:
            owed[branch.participant] = owed.get(branch.participant, 0) + 1
            last_error[branch.participant] = branch.last_error or last_error.get(
                branch.participant, ""
            )
    if not owed or holding < _OWED_SHARE_TO_NAME * max(1, len(runs)):
        return "retry shortly"
    name = max(owed, key=owed.__getitem__)
    error = last_error[name][:200] or "none yet"
    return (
        f"{holding} of them have their answer and wait only for phase 2, {owed[name]} for "
        f"participant {name!r} (last error: {error}): they keep their slots until it "
        "acknowledges, so retrying helps only once it is reachable again (dtm txn list "
        "--stuck; dtm txn retry ID)"
    )


def _stop_phase_two(
    pending: dict[str, log_pb2.CommitDecided], heuristic: log_pb2.HeuristicRecorded
) -> bool:
    """Replay: phase 2 of a branch stopped when its heuristic outcome was recorded. Marked in
    the commit to resume, so that it is not sent Commit again after a restart (it would be
    contradicted and recorded again, bringing back a heuristic an operator forgot) and is
    still shown with its outcome. True when no branch is owed a Commit any more: the commit
    is over, as if its end record had been read."""
    decided = pending.get(heuristic.transaction_id)
    if decided is None or not heuristic.committed:
        return False
    if not same_attempt(decided.fingerprint, heuristic.transaction_fingerprint):
        # Another attempt's branch: this commit still owes its own a Commit.
        return False
    for branch in decided.branches:
        if branch.branch == heuristic.branch:
            branch.acknowledged = True
            branch.heuristic = heuristic.outcome
    return all(branch.acknowledged for branch in decided.branches)
