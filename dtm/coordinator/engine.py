"""The coordinator's engine: runs each transaction's pure core (dtm.core.transaction) against
the participants (gRPC), the log and the clock.

Every state change goes through `_feed`, which hands an event to the core and carries out the
actions it returns. All of it runs on one event loop thread: transactions interleave at awaits
(RPCs, log fsyncs) but never hold a lock, so there is no global serialization.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from dtm import crashpoints, limits, logs
from dtm.coordinator.failures import PhaseTwoFailures
from dtm.coordinator.finished import FinishedWindow, Head, TransactionView, pack
from dtm.coordinator.heuristics import (
    UNKNOWN_ATTEMPT,
    HeuristicTable,
    heuristic_pb,
    key_of,
    named_by,
    same_attempt,
)
from dtm.coordinator.ports import DecideItem, DecideResult, PrepareItem, PrepareResult
from dtm.coordinator.registry import Registry
from dtm.coordinator.run import (
    OUTCOME_TO_PB,
    Run,
    _state_pb,
    _stop_phase_two,
    slots_held,
)
from dtm.core import transaction as core
from dtm.core.branch import HEURISTIC_COMMIT, HEURISTIC_HAZARD, HEURISTIC_ROLLBACK
from dtm.core.transaction import (
    ROLLBACK_ATTEMPTS_MAX,
    Outcome,
    ProtocolError,
    Transaction,
    TxnState,
)
from dtm.metrics import NO_OBSERVER, CheckpointStats, EngineObserver
from dtm.records import (
    RecordType,
    ReplayError,
    coalesced,
    encoded_field,
    field_key,
    in_parts,
    without_format_records,
)
from dtm.wal import CheckpointPayload, Log, LogRecord
from dtmpb.v1 import coordinator_pb2, log_pb2


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def loop_s() -> float:
    """The running event loop's clock, in seconds: monotonic, and the one the engine's timers
    and call deadlines run on. For intervals; the wall clock (`wall_ms`) may step."""
    return asyncio.get_running_loop().time()


@dataclass
class CoordinatorConfig:
    prepare_timeout_ms: int = limits.PREPARE_TIMEOUT_MS_DEFAULT
    transaction_timeout_ms: int = limits.TRANSACTION_TIMEOUT_MS_DEFAULT
    phase_two_timeout_ms: int = limits.PHASE_TWO_CALL_TIMEOUT_MS
    backoff_ms_min: int = limits.PHASE_TWO_BACKOFF_MS_MIN
    backoff_ms_max: int = limits.PHASE_TWO_BACKOFF_MS_MAX
    checkpoint_every_records: int = 20_000
    finished_kept: int = limits.FINISHED_TRANSACTIONS_KEPT
    in_flight_max: int = limits.TRANSACTIONS_IN_FLIGHT_MAX


class Refused(Exception):
    """A request refused before it changed anything; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class SubmitRejected(Refused):
    """A Submit refused before anything ran."""


TERMINAL_ANSWERS = frozenset({coordinator_pb2.OUTCOME_COMMITTED, coordinator_pb2.OUTCOME_ABORTED})


class InquiryAnswer(NamedTuple):
    """What a participant in doubt is told (QueryOutcomeResponse): `outcome`
    (coordinator_pb2.Outcome), and whether it is an abort presumed for want of any record of
    the asked attempt (`presumed_abort`) rather than one decided and kept."""

    outcome: int
    presumed_abort: bool = False


PRESUMED_ABORT = InquiryAnswer(coordinator_pb2.OUTCOME_ABORTED, presumed_abort=True)

#: Waits of a Submit for earlier attempts under its id (one running, then its Rollbacks)
#: before its own attempt runs.
SUBMIT_WAITS_MAX = 8


_ENDED_KEY = field_key(4)  # CoordinatorCheckpoint.ended

#: How long the count of what holds the slots at the limit of transactions in flight is
#: reused for the next refusals (Engine._in_flight_refusal).
SLOTS_RECOUNT_MS = 1_000


def _other_report(kept: log_pb2.HeuristicRecorded, outcome: str, text: str) -> str:
    """Why a report is refused when the heuristic outcome kept for its branch says something
    else. Acknowledged, the participant would take its report as recorded, and stop."""
    kept_decision = coordinator_pb2.Outcome.Name(heuristic_pb(kept).decision)
    decision = "OUTCOME_COMMITTED" if outcome == HEURISTIC_ROLLBACK else "OUTCOME_ABORTED"
    return (
        f"another heuristic outcome is kept for branch {text}: {kept.outcome} against "
        f"{kept_decision}, recorded at {kept.recorded_at_unix_ms} (unix ms); this report is "
        f"a {outcome} against {decision}: nothing recorded (the coordinator forgot the "
        "transaction and now presumes it aborted, or the id was used by another attempt "
        "and one of the two has no fingerprint to tell them apart). "
        "An operator reconciles the kept one and forgets it (dtm heuristics forget "
        f"{text.replace('/', ' ')}{_attempt_option(kept)}); the report is recorded after that"
    )


def _attempt_option(kept: log_pb2.HeuristicRecorded) -> str:
    """The `dtm heuristics forget` option naming a kept outcome's attempt: named even when it
    is the only one kept now, since another attempt's may be by the time the operator acts."""
    return f" --attempt {kept.transaction_fingerprint.hex() or UNKNOWN_ATTEMPT}"


def _same_transaction(transaction_id: str, known: bytes, fingerprint: bytes) -> None:
    """A retried Submit must carry the transaction its id was first used for."""
    if known != fingerprint:
        raise SubmitRejected(
            grpc.StatusCode.ALREADY_EXISTS,
            f"transaction id {transaction_id!r} was already used for a different "
            "transaction; choose a new id",
        )


def _another_process(
    known: coordinator_pb2.ParticipantInfo, info: coordinator_pb2.ParticipantInfo
) -> bool:
    """Whether registration `info` is another process than the registered `known`, as far as
    incarnations tell: another non-empty incarnation; or none at another address while `known`
    has one. The process that registered `known` sends its incarnation again after a restart
    on its log, whatever its address, so a registration with none cannot be it (a
    registration with none took an owed name at will: the guard compared only two non-empty
    incarnations). At `known`'s own address a registration with none moves no decision
    (they go to that address either way): as before. Nothing is told when `known` has none."""
    if not known.incarnation:
        return False
    if info.incarnation:
        return info.incarnation != known.incarnation
    return info.address != known.address


def _whom(info: coordinator_pb2.ParticipantInfo) -> str:
    """A registration in a log line: its incarnation, or that it has none, and its address."""
    if not info.incarnation:
        return f"no incarnation at {info.address}"
    return f"incarnation {info.incarnation} at {info.address}"


def _takeover_refusal(
    known: coordinator_pb2.ParticipantInfo, info: coordinator_pb2.ParticipantInfo
) -> tuple[str, str]:
    """What goes before and after Engine._refuse_if_busy's reason when `info` may not take
    `known`'s name (`_another_process`): the way out first, then who is registered and why
    `info` is not it. A status carries at most grpc_edge.STATUS_DETAILS_CHARS_MAX characters
    and the end is what is cut, so what varies in length (addresses of up to
    ADDRESS_LENGTH_MAX, the transaction ids) comes after the way out and the busy reason."""
    if info.incarnation:
        way_out = (
            f"participant {info.name!r} may not be taken by another incarnation while it is "
            "owed an answer; if this participant's log was lost, start it with "
            f"{limits.REPLACE_REGISTRATION_FLAG} (the owed commit decisions become heuristic "
            "hazards)"
        )
        whom = (
            f"incarnation {info.incarnation!r} at {info.address} is another process (or one "
            "whose log was lost)"
        )
    else:
        way_out = (
            f"participant {info.name!r} may not be taken by a registration with no "
            "incarnation while it is owed an answer: register with the incarnation in the "
            "participant's log, or, if that log is lost, with replace "
            f"({limits.REPLACE_REGISTRATION_FLAG}: owed commits become heuristic hazards)"
        )
        whom = f"a registration with no incarnation, at {info.address}, is not that process"
    registered = f"registered: incarnation {known.incarnation!r} at {known.address}"
    return f"{way_out}; ", f"; {registered}; {whom}"


