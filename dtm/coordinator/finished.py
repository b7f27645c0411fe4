"""What the coordinator remembers of a transaction once it is over, and the bounded window of
the most recent ones (`finished_kept`): the answer to a retried Submit, to a participant's
inquiry and to GetTransaction and ListTransactions.

A finished transaction is kept as a plain tuple of strings, numbers and bytes, not as the
objects that ran it (a `Run`, its core `Transaction`, a `Branch` per participant, a future:
about twenty objects the garbage collector tracks). Why it matters: under load the window
evicts one transaction for each it admits, so CPython's young-generation counter
(allocations minus deallocations) stays flat while every object admitted since the last
collection waits in the young generation, and the next collection traverses all of them, on
the event loop. With 20,000 `Run`s kept, a 120-second run under `make bench-soak` load
measured the coordinator's young collections growing to 179 ms, one every 15 s, and one of
the middle generation taking 299 ms. A tuple
holding only atoms is untracked at the first collection it meets, and then costs nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from typing import Any, NamedTuple

#: branch, participant, vote (coordinator_pb2.Vote), reason, acknowledged, phase-2 attempts,
#: last error, heuristic outcome.
BranchRow = tuple[int, str, int, str, bool, int, str, str]


class BranchView(NamedTuple):
    branch: int
    participant: str
    vote: int
    reason: str
    acknowledged: bool
    phase_two_attempts: int
    last_error: str
    heuristic: str


#: A TransactionView's fields but its branches: transaction id, state, answer, reason,
#: created at, decided at, timeout, fingerprint, invalid argument, id reused, decision,
#: committed earlier.
Head = tuple[str, int, int, str, int, int, int, bytes, str, str, bytes, str]


class TransactionView(NamedTuple):
    """A transaction as clients and operators see it, active or finished."""

    transaction_id: str
    state: int  # coordinator_pb2.TransactionState
    #: What a retried Submit is told (coordinator_pb2.Outcome): the outcome as known now.
    answer: int
    reason: str
    created_at_ms: int
    decided_at_ms: int
    timeout_ms: int
    #: The request's fingerprint: a retry with the same id must carry the same transaction.
    fingerprint: bytes
    #: Set when a participant said the operation itself is invalid (INVALID_ARGUMENT).
    invalid_argument: str
    #: Set when a participant knows the id as another transaction's (ALREADY_EXISTS).
    id_reused: str
    #: A commit's CommitDecided record, serialized (b"" for any other transaction): what a
    #: checkpoint keeps of it, about 150 bytes, copied as is (building 20,000 messages there
    #: would hold the event loop for about 180 ms).
    decision: bytes
    #: Set (to the participant that showed it) when this attempt found its transaction
    #: committed by an earlier one (Transaction.committed_earlier): the state reads
    #: committed, while this attempt itself decided abort, which an inquiry hears.
    committed_earlier: str
    branches: tuple[BranchView, ...]


#: What the window stores: a Head, then each branch's BranchRow, in one flat tuple of atoms.
#: Flat because a collection untracks nested tuples one level at a time: it meets the outer
#: one while its rows are still tracked, and keeps it for another collection.
Record = tuple[Any, ...]

_HEAD_FIELDS = len(TransactionView._fields) - 1
_BRANCH_FIELDS = len(BranchView._fields)
_STATE = TransactionView._fields.index("state")
_DECISION = TransactionView._fields.index("decision")
_BRANCH = BranchView._fields.index("branch")
_ACKNOWLEDGED = BranchView._fields.index("acknowledged")
_HEURISTIC = BranchView._fields.index("heuristic")


def pack(head: Head, branches: Iterable[BranchRow]) -> Record:
    flat: list[Any] = list(head)
    for row in branches:
        flat += row
    return tuple(flat)


def unpack(record: Record) -> TransactionView:
    step = _BRANCH_FIELDS
    branches = tuple(
        BranchView._make(record[at : at + step]) for at in range(_HEAD_FIELDS, len(record), step)
    )
    return TransactionView._make((*record[:_HEAD_FIELDS], branches))


#: While a commit holds the window (its end record not durable yet), what finishes after it
#: is kept too, up to `kept` more, and at least this many more (see _forget_unheld).
HELD_BEYOND_KEPT_MIN = 1_024


class FinishedWindow:
    """The last `kept` finished transactions, oldest first; more only while the oldest is a
    commit whose end record is not durable yet (see `trim`)."""

    def __init__(self, kept: int) -> None:
        assert kept >= 0
        self._kept = kept
        self._records: OrderedDict[str, Record] = OrderedDict()
        # The LSN of each kept commit's TransactionEnded record not known to be durable yet,
        # oldest first: the commits ended since the last sync the window saw. Not forgotten
        # before that record is on disk: forgotten first and then lost in a crash, the commit
        # is resumed from its decision record, while a late retry of its id, which no longer
        # found it here, may have run afresh meanwhile (the simulator's seed 3389).
        self._ending: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, transaction_id: str) -> bool:
        return transaction_id in self._records

    def put(self, record: Record, end_lsn: int = 0, durable_lsn: int = 0) -> int:
        """Remember a finished transaction (the newest), a commit with the LSN of its lazy end
        record (`end_lsn`), and forget the oldest beyond `kept` as `trim` does, whose answer
        this is."""
        self._records[record[0]] = record
        if end_lsn > durable_lsn:
            self._ending[record[0]] = end_lsn
        return self.trim(durable_lsn)

    def trim(self, durable_lsn: int) -> int:
        """Forget the oldest transactions beyond `kept`, but not a commit whose end record is
        beyond `durable_lsn` (the log's), nor anything newer. Returns that end record's LSN
        (0 when the window is down to `kept`): the caller has the log sync it, then trims
        again. So the window exceeds `kept` by at most the transactions that finish while
        that one sync is asked for and made, and never by more than max(`kept`,
        HELD_BEYOND_KEPT_MIN) beyond the commits that hold it (`_forget_unheld`)."""
        ending = self._ending
        # Bounded: each step forgets one. End records are appended in the order commits
        # finish, so the ones now durable are at the front.
        while ending and ending[next(iter(ending))] <= durable_lsn:
            ending.popitem(last=False)
        records = self._records
        while len(records) > self._kept:
            oldest = next(iter(records))
            end_lsn = ending.get(oldest, 0)
            if end_lsn > durable_lsn:
                self._forget_unheld(durable_lsn)
                return end_lsn
            records.popitem(last=False)
            if end_lsn:
                del ending[oldest]
        return 0

    def _forget_unheld(self, durable_lsn: int) -> None:
        """Held, the window is past `kept`: beyond `kept` + max(`kept`, HELD_BEYOND_KEPT_MIN),
        forget its oldest that nothing holds (aborts, one-phase commits, commits whose end
        record is durable), keeping the commits that wait for their sync. Otherwise a sync that
        does not come (a disk that hangs) let every abort that finished meanwhile grow the
        window without a bound."""
        records, ending = self._records, self._ending
        excess = len(records) - self._kept - max(self._kept, HELD_BEYOND_KEPT_MIN)
        if excess <= 0:
            return
        # Bounded: the held commits first met (ended before the sync asked for, so few: no
        # commit can end while its decision waits for a sync), then `excess` forgotten.
        forgettable = []
        for transaction_id in records:
            if ending.get(transaction_id, 0) <= durable_lsn:
                forgettable.append(transaction_id)
                if len(forgettable) == excess:
                    break
        for transaction_id in forgettable:
            del records[transaction_id]
            ending.pop(transaction_id, None)

    def update(self, record: Record) -> None:
        """Replace what is kept of a transaction that changed after it finished (a rollback
        acknowledged, a heuristic reported), in place; nothing if it was forgotten."""
        if record[0] in self._records:
            self._records[record[0]] = record

    def mark_heuristic(self, transaction_id: str, branch: int, outcome: str) -> None:
        """Show a heuristic outcome reported after the transaction finished (a participant's
        inquiry found it) in the branch's status, as phase 2 would have (acknowledged: no
        decision is owed to it); nothing if the transaction was forgotten."""
        record = self._records.get(transaction_id)
        if record is None:
            return
        # By number: a commit remembered from its decision record has only its updating
        # branches' rows.
        at = next(
            (
                at
                for at in range(_HEAD_FIELDS, len(record), _BRANCH_FIELDS)
                if record[at + _BRANCH] == branch
            ),
            None,
        )
        if at is None:
            return
        row = list(record[at : at + _BRANCH_FIELDS])
        row[_ACKNOWLEDGED] = True
        row[_HEURISTIC] = outcome
        self._records[transaction_id] = (*record[:at], *row, *record[at + _BRANCH_FIELDS :])

    def clear(self) -> None:
        self._records.clear()
        self._ending.clear()

    def decisions(self) -> Iterator[bytes]:
        """The CommitDecided record of every kept commit, oldest first."""
        for record in self._records.values():
            if record[_DECISION]:
                yield record[_DECISION]

    def get(self, transaction_id: str) -> TransactionView | None:
        record = self._records.get(transaction_id)
        return None if record is None else unpack(record)

    def newest_first(self, states: Collection[int] = ()) -> Iterator[TransactionView]:
        """Every kept transaction, newest first; only those in `states` if any are given (the
        filter reads the tuple, so skipped entries cost no view)."""
        for record in reversed(self._records.values()):
            if not states or record[_STATE] in states:
                yield unpack(record)
