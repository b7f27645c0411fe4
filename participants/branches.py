"""The participant's branch engine: runs the pure branch core (dtm.core.branch) against a
service's business logic, the lock manager and the write-ahead log.

Everything here runs on the event loop thread; the only awaits are lock waits and waiting for
the log to make a record durable. Persist before you speak: every reply waits until the
branch's forced records are durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from dtm import crashpoints, limits, logs
from dtm.core import branch as core
from dtm.core.branch import Branch, BranchState, BranchVote
from dtm.metrics import BranchCounters, CheckpointStats
from dtm.records import (
    RecordType,
    ReplayError,
    coalesced,
    encoded_field,
    field_key,
    in_parts,
    varint,
    without_format_records,
)
from dtm.wal import CheckpointPayload, Log, LogRecord
from dtmpb.v1 import coordinator_pb2, log_pb2, participant_pb2
from participants.decided import DecidedWindow
from participants.locks import LockManager, LockMode, LockRefused, LockTimeout
from participants.service import (
    InvalidOperation,
    LockRequest,
    Prepared,
    ReadOnly,
    Refused,
    Service,
)

BranchKey = tuple[str, int]


def monotonic_ms() -> int:
    """The engine's clock for intervals (leases, inquiries): it never steps, as the wall
    clock (`clock_ms`, which dates the records) may."""
    return time.monotonic_ns() // 1_000_000


_VOTE_TO_PB = {
    BranchVote.PREPARED: coordinator_pb2.VOTE_PREPARED,
    BranchVote.READ_ONLY: coordinator_pb2.VOTE_READ_ONLY,
    BranchVote.REFUSED: coordinator_pb2.VOTE_REFUSED,
    BranchVote.COMMITTED: coordinator_pb2.VOTE_COMMITTED,
}
_PB_TO_VOTE = {v: k for k, v in _VOTE_TO_PB.items()}
STATE_TO_PB = {
    BranchState.PREPARING: participant_pb2.BRANCH_STATE_PREPARING,
    BranchState.PREPARED: participant_pb2.BRANCH_STATE_PREPARED,
    BranchState.COMMITTED: participant_pb2.BRANCH_STATE_COMMITTED,
    BranchState.ROLLED_BACK: participant_pb2.BRANCH_STATE_ROLLED_BACK,
    BranchState.REFUSED: participant_pb2.BRANCH_STATE_REFUSED,
    BranchState.READ_ONLY: participant_pb2.BRANCH_STATE_READ_ONLY,
}
_PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}


class BranchError(Exception):
    """A Commit or Rollback that cannot be honoured (unknown branch, already decided otherwise)."""

    def __init__(self, kind: core.ErrorKind, message: str, heuristic: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.heuristic = heuristic


class IdReused(Exception):
    """A Prepare for a branch this participant knows as part of another transaction: the client
    used one transaction id for two transactions (see PrepareRequest.transaction_fingerprint)."""


class RecoveryError(Exception):
    """The log cannot be replayed through the service (a bug or a corrupted log); `replay`
    raises it as a ReplayError naming the record."""


@dataclass(slots=True)
class BranchInfo:
    branch: Branch
    updated_at_ms: int
    prepared_at_ms: int = 0
    # The same two moments by the engine's monotonic clock (`monotonic_ms`): what the lease
    # and the inquiries count from. The wall clock's are for the log and the operator; by
    # them, a wall-clock step back of an hour held an unvoted or in-doubt branch's locks an
    # hour, and a step forward ended an unvoted branch's lease at once.
    updated_monotonic_ms: int = 0
    prepared_monotonic_ms: int = 0
    # The coordinator's digest of the whole transaction this branch belongs to; b"" unknown.
    fingerprint: bytes = b""
    # A forced branch an operator forgot (`BranchEngine.forget`).
    forgotten: bool = False
    # A forced branch that learned its coordinator's outcome (a BranchReconciled record).
    reconciled: bool = False


def _decided_entry(info: BranchInfo) -> bytes:
    """A decided branch as a checkpoint's encoded `decided` entry (see checkpoint_records):
    the field's key (3, length-delimited), the length, the DecidedBranch message. It is also
    all the engine keeps of the branch (`_decided_info` reads it back)."""
    branch = info.branch
    entry = log_pb2.DecidedBranch(
        transaction_id=branch.transaction_id,
        branch=branch.index,
        state=STATE_TO_PB[branch.state],
        reason=branch.reason,
        vote=_VOTE_TO_PB[branch.vote] if branch.vote else None,
        heuristic=branch.heuristic,
        transaction_fingerprint=info.fingerprint,
        decided_at_unix_ms=info.updated_at_ms,
        forgotten=info.forgotten,
        one_phase=branch.one_phase,
        reconciled=info.reconciled,
    ).SerializeToString()
    return encoded_field(_DECIDED_KEY, entry)


def _decided_info(entry: bytes) -> BranchInfo:
    """A decided branch as the engine's handlers take it, read back from its entry: a fresh
    object each time, and none of them is ever changed (a decided branch only answers)."""
    start = 1  # past the field's key: then a varint, whose last byte has no high bit
    while entry[start] & 0x80:
        start += 1
    decided = log_pb2.DecidedBranch.FromString(entry[start + 1 :])
    branch = Branch(
        decided.transaction_id,
        decided.branch,
        _PB_TO_STATE[decided.state],
        one_phase=decided.one_phase,
    )
    branch.vote = _PB_TO_VOTE.get(decided.vote)
    branch.reason = decided.reason
    branch.heuristic = decided.heuristic
    return BranchInfo(
        branch,
        decided.decided_at_unix_ms,
        fingerprint=decided.transaction_fingerprint,
        forgotten=decided.forgotten,
        reconciled=decided.reconciled,
    )


def _state_pieces(service: Service[Any], size: int) -> list[bytes]:
    """The service's snapshot as pieces of at most `size` bytes (a larger piece is cut: one
    copy of it; the services of this repository hand over pieces smaller than that)."""
    state = service.snapshot()
    pieces = [state] if isinstance(state, bytes) else list(state)
    if not all(type(piece) is bytes for piece in pieces):
        raise TypeError(
            f"{service.name}: snapshot() must return bytes or a list of bytes, "
            f"got {type(state).__name__}"
        )
    if all(len(piece) <= size for piece in pieces):
        return pieces
    return [piece[start : start + size] for piece in pieces for start in range(0, len(piece), size)]


# A length-delimited field's tag and length: 1 byte of tag (field numbers < 16), at most 10 of
# varint.
_FIELD_HEADER_BYTES_MAX = 11

# ParticipantCheckpoint.decided: field 3, length-delimited.
_DECIDED_KEY = field_key(3)
# ParticipantCheckpoint.service_state: field 1, length-delimited.
_SERVICE_STATE_KEY = field_key(1)
# ParticipantCheckpoint.incarnation: field 4, length-delimited.
_INCARNATION_KEY = field_key(4)


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


#: Actions that leave a branch as it was: answers, and waiting for or asking about its outcome.
_CHANGING_NOTHING = frozenset(
    {
        core.ReplyVote,
        core.ReplyAck,
        core.ReplyError,
        core.AwaitPrepare,
        core.AskCoordinator,
        core.ReleaseLatePrepare,  # the branch is decided already; only the service changes
    }
)


def _by_resource(request: LockRequest) -> str:
    return request.resource


def branch_key_text(key: BranchKey) -> str:
    return f"{key[0]}/{key[1]}"


class BranchEngine:
    def __init__(
        self,
        service: Service[Any],
        log: Log,
        locks: LockManager,
        *,
        clock_ms: Callable[[], int],
        monotonic_ms: Callable[[], int] = monotonic_ms,
        decided_kept: int = limits.BRANCHES_DECIDED_KEPT,
        forced_kept: int = limits.HEURISTICS_KEPT_MAX,
        checkpoint_part_bytes: int = limits.CHECKPOINT_PART_BYTES,
    ) -> None:
        assert 0 < checkpoint_part_bytes <= limits.LOG_RECORD_BYTES_MAX // 2
        self.service = service
        self.log = log
        self.locks = locks
        self.clock_ms = clock_ms
        self.monotonic_ms = monotonic_ms
        self.checkpoint_part_bytes = checkpoint_part_bytes
        # Where a branch's state lives. Not yet decided (PREPARING or PREPARED): in `open`, as
        # a live BranchInfo, which leases and inquiries scan. Decided: in `_decided`, as its
        # encoded checkpoint entry only, read back (`_decided_info`) for a duplicate answer.
        # `branch(key)` looks in both, `listed` lists both.
        self.open: dict[BranchKey, BranchInfo] = {}
        # Decided branches kept for duplicate answers, oldest first. A checkpoint takes their
        # cached bytes instead of building up to BRANCHES_DECIDED_KEPT messages (measured:
        # 274 ms for 100,000, the loop stalled).
        self._decided = DecidedWindow(decided_kept)
        # Branches forced by an operator that their coordinator has not yet sent a decision
        # for, oldest first (rule 17: a heuristic outcome is never silent). The window alone
        # would forget one after `decided_kept` later decisions, and a Rollback arriving after
        # that would be acknowledged as a tombstone, hiding a forced commit. So they outlive the
        # window, bounded by `forced_kept` (beyond, the oldest goes, with an ERROR line). Each
        # with the time it was forced (its decision's, by `monotonic_ms`), from which the
        # server's inquiry loop waits `in_doubt_after_ms` before it asks the coordinator about
        # it itself. Once the coordinator has spoken, a BranchReconciled record says so: replay
        # and checkpoints keep it off this list (`_forced_reported`).
        self._forced_unreported: dict[BranchKey, int] = {}
        # Those of them the window has pushed out: their checkpoint entries.
        self._forced_beyond: dict[BranchKey, bytes] = {}
        self._forced_kept = forced_kept
        # The operation of each branch the service prepared (`_settle_prepare`, replay), to
        # commit or undo it with.
        self._operations: dict[BranchKey, Message] = {}
        self._applied: set[BranchKey] = set()  # service.prepare returned Prepared
        # The operation as it arrived (an Any), for the prepare record; absent after a replay.
        self._packed: dict[BranchKey, any_pb2.Any] = {}
        self._pending: dict[BranchKey, asyncio.Future[tuple[BranchVote, str]]] = {}
        self._tasks: dict[BranchKey, asyncio.Task[None]] = {}
        self._durable_lsn: dict[BranchKey, int] = {}
        self.forced_writes = 0
        self.counters = BranchCounters()  # read by dtm.metrics at scrape time
        self.checkpoints = CheckpointStats()  # likewise
        self.records_since_checkpoint = 0
        # The participant's incarnation (RegisterParticipantRequest.incarnation): created with
        # the log by the server, restored from every checkpoint, written in each. "" until then.
        self.incarnation = ""

    # ---- the three protocol calls ----

    async def prepare(
        self,
        transaction_id: str,
        index: int,
        operation: any_pb2.Any,
        one_phase: bool,
        fingerprint: bytes = b"",
    ) -> tuple[BranchVote, str]:
        answer = self.begin_prepare(
            transaction_id, index, operation, one_phase, fingerprint=fingerprint
        )
        vote, reason = answer if isinstance(answer, tuple) else await answer
        await self.wait_durable([(transaction_id, index)])
        if vote is BranchVote.PREPARED:
            crashpoints.hit("participant.after_prepare_durable")
        return vote, reason

    def begin_prepare(
        self,
        transaction_id: str,
        index: int,
        operation: any_pb2.Any,
        one_phase: bool,
        lock_wait_s: float | None = None,
        fingerprint: bytes = b"",
    ) -> tuple[BranchVote, str] | Awaitable[tuple[BranchVote, str]]:
        """Run a Prepare up to its answer. The answer is immediate unless the service needs
        locks; either way it may leave only after `wait_durable` (persist before you speak).
        Raises InvalidOperation or IdReused, changing nothing."""
        key = (transaction_id, index)
        info = self.branch(key)
        if info is not None and fingerprint and info.fingerprint not in (b"", fingerprint):
            # Answering from this branch's record would tell the client that its new content
            # was applied (or refused) when only the old one was.
            raise IdReused(
                f"transaction id {transaction_id!r} was already used for a different "
                f"transaction: branch {index} is {info.branch.state.value} here"
            )
        if info is None:
            try:
                decoded = self.decode_operation(operation)
                bug = self._validate(key, decoded)
            except InvalidOperation:
                # Answered as a refusal (VOTE_REFUSED with invalid_argument in a batch,
                # INVALID_ARGUMENT alone): counted as one, though no branch is kept.
                self.counters.refused += 1
                raise
            branch, actions = Branch.on_first_message(
                transaction_id, index, core.PREPARE_REQUESTED[one_phase]
            )
            assert branch is not None and [core.RUN_PREPARE[one_phase]] == actions
            info = self._track(branch, fingerprint)
            self._packed[key] = operation  # logged as received: no second serialization
            requests = bug or self._lock_requests(key, decoded)
            if isinstance(requests, Refused):
                reply = self._settle_prepare(info, requests, decoded)
                return reply.vote, reply.reason
            owner = branch_key_text(key)
            if all(self.locks.try_acquire(owner, r.resource, r.mode) for r in requests):
                # The common case: no lock wait, so no task: the whole prepare is one step.
                outcome = self._service_prepare(key, owner, decoded)
                reply = self._settle_prepare(info, outcome, decoded)
                return reply.vote, reply.reason
            # Some lock is taken: wait in a task (the locks already granted stay held, and
            # acquiring them again there is a no-op).
            self._start_prepare(info, decoded, requests, lock_wait_s)
            return asyncio.shield(self._pending[key])
        branch = info.branch
        duplicate = self._execute(info, branch.handle(core.PREPARE_REQUESTED[one_phase]))
        if isinstance(duplicate, core.ReplyVote):
            return duplicate.vote, duplicate.reason
        pending = self._pending.get(key)
        if pending is None:
            return branch.vote or BranchVote.REFUSED, branch.reason
        return asyncio.shield(pending)

    async def commit(self, transaction_id: str, index: int, fingerprint: bytes = b"") -> None:
        await self._decide(transaction_id, index, True, fingerprint)
        crashpoints.hit("participant.after_commit_durable")

    async def rollback(self, transaction_id: str, index: int, fingerprint: bytes = b"") -> None:
        await self._decide(transaction_id, index, False, fingerprint)
        crashpoints.hit("participant.after_rollback_applied")

    async def _decide(
        self, transaction_id: str, index: int, commit: bool, fingerprint: bytes
    ) -> None:
        key = (transaction_id, index)
        try:
            self.decide_now(transaction_id, index, commit, fingerprint)
        finally:
            # Errors too ("already committed") speak about records that must be on disk first:
            # the one-phase probe turns that answer into the client's COMMITTED (simulator,
            # seed 7877 --sdk-error-replies).
            await self.wait_durable([key])

    def learn_outcome(self, key: BranchKey, commit: bool) -> bool:
        """The coordinator answered an inquiry about a prepared branch. False: nothing left to
        learn, the branch was decided meanwhile (a Commit or Rollback came first), or it is
        preparing again (decided, dropped from the window, prepared anew: the core ignores
        an answer about its earlier life)."""
        info = self.open.get(key)
        if info is None:
            return False
        in_doubt = info.branch.state is BranchState.PREPARED
        self._execute(info, info.branch.handle(core.OutcomeLearned(commit)))
        return in_doubt

    async def force(self, key: BranchKey, commit: bool) -> BranchInfo:
        """Heuristic outcome an operator asked for; recorded (forced) and never silent."""
        info = self.branch(key)
        if info is None:
            raise BranchError(core.ErrorKind.NOT_FOUND, f"no branch {branch_key_text(key)}")
        if info.branch.state is not BranchState.PREPARED:
            raise BranchError(
                core.ErrorKind.FAILED_PRECONDITION,
                f"branch {branch_key_text(key)} is {info.branch.state.value}, not prepared: "
                "only an in-doubt branch can be forced",
            )
        self._execute(info, info.branch.handle(core.HeuristicForced(commit)))
        await self.wait_durable([key])
        return info

    async def forget(self, key: BranchKey) -> BranchInfo:
        """An operator has reconciled a forced branch: stop keeping it for its coordinator
        (the participant's xa_forget). Durable. For a coordinator that will never send a
        decision: one that never logged the transaction (presumed abort), or lost its log."""
        text = branch_key_text(key)
        info = self.branch(key)
        if info is None:
            raise BranchError(
                core.ErrorKind.NOT_FOUND,
                f"no branch {text}: never known here, or no longer kept (ListBranches)",
            )
        if key in self.open:
            raise BranchError(
                core.ErrorKind.FAILED_PRECONDITION,
                f"branch {text} is {info.branch.state.value}, not decided: only a forced branch "
                "can be forgotten (an in-doubt one is decided by its coordinator, or forced)",
            )
        if not info.branch.heuristic:
            raise BranchError(
                core.ErrorKind.FAILED_PRECONDITION,
                f"branch {text} is {info.branch.state.value} as its coordinator decided, not "
                "forced: it leaves the window of decided branches on its own",
            )
        if not info.forgotten:
            record = log_pb2.BranchForgotten(transaction_id=key[0], branch=key[1])
            lsn = self.log.append(RecordType.BRANCH_FORGOTTEN, record.SerializeToString())
            self.records_since_checkpoint += 1
            self._durable_lsn[key] = lsn
            self._forget_forced(key, info)
        await self.wait_durable([key])  # a repeated forget too: the first may still be syncing
        return info

    def expire_lease(self, key: BranchKey) -> bool:
        """The lease of a branch ran out. Returns True when the coordinator must be asked."""
        info = self.open.get(key)  # a decided branch has no lease
        if info is None:
            return False
        actions = info.branch.handle(core.LeaseExpired())
        self._execute(info, actions)
        return any(isinstance(a, core.AskCoordinator) for a in actions)

    # ---- queries ----

    def transaction_of(self, owner: str) -> str:
        """The transaction of lock owner `owner` (branch_key_text of an open branch), for the
        lock manager's `transaction_of`, so that its deadlock search sees a prepared branch as
        its whole transaction, and a branch wanting what a prepared sibling holds is refused
        at once. Its id and, when its Prepare carried one, its attempt's fingerprint: an
        attempt of a reused id (the coordinator forgot the first attempt, still in doubt
        here) is another transaction, whose branch waits for the first one's decision like
        any other; by the id alone it was refused at once as the first one's sibling. The
        lock manager asks once per owner, as the branch takes its first lock, while it is
        open, and keeps the answer until `release_all`. "#" is not in a transaction id."""
        # branch_key_text split back, inline (once per branch): the id part is what
        # participants.service.transaction_of gives, and the index finds the open branch.
        transaction_id, _, index = owner.rpartition("/")
        info = self.open.get((transaction_id, int(index)))
        if info is None or not info.fingerprint:
            return transaction_id
        return f"{transaction_id}#{info.fingerprint.hex()}"

    def branch(self, key: BranchKey) -> BranchInfo | None:
        """The branch as this participant knows it: live while open, read back once decided
        (a copy: changing it changes nothing)."""
        info = self.open.get(key)
        if info is not None:
            return info
        entry = self._decided.get(key)
        if entry is None:
            entry = self._forced_beyond.get(key)
        return None if entry is None else _decided_info(entry)

    def listed(self, states: set[BranchState], limit: int) -> list[BranchInfo]:
        """The newest `limit` branches in one of `states` (every state if empty), oldest
        first: forced branches kept past the window, then the window (in decision order),
        then the open ones. Reads back only the decided entries it returns."""
        wanted = states or set(BranchState)
        newest: list[BranchInfo] = [
            info for info in reversed(self.open.values()) if info.branch.state in wanted
        ][:limit]
        if wanted & core.DECIDED_STATES:
            decided = itertools.chain(
                self._decided.newest_first(), reversed(self._forced_beyond.items())
            )
            for _, entry in decided:  # bounded by the window and `forced_kept`
                if len(newest) >= limit:
                    break
                info = _decided_info(entry)
                if info.branch.state in wanted:
                    newest.append(info)
        newest.reverse()
        return newest

    def of_transaction(self, transaction_id: str, states: set[BranchState]) -> list[BranchInfo]:
        """The branches of one transaction this participant keeps, in one of `states` (every
        state if empty), by index: one lookup per index a transaction can have, however old
        the branch (in the window of decided branches, or forced and kept past it)."""
        found = [
            self.branch((transaction_id, index))
            for index in range(limits.BRANCHES_PER_TRANSACTION_MAX)
        ]
        return [
            info
            for info in found
            if info is not None and (not states or info.branch.state in states)
        ]

    def awaiting_coordinator(self, key: BranchKey) -> bool:
        """A forced branch kept until its coordinator sends a decision for it."""
        return key in self._forced_unreported

    def forced_awaiting(self) -> list[tuple[BranchKey, int]]:
        """Every forced branch kept for its coordinator, with the time it was forced (by
        `monotonic_ms`), oldest first (the inquiry loop asks the coordinator about them:
        `reconcile_forced`)."""
        return list(self._forced_unreported.items())

    @property
    def forced_awaiting_count(self) -> int:
        return len(self._forced_unreported)

    def reconcile_forced(
        self, key: BranchKey, commit: bool, reported: bool = False
    ) -> BranchInfo | None:
        """The coordinator answered an inquiry about a forced branch still awaiting it: its
        outcome is `commit` (true committed, false aborted). The branch stops awaiting, as when
        the coordinator's own Commit or Rollback arrives (`decide_now`, the same path),
        whether the answer agrees with the forced outcome or contradicts it (a heuristic
        outcome: the caller says so). Returns the branch, or None when it no longer awaits
        (its decision came, or an operator forgot it, while the inquiry was in flight).

        Its BranchReconciled record is lazy: the coordinator is not waiting on it (it learns
        nothing from this inquiry). Lost in a crash before the next fsync, the branch is
        awaiting again after the restart and asked again, and the answer is the same: an
        abort stays an abort (presumed or logged), and a commit is forgotten by its
        coordinator only once this branch has answered its Commit (acknowledged it, or told
        it the heuristic), an answer that waits for this record too (`_durable_lsn`, set
        below). The cost of the loss is the one line and count repeated.

        `reported`: the answer contradicted the forced outcome, and the coordinator has
        acknowledged the report of it (ReportHeuristic). The record says so; the caller waits
        for it (`wait_durable`), so that a restart does not report it again."""
        if key not in self._forced_unreported:
            return None
        info = self.branch(key)
        assert info is not None  # kept in the window or past it while it awaits
        self._forced_reported(key, commit, info, reported)
        return info

    def awaiting(self, states: set[BranchState], limit: int) -> list[BranchInfo]:
        """The newest `limit` forced branches kept for their coordinator, in one of
        `states` (any if empty), oldest first."""
        newest: list[BranchInfo] = []
        for key in reversed(self._forced_unreported):  # bounded by `forced_kept`
            if len(newest) >= limit:
                break
            info = self.branch(key)  # in the window, or kept past it
            if info is not None and (not states or info.branch.state in states):
                newest.append(info)
        newest.reverse()
        return newest

    def in_doubt(self) -> list[BranchInfo]:
        return [i for i in self.open.values() if i.branch.state is BranchState.PREPARED]

    def preparing(self) -> list[BranchInfo]:
        return [i for i in self.open.values() if i.branch.state is BranchState.PREPARING]

    # ---- decoding ----

    def decode_operation(self, operation: any_pb2.Any) -> Message:
        expected = self.service.operation_type.DESCRIPTOR.full_name
        if not operation.type_url:
            raise InvalidOperation(
                f"{self.service.name}: the operation is missing (want {expected})"
            )
        actual = operation.type_url.rsplit("/", 1)[-1]
        if actual != expected:
            raise InvalidOperation(
                f"{self.service.name} takes {expected} operations, not {actual[:80]!r}"
            )
        if len(operation.value) > limits.OPERATION_BYTES_MAX:
            raise InvalidOperation(
                f"operation is {len(operation.value)} bytes; the limit is "
                f"{limits.OPERATION_BYTES_MAX}"
            )
        decoded: Message = self.service.operation_type()
        try:
            decoded.ParseFromString(operation.value)
        except DecodeError as error:
            raise InvalidOperation(f"cannot decode {expected}: {error}") from None
        return decoded

    def _validate(self, key: BranchKey, operation: Message) -> Refused | None:
        """The service's validate. InvalidOperation (bad input) goes to the caller, before any
        branch is kept; any other exception is a bug in the service, and refuses the branch,
        as one from its locks or prepare does: before, it failed every other item of the
        batched call with it."""
        try:
            self.service.validate(operation)
        except InvalidOperation:
            raise
        except Exception as error:
            return self._service_failed(key, "validate", error)
        return None

    # ---- running the core's actions ----

    def _track(self, branch: Branch, fingerprint: bytes = b"") -> BranchInfo:
        """A new branch; open unless it starts decided (a tombstone, which `_finish` keeps)."""
        info = BranchInfo(
            branch,
            self.clock_ms(),
            fingerprint=fingerprint,
            updated_monotonic_ms=self.monotonic_ms(),
        )
        if branch.state not in core.DECIDED_STATES:
            self.open[branch.key] = info
        return info

    def _execute(
        self, info: BranchInfo, actions: Iterable[core.BranchAction]
    ) -> core.BranchAction | None:
        """Carry out every action but the reply, synchronously; return the reply (if any)."""
        reply: core.BranchAction | None = None
        actions = tuple(actions)
        if not all(type(action) in _CHANGING_NOTHING for action in actions):
            # A change: the branch's time moves (its lease runs from here). An event answered
            # with a reply alone changed nothing (a repeated Prepare, a Commit on a branch not
            # prepared yet), and renewing the lease then would let a caller keep its locks.
            info.updated_at_ms = self.clock_ms()
            info.updated_monotonic_ms = self.monotonic_ms()
        for action in actions:
            effect = self._effects.get(type(action))  # the table at the end of the class
            if effect is None:
                reply = action  # ReplyVote, ReplyAck or ReplyError: the caller's to send
            else:
                effect(self, info, action)
        return reply

    def _cancel_prepare(self, info: BranchInfo, action: core.CancelPrepare) -> None:
        task = self._tasks.pop(info.branch.key, None)
        if task is not None:
            task.cancel()
        self._finish(info)

    def _apply_commit(self, info: BranchInfo, action: core.ApplyCommit) -> None:
        key = info.branch.key
        self.counters.committed += 1
        self.service.commit(branch_key_text(key), self._operations[key])
        self._finish(info)

    def _apply_rollback(self, info: BranchInfo, action: core.ApplyRollback) -> None:
        self._undo_prepare(info.branch.key)
        self._finish(info)

    def _release_late_prepare(self, info: BranchInfo, action: core.ReleaseLatePrepare) -> None:
        """The branch was finished when its prepare was cancelled (its locks released, its
        operation dropped), and the prepare ran on: `_settle_prepare` registered what it
        reserved, and it may have been granted locks since. Both go; nothing else changes."""
        key = info.branch.key
        self._undo_prepare(key)
        self._applied.discard(key)
        self._operations.pop(key, None)
        self.locks.release_all(branch_key_text(key))

    def _undo_prepare(self, key: BranchKey) -> None:
        """Give back what the service's prepare reserved for the branch, if it reserved."""
        if key in self._applied:
            self.counters.rolled_back += 1  # work undone, not a refusal's no-op
            self.service.rollback(branch_key_text(key), self._operations[key])

    def _ask_coordinator(self, info: BranchInfo, action: core.AskCoordinator) -> None:
        pass  # the server's inquiry loop asks for every in-doubt branch

    def _packed_operation(self, key: BranchKey) -> any_pb2.Any:
        packed = self._packed.get(key)
        if packed is None:
            packed = any_pb2.Any()
            packed.Pack(self._operations[key])
        return packed

    def _persist(self, info: BranchInfo, action: core.Persist) -> None:
        branch = info.branch
        key = branch.key
        record_type: RecordType
        record: Message
        if action.kind is core.RecordKind.PREPARED:
            self.counters.prepared += 1
            crashpoints.hit("participant.before_prepare_record")
            info.prepared_at_ms = self.clock_ms()
            info.prepared_monotonic_ms = info.updated_monotonic_ms  # stamped in this step
            record_type = RecordType.BRANCH_PREPARED
            record = log_pb2.BranchPrepared(
                transaction_id=key[0],
                branch=key[1],
                prepared_at_unix_ms=info.prepared_at_ms,
                transaction_fingerprint=info.fingerprint,
            )
            record.operation.CopyFrom(self._packed_operation(key))
        elif action.kind is core.RecordKind.COMMITTED:
            record_type = RecordType.BRANCH_COMMITTED
            record = log_pb2.BranchCommitted(
                transaction_id=key[0],
                branch=key[1],
                heuristic=action.heuristic,
                decided_at_unix_ms=info.updated_at_ms,
            )
            if branch.one_phase:
                record.operation.CopyFrom(self._packed_operation(key))
                record.transaction_fingerprint = info.fingerprint
        else:
            record_type = RecordType.BRANCH_ROLLED_BACK
            record = log_pb2.BranchRolledBack(
                transaction_id=key[0],
                branch=key[1],
                heuristic=action.heuristic,
                reason=branch.reason,
                transaction_fingerprint=info.fingerprint,
                decided_at_unix_ms=info.updated_at_ms,
                refused=branch.state is BranchState.REFUSED,
                one_phase=branch.one_phase,
            )
        lsn = self.log.append(record_type, record.SerializeToString())
        self.records_since_checkpoint += 1
        if record_type is RecordType.BRANCH_PREPARED:
            crashpoints.hit("participant.after_prepare_record")
        if action.forced:
            self.forced_writes += 1
            self._durable_lsn[key] = lsn

    def _finish(self, info: BranchInfo) -> None:
        """The branch is decided: drop its operation and locks; remember it (bounded) for dedup,
        as its entry only. The actions after this one in the same step (a Persist after a
        CancelPrepare) still have `info`; nothing reads it after the step."""
        key = info.branch.key
        self._applied.discard(key)
        self._operations.pop(key, None)
        self._packed.pop(key, None)
        self.open.pop(key, None)
        self.locks.release_all(branch_key_text(key))
        if info.branch.heuristic:
            self._keep_forced(key, self._monotonic_of(info.updated_at_ms))
        self._remember_decided(key, _decided_entry(info))

    def _remember_decided(self, key: BranchKey, entry: bytes) -> None:
        """Keep a decided branch for duplicate answers; forget those it pushes out, except
        forced branches whose coordinator has not spoken yet."""
        for old, old_entry in self._decided.put(key, entry):
            if old in self._forced_unreported:
                self._forced_beyond[old] = old_entry
                continue
            self._durable_lsn.pop(old, None)

    def _monotonic_of(self, at_unix_ms: int) -> int:
        """A moment of the wall clock (from a record, maybe of an earlier process) on the
        monotonic clock: as long ago as the wall clock says, never in the future."""
        return self.monotonic_ms() - max(0, self.clock_ms() - at_unix_ms)

    def _keep_forced(self, key: BranchKey, forced_at_ms: int) -> None:
        """A forced branch: kept until its coordinator sends a decision for it, or answers
        an inquiry about it (`reconcile_forced`). `forced_at_ms` by `monotonic_ms`."""
        self._forced_unreported[key] = forced_at_ms
        # Bounded: one iteration per insertion.
        while len(self._forced_unreported) > self._forced_kept:
            oldest = next(iter(self._forced_unreported))
            del self._forced_unreported[oldest]
            if self._forced_beyond.pop(oldest, None) is not None:
                self._durable_lsn.pop(oldest, None)
            logs.get(self.service.name).error(
                "too many forced branches not yet decided by their coordinator: the oldest "
                "is no longer kept past the window of decided branches",
                txn=oldest[0],
                branch=oldest[1],
                kept_max=self._forced_kept,
            )

    def _forced_reported(
        self, key: BranchKey, commit: bool, info: BranchInfo, reported: bool = False
    ) -> None:
        """The coordinator sent its decision (`commit`) for a forced branch, and hears the
        heuristic in the answer (or answered an inquiry about it: `reconcile_forced`): from
        now on the branch is kept as long as any decided one. Counted by whether the
        coordinator's outcome agreed with the forced one, and logged (BranchReconciled), so
        that a restart neither asks about it again (a coordinator that has forgotten the
        transaction meanwhile would answer ABORTED, presumed abort: the wrong verdict) nor
        counts it again. Every later answer about the branch waits for the record
        (`_durable_lsn`)."""
        del self._forced_unreported[key]
        if commit == (info.branch.state is BranchState.COMMITTED):
            self.counters.forced_agreed += 1
        else:
            self.counters.forced_contradicted += 1
        record = log_pb2.BranchReconciled(
            transaction_id=key[0], branch=key[1], committed=commit, reported=reported
        )
        lsn = self.log.append(RecordType.BRANCH_RECONCILED, record.SerializeToString())
        self.records_since_checkpoint += 1
        self._durable_lsn[key] = lsn
        self._mark_reconciled(key)

    def _mark_reconciled(self, key: BranchKey) -> None:
        """A forced branch no longer awaiting its coordinator, which has spoken: its entry
        says so (for the checkpoints), re-encoded in place in the window, or put back into it
        as the newest when it was kept past it (for a retried decision)."""
        entry = self._forced_beyond.pop(key, None) or self._decided.get(key)
        assert entry is not None  # kept in the window or past it while it awaited
        info = _decided_info(entry)
        info.reconciled = True
        self._remember_decided(key, _decided_entry(info))

    def _forget_forced(self, key: BranchKey, info: BranchInfo) -> None:
        """Kept from now on as long as any decided branch: its entry re-encoded in place in the
        window, or put back into it as the newest when it was kept past it, so that a late
        decision still hears the heuristic outcome and a repeated forget answers the same."""
        info.forgotten = True
        self._forced_unreported.pop(key, None)
        self._forced_beyond.pop(key, None)
        self._remember_decided(key, _decided_entry(info))

    def _start_prepare(
        self,
        info: BranchInfo,
        operation: Message,
        requests: Sequence[LockRequest],
        lock_wait_s: float | None,
    ) -> None:
        branch = info.branch
        key = branch.key
        loop = asyncio.get_running_loop()
        result: asyncio.Future[tuple[BranchVote, str]] = loop.create_future()
        self._pending[key] = result
        task = loop.create_task(self._run_prepare(info, operation, requests, lock_wait_s))
        self._tasks[key] = task

        def settle(done: asyncio.Task[None]) -> None:
            self._tasks.pop(key, None)
            self._pending.pop(key, None)
            if result.done():
                return
            if done.cancelled():
                result.set_result((BranchVote.REFUSED, branch.reason or "prepare cancelled"))
            elif (error := done.exception()) is not None:
                result.set_exception(error)

        task.add_done_callback(settle)

    async def _run_prepare(
        self,
        info: BranchInfo,
        operation: Message,
        requests: Sequence[LockRequest],
        lock_wait_s: float | None,
    ) -> None:
        """The prepare of a branch that waits for locks. It has its own `operation`: a cancel
        (Rollback, lease) finishes the branch and drops the engine's copy, and should the wait
        not stop at the cancel, the late vote must still give back what it took."""
        key = info.branch.key
        owner = branch_key_text(key)
        outcome: Prepared | ReadOnly | Refused
        try:
            # A fixed order (by resource name) means one branch's own locks never deadlock.
            for request in requests:
                await self._acquire(key, request, lock_wait_s)
        except LockRefused as refusal:
            outcome = Refused(refusal.reason)
        else:
            outcome = self._service_prepare(key, owner, operation)
        self._tasks.pop(key, None)  # past the point where a rollback could cancel it
        reply = self._settle_prepare(info, outcome, operation)
        pending = self._pending.get(key)
        if pending is not None and not pending.done():
            pending.set_result((reply.vote, reply.reason))

    async def _acquire(
        self, key: BranchKey, request: LockRequest, lock_wait_s: float | None
    ) -> None:
        """Take one of a prepare's locks; a wait that runs out is refused with the service's
        `timeout_reason` for it, if it gave one. One held by another branch of the same
        transaction is refused at once (locks.HeldByOwnTransaction)."""
        try:
            await self.locks.acquire(
                branch_key_text(key),
                request.resource,
                request.mode,
                lock_wait_s,
            )
        except LockTimeout:
            if not request.timeout_reason:
                raise
            raise LockRefused(request.timeout_reason) from None

    def _lock_requests(self, key: BranchKey, operation: Message) -> list[LockRequest] | Refused:
        """The service's lock requests, by resource name. An exception from its `locks`, or a
        request that names no resource or has no LockMode (bugs in the service), refuses the
        branch before any lock is taken, as one from its prepare does (`_service_prepare`):
        before, it failed every other item of the batched call, and left the branch PREPARING
        until its lease ran out, a duplicate Prepare refused with no reason."""
        try:
            return self._checked_locks(operation)
        except Exception as error:
            return self._service_failed(key, "locks", error)

    def _checked_locks(self, operation: Message) -> list[LockRequest]:
        """The service's lock requests, by resource name; ValueError for one that names no
        resource or has no LockMode (a bug in the service), which the lock table asserts
        against."""
        requests = sorted(self.service.locks(operation), key=_by_resource)
        for request in requests:
            if not request.resource or not isinstance(request.mode, LockMode):
                raise ValueError(f"locks() returned {request!r}")
        return requests

    def _service_prepare(
        self, key: BranchKey, owner: str, operation: Message
    ) -> Prepared | ReadOnly | Refused:
        """The service's prepare; an exception from it (a bug in the service) refuses the
        branch, which releases its locks, instead of leaving it PREPARING with them until its
        lease runs out and failing every other item of its batched call."""
        try:
            return self.service.prepare(owner, operation)  # owner is branch_key_text(key)
        except Exception as error:
            return self._service_failed(key, "prepare", error)

    def _service_failed(self, key: BranchKey, step: str, error: Exception) -> Refused:
        """A bug in the service's `step`: logged with its traceback, and the branch's refusal."""
        logs.get(self.service.name).error(
            f"the service's {step} raised: branch refused",
            txn=key[0],
            branch=key[1],
            error=f"{type(error).__name__}: {error}",
            exc_info=error,
        )
        return Refused(f"{self.service.name} failed to prepare: {type(error).__name__}")

    def _settle_prepare(
        self, info: BranchInfo, outcome: Prepared | ReadOnly | Refused, operation: Message
    ) -> core.ReplyVote:
        """Feed the service's answer to the core. Nothing awaits between the service's state
        change and the log append, so the log order is the order of the state changes. A
        reservation is registered here, with the operation that undoes it, whatever state the
        branch is in by now: the core's answer (ApplyCommit, ApplyRollback, ReleaseLatePrepare)
        finds it."""
        branch = info.branch
        if isinstance(outcome, Prepared):
            self._applied.add(branch.key)
            self._operations[branch.key] = operation
            event = core.PREPARE_VOTED
        elif isinstance(outcome, ReadOnly):
            event = core.PrepareVoted(BranchVote.READ_ONLY)
        else:
            self.counters.refused += 1
            # Kept with the branch, in the window of decided ones too: the service's own text.
            event = core.PrepareVoted(BranchVote.REFUSED, limits.reason_kept(outcome.reason))
        reply = self._execute(info, branch.handle(event))
        assert isinstance(reply, core.ReplyVote)
        if reply.vote is BranchVote.PREPARED:
            # Its locks now last until its transaction is decided (a READ_ONLY or REFUSED
            # vote let them go): the lock table's deadlock search reads a wait for them as a
            # wait for its siblings. Nothing when they went already (one phase, finished).
            self.locks.pin(branch_key_text(branch.key))
        else:
            # No record of its own to wait for, but the answer may rest on effects whose
            # records are not durable yet ("duplicate order id" after another branch's
            # commit was appended): it waits for everything appended so far (persist before
            # you speak). The same fsync, with group commit.
            key = branch.key
            self._durable_lsn[key] = max(self._durable_lsn.get(key, 0), self.log.appended_lsn)
        return reply

    def decide_now(
        self, transaction_id: str, index: int, commit: bool, fingerprint: bytes = b""
    ) -> None:
        """Apply a Commit or Rollback; its answer may leave only after `wait_durable`.
        Raises BranchError when it cannot be honoured."""
        key = (transaction_id, index)
        event: core.BranchEvent = core.CommitRequested() if commit else core.RollbackRequested()
        info = self.branch(key)
        if info is not None and fingerprint and info.fingerprint not in (b"", fingerprint):
            self._another_transactions(info, commit)
            return
        if info is None:
            branch, actions = Branch.on_first_message(transaction_id, index, event)
            if branch is None:
                reply: core.BranchAction | None = next(
                    a for a in actions if isinstance(a, core.ReplyError)
                )
            else:
                tombstone = self._track(branch)
                self._finish(tombstone)
                reply = self._execute(tombstone, actions)
        else:
            reply = self._execute(info, info.branch.handle(event))
            if key in self._forced_unreported:
                # Forced: its coordinator forgets a commit once every branch acknowledged it,
                # and a restart that lost this record would then ask about the forgotten
                # commit and hear ABORTED. The answer (`_decide`, `DecideBatch`) waits for it.
                # Forced heuristic branches are an operator's rare doing: the one fsync
                # costs nothing measurable.
                self._forced_reported(key, commit, info)
                self.forced_writes += 1
        if isinstance(reply, core.ReplyError):
            raise BranchError(reply.kind, reply.message, reply.heuristic)

    def _another_transactions(self, info: BranchInfo, commit: bool) -> None:
        """A decision for a transaction that reused the id of the one this branch belongs to
        (PrepareRequest.transaction_fingerprint). Its Prepare never ran here: it was refused
        as a reuse, or never arrived before the reuse aborted. So a Rollback has nothing to
        undo, and is acknowledged with this branch left alone: answered from this branch's
        record, a committed one, it would have been reported a heuristic commit, and to the
        one-phase probe, a commit of the reuse's content that never ran. A Commit cannot be
        honoured: the reuse has no vote here (only a coordinator breaking rule 2 sends one)."""
        branch = info.branch
        text = branch_key_text((branch.transaction_id, branch.index))
        if commit:
            raise BranchError(
                core.ErrorKind.FAILED_PRECONDITION,
                f"branch {text} belongs to a different transaction here (the transaction id "
                f"was reused) and is {branch.state.value}: it never prepared for this one",
            )
        logs.get(self.service.name).info(
            "rollback for another transaction under this id: nothing of it here",
            txn=branch.transaction_id,
            branch=branch.index,
            state=branch.state.value,
        )

    async def wait_durable(self, keys: Iterable[BranchKey]) -> None:
        """Until every forced record of these branches is on disk: one wait for a whole batch."""
        lsn = max((self._durable_lsn.get(key, 0) for key in keys), default=0)
        if lsn:
            await self.log.wait_durable(lsn)

    # ---- recovery and checkpoints ----

    def replay(self, records: Iterable[LogRecord], log_directory: Path | None = None) -> None:
        """Rebuild branches, service state and locks from the log, before serving. A record
        it cannot apply raises ReplayError, naming `log_directory`, its LSN and its type."""
        since_checkpoint = 0
        # A log in a format newer than this build's is refused, not misread.
        replayed = without_format_records(records, log_directory)
        for record in coalesced(replayed, RecordType.PARTICIPANT_CHECKPOINT):
            try:
                kind = RecordType(record.record_type)
                if kind is RecordType.PARTICIPANT_CHECKPOINT:
                    self._restore_checkpoint(
                        log_pb2.ParticipantCheckpoint.FromString(record.payload)
                    )
                    since_checkpoint = 0
                    continue
                since_checkpoint += 1
                if kind is RecordType.BRANCH_PREPARED:
                    prepared = log_pb2.BranchPrepared.FromString(record.payload)
                    self._replay_prepare(
                        prepared.transaction_id,
                        prepared.branch,
                        prepared.operation,
                        fingerprint=prepared.transaction_fingerprint,
                        prepared_at_ms=prepared.prepared_at_unix_ms,
                    )
                elif kind is RecordType.BRANCH_COMMITTED:
                    committed = log_pb2.BranchCommitted.FromString(record.payload)
                    key = (committed.transaction_id, committed.branch)
                    if committed.HasField("operation"):  # one-phase
                        one_phase = self._replay_prepare(
                            key[0],
                            key[1],
                            committed.operation,
                            one_phase=True,
                            fingerprint=committed.transaction_fingerprint,
                        )
                        # Its first answer was COMMITTED: a stale duplicate Prepare must get that.
                        one_phase.branch.vote = BranchVote.COMMITTED
                    prepared_info = self.open.get(key)
                    if (
                        prepared_info is None
                        or prepared_info.branch.state is not BranchState.PREPARED
                    ):
                        raise RecoveryError(
                            f"commit record for {branch_key_text(key)} not prepared"
                        )
                    prepared_info.branch.state = BranchState.COMMITTED
                    prepared_info.branch.heuristic = committed.heuristic
                    # The decision's time, not the replay's (0 in a log older than the field).
                    prepared_info.updated_at_ms = committed.decided_at_unix_ms or self.clock_ms()
                    with self._replaying("commit", key):
                        self.service.commit(branch_key_text(key), self._operations[key])
                    self._finish(prepared_info)
                elif kind is RecordType.BRANCH_ROLLED_BACK:
                    rolled = log_pb2.BranchRolledBack.FromString(record.payload)
                    key = (rolled.transaction_id, rolled.branch)
                    known = self.branch(key)
                    if known is None and rolled.refused:  # by its own prepare, as it voted
                        refused = Branch(
                            key[0],
                            key[1],
                            BranchState.REFUSED,
                            BranchVote.REFUSED,
                            rolled.reason,
                            rolled.one_phase,
                        )
                        known = self._track(refused, rolled.transaction_fingerprint)
                    elif known is None:
                        tombstone = Branch(
                            key[0], key[1], BranchState.ROLLED_BACK, one_phase=rolled.one_phase
                        )
                        # A log written before the record kept a reason: a tombstone's.
                        tombstone.reason = rolled.reason or "rolled back before prepare"
                        known = self._track(tombstone, rolled.transaction_fingerprint)
                    elif known.branch.state is BranchState.PREPARED:
                        known.branch.state = BranchState.ROLLED_BACK
                        known.branch.heuristic = rolled.heuristic
                        known.branch.reason = rolled.reason or known.branch.reason
                        with self._replaying("rollback", key):
                            self.service.rollback(branch_key_text(key), self._operations[key])
                    if rolled.decided_at_unix_ms:
                        known.updated_at_ms = rolled.decided_at_unix_ms
                    self._finish(known)
                elif kind is RecordType.BRANCH_FORGOTTEN:
                    forgotten = log_pb2.BranchForgotten.FromString(record.payload)
                    key = (forgotten.transaction_id, forgotten.branch)
                    info = self.branch(key)
                    # Absent when the bound on forced branches pushed it out before the forget.
                    if info is not None and key not in self.open:
                        self._forget_forced(key, info)
                elif kind is RecordType.BRANCH_RECONCILED:
                    reconciled = log_pb2.BranchReconciled.FromString(record.payload)
                    key = (reconciled.transaction_id, reconciled.branch)
                    # Absent when the bound on forced branches pushed it out before, or an
                    # operator forgot it first. Not counted, not logged: that was done once.
                    if self._forced_unreported.pop(key, None) is not None:
                        self._mark_reconciled(key)
                # Coordinator record types never appear in a participant's log.
            # ValueError: RecordType(n), or a snapshot the service's restore refuses.
            # RecoveryError: whatever else the service raised, among others (`_replaying`).
            except (ValueError, DecodeError, RecoveryError) as error:
                raise ReplayError(
                    log_directory, record.lsn, record.record_type, str(error)
                ) from error
        # Counted on from here: a process restarted more often than it appends the records
        # that make a checkpoint due would otherwise never take one, and its log would grow.
        self.records_since_checkpoint = since_checkpoint

    def _replay_prepare(
        self,
        transaction_id: str,
        index: int,
        operation: any_pb2.Any,
        one_phase: bool = False,
        fingerprint: bytes = b"",
        prepared_at_ms: int = 0,
    ) -> BranchInfo:
        key = (transaction_id, index)
        decoded = self._logged_operation(key, operation)
        with self._replaying("prepare", key):
            outcome = self.service.prepare(branch_key_text(key), decoded)
        if not isinstance(outcome, Prepared):
            raise RecoveryError(
                f"replaying the prepare of {branch_key_text(key)} gave {outcome!r}: the service "
                "is not deterministic or the log does not match the state"
            )
        branch = Branch(transaction_id, index, BranchState.PREPARED, BranchVote.PREPARED)
        branch.one_phase = one_phase
        info = self._track(branch, fingerprint)
        info.prepared_at_ms = prepared_at_ms
        self._operations[key] = decoded
        self._applied.add(key)
        self._recover_prepared(info, decoded)
        return info

    def _logged_operation(self, key: BranchKey, operation: any_pb2.Any) -> Message:
        """A prepared branch's operation as logged, decoded. Any.Unpack answers False, and
        leaves the message empty, for another type: replayed, that was a branch PREPARED on
        an empty operation (an empty order, prepared), silently."""
        decoded: Message = self.service.operation_type()
        if not operation.Unpack(decoded):
            raise RecoveryError(
                f"the operation of branch {branch_key_text(key)} is "
                f"{operation.type_url.rsplit('/', 1)[-1][:80]!r}, not "
                f"{decoded.DESCRIPTOR.full_name} (a log written by another service?)"
            )
        return decoded

    def _recover_prepared(self, info: BranchInfo, operation: Any) -> None:
        """Date a branch recovered as prepared on this process's monotonic clock, as old as
        its logged `prepared_at_ms` says (0, none logged: as old as can be, so asked about at
        once), and re-take its locks, as held since its prepare (not since the restart:
        ListLocks' held_since). They were taken just before its record was written, so this
        is later by the prepare's own time."""
        info.prepared_monotonic_ms = self._monotonic_of(info.prepared_at_ms)
        age_ms = max(0, self.clock_ms() - info.prepared_at_ms) if info.prepared_at_ms else 0
        with self._replaying("locks", info.branch.key):
            requests = self._checked_locks(operation)
        for request in requests:
            try:
                self.locks.acquire_now(
                    branch_key_text(info.branch.key),
                    request.resource,
                    request.mode,
                    held_for_s=age_ms / 1000,
                )
            except LockRefused as conflict:
                # Serving on would let two branches share what the service means to isolate.
                raise RecoveryError(
                    f"re-taking the locks of prepared branch {branch_key_text(info.branch.key)}: "
                    f"{conflict.reason}; the service's locks() do not match the log (changed "
                    "since it was written?)"
                ) from None

    @contextlib.contextmanager
    def _replaying(
        self, step: str, key: BranchKey | None, refusal: type[Exception] | None = None
    ) -> Iterator[None]:
        """A call into the service during replay. Whatever it raises (a bug in the service, or
        a service changed since the log was written) refuses the start as a RecoveryError, which
        `replay` reports as its one-line ReplayError naming the record: anything but a
        ValueError was a bare traceback. Where it was raised stands in for the traceback.
        `refusal`: the step's documented way to refuse (restore's ValueError), worded for an
        operator already, passed on as it is."""
        try:
            yield
        except Exception as error:
            if refusal is not None and isinstance(error, refusal):
                raise
            raised = traceback.extract_tb(error.__traceback__)[-1:]  # the innermost frame
            where = "".join(f" (in {f.name}, {f.filename}:{f.lineno})" for f in raised)
            branch = "" if key is None else f", replaying branch {branch_key_text(key)}"
            said = " ".join(str(error).splitlines())  # the start's error is one line
            raise RecoveryError(
                f"the service's {step} raised {type(error).__name__}: {said}{where}{branch} "
                "(a bug in the service, or a service changed since the log was written)"
            ) from error

    def checkpoint_records(self) -> list[CheckpointPayload]:
        """A snapshot of everything the log holds (service state, prepared and decided
        branches), as the payloads of the checkpoint's records: each one a ParticipantCheckpoint
        of at most `checkpoint_part_bytes`, all of them merged the whole (see log.proto).

        Serialized protobuf messages concatenate, so the decided branches' entries, encoded
        once each when decided, are joined as bytes; and the records are cut between fields,
        never inside one, except for the service's state, which has parts of its own."""
        size = self.checkpoint_part_bytes
        part = size - _FIELD_HEADER_BYTES_MAX  # so that a part's record fits in `size`
        records: list[CheckpointPayload] = [
            [_SERVICE_STATE_KEY, varint(sum(map(len, run))), *run]
            for run in in_parts(_state_pieces(self.service, part), part)
        ] or [encoded_field(_SERVICE_STATE_KEY, b"")]
        prepared = [
            log_pb2.ParticipantCheckpoint(
                prepared=[
                    log_pb2.BranchPrepared(
                        transaction_id=key[0],
                        branch=key[1],
                        prepared_at_unix_ms=info.prepared_at_ms,
                        operation=_packed(self._operations[key]),
                        transaction_fingerprint=info.fingerprint,
                    )
                ]
            ).SerializeToString()
            for key, info in self.open.items()
            if info.branch.state is BranchState.PREPARED
        ]
        # Each run of pieces is joined by the log, where it writes the record (off the loop):
        # the list copies below are the consistent snapshot, cheap references to bytes.
        identity = [encoded_field(_INCARNATION_KEY, self.incarnation.encode())]
        return [
            *(identity if self.incarnation else ()),
            *records,
            *in_parts(prepared, size),
            # Forced branches kept past the window first: they are older than its entries.
            *in_parts([*self._forced_beyond.values(), *self._decided.pieces(size)], size),
        ]

    def _restore_checkpoint(self, checkpoint: log_pb2.ParticipantCheckpoint) -> None:
        self.open.clear()
        self._decided.clear()
        self._forced_unreported.clear()
        self._forced_beyond.clear()
        self._operations.clear()
        self._packed.clear()
        self._applied.clear()
        self.incarnation = checkpoint.incarnation or self.incarnation
        with self._replaying("restore", None, refusal=ValueError):
            self.service.restore(b"".join(checkpoint.service_state))
        for prepared in checkpoint.prepared:
            key = (prepared.transaction_id, prepared.branch)
            decoded = self._logged_operation(key, prepared.operation)
            branch = Branch(key[0], key[1], BranchState.PREPARED, BranchVote.PREPARED)
            info = self._track(branch, prepared.transaction_fingerprint)
            info.prepared_at_ms = prepared.prepared_at_unix_ms
            self._operations[key] = decoded
            self._applied.add(key)
            self._recover_prepared(info, decoded)
        restored_at_ms = self.clock_ms()
        for decided in checkpoint.decided:
            key = (decided.transaction_id, decided.branch)
            if not decided.decided_at_unix_ms:  # a checkpoint from before the field
                decided.decided_at_unix_ms = restored_at_ms
            if decided.heuristic and not decided.forgotten and not decided.reconciled:
                # Its coordinator has not spoken yet (BranchReconciled): kept, and asked about
                # by the inquiry loop. A checkpoint written before `reconciled` existed keeps
                # every forced branch not forgotten, and they are asked about again.
                self._keep_forced(key, self._monotonic_of(decided.decided_at_unix_ms))
            self._remember_decided(key, encoded_field(_DECIDED_KEY, decided.SerializeToString()))

    async def checkpoint(self) -> None:
        await self.checkpoints.write(
            self.log, RecordType.PARTICIPANT_CHECKPOINT, self.checkpoint_records
        )
        self.records_since_checkpoint = 0

    # The side effect of each action type (a table, not a chain of isinstance tests: this runs
    # for every action of every branch). Reply actions have none: _execute returns them.
    _effects: dict[type, Callable[[BranchEngine, BranchInfo, Any], None]] = {
        core.CancelPrepare: _cancel_prepare,
        core.Persist: _persist,
        core.ApplyCommit: _apply_commit,
        core.ApplyRollback: _apply_rollback,
        core.ReleaseLatePrepare: _release_late_prepare,
        core.AskCoordinator: _ask_coordinator,
    }