class Counters:
    """Protocol costs, to check against the presumed-abort table of protocol.md."""

    def __init__(self) -> None:
        self.requests = 0  # Prepare, Commit, Rollback sent
        self.replies = 0  # answers the protocol acts on (votes, commit acks)
        self.rollback_replies = 0  # transport-level answers to Rollback; PA needs none
        self.forced_writes = 0
        self.lazy_writes = 0
        self.committed = 0
        self.aborted = 0
        # Finished with their outcome unknown for good (a one-phase commit whose log was lost).
        self.unknown = 0


class Left(NamedTuple):
    """What a stop leaves in flight (Engine.drain)."""

    to_recovery: int  # commits decided in the log: the next start finishes their phase 2
    one_phase_unknown: int  # one-phase commits unanswered: their participants alone know
    # Two-phase ones undecided (a stop without grace skips stop_waiting): nothing of them is
    # in the log, so a participant that prepared one is told ABORTED when it asks.
    presumed_aborted: int


class Engine:
    def __init__(
        self,
        log: Log,
        registry: Registry,
        config: CoordinatorConfig,
        clock_ms: Callable[[], int] = wall_ms,
        monotonic_s: Callable[[], float] = loop_s,
    ) -> None:
        self.log = log
        self.registry = registry
        self.config = config
        self.clock_ms = clock_ms
        self.monotonic_s = monotonic_s
        self.active: dict[str, Run] = {}
        self.finished = FinishedWindow(config.finished_kept)
        self.counters = Counters()
        self.observer: EngineObserver = NO_OBSERVER  # dtm.metrics installs itself here
        self.records_since_checkpoint = 0
        self.checkpoints = CheckpointStats()
        # Kept until an operator forgets them: replayed and checkpointed (see heuristics.py).
        self.heuristics = HeuristicTable()
        self._log = logs.get("coordinator")
        self._debug = logs.debug_enabled()
        self._phase_two_failures = PhaseTwoFailures(self._log)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False  # close() ran: nothing new is spawned
        # Finished attempts whose Rollbacks are still in flight or waiting to be retried, by
        # id (see Run.decisions_open). Bounded by the abort rate times a Rollback's few tries.
        self._settling: dict[str, Run] = {}
        self._stop_waiting = False  # see stop_waiting
        # Has the log sync the end records of the commits the finished window may not forget
        # yet, then trims it (see _keep_finished). One at a time.
        self._ends_syncing: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None  # set while drain() waits
        # What holds the slots at the limit of transactions in flight, and when it was counted
        # (`monotonic_s`; see _in_flight_refusal).
        self._slots_held: tuple[float, str] = (0.0, "")

    # ---- public operations ----

    async def submit(
        self,
        transaction_id: str,
        branches: Sequence[tuple[str, any_pb2.Any]],
        timeout_ms: int,
        fingerprint: bytes,
    ) -> TransactionView:
        """Run (or join) a transaction; returns once the client's answer is known."""
        transaction_id = transaction_id or uuid.uuid4().hex
        for _ in range(SUBMIT_WAITS_MAX):
            run = self.active.get(transaction_id)
            if run is not None:
                if run.fingerprint == fingerprint:  # a retry while it runs: join it
                    await self._wait_on(run, run.reply)
                    return run.view()
                # Other content under this id is running. Whose id it is, the participants
                # say: if they refuse that attempt as a reuse (perhaps of this very
                # transaction, which the coordinator forgot), it is not kept, and this one runs
                # after it.
                await self._wait_on(run, run.reply)
                if run.kept:
                    _same_transaction(transaction_id, run.fingerprint, fingerprint)
                continue
            finished = self.finished.get(transaction_id)
            if finished is not None:  # a retry after it finished: its answer again
                _same_transaction(transaction_id, finished.fingerprint, fingerprint)
                return finished
            earlier = self._settling.get(transaction_id)
            if earlier is None or earlier.settled is None:
                break
            # An attempt under this id that is no longer kept (a refused reuse, or pushed out
            # of the window) still has Rollbacks on their way: wait for them to end.
            await self._wait_on(earlier, earlier.settled)
        else:
            raise SubmitRejected(
                grpc.StatusCode.UNAVAILABLE,
                f"transaction id {transaction_id!r} is busy with other attempts; retry shortly",
            )
        if self._stop_waiting:
            # Reached after the waits above: stop_waiting has aborted what collected votes,
            # and an attempt started now would get no vote before the server's grace cut its
            # call off, leaving what prepared in doubt until the next start.
            raise SubmitRejected(
                grpc.StatusCode.UNAVAILABLE,
                f"the coordinator is stopping: nothing was run for transaction "
                f"{transaction_id!r}; submit it again once the coordinator is back",
            )
        if len(self.active) >= self.config.in_flight_max:
            raise self._in_flight_refusal()
        participants = [name for name, _ in branches]
        for index, name in enumerate(participants):
            # Checked again here: the server skips its checks for an id the engine knows, and
            # the waits above may end in a fresh attempt (the one waited for was a refused
            # reuse, not kept), or an operator unregistered a participant meanwhile. It was a
            # KeyError: UNKNOWN to the client, and some prepares already sent.
            if name not in self.registry.participants:
                raise SubmitRejected(
                    grpc.StatusCode.NOT_FOUND, self.registry.unknown_branch(index, name)
                )
        one_phase_capable = len(branches) == 1 and self.registry.one_phase(participants[0])
        now = self.clock_ms()
        txn, actions = Transaction.begin(
            transaction_id,
            participants,
            now_ms=now,
            timeout_ms=timeout_ms,
            one_phase_capable=one_phase_capable,
        )
        loop = asyncio.get_running_loop()
        run = Run(txn, fingerprint, [op for _, op in branches], loop.create_future())
        run.started_s = self.monotonic_s()
        run.due_s = run.started_s + timeout_ms / 1000
        self.active[transaction_id] = run
        run.timer = loop.call_later(timeout_ms / 1000, self._on_timer, run)
        if self._debug:
            self._log.debug(
                "transaction started",
                txn=transaction_id,
                participants=",".join(participants),
                one_phase=txn.one_phase,
                timeout_ms=timeout_ms,
            )
        self._execute(run, actions)
        await asyncio.shield(run.reply)
        return run.view()

    async def _wait_on(self, run: Run, until: asyncio.Future[None]) -> None:
        """Wait, as another Submit under `run`'s id, for `until` (its answer, or the end of its
        Rollbacks). Such Submits are not transactions in flight, and nothing bounded them: a
        client could hold any number of calls, each with its request, on one transaction
        (found by a bug hunt). Raises SubmitRejected (RESOURCE_EXHAUSTED) beyond the bound."""
        if run.waiting >= limits.SUBMITS_WAITING_PER_TRANSACTION_MAX:
            raise SubmitRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{run.waiting} Submits under transaction id {run.txn.transaction_id!r} already "
                "wait for it (the limit): nothing was run for this one; ask its outcome with "
                "GetTransaction, or submit it again once one of them is answered",
            )
        run.waiting += 1
        try:
            await asyncio.shield(until)
        finally:
            run.waiting -= 1

    def _in_flight_refusal(self) -> SubmitRejected:
        """The refusal at the limit of transactions in flight, saying what holds the slots. A
        committed transaction keeps its slot until every branch acknowledged its Commit, so a
        participant that stops acknowledging fills them all, and "retry shortly" then sent
        operators and clients after a wait that could not help (found by a bug hunt). The
        count is a scan of the transactions in flight, made at most once per
        SLOTS_RECOUNT_MS: under overload, refusals come by thousands a second. Timed by the
        monotonic clock: by the wall clock, a step back (NTP, an operator) kept a stale count
        (naming a participant that had recovered, or missing one that stopped) for as long as
        the step."""
        now = self.monotonic_s()
        counted_at, held = self._slots_held
        if not held or (now - counted_at) * 1000 >= SLOTS_RECOUNT_MS:
            held = slots_held(self.active.values())
            self._slots_held = (now, held)
        return SubmitRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{len(self.active)} transactions in flight (the limit); {held}",
        )

    def lookup(self, transaction_id: str) -> TransactionView | None:
        run = self.active.get(transaction_id)
        return run.view() if run is not None else self.finished.get(transaction_id)

    def query_outcome(self, transaction_id: str, fingerprint: bytes = b"") -> int:
        """For a participant in doubt: `answer_inquiry`'s outcome."""
        return self.answer_inquiry(transaction_id, fingerprint).outcome

    def answer_inquiry(self, transaction_id: str, fingerprint: bytes = b"") -> InquiryAnswer:
        """For a participant in doubt. No record means aborted (presumed abort), and so does a
        record of other content under the id: the asking branch was prepared for an attempt
        that reused the id, which the participants refused and which is over (a branch of a
        commit is never left in doubt by a record the coordinator still keeps or forgot), and
        must not take the outcome of the transaction the id belongs to. Both say so
        (`presumed_abort`): an operator's override that the coordinator lost its log may force
        a commit past such an answer, never past an abort it keeps on record."""
        run = self.active.get(transaction_id)
        finished = None if run is not None else self.finished.get(transaction_id)
        on_record = run.fingerprint if run is not None else finished and finished.fingerprint
        if fingerprint and on_record and on_record != fingerprint:
            return PRESUMED_ABORT
        if finished is None:  # running, or no record at all
            answer = core.inquiry_answer(run.txn if run is not None else None)
            outcome = (
                coordinator_pb2.OUTCOME_UNSPECIFIED if answer is None else OUTCOME_TO_PB[answer]
            )
            return InquiryAnswer(outcome, presumed_abort=run is None)
        if finished.committed_earlier:
            # This attempt's own outcome: it decided abort, and a branch of it in doubt is one
            # a participant that had forgotten the earlier commit prepared again.
            return InquiryAnswer(coordinator_pb2.OUTCOME_ABORTED)
        if finished.answer in TERMINAL_ANSWERS:
            return InquiryAnswer(finished.answer)
        return InquiryAnswer(coordinator_pb2.OUTCOME_UNSPECIFIED)

    def views(self, states: Collection[int] = ()) -> Iterator[TransactionView]:
        """Active then finished, newest first; only those in `states` (TransactionState
        values) if any are given. Consume without awaiting: the window is read in place."""
        for run in reversed(list(self.active.values())):
            if not states or _state_pb(run.txn) in states:
                yield run.view()
        yield from self.finished.newest_first(states)

    async def retry_phase_two_now(self, transaction_id: str) -> TransactionView | None:
        run = self.active.get(transaction_id)
        if run is None:
            return self.finished.get(transaction_id)
        if run.txn.state is TxnState.COMMITTING and run.retrying:
            # A branch waiting out its backoff is sent now, in place of that wait: sent in
            # addition, each call's failure would start one more retry loop against the
            # participant. Any other unacknowledged branch has its Commit in flight.
            for index, waiting in list(run.retrying.items()):
                del run.retrying[index]
                waiting.cancel()
                self._phase_two(run, index, commit=True)
        return run.view()

    # ---- the one place where events reach the core ----

    def _feed(self, run: Run, event: core.Event) -> None:
        before = run.txn.state
        finished_before = run.finished
        try:
            actions = run.txn.handle(event)
        except ProtocolError as error:
            # A participant answered something the protocol does not allow (a PREPARED vote to
            # a one-phase Prepare, say). The core changed nothing; never wedge the transaction
            # on it: an illegal vote counts as a failed prepare, anything else is dropped.
            self._log.error("protocol error", txn=run.txn.transaction_id, error=str(error))
            aborted_waiting = run.txn.state is TxnState.ABORTED and run.txn.answer_pending
            if isinstance(event, core.VoteReceived) and (
                run.txn.state is TxnState.PREPARING or aborted_waiting
            ):
                failed = core.PrepareFailed(
                    event.branch, f"protocol error: {error}", event.now_ms, protocol_error=True
                )
                self._feed(run, failed)
            return
        if run.txn.state is not before:
            if self._debug:
                self._log.debug(
                    "transaction state",
                    txn=run.txn.transaction_id,
                    state=run.txn.state.value,
                    previous=before.value,
                    reason=run.txn.reason or None,
                )
            if run.txn.state is TxnState.ABORTED:
                crashpoints.hit("coordinator.after_abort_decided")
            if before is TxnState.PREPARING:
                run.operations = []  # phase 1 is over: no need to keep the payloads
                # The timer stays while an aborted transaction's answer waits for a Prepare
                # still out: the deadline bounds that wait.
                if run.timer is not None and not run.txn.answer_pending:
                    run.timer.cancel()
                    run.timer = None
        self._execute(run, actions)
        if self._stop_waiting:
            self._answer_now(run)
        if finished_before and run.kept:
            # A rollback acknowledged or a heuristic reported after the transaction finished
            # (a refused reuse is not in the window: its record would replace the one of the
            # transaction the id belongs to).
            self.finished.update(run.record())

    def _execute(self, run: Run, actions: Iterable[core.Action]) -> None:
        effects = self._effects  # the table at the end of the class
        for action in actions:
            effects[type(action)](self, run, action)

    def _send_prepare(self, run: Run, action: core.SendPrepare) -> None:
        self._prepare(run, action.branch, action.one_phase)

    def _send_commit(self, run: Run, action: core.SendCommit) -> None:
        self._phase_two(run, action.branch, commit=True)

    def _send_rollback(self, run: Run, action: core.SendRollback) -> None:
        self._phase_two(run, action.branch, commit=False)

    def _retry_phase_two(self, run: Run, action: core.RetryPhaseTwo) -> None:
        task = self._spawn(self._retry(run, action.branch, action.attempt))
        if task is not None:
            if run.retrying is None:
                run.retrying = {}
            run.retrying[action.branch] = task
            # Open until the task ends, even cancelled before it ran (it then runs no code).
            run.decisions_open += 1
            task.add_done_callback(lambda _: self._decision_closed(run))

    def _decision_closed(self, run: Run) -> None:
        run.decisions_open -= 1
        if run.decisions_open == 0 and run.finished:
            if self._settling.get(run.txn.transaction_id) is run:
                del self._settling[run.txn.transaction_id]
            if run.settled is not None and not run.settled.done():
                run.settled.set_result(None)

    def _probe_one_phase(self, run: Run, action: core.ProbeOnePhase) -> None:
        self._probe(run)

    def _reply(self, run: Run, action: core.Reply) -> None:
        run.outcome_pb = OUTCOME_TO_PB[action.outcome]
        if not run.reply.done():
            run.reply.set_result(None)
        if crashpoints.ARMED == "coordinator.after_client_reply":
            # The answer leaves when the Submit handler resumes; die just after.
            loop = asyncio.get_running_loop()
            loop.call_later(0.02, crashpoints.hit, "coordinator.after_client_reply")

    def _persist_end(self, run: Run, action: core.PersistEnd) -> None:
        crashpoints.hit("coordinator.before_end_record")
        payload = log_pb2.TransactionEnded(transaction_id=run.txn.transaction_id)
        # Nobody waits for it: it rides the next fsync. The finished window keeps the commit
        # until then (_keep_finished).
        run.end_lsn = self._append(RecordType.TRANSACTION_ENDED, payload.SerializeToString())
        self.counters.lazy_writes += 1

    def _persist_heuristic(self, run: Run, action: core.PersistHeuristic) -> None:
        txn = run.txn
        branch = txn.branch(action.branch)
        heuristic = log_pb2.HeuristicRecorded(
            transaction_id=txn.transaction_id,
            branch=action.branch,
            participant=branch.participant,
            outcome=action.outcome,
            detail=action.detail,
            recorded_at_unix_ms=wall_ms(),
            committed=txn.state in (TxnState.COMMITTING, TxnState.COMMITTED),
            one_phase_unknown=txn.state is TxnState.UNKNOWN,
            found_by_inquiry=action.found_by_inquiry,
            transaction_fingerprint=run.fingerprint,
        )
        if heuristic.committed and run.decision:
            # As replay marks it (_stop_phase_two): the decision a checkpoint keeps says so.
            decided = log_pb2.CommitDecided.FromString(run.decision)
            _stop_phase_two({txn.transaction_id: decided}, heuristic)
            run.decision = decided.SerializeToString()
        self._write_heuristic(heuristic)
        self._log.warning(
            "one-phase outcome cannot be learned: recorded as a heuristic outcome"
            if txn.state is TxnState.UNKNOWN
            else "heuristic outcome reported by a participant: phase 2 of this branch stops",
            txn=txn.transaction_id,
            participant=branch.participant,
            branch=action.branch,
            outcome=action.outcome,
            decision=txn.state.value,
            detail=action.detail,
            found_by_inquiry=action.found_by_inquiry or None,
        )

    def _write_heuristic(self, heuristic: log_pb2.HeuristicRecorded) -> None:
        """Log a heuristic outcome, keep it and count it."""
        # Flushed at once, though nobody waits for it: after a crash, a commit's Commit is
        # sent again (and contradicted again), but an abort's Rollback never is.
        lsn = self._append(RecordType.HEURISTIC_RECORDED, heuristic.SerializeToString())
        self.counters.forced_writes += 1
        self._spawn(self.log.wait_durable(lsn))
        self._keep_heuristic(heuristic)
        self.observer.heuristic_recorded(heuristic.participant, heuristic.outcome)

    def _keep_heuristic(self, heuristic: log_pb2.HeuristicRecorded) -> None:
        for dropped in self.heuristics.keep(heuristic):
            self._log.error(
                "too many heuristic outcomes kept: the oldest is no longer listed; forget "
                "the ones reconciled (dtm heuristics forget)",
                kept_max=self.heuristics.kept_max,
                txn=dropped.transaction_id,
                branch=dropped.branch,
                participant=dropped.participant,
                outcome=dropped.outcome,
            )

    def knows(self, transaction_id: str) -> bool:
        """In flight, or finished and still remembered."""
        return transaction_id in self.active or transaction_id in self.finished

    async def register(self, info: coordinator_pb2.ParticipantInfo, replace: bool = False) -> None:
        """A participant (re-)registers with a change (a new address, new capabilities, a new
        incarnation): into the registry, durably. Raises RegistrationError (the registry is
        full), or Refused (another process, `_another_process`, while transactions not yet
        finished have branches under the name), changing nothing. `replace` (an operator's
        override for a participant that lost its log) accepts another incarnation even then:
        the decisions owed go to it, and each Commit among them becomes a heuristic hazard."""
        known = self.registry.participants.get(info.name)
        replaced = known is not None and _another_process(known, info)
        owed: list[str] = []
        if replaced:
            assert known is not None
            owed = self._owed(info.name)
            if not replace:
                self._refuse_if_busy(info.name, *_takeover_refusal(known, info))
        elif known is not None and not known.incarnation and known.address != info.address:
            self._warn_if_moved_unverified(known, info)
        self.registry.put(info)
        if replaced and owed:
            assert known is not None
            unknown = [t for t in owed if self.active[t].txn.state is TxnState.UNKNOWN]
            one_phase = (
                f"; {len(unknown)} of them one-phase commit(s) whose outcome is unknown (their "
                f"answer was lost), e.g. {', '.join(unknown[:3])}: only the lost log knew "
                "it, so each will be recorded as a heuristic hazard and stay UNKNOWN"
                if unknown
                else ""
            )
            self._log.warning(
                f"participant {info.name} replaced while owed, by an operator's override "
                f"({limits.REPLACE_REGISTRATION_FLAG}): incarnation {known.incarnation} at "
                f"{known.address} → {_whom(info)}; {len(owed)} "
                f"transaction(s) not yet finished have branches at it, e.g. "
                f"{', '.join(owed[:3])}: their decisions now go to the replacement, which does "
                "not know their branches: each Commit among them will be recorded as a "
                f"heuristic hazard for an operator to reconcile (dtm heuristics){one_phase}",
                name=info.name,
                owed=len(owed),
                unknown=len(unknown) or None,
            )
        elif replaced:
            assert known is not None
            self._log.warning(
                f"participant {info.name} replaced: incarnation {known.incarnation} at "
                f"{known.address} → {_whom(info)}",
                name=info.name,
            )
        self.observer.participant_registered(info.name)
        await self._log_registration(info)

    async def renew(self, name: str, registered_at_ms: int) -> None:
        """`name` registered again with no change (a participant restarted on its log, at its
        address; or a retry): its registration time is now `registered_at_ms`, logged as any
        registration, so that a restart before the next checkpoint still lists it (it listed
        the earlier time, as if the participant had run since). Answered once durable, as the
        first one is: a retry made while that first one waited for its fsync, told at once,
        lost a registration its participant believed made if the coordinator crashed then
        (this record comes after that one, so it is durable once this one is)."""
        self.registry.renew(name, registered_at_ms)
        await self._log_registration(self.registry.participants[name])

    async def _log_registration(self, info: coordinator_pb2.ParticipantInfo) -> None:
        """Until the record of registration `info` is on disk. Registrations are rare (a
        participant's start): a forced write each."""
        record = log_pb2.ParticipantRegistered(participant=info)
        lsn = self._append(RecordType.PARTICIPANT_REGISTERED, record.SerializeToString())
        self.counters.forced_writes += 1
        await self.log.wait_durable(lsn)

    def _warn_if_moved_unverified(
        self, known: coordinator_pb2.ParticipantInfo, info: coordinator_pb2.ParticipantInfo
    ) -> None:
        """`known`, registered with no incarnation, moves to another address while owed
        decisions. Accepted: a participant outside the SDK restarted on a new port sends none
        (or, upgraded, sends one for the first time), and it must get its decisions. But
        nothing tells it from a second process under the name, which would answer the owed
        Commits NOT_FOUND (heuristic hazards) while the first still holds the branches: say
        so, once per such registration."""
        owed = self._owed(info.name)
        if owed:
            self._log.warning(
                f"participant {info.name} moved from {known.address} to {info.address} while "
                f"{len(owed)} transaction(s) not yet finished have branches at it, e.g. "
                f"{', '.join(owed[:3])}: their decisions now go to {info.address}. It was "
                "registered with no incarnation, so the coordinator cannot tell its restart "
                "from another process under its name; if the process at "
                f"{known.address} still runs, stop the one at {info.address}. Send "
                "RegisterParticipantRequest.incarnation (kept with the participant's log) "
                "so that the coordinator can refuse a second process",
                name=info.name,
                owed=len(owed),
            )

    def _owed(self, name: str) -> list[str]:
        """The transactions in flight, or still owed phase 2, with a branch at `name`."""
        # Bounded by TRANSACTIONS_IN_FLIGHT_MAX; an operator's or a registration's call, not
        # the hot path.
        return [
            txn_id
            for txn_id, run in self.active.items()
            if any(branch.participant == name for branch in run.txn.branches)
        ]

    def _refuse_if_busy(self, name: str, why: str = "", then: str = "") -> None:
        """Raise Refused (FAILED_PRECONDITION) while a transaction in flight, or still owed
        phase 2, has a branch at `name`: the coordinator must reach that participant to finish
        it. `why` (which names the participant) goes before the reason, `then` after it, the
        example ids last."""
        using = self._owed(name)
        if using:
            if all(self.active[txn_id].txn.answer_pending for txn_id in using):
                hint = (
                    "aborted, each waits for a Prepare still out, at most until its deadline: "
                    "retry shortly (dtm txn list --state aborting)"
                )
            else:
                hint = "dtm txn list --stuck; dtm txn retry ID once it is reachable"
            subject = "it" if why else f"participant {name!r}"
            # The ids last (up to 3 of TRANSACTION_ID_PATTERN's 128 characters): a status is
            # cut at its end, and the hint is a way out.
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{why}{subject} has branches in {len(using)} transaction(s) not yet finished: "
                f"the coordinator must finish them first ({hint}){then}; e.g. "
                f"{', '.join(using[:3])}",
            )

    async def unregister(self, name: str) -> coordinator_pb2.ParticipantInfo:
        """An operator decommissions a participant: remove it from the registry, durably (the
        answer waits for the record). Refused while a transaction in flight, or still owed
        phase 2, has a branch there: the coordinator could no longer finish it."""
        if name not in self.registry.participants:
            # The way out before the names, which a status may cut (Registry.registered_names).
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"participant {name!r} is not registered: nothing to remove (check the name, "
                f"or it was removed already); {self.registry.registered_names()}",
            )
        self._refuse_if_busy(name)
        # Removed before the record is written: from now on no Submit can name it. (The
        # check above and this removal run in one step of the loop, so no Submit between.)
        info = self.registry.remove(name)
        assert info is not None
        self.observer.participant_unregistered(name)
        record = log_pb2.ParticipantUnregistered(name=name)
        lsn = self._append(RecordType.PARTICIPANT_UNREGISTERED, record.SerializeToString())
        self.counters.forced_writes += 1
        await self.log.wait_durable(lsn)
        self._log.warning("participant unregistered by an operator", name=name)
        return info

    async def forget_heuristic(
        self, transaction_id: str, branch: int, attempt: bytes | None = None
    ) -> log_pb2.HeuristicRecorded | None:
        """An operator reconciled a heuristic outcome: stop listing it, durably (the answer
        waits for the record). `attempt`: its fingerprint, or the first bytes of it; empty:
        the one whose attempt is not known; None: any (`named_by`). None when none is kept
        for that branch (and attempt); Refused when several attempts' are (the operator
        names one)."""
        matching = [
            kept
            for kept in self.heuristics.of_branch(transaction_id, branch)
            if named_by(kept.transaction_fingerprint, attempt)
        ]
        if not matching:
            return None
        if len(matching) > 1:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{len(matching)} heuristic outcomes are kept for branch "
                f"{transaction_id}/{branch}, one per attempt of the transaction id: name the "
                f"one reconciled (dtm heuristics forget {transaction_id} {branch} --attempt "
                f"HEX, or --attempt {UNKNOWN_ATTEMPT} for the one whose attempt is not known; "
                "ForgetHeuristicRequest.transaction_fingerprint, set and empty for that one), "
                "among "
                + ", ".join(
                    f"{kept.transaction_fingerprint.hex() or UNKNOWN_ATTEMPT} ({kept.outcome})"
                    for kept in matching
                ),
            )
        [forgotten] = matching
        self.heuristics.forget(key_of(forgotten))
        record = log_pb2.HeuristicForgotten(
            transaction_id=transaction_id,
            branch=branch,
            transaction_fingerprint=forgotten.transaction_fingerprint,
        )
        lsn = self._append(RecordType.HEURISTIC_FORGOTTEN, record.SerializeToString())
        self.counters.forced_writes += 1
        await self.log.wait_durable(lsn)
        self._log.info(
            "heuristic outcome forgotten by an operator",
            txn=transaction_id,
            branch=branch,
            participant=forgotten.participant,
            outcome=forgotten.outcome,
        )
        return forgotten

    async def report_heuristic(
        self,
        transaction_id: str,
        branch: int,
        participant: str,
        forced_commit: bool,
        fingerprint: bytes = b"",
        detail: str = "",
    ) -> log_pb2.HeuristicRecorded:
        """A participant asked about a branch an operator forced (`forced_commit`) and heard
        the other outcome (Coordinator.ReportHeuristic): record it as phase 2 would have, had
        its Commit or Rollback reached the branch. Durable before it returns what is kept.
        Idempotent: a branch whose heuristic outcome was recorded already (by phase 2, or an
        earlier report) writes nothing. Raises Refused when this coordinator's outcome is not
        the other one (any more), the branch is another participant's, or what is kept for it
        is another outcome (or decision) than this report's."""
        decided = (
            coordinator_pb2.OUTCOME_ABORTED if forced_commit else coordinator_pb2.OUTCOME_COMMITTED
        )
        outcome = HEURISTIC_COMMIT if forced_commit else HEURISTIC_ROLLBACK
        answer = self.query_outcome(transaction_id, fingerprint)
        text = f"{transaction_id}/{branch}"
        if answer != decided:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the coordinator's outcome of transaction {transaction_id} is "
                f"{coordinator_pb2.Outcome.Name(answer)}, not "
                f"{coordinator_pb2.Outcome.Name(decided)}: a forced "
                f"{'commit' if forced_commit else 'rollback'} of branch {text} does not "
                "contradict it (now); ask again (QueryOutcome)",
            )
        kept_here = self._kept_for_attempt(transaction_id, branch, fingerprint)
        if not kept_here:
            kept_here = [
                self._record_reported(
                    transaction_id, branch, participant, outcome, fingerprint, detail
                )
            ]
        # The same fact, or refused: a phase-2 record of it may say it in other words (detail).
        fact = (participant, outcome, not forced_commit, False)
        agreeing = [
            kept
            for kept in kept_here
            if (kept.participant, kept.outcome, kept.committed, kept.one_phase_unknown) == fact
        ]
        if not agreeing:
            kept = kept_here[0]
            if kept.participant != participant:  # kept for the branch of an unknown attempt
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the heuristic outcome kept for branch {text} is participant "
                    f"{kept.participant!r}'s, not {participant!r}'s: nothing recorded",
                )
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, _other_report(kept, outcome, text))
        kept = agreeing[0]
        # Persist before you speak: the record, or the one phase 2 wrote (flushed, not awaited).
        await self.log.wait_durable(self.log.appended_lsn)
        return kept

    def _kept_for_attempt(
        self, transaction_id: str, branch: int, fingerprint: bytes
    ) -> list[log_pb2.HeuristicRecorded]:
        """The heuristic outcomes kept for the branch that may be the reporting attempt's:
        those kept under its own fingerprint, if any; else those that cannot tell (an empty
        fingerprint, on either side). Another attempt's is no concern of this report, and
        one that only may be its attempt's does not answer for one that is: the report
        would be acknowledged while it contradicts its own attempt's outcome."""
        candidates = [
            kept
            for kept in self.heuristics.of_branch(transaction_id, branch)
            if same_attempt(kept.transaction_fingerprint, fingerprint)
        ]
        own = [
            kept
            for kept in candidates
            if fingerprint and kept.transaction_fingerprint == fingerprint
        ]
        # Else those that cannot tell: for a report without a fingerprint, one kept without
        # one first (what a refusal names).
        return own or sorted(
            candidates, key=lambda kept: kept.transaction_fingerprint != fingerprint
        )

    def _record_reported(
        self,
        transaction_id: str,
        branch: int,
        participant: str,
        outcome: str,
        fingerprint: bytes,
        detail: str,
    ) -> log_pb2.HeuristicRecorded:
        """Record a reported heuristic outcome that no kept one covers (report_heuristic).
        Through the transaction's core while the coordinator still runs it (or its
        Rollbacks), so that phase 2 of the branch stops and a later answer from it is not
        recorded again; else directly, with the outcome the coordinator answered (presumed
        abort included). Returns what stands for the branch, unrecorded when its heuristic
        was recorded once already and an operator forgot it since. Raises Refused when the
        transaction the report is about has no such branch at `participant`."""
        reported = log_pb2.HeuristicRecorded(
            transaction_id=transaction_id,
            branch=branch,
            participant=participant,
            outcome=outcome,
            detail=detail,
            recorded_at_unix_ms=wall_ms(),
            committed=outcome == HEURISTIC_ROLLBACK,
            found_by_inquiry=True,
            transaction_fingerprint=fingerprint,
        )
        run = self.active.get(transaction_id) or self._settling.get(transaction_id)
        view = None
        if run is None or (fingerprint and run.fingerprint != fingerprint):
            run = None  # none, or another attempt under the id: the report's is over
            view = self.finished.get(transaction_id)
            if view is not None and fingerprint and view.fingerprint != fingerprint:
                view = None
        # Kept under the attempt's fingerprint, also for a report that carries none.
        if run is not None:
            reported.transaction_fingerprint = run.fingerprint
        elif view is not None and not fingerprint:
            reported.transaction_fingerprint = view.fingerprint
        # By branch number, not place: a commit resumed after a restart (and one remembered
        # from its decision record) lists only its updating branches.
        known = (
            {b.index: (b.participant, b.heuristic) for b in run.txn.branches}
            if run is not None
            else {b.branch: (b.participant, b.heuristic) for b in view.branches}
            if view is not None
            else None  # no record of the transaction (presumed abort): nothing to check
        )
        if known is not None:
            owner, heuristic = known.get(branch, ("", ""))
            if owner != participant:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"transaction {transaction_id} has no branch {branch} at participant "
                    f"{participant!r} "
                    + (f"(it is {owner!r}'s)" if owner else f"(it has {len(known)} branches)")
                    + ": nothing recorded",
                )
            if heuristic == outcome:  # recorded once already, and an operator forgot it
                return reported
        if run is not None:
            self._feed(
                run,
                core.HeuristicReported(branch, outcome, detail, forced=True, found_by_inquiry=True),
            )
            return self.heuristics.get(key_of(reported)) or reported
        self._write_heuristic(reported)
        if view is not None:  # finished and still remembered: its status shows it too
            self.finished.mark_heuristic(transaction_id, branch, outcome)
        self._log.warning(
            "heuristic outcome found by a participant's inquiry: recorded",
            txn=transaction_id,
            participant=participant,
            branch=branch,
            outcome=outcome,
            decision="committed" if reported.committed else "aborted",
            detail=detail,
        )
        return reported

    def _finished(self, run: Run, action: core.Finished) -> None:
        self._finish(run)

    # ---- carrying out actions ----

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        if self._closed:
            work.close()  # stopping: recovery finishes it at the next start
            return None
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        logs.report_failure(task, "coordinator", "background work")

    def _elapsed_ms(self, run: Run) -> float:
        """The time since the transaction started: by the monotonic clock, which a wall-clock
        step cannot stretch (an hour's step forward made every transaction in flight an hour
        long in the latency histograms) or shrink; for one recovered after a restart, by the
        wall clock, the one clock both processes read."""
        if run.txn.recovered:
            return max(0, self.clock_ms() - run.txn.created_at_ms)
        return (self.monotonic_s() - run.started_s) * 1000

    def _on_timer(self, run: Run) -> None:
        run.timer = None
        early_s = run.due_s - self.monotonic_s()
        if early_s > 0:
            # Fired before the deadline: uvloop rounds the timer to milliseconds (1 in 200-400
            # fired early). Again, for the rest.
            loop = asyncio.get_running_loop()
            run.timer = loop.call_later(max(early_s, 0.001), self._on_timer, run)
            return
        # Due by the monotonic clock, so due for the core too: by the wall clock it reads, a
        # step back had re-armed the timer for the length of the step (an hour's step held a
        # 100 ms transaction, and its participants' locks, an hour).
        self._feed(run, core.TimedOut(max(self.clock_ms(), run.txn.deadline_ms)))

    def _prepare(self, run: Run, index: int, one_phase: bool) -> None:
        txn = run.txn
        branch = txn.branch(index)
        remaining_ms = max(1.0, (run.due_s - self.monotonic_s()) * 1000)
        timeout_s = min(self.config.prepare_timeout_ms, remaining_ms) / 1000
        started = time.perf_counter()
        self.counters.requests += 1

        def done(result: PrepareResult) -> None:
            ok = result.vote is not None
            self.observer.call_finished(branch.participant, "Prepare", started, ok)
            if result.vote is None:
                self._log.warning(
                    "prepare failed",
                    txn=txn.transaction_id,
                    participant=branch.participant,
                    branch=index,
                    reason=result.reason,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )
                if result.invalid_argument:
                    run.invalid_argument = (
                        f"branch {index} ({branch.participant}): {result.invalid_argument}"
                    )
                failed = core.PrepareFailed(
                    index,
                    result.reason,
                    self.clock_ms(),
                    not_reached=result.not_reached,
                    protocol_error=result.protocol_error,
                )
                self._feed(run, failed)
                return
            self.counters.replies += 1
            if result.id_reused and result.vote is core.Vote.REFUSED:  # the only vote it goes with
                run.id_reused = f"{branch.participant} reports that {result.id_reused}"
            crashpoints.hit("coordinator.after_vote_received")
            if self._debug:
                self._log.debug(
                    "prepare answered",
                    txn=txn.transaction_id,
                    participant=branch.participant,
                    branch=index,
                    vote=result.vote.value,
                    reason=result.reason or None,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )
            vote = core.VoteReceived(
                index, result.vote, result.reason, self.clock_ms(), earlier=result.earlier
            )
            self._feed(run, vote)

        loop = asyncio.get_running_loop()
        port = self.registry.port(branch.participant)
        if one_phase:
            run.one_phase_incarnation = port.client.incarnation
        port.prepare(
            PrepareItem(
                txn.transaction_id,
                index,
                run.operations[index],
                one_phase,
                loop.time() + timeout_s,
                timeout_s,
                done,
                run.fingerprint,
            )
        )

    def _persist_decision(self, run: Run, action: core.PersistDecision) -> None:
        crashpoints.hit("coordinator.before_decision_write")
        txn = run.txn
        record = log_pb2.CommitDecided(
            transaction_id=txn.transaction_id,
            branches=[log_pb2.DecisionBranch(branch=i, participant=p) for i, p in action.branches],
            decided_at_unix_ms=self.clock_ms(),
            fingerprint=run.fingerprint,
            # What a restart shows of it (_remember_committed, resume).
            created_at_unix_ms=txn.created_at_ms,
            timeout_ms=max(0, txn.deadline_ms - txn.created_at_ms),
        )
        run.decision = record.SerializeToString()
        lsn = self._append(RecordType.COMMIT_DECIDED, run.decision)
        self.counters.forced_writes += 1
        crashpoints.hit("coordinator.after_decision_write")

        async def when_durable() -> None:
            await self.log.wait_durable(lsn)
            crashpoints.hit("coordinator.after_decision_durable")
            self._feed(run, core.DecisionDurable(self.clock_ms()))

        self._spawn(when_durable())

    def _phase_two(self, run: Run, index: int, commit: bool) -> None:
        txn = run.txn
        branch = txn.branch(index)
        started = time.perf_counter()
        rpc = "Commit" if commit else "Rollback"
        self.counters.requests += 1

        def done(result: DecideResult) -> None:
            try:
                answered(result)
            finally:  # after the answer's events: a retry they start keeps it open
                self._decision_closed(run)

        def answered(result: DecideResult) -> None:
            self.observer.call_finished(branch.participant, rpc, started, result.ok)
            if result.heuristic:
                reported = core.HeuristicReported(
                    index, result.heuristic, result.error, forced=result.forced
                )
                self._feed(run, reported)
                return
            if not result.ok:
                attempt = branch.phase_two_attempts + 1
                if commit:
                    event = "commit failed"
                elif attempt >= ROLLBACK_ATTEMPTS_MAX:  # the core gives up (presumed abort)
                    event = "rollback failed; given up: the participant learns the abort by asking"
                else:
                    event = "rollback failed"
                self._phase_two_failures.failed(
                    event,
                    branch.participant,
                    self._retry_warns(commit, attempt),
                    given_up=not commit and attempt >= ROLLBACK_ATTEMPTS_MAX,
                    txn=txn.transaction_id,
                    branch=index,
                    reason=result.error,
                    attempt=attempt,
                )
                self._feed(run, core.PhaseTwoFailed(index, result.error))
                return
            self._phase_two_failures.answered(branch.participant)
            if commit:
                self.counters.replies += 1
                crashpoints.hit("coordinator.mid_phase_two")
            else:
                self.counters.rollback_replies += 1
            if self._debug:
                self._log.debug(
                    "commit acknowledged" if commit else "rollback acknowledged",
                    txn=txn.transaction_id,
                    participant=branch.participant,
                    branch=index,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )
            self._feed(run, core.PhaseTwoAcked(index))

        if branch.participant not in self.registry.participants:
            # Unregistered by an operator once this transaction had ended (it refuses while
            # any unfinished one has a branch there): a late rollback. Presumed abort lets the
            # participant, if it ever asks, learn the outcome from QueryOutcome.
            assert not commit
            return
        run.decisions_open += 1
        self.registry.port(branch.participant).decide(
            DecideItem(txn.transaction_id, index, commit, done, run.fingerprint)
        )

    async def _retry(self, run: Run, index: int, attempt: int) -> None:
        # Capped exponential backoff with full jitter: a dead participant costs a bounded rate.
        ceiling = min(
            self.config.backoff_ms_max, self.config.backoff_ms_min * 2 ** min(attempt, 16)
        )
        await asyncio.sleep(random.uniform(self.config.backoff_ms_min, ceiling) / 1000)
        if run.retrying is not None:
            run.retrying.pop(index, None)
        self.observer.phase_two_retry(run.txn.branch(index).participant)
        state = run.txn.state
        if state is TxnState.UNKNOWN:
            self._probe(run)
        elif run.txn.branch(index).acknowledged:
            # Settled while this retry waited (a heuristic a participant reported, say): its
            # answer could only contradict what is recorded (NOT_FOUND, read as a hazard).
            return
        elif state in (TxnState.COMMITTING, TxnState.ABORTED):
            self._phase_two(run, index, commit=state is TxnState.COMMITTING)

    def _probe(self, run: Run) -> None:
        """Resolve a lost one-phase answer: a Rollback either finds the branch committed
        (FAILED_PRECONDITION), or rolls it back / leaves a tombstone (so it never commits).
        Sent through the participant's port, so that a port retired meanwhile (a new address)
        waits for it before closing its channel."""
        txn = run.txn
        participant = txn.branches[0].participant
        port = self.registry.port(participant)
        prepared_at, now_at = run.one_phase_incarnation, port.client.incarnation
        if prepared_at and now_at and prepared_at != now_at:
            # Another incarnation took the name since the Prepare went out (an operator's
            # --replace-registration: the log that ran it is lost). Its answer would tell
            # nothing of that log's: a Rollback would find no branch, leave a tombstone and be
            # read as "rolled back", though the lost log may have committed it. Unknown for
            # good: a heuristic hazard, and the client's answer stays UNKNOWN. (A port's
            # incarnation never changes: a new registration makes a new port, so a probe sent
            # before the replacement was answered by the Prepare's incarnation or refused.)
            detail = (
                f"participant {participant}'s log was replaced (incarnation {prepared_at}, "
                f"which ran the one-phase Prepare, → {now_at}, by "
                f"{limits.REPLACE_REGISTRATION_FLAG}) before the outcome was learned: the "
                "outcome is unknown, recorded as a heuristic hazard to reconcile by hand"
            )
            self._feed(run, core.HeuristicReported(0, HEURISTIC_HAZARD, detail))
            return
        timeout_s = self.config.phase_two_timeout_ms / 1000
        self.counters.requests += 1
        started = time.perf_counter()

        def done(code: grpc.StatusCode | None, failure: str) -> None:
            answered = code is None or code is grpc.StatusCode.FAILED_PRECONDITION
            self.observer.call_finished(participant, "Rollback", started, answered)
            if answered:
                self._phase_two_failures.answered(participant)
            if code is None:
                self._feed(run, core.OnePhaseResolved(False, f"{txn.reason}; rolled back"))
            elif code is grpc.StatusCode.FAILED_PRECONDITION:
                self._feed(run, core.OnePhaseResolved(committed=True))
            else:
                attempt = txn.branches[0].phase_two_attempts + 1
                self._phase_two_failures.failed(
                    "one-phase outcome still unknown: probe failed",
                    participant,
                    self._retry_warns(True, attempt),
                    txn=txn.transaction_id,
                    reason=failure,
                    attempt=attempt,
                )
                self._feed(run, core.PhaseTwoFailed(0, failure))

        port.probe(txn.transaction_id, run.fingerprint, timeout_s, done)

    @staticmethod
    def _retry_warns(forever: bool, attempt: int) -> bool:
        """Whether the failure of a phase-2 call's `attempt` is worth a WARNING (within its
        participant's budget: see PhaseTwoFailures). A Commit (and a one-phase probe) is
        retried for as long as its participant does not answer, and a WARNING per attempt
        made about 0.4 lines a second per branch owed, forever: 4,000 a second with 10,000
        commits owed to a participant that is down (found by a bug hunt). So attempts 1, 2,
        4, 8... are, the others DEBUG: lines per branch grow with the log of the outage, not
        with its length (dtm_phase_two_retries_total counts every retry, and `dtm txn list
        --stuck` shows the attempts). A Rollback is tried a few times only: each is."""
        return not forever or logs.retry_warns(attempt)

    def _append(self, record_type: RecordType, payload: bytes) -> int:
        self.records_since_checkpoint += 1
        return self.log.append(record_type, payload)

    def _finish(self, run: Run) -> None:
        txn = run.txn
        if run.finished:
            return
        run.finished = True
        elapsed_ms = self._elapsed_ms(run)
        self.observer.transaction_finished(txn, elapsed_ms)
        outcome = txn.answer
        # The one INFO line per transaction: its whole story (DEBUG has every step).
        self._log.info(
            "transaction finished",
            txn=txn.transaction_id,
            outcome=outcome.value if outcome else txn.state.value,
            reason=txn.reason or None,
            branches=len(txn.branches),
            ms=round(elapsed_ms),
            phase_two_retries=sum(b.phase_two_attempts for b in txn.branches) or None,
            heuristic=",".join(b.heuristic for b in txn.branches if b.heuristic) or None,
        )
        if outcome is Outcome.COMMITTED:
            self.counters.committed += 1
        elif outcome is Outcome.ABORTED:
            self.counters.aborted += 1
        elif outcome is Outcome.UNKNOWN:
            self.counters.unknown += 1
        self.active.pop(txn.transaction_id, None)
        if self._drained is not None and not self.active:  # None but while stopping
            self._drained.set()
        if run.kept:
            self._keep_finished(run)
        if run.decisions_open and txn.state is TxnState.ABORTED:
            # Its Rollbacks go on (presumed abort answers the client first): a later attempt
            # under this id waits for them once this record is gone from the window. (A
            # commit finishes on its last acknowledgement, the one call still counted.)
            run.settled = asyncio.get_running_loop().create_future()
            self._settling[txn.transaction_id] = run
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        run.operations = []

    def _keep_finished(self, run: Run) -> None:
        """Into the finished window, which forgets its oldest beyond `finished_kept`, but not a
        commit whose end record is not yet durable: forgotten, then lost in a crash, the commit
        would be resumed from its decision record, while a late retry of its id, no longer
        remembered, may have run afresh meanwhile (prepared again, perhaps rolled back: the
        resumed Commit then meets it). The next fsync makes it durable: with the default
        window of 20,000, one is made long before the commit is the oldest, but with a small
        window, or after a stream of aborts and one-phase commits (nothing forced), the window
        is held and asks for that fsync. No fsync is added while the window is not held."""
        waiting_for = self.finished.put(run.record(), run.end_lsn, self.log.durable_lsn)
        if waiting_for and (self._ends_syncing is None or self._ends_syncing.done()):
            self._ends_syncing = self._spawn(self._trim_once_durable(waiting_for))

    async def _trim_once_durable(self, lsn: int) -> None:
        # Bounded: each round waits for one fsync, and only an end record appended after the
        # one before it started can hold the window again.
        while lsn:
            await self.log.wait_durable(lsn)
            lsn = self.finished.trim(self.log.durable_lsn)

    # ---- recovery and checkpoints ----

    def replay(
        self, records: Iterable[LogRecord], log_directory: Path | None = None
    ) -> list[log_pb2.CommitDecided]:
        """Rebuild the registry and the commits still owed phase 2, before serving. A record
        it cannot apply raises ReplayError, naming `log_directory`, its LSN and its type."""
        pending: dict[str, log_pb2.CommitDecided] = {}
        since_checkpoint = 0
        # A log in a format newer than this build's is refused, not misread.
        replayed = without_format_records(records, log_directory)
        for record in coalesced(replayed, RecordType.COORDINATOR_CHECKPOINT):
            try:
                kind = RecordType(record.record_type)
                if kind is RecordType.COORDINATOR_CHECKPOINT:
                    checkpoint = log_pb2.CoordinatorCheckpoint.FromString(record.payload)
                    self.registry.participants.clear()
                    for info in checkpoint.participants:
                        self.registry.put(info)
                    pending = {c.transaction_id: c for c in checkpoint.committing}
                    self.finished.clear()
                    for commit in checkpoint.ended:
                        self._remember_committed(commit)
                    self.heuristics.clear()
                    for heuristic in checkpoint.heuristics:
                        self._keep_heuristic(heuristic)
                    since_checkpoint = 0
                    continue
                since_checkpoint += 1
                if kind is RecordType.PARTICIPANT_REGISTERED:
                    registered = log_pb2.ParticipantRegistered.FromString(record.payload)
                    self.registry.put(registered.participant)
                elif kind is RecordType.PARTICIPANT_UNREGISTERED:
                    unregistered = log_pb2.ParticipantUnregistered.FromString(record.payload)
                    self.registry.remove(unregistered.name)
                elif kind is RecordType.COMMIT_DECIDED:
                    decided = log_pb2.CommitDecided.FromString(record.payload)
                    pending[decided.transaction_id] = decided
                elif kind is RecordType.TRANSACTION_ENDED:
                    ended = log_pb2.TransactionEnded.FromString(record.payload)
                    decided_record = pending.pop(ended.transaction_id, None)
                    if decided_record is not None:
                        self._remember_committed(decided_record)
                elif kind is RecordType.HEURISTIC_RECORDED:
                    heuristic = log_pb2.HeuristicRecorded.FromString(record.payload)
                    self._keep_heuristic(heuristic)
                    if _stop_phase_two(pending, heuristic):  # no branch is owed a Commit now
                        self._remember_committed(pending.pop(heuristic.transaction_id))
                elif kind is RecordType.HEURISTIC_FORGOTTEN:
                    forgotten = log_pb2.HeuristicForgotten.FromString(record.payload)
                    self.heuristics.forget(key_of(forgotten))
            except (ValueError, DecodeError) as error:  # RecordType(n) among them
                raise ReplayError(
                    log_directory, record.lsn, record.record_type, str(error)
                ) from error
        # Counted on from here: a process restarted more often than it appends the records
        # that make a checkpoint due would otherwise never take one, and its log would grow.
        self.records_since_checkpoint = since_checkpoint
        return list(pending.values())

    def _remember_committed(self, decided: log_pb2.CommitDecided) -> None:
        at_ms = decided.decided_at_unix_ms  # the decision is all the log keeps of its times
        head: Head = (
            decided.transaction_id,
            coordinator_pb2.TRANSACTION_STATE_COMMITTED,
            coordinator_pb2.OUTCOME_COMMITTED,
            "",
            # A record older than the field: begun when decided, as far as anyone can tell.
            decided.created_at_unix_ms or at_ms,
            at_ms,
            decided.timeout_ms,
            decided.fingerprint,
            "",
            "",
            decided.SerializeToString(),
            "",
        )
        prepared = coordinator_pb2.VOTE_PREPARED
        rows = [
            (b.branch, b.participant, prepared, "", True, 0, "", b.heuristic)
            for b in decided.branches
        ]
        self.finished.put(pack(head, rows))

    def resume(self, pending: Iterable[log_pb2.CommitDecided]) -> int:
        """Drive every recovered commit decision to completion (phase 2 until acknowledged)."""
        loop = asyncio.get_running_loop()
        count = 0
        for decided in pending:
            txn, actions = Transaction.recovered_commit(
                decided.transaction_id,
                [(b.branch, b.participant) for b in decided.branches],
                decided_at_ms=decided.decided_at_unix_ms,
                created_at_ms=decided.created_at_unix_ms,
                timeout_ms=decided.timeout_ms,
            )
            for progress, recorded in zip(txn.branches, decided.branches, strict=True):
                progress.acknowledged = recorded.acknowledged
                progress.heuristic = recorded.heuristic
            if txn._all_acknowledged():  # nothing owed: over (replay ends these itself)
                self._remember_committed(decided)
                continue
            actions = [
                action
                for action in actions
                if not isinstance(action, core.SendCommit)
                or not txn.branch(action.branch).acknowledged
            ]
            reply: asyncio.Future[None] = loop.create_future()
            reply.set_result(None)
            run = Run(
                txn,
                decided.fingerprint,
                [],
                reply,
                outcome_pb=coordinator_pb2.OUTCOME_COMMITTED,
                decision=decided.SerializeToString(),
            )
            self.active[txn.transaction_id] = run
            self._log.info("recovered commit: resuming phase 2", txn=txn.transaction_id)
            self._execute(run, actions)
            count += 1
        return count

    def checkpoint_records(self) -> list[CheckpointPayload]:
        """The registry, every commit still owed phase 2 and the heuristic outcomes kept, as
        the payloads of a checkpoint's records: the registry first, then the commits and the
        heuristics, cut into records that fit the log (a
        participant down for long, under load, can leave 10,000 commits of 32 branches each,
        about 25 MB). Merged in order on replay they are one CoordinatorCheckpoint."""
        registry = log_pb2.CoordinatorCheckpoint(
            participants=list(self.registry.participants.values())
        ).SerializeToString()
        committing = [
            log_pb2.CoordinatorCheckpoint(
                committing=[
                    log_pb2.CommitDecided(
                        transaction_id=run.txn.transaction_id,
                        # Each with where its phase 2 stands: a restart sends no Commit to
                        # one acknowledged or stopped by a heuristic outcome.
                        branches=[
                            log_pb2.DecisionBranch(
                                branch=b.index,
                                participant=b.participant,
                                acknowledged=b.acknowledged,
                                heuristic=b.heuristic,
                            )
                            for b in run.txn.branches
                            if b.needs_phase_two
                        ],
                        # DECIDING: its record is not durable yet, so the core has no time
                        # for the decision; now is at most one fsync later than the record's.
                        decided_at_unix_ms=run.txn.decided_at_ms or self.clock_ms(),
                        fingerprint=run.fingerprint,
                        created_at_unix_ms=run.txn.created_at_ms,
                        timeout_ms=max(0, run.txn.deadline_ms - run.txn.created_at_ms),
                    )
                ]
            ).SerializeToString()
            for run in self.active.values()
            if run.txn.state in (TxnState.DECIDING, TxnState.COMMITTING)
        ]
        heuristics = [
            log_pb2.CoordinatorCheckpoint(heuristics=[heuristic]).SerializeToString()
            for heuristic in self.heuristics
        ]
        # Without them a restart would forget every commit older than the checkpoint, and
        # a client retrying one would run it again: while a participant is down, that attempt
        # aborts, and the client is told ABORTED for an order that committed (found by a bug
        # hunt). Each is the record as written, framed as a field: no message is built here.
        ended = [encoded_field(_ENDED_KEY, decision) for decision in self.finished.decisions()]
        pieces = committing + heuristics + ended
        return [registry, *in_parts(pieces, limits.CHECKPOINT_PART_BYTES)]

    async def checkpoint_if_due(self) -> bool:
        if self.records_since_checkpoint < self.config.checkpoint_every_records:
            return False
        self.records_since_checkpoint = 0
        await self.checkpoints.write(
            self.log, RecordType.COORDINATOR_CHECKPOINT, self.checkpoint_records
        )
        return True

    async def drain(self, timeout_s: float) -> Left:
        """Wait up to `timeout_s` for every transaction in flight to finish, phase 2 included,
        so that a graceful stop leaves participants nothing in doubt. Returns what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self.active and timeout_s > 0:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
            self._drained = None
        # Aborts answered before their Rollbacks were acknowledged (presumed abort answers
        # first; stop_waiting aborts every transaction still collecting votes): closing the
        # ports at once cancelled those Rollbacks, and the participants kept the branches in
        # doubt, reservations and locks included, until the coordinator was back (seen under
        # load: the Exchange carrying them was cancelled before it was sent).
        settling = [run.settled for run in self._settling.values() if run.settled is not None]
        if settling and deadline > loop.time():
            await asyncio.wait(settling, timeout=deadline - loop.time())
        # Only a commit decision is in the log for the next start to resume (resume()); a
        # one-phase commit still out (or its outcome still unknown) is not: its participant
        # alone knows it. Counted together as left_to_recovery, they overstated what the
        # restart would finish.
        decided = one_phase = 0
        for run in self.active.values():
            if run.decision:
                decided += 1
            elif run.txn.one_phase:
                one_phase += 1
        return Left(decided, one_phase, len(self.active) - decided - one_phase)

    def stop_waiting(self) -> None:
        """Stopping: a two-phase transaction still waiting for votes is aborted now, and an
        aborted one whose answer waits for a Prepare still out (a vote that may say an earlier
        attempt committed it) is answered ABORTED now, both as at their deadline, and so is
        every one that comes to wait from now on. Nothing of them is in the log to recover:
        the server's grace would end their calls unanswered (UNAVAILABLE, "Cancelling all
        calls"), and the branches that prepared would stay in doubt, holding their
        reservations and locks, until the coordinator is back to answer their inquiries."""
        self._stop_waiting = True
        for run in list(self.active.values()):
            self._answer_now(run)

    def _answer_now(self, run: Run) -> None:
        if run.txn.answer_pending or run.txn.state is TxnState.PREPARING:
            self._feed(run, core.TimedOut(self.clock_ms(), stopping=True))

    async def close(self) -> None:
        # From now on nothing new starts: a call that ends while the tasks below are being
        # cancelled would otherwise spawn a retry that reopens a port after the registry closed.
        self._closed = True
        for run in self.active.values():
            if run.timer is not None:  # (a stopped engine takes no more timeouts)
                run.timer.cancel()
                run.timer = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._phase_two_failures.close()  # the counts of what the last windows held back

    # How each action the core returns is carried out: one entry per action type (a table, not
    # a chain of isinstance tests; it runs for every action of every transaction).
    _effects: dict[type, Callable[[Engine, Run, Any], None]] = {
        core.SendPrepare: _send_prepare,
        core.PersistDecision: _persist_decision,
        core.SendCommit: _send_commit,
        core.SendRollback: _send_rollback,
        core.RetryPhaseTwo: _retry_phase_two,
        core.ProbeOnePhase: _probe_one_phase,
        core.Reply: _reply,
        core.PersistEnd: _persist_end,
        core.PersistHeuristic: _persist_heuristic,
        core.Finished: _finished,
    }
