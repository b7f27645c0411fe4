"""How the engine's messages reach one participant: batched when the participant declared the
`batch` capability, plain unary calls otherwise (any participant in any language).

Per-call overhead dominates Python gRPC (performance.md: ~0.4 ms of CPU per unary call, while
one call carrying 32 items moves thirty times more). So each participant gets one queue for
prepares and decisions alike: items queue while the participant's calls are in flight and
leave together as one Exchange call when a call slot frees. A prepare never waits for a
timer at low load, so a lone transaction pays no extra latency. Two bounded waits make calls
fewer (BatchPolicy): under load, a call waits `linger_ms` for more items; and decisions, which
no client waits for, wait `decision_linger_ms` for the next prepare to ride with.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2

from dtm import grpc_edge, limits, logs
from dtm.batcher import Batcher, BatchPolicy
from dtm.coordinator.clients import PB_TO_VOTE, ParticipantClient, no_vote
from dtm.core.branch import (
    HEURISTIC_COMMIT,
    HEURISTIC_HAZARD,
    HEURISTIC_OUTCOMES,
    HEURISTIC_ROLLBACK,
)
from dtm.core.transaction import ProtocolError, Vote
from dtmpb.v1 import participant_pb2

HEURISTIC_METADATA_KEY = "dtm-heuristic"
# A participant refused the call as meant for another (PrepareRequest.participant): see
# call_code.
MISDIRECTED_METADATA_KEY = "dtm-misdirected"


@dataclass(frozen=True, slots=True)
class PrepareResult:
    vote: Vote | None  # None: the call failed; the branch may or may not have prepared
    reason: str
    invalid_argument: str = ""
    # The participant refused: this (transaction, branch) belongs to another transaction.
    id_reused: str = ""
    # With COMMITTED to a two-phase Prepare: an earlier attempt committed the branch.
    earlier: bool = False
    # With vote None: the call was refused before any branch was touched, as meant for
    # another participant (`misdirected`) or, in a batch, as an invalid operation: it did not
    # run (core.PrepareFailed.not_reached).
    not_reached: bool = False
    # With vote None: the participant answered outside the contract (no vote it defines, a
    # malformed Exchange), and `reason` says how (core.PrepareFailed.protocol_error).
    protocol_error: bool = False


@dataclass(frozen=True, slots=True)
class DecideResult:
    ok: bool
    error: str = ""
    heuristic: str = ""
    forced: bool = False  # the heuristic is the participant's (an operator's), not inferred


@dataclass(slots=True)
class PrepareItem:
    transaction_id: str
    branch: int
    operation: any_pb2.Any
    one_phase: bool
    deadline: float  # loop time
    timeout_s: float
    done: Callable[[PrepareResult], None]
    fingerprint: bytes = b""  # the transaction's (PrepareRequest.transaction_fingerprint)


@dataclass(slots=True)
class DecideItem:
    transaction_id: str
    branch: int
    commit: bool
    done: Callable[[DecideResult], None]
    fingerprint: bytes = b""  # the transaction's, as in its prepares


# A prepare with less time than this left when its batch leaves fails at once, unsent: it
# could not be answered in time anyway.
PREPARE_SEND_MARGIN_S = 0.010


def _due(item: PrepareItem) -> float:
    """When a queued prepare can no longer be sent in time (loop time)."""
    return item.deadline - PREPARE_SEND_MARGIN_S


def _is_prepare(item: PrepareItem | DecideItem) -> bool:
    return isinstance(item, PrepareItem)


def _item_bytes(item: PrepareItem | DecideItem) -> int:
    """At least what an item adds to an ExchangeRequest: its operation's exact size (a type
    URL may hold multi-byte characters: counting characters let a batch pass the limit), its
    id's length (ASCII, limits.TRANSACTION_ID_PATTERN), and an allowance for tags and lengths."""
    if isinstance(item, PrepareItem):
        return item.operation.ByteSize() + len(item.transaction_id) + len(item.fingerprint) + 32
    return len(item.transaction_id) + len(item.fingerprint) + 16


class ParticipantPort:
    def __init__(self, client: ParticipantClient, batch: bool, policy: BatchPolicy) -> None:
        self.client = client
        self.batch = batch and policy.enabled
        # Its Exchange was answered UNIMPLEMENTED: unary from then on (_fall_back_to_unary).
        self.fell_back = False
        self._phase_two_timeout_s = policy.phase_two_timeout_ms / 1000
        self._tasks: set[asyncio.Task[None]] = set()
        # Every unary call to the participant (Prepare, Commit, Rollback, a probe) takes one
        # (limits.UNARY_CALLS_IN_FLIGHT_MAX): unbounded, a burst overran its server's gRPC queue.
        self._unary_slots = asyncio.Semaphore(limits.UNARY_CALLS_IN_FLIGHT_MAX)
        # One queue for prepares and decisions alike: they leave together in one Exchange.
        self._batcher: Batcher[PrepareItem | DecideItem] = Batcher(
            self._send_exchange, policy, self._tasks, _is_prepare, size=_item_bytes
        )
        # One timer for the prepares still queued (their call slot is taken): at the earliest
        # time one of them can no longer be sent. A call can last up to its latest prepare's
        # deadline, and a one-phase transaction has no timer of its own, so a prepare queued
        # behind a slow call waited for it (a Submit of 300 ms answered after 3.9 s).
        self._queued_timer: asyncio.TimerHandle | None = None
        self._queued_timer_at = math.inf  # inf: no timer
        # The queued prepares by the time they come due (`_due`), as the last scan of the
        # queue found them, a heap; valid until the next batch leaves (the batcher's `calls`
        # then differs from `_scanned_at_calls`). The prepares queued since then come due at
        # `_unscanned_due` at the earliest. So while a participant hangs, each expiry costs
        # O(log queue), and the queue is scanned once per call (see _expire_queued).
        self._expiring: list[tuple[float, int, PrepareItem]] = []
        self._scanned_at_calls = -1
        self._unscanned_due = math.inf

    @property
    def calls(self) -> int:
        return self._batcher.calls

    @property
    def items(self) -> int:
        return self._batcher.items

    def prepare(self, item: PrepareItem) -> None:
        if self.batch:
            self._batcher.add(item)  # still queued here: a flush runs in a later step
            due = item.deadline - PREPARE_SEND_MARGIN_S  # _due(item), without the call
            if due < self._unscanned_due:  # (the first since a scan, or one out of order)
                self._unscanned_due = due
                if due < self._queued_timer_at:
                    self._arm_queued_timer(due)
        else:
            self._spawn(self._unary_prepare(item))

    def _arm_queued_timer(self, when: float) -> None:
        if self._queued_timer is not None:
            self._queued_timer.cancel()
        self._queued_timer = asyncio.get_running_loop().call_at(when, self._expire_queued)
        self._queued_timer_at = when

    def _expire_queued(self) -> None:
        """Fail the queued prepares that can no longer be sent in time (as `_drop_late` does
        when their call leaves), and wait for the next one to come due. Behind a participant
        that hangs they come due one after another, each alone: this scanned the whole queue
        (up to DECISIONS_WAITING_MAX decisions) for each, and at a few hundred prepares a
        second the scans took most of the event loop (found by a bug hunt)."""
        self._queued_timer = None
        self._queued_timer_at = math.inf
        now = asyncio.get_running_loop().time() + _Expiry.TOLERANCE_S
        if self._scanned_at_calls != self._batcher.calls or self._unscanned_due < now:
            self._scan_queued()
        expiring = self._expiring
        late: list[PrepareItem] = []
        # Bounded by the queue: each item leaves the heap once.
        while expiring and expiring[0][0] < now:
            late.append(heapq.heappop(expiring)[2])
        if late:
            self._batcher.drop(late)
            self._fail(late, [], "its prepare deadline passed before its batched call left")
        following = min(expiring[0][0] if expiring else math.inf, self._unscanned_due)
        if following < math.inf:
            self._arm_queued_timer(following)

    def _scan_queued(self) -> None:
        """The heap of the queued prepares by due time, afresh: O(queue), at most once per call
        sent, or per prepare queued out of order (one that comes due before the earlier ones)."""
        self._expiring = [
            (_due(item), order, item)
            for order, item in enumerate(self._batcher.queued_items())
            if isinstance(item, PrepareItem)
        ]
        heapq.heapify(self._expiring)
        self._scanned_at_calls = self._batcher.calls
        self._unscanned_due = math.inf

    def decide(self, item: DecideItem) -> None:
        # Every call the port holds counts: prepares share the batched queue, and each unary
        # call, prepare or decision, is a task.
        waiting = self._batcher.queued if self.batch else len(self._tasks)
        if waiting >= limits.DECISIONS_WAITING_MAX:
            failed = DecideResult(
                False,
                f"{waiting} calls (prepares and decisions) already wait for "
                f"{self.client.name}, the most one participant may have waiting; this "
                "decision is retried later",
            )
            # Not from inside the engine's own step that asked for the call.
            asyncio.get_running_loop().call_soon(item.done, failed)
        elif self.batch:
            self._batcher.add(item)
        else:
            self._spawn(self._unary_decide(item))

    def probe(
        self,
        transaction_id: str,
        fingerprint: bytes,
        timeout_s: float,
        done: Callable[[grpc.StatusCode | None, str], None],
    ) -> None:
        """A Rollback of branch 0, alone and at once (never batched: its answer is the
        outcome of a one-phase commit whose answer was lost). `done` gets None when it rolled
        back, else the status and a failure to report."""
        self._spawn(self._probe(transaction_id, fingerprint, timeout_s, done))

    async def _probe(
        self,
        transaction_id: str,
        fingerprint: bytes,
        timeout_s: float,
        done: Callable[[grpc.StatusCode | None, str], None],
    ) -> None:
        try:
            async with self._unary_slots:
                await self.client.rollback(transaction_id, 0, timeout_s, fingerprint)
        except grpc.aio.AioRpcError as error:
            done(call_code(error), rpc_failure(error, timeout_s))
            return
        except Exception as error:  # a bug: fail the probe (it is retried), say why
            _internal_error(self.client.name, "Rollback", error)
            done(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")
            return
        done(None, "")

    async def drain(self) -> None:
        """Send what is queued at once (no linger) and wait until every call has ended, for a
        port about to be closed: closing it sooner would drop queued decisions unanswered, and
        a commit whose answer never comes is never retried."""
        self.hurry()
        await asyncio.sleep(0)  # the flush that hurry scheduled starts its calls' tasks
        # Bounded: every call has a deadline, and each round ends at least one call; a call
        # that ends may start the next of the queue, which holds at most the items in flight.
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        logs.report_failure(task, "coordinator", f"a call to {self.client.name}")

    # ---- unary: the plain contract ----

    async def _unary_prepare(self, item: PrepareItem, timeout_s: float | None = None) -> None:
        """`timeout_s`: the call's, when less than the item's own (a prepare sent again)."""
        if self._unary_slots.locked():
            timeout_s = await self._unary_slot_in_time(item)
            if timeout_s is None:
                return
        else:
            await self._unary_slots.acquire()  # one is free: taken at once, without a wait
        try:
            await self._unary_prepare_call(item, timeout_s)
        finally:
            self._unary_slots.release()

    async def _unary_slot_in_time(self, item: PrepareItem) -> float | None:
        """Wait for a unary call slot until the prepare can no longer be sent in time: its
        deadline holds here as its call's would (a one-phase transaction has no timer of its
        own). The time its call then has left; or None: the prepare failed unsent, a timeout."""
        try:
            async with asyncio.timeout_at(_due(item)):
                await self._unary_slots.acquire()
        except TimeoutError:
            reason = (
                f"no answer within the {round(item.timeout_s * 1000)} ms deadline: never sent, "
                f"{limits.UNARY_CALLS_IN_FLIGHT_MAX} calls to {self.client.name} were in flight"
            )
            # Nothing reached the participant: a one-phase transaction aborts, unprobed.
            item.done(PrepareResult(None, reason, not_reached=True))
            return None
        return item.deadline - asyncio.get_running_loop().time()

    async def _unary_prepare_call(self, item: PrepareItem, timeout_s: float | None) -> None:
        try:
            vote, reason, id_reused, earlier = await self.client.prepare(
                item.transaction_id,
                item.branch,
                item.operation,
                item.one_phase,
                item.timeout_s if timeout_s is None else timeout_s,
                item.fingerprint,
            )
        except grpc.aio.AioRpcError as error:
            invalid = (
                error.details() or "" if error.code() is grpc.StatusCode.INVALID_ARGUMENT else ""
            )
            reason = rpc_failure(error, item.timeout_s)
            item.done(PrepareResult(None, reason, _said(invalid), not_reached=misdirected(error)))
            return
        except ProtocolError as error:  # the participant's: the transaction aborts on it
            item.done(PrepareResult(None, f"protocol error: {error}", protocol_error=True))
            return
        except Exception as error:  # a bug: fail the item (so the transaction aborts), say why
            _internal_error(self.client.name, "Prepare", error)
            item.done(PrepareResult(None, f"internal error: {type(error).__name__}: {error}"))
            return
        item.done(PrepareResult(vote, _said(reason), id_reused=_said(id_reused), earlier=earlier))

    async def _unary_decide(self, item: DecideItem) -> None:
        # No deadline to wait within: phase 2 waits for the answer, however late.
        async with self._unary_slots:
            await self._unary_decide_call(item)

    async def _unary_decide_call(self, item: DecideItem) -> None:
        timeout_s = self._phase_two_timeout_s
        try:
            if item.commit:
                await self.client.commit(
                    item.transaction_id, item.branch, timeout_s, item.fingerprint
                )
            else:
                await self.client.rollback(
                    item.transaction_id, item.branch, timeout_s, item.fingerprint
                )
        except grpc.aio.AioRpcError as error:
            code = call_code(error)
            forced = heuristic_of(error) if code is not grpc.StatusCode.UNAVAILABLE else ""
            heuristic = reported_heuristic(item.commit, code, forced)
            item.done(DecideResult(False, rpc_failure(error, timeout_s), heuristic, bool(forced)))
            return
        except Exception as error:  # a bug: fail the item (phase 2 retries it), say why
            _internal_error(self.client.name, "Commit" if item.commit else "Rollback", error)
            item.done(DecideResult(False, f"internal error: {type(error).__name__}: {error}"))
            return
        item.done(DecideResult(True))

    # ---- batched ----

    async def _send_exchange(self, batch: list[PrepareItem | DecideItem]) -> None:
        prepares = [item for item in batch if isinstance(item, PrepareItem)]
        decisions = [item for item in batch if isinstance(item, DecideItem)]
        # One deadline for the call, the most patient item's: the earliest one's would fail
        # every other item with it, aborting transactions with seconds left (found by a bug
        # hunt). Each prepare still fails at its own deadline (`_Expiry`).
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout_s = self._phase_two_timeout_s if decisions else 0.0
        expiry: _Expiry | None = None
        if prepares:
            prepares = self._drop_late(prepares, now)
            if prepares:
                timeout_s = max(timeout_s, max(item.deadline for item in prepares) - now)
                expiry = _Expiry.start(loop, prepares, now + timeout_s)
            elif not decisions:
                return
        try:
            client = self.client
            request = _exchange_request(prepares, decisions, client.name, client.incarnation)
            response = await self.client.stub.Exchange(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            unexpired = _unexpired(prepares, expiry)
            if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                self._fall_back_to_unary(unexpired, decisions, error)
                return
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                # The call's deadline is its most patient prepare's: each prepare is told its
                # own timeout, the one it ran into (not the time left when the call left).
                for prepare in unexpired:
                    prepare.done(PrepareResult(None, rpc_failure(error, prepare.timeout_s)))
                unexpired = []
            reason = rpc_failure(error, timeout_s)
            self._fail(unexpired, decisions, reason, not_reached=misdirected(error))
            return
        except Exception as error:  # a bug: answer every item, or phase 2 would wait forever
            _internal_error(self.client.name, "Exchange", error)
            reason = f"internal error: {type(error).__name__}: {error}"
            self._fail(_unexpired(prepares, expiry), decisions, reason)
            return
        finally:
            if expiry is not None:
                expiry.stop()
        if len(response.votes) != len(prepares) or len(response.results) != len(decisions):
            reason = (
                f"protocol error: {self.client.name} answered a malformed Exchange "
                f"({len(response.votes)} votes for {len(prepares)} prepares, "
                f"{len(response.results)} results for {len(decisions)} decisions)"
            )
            self._fail(_unexpired(prepares, expiry), decisions, reason, protocol_error=True)
            return
        for decision, result in zip(decisions, response.results, strict=True):
            heuristic = forced = result.heuristic
            if not result.ok:
                code = grpc_edge.STATUS_OF_CODE.get(result.code, grpc.StatusCode.UNKNOWN)
                heuristic = reported_heuristic(decision.commit, code, heuristic)
            said = _said(result.error)
            decision.done(DecideResult(result.ok, said, named_heuristic(heuristic), bool(forced)))
        expired = expiry.failed if expiry is not None else ()
        for prepare, answer in zip(prepares, response.votes, strict=True):
            if expired and id(prepare) in expired:
                continue  # failed at its own deadline: its transaction has moved on
            if answer.invalid_argument:
                invalid = _said(answer.invalid_argument)
                # Only a batching participant (the SDK) answers an item so, and it does
                # before any branch exists: nothing ran. A one-phase transaction then aborts
                # at once, with no probe of an "answer lost" (the unary INVALID_ARGUMENT of
                # another participant still gets one: that contract does not say so).
                prepare.done(PrepareResult(None, invalid, invalid, not_reached=True))
            else:
                vote = PB_TO_VOTE.get(answer.vote)
                if vote is None:  # a failed prepare, as in the unary path
                    reason = f"protocol error: {no_vote(self.client.name, answer.vote)}"
                    prepare.done(PrepareResult(None, reason, protocol_error=True))
                    continue
                reason = _said(answer.reason)
                reused = _said(answer.id_reused)
                earlier = answer.committed_earlier
                prepare.done(PrepareResult(vote, reason, id_reused=reused, earlier=earlier))

    def _fall_back_to_unary(
        self,
        prepares: list[PrepareItem],
        decisions: list[DecideItem],
        error: grpc.aio.AioRpcError,
    ) -> None:
        """An Exchange answered UNIMPLEMENTED: the participant declared the batch capability
        without serving Exchange (one outside the SDK that followed Capabilities.batch's old
        comment). Each of its transactions used to fail on it, for ever. UNIMPLEMENTED says
        the method is not there (gRPC's answer to an unknown method, and the generated
        servicer base's to one not overridden): nothing of the call ran. So its items not yet
        answered (`prepares`: those its `_Expiry` failed are left out, or they would be
        answered twice), and those queued behind it, go again, once each, over the unary
        calls of the plain contract, and so does everything after, until the participant
        registers again (`Registry.renew` then makes a batching port). Another call in flight
        that fails so sends its own items; the WARNING is logged once."""
        queued: list[PrepareItem | DecideItem] = []
        if self.batch:
            self.batch = False
            self.fell_back = True
            # The queued prepares' timer would fail items now sent unary: a second answer.
            self._stop_queued_timer()
            queued = self._batcher.close()
            logs.get("coordinator").warning(
                f"{self.client.name} registered the batch capability but does not serve "
                f"Exchange ({error.details()}): its calls go unary (Prepare, Commit, Rollback) "
                "until it registers again; register it with batch false, or implement Exchange",
                participant=self.client.name,
                address=self.client.address,
            )
        now = asyncio.get_running_loop().time()
        for item in [*prepares, *decisions, *queued]:
            if isinstance(item, DecideItem):
                self._spawn(self._unary_decide(item))
            elif item.deadline - now < PREPARE_SEND_MARGIN_S:  # as _drop_late
                self._fail([item], [], "its prepare deadline passed before its batched call left")
            else:  # only the time it has left: its deadline has not moved
                self._spawn(self._unary_prepare(item, item.deadline - now))

    def _drop_late(self, prepares: list[PrepareItem], now: float) -> list[PrepareItem]:
        """The prepares with time left to be answered. The others ran out of it waiting for
        their call (under load): failed here, unsent, which aborts their transactions as the
        deadline would have, without costing the participant their forced writes."""
        if min(item.deadline for item in prepares) - now >= PREPARE_SEND_MARGIN_S:
            return prepares  # the usual case: one pass over the batch
        late = [item for item in prepares if item.deadline - now < PREPARE_SEND_MARGIN_S]
        self._fail(late, [], "its prepare deadline passed before its batched call left")
        return [item for item in prepares if item.deadline - now >= PREPARE_SEND_MARGIN_S]

    @staticmethod
    def _fail(
        prepares: list[PrepareItem],
        decisions: list[DecideItem],
        reason: str,
        not_reached: bool = False,
        protocol_error: bool = False,
    ) -> None:
        for decision in decisions:
            decision.done(DecideResult(False, reason))
        for prepare in prepares:
            prepare.done(
                PrepareResult(None, reason, not_reached=not_reached, protocol_error=protocol_error)
            )

    def hurry(self) -> None:
        self._batcher.hurry()

    def _stop_queued_timer(self) -> None:
        if self._queued_timer is not None:
            self._queued_timer.cancel()
            self._queued_timer = None
            self._queued_timer_at = math.inf
        self._expiring = []

    async def close(self) -> None:
        self._batcher.close()
        self._stop_queued_timer()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _Expiry:
    """Fails each prepare of a call at its own deadline, while the call waits for the most
    patient one: one timer per call, moved from deadline to deadline (a batch's prepares
    usually share one, give or take the time it gathered, and the call ends first)."""

    # uvloop rounds a timer to the millisecond and its clock ticks by milliseconds: a timer
    # may fire just before a deadline that falls between ticks, and re-armed for the rest
    # (under a millisecond, which runs at once) it would spin until the clock ticks.
    TOLERANCE_S = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop, pending: list[PrepareItem]) -> None:
        self._loop = loop
        self._pending = pending  # by deadline; those the call's own deadline covers left out
        self._next = 0  # the first of _pending not failed yet
        self.failed: set[int] = set()  # ids of the prepares failed here
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def start(
        cls, loop: asyncio.AbstractEventLoop, prepares: list[PrepareItem], call_deadline: float
    ) -> _Expiry:
        ordered = sorted(prepares, key=lambda item: item.deadline)
        # The latest prepare is left to the call's own deadline only when that deadline is its
        # own: a call that carries decisions lasts at least the phase-2 timeout, and a prepare
        # riding with a lingering Commit (the usual case at low load) waited 2 s for 200 ms.
        if ordered[-1].deadline + cls.TOLERANCE_S >= call_deadline:
            ordered.pop()
        expiry = cls(loop, ordered)
        expiry._arm()
        return expiry

    def _arm(self) -> None:
        if self._next < len(self._pending):
            self._timer = self._loop.call_at(self._pending[self._next].deadline, self._expire)

    def _expire(self) -> None:
        due = self._loop.time() + self.TOLERANCE_S
        pending = self._pending
        # Bounded by the batch: each item is failed at most once.
        while self._next < len(pending) and pending[self._next].deadline <= due:
            item = pending[self._next]
            self._next += 1
            self.failed.add(id(item))
            late = f"no answer within the {round(item.timeout_s * 1000)} ms deadline"
            item.done(PrepareResult(None, late))
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._next = len(self._pending)


def _unexpired(prepares: list[PrepareItem], expiry: _Expiry | None) -> list[PrepareItem]:
    if expiry is None or not expiry.failed:
        return prepares
    return [item for item in prepares if id(item) not in expiry.failed]


def _exchange_request(
    prepares: list[PrepareItem],
    decisions: list[DecideItem],
    participant: str = "",
    incarnation: str = "",
) -> participant_pb2.ExchangeRequest:
    # Built in place with add(): constructing each item and then the list copies each item
    # once more (measured: 4.4 against 1.9 us per prepare). The envelope names its
    # participant (at most 128 bytes: within EXCHANGE_BYTES_MAX's allowance for framing).
    request = participant_pb2.ExchangeRequest(participant=participant, incarnation=incarnation)
    add_decision = request.decisions.add
    for decision in decisions:
        add_decision(
            transaction_id=decision.transaction_id,
            branch=decision.branch,
            commit=decision.commit,
            transaction_fingerprint=decision.fingerprint,
        )
    add_prepare = request.prepares.add
    for prepare in prepares:
        added = add_prepare(
            transaction_id=prepare.transaction_id,
            branch=prepare.branch,
            one_phase=prepare.one_phase,
            transaction_fingerprint=prepare.fingerprint,
        )
        added.operation.CopyFrom(prepare.operation)
    return request


def _internal_error(participant: str, rpc: str, error: Exception) -> None:
    logs.get("coordinator").error(
        f"{rpc} failed inside the coordinator",
        participant=participant,
        error=f"{type(error).__name__}: {error}",
        exc_info=error,
    )


def _trailing(error: grpc.aio.AioRpcError, wanted: str) -> str | None:
    """The value of one trailing metadata key of a failed call, or None."""
    metadata: Any = error.trailing_metadata() or ()  # grpc-stubs types it too narrowly
    for key, value in metadata:
        if key == wanted:
            return str(value if isinstance(value, str) else value.decode())
    return None


def heuristic_of(error: grpc.aio.AioRpcError) -> str:
    """The heuristic outcome a participant reports in trailing metadata, if any."""
    return _trailing(error, HEURISTIC_METADATA_KEY) or ""


def misdirected(error: grpc.aio.AioRpcError) -> bool:
    """Whether whatever answered at the registered address refused the call as meant for
    another participant (another service reusing the address, or another process under the
    name: participant.proto, PrepareRequest.participant)."""
    return (
        error.code() is grpc.StatusCode.FAILED_PRECONDITION
        and _trailing(error, MISDIRECTED_METADATA_KEY) is not None
    )


def call_code(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status a failed call to a participant counts as: the code, except that a refusal
    as misdirected counts as UNAVAILABLE (the participant was not reached). Never read as a
    heuristic outcome (a FAILED_PRECONDITION to a decision), a one-phase commit (to the probe)
    or an invalid argument: a prepare fails, a decision is retried later."""
    if misdirected(error):
        return grpc.StatusCode.UNAVAILABLE
    return error.code()


def reported_heuristic(commit: bool, code: grpc.StatusCode, forced: str) -> str:
    """The heuristic outcome a failed Commit or Rollback reports, or "" for a failure worth
    retrying.

    A participant answers FAILED_PRECONDITION when its own record of the branch contradicts
    the decision: rolled back when told to commit, committed when told to roll back. That is
    XA's heuristic rollback or commit: no retry can change it, so phase 2 records it and stops
    (rule 17: recorded, shown in status, never silent) instead of retrying forever. A Commit
    answered NOT_FOUND finds a branch that voted PREPARED unknown: a participant keeps every
    prepared branch until decided, so it was decided and forgotten since, or its log was lost;
    the outcome there is unknown (XA's heuristic hazard). An operator's forced outcome, which
    the participant names, comes first."""
    if forced:
        return named_heuristic(forced)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return HEURISTIC_ROLLBACK if commit else HEURISTIC_COMMIT
    if code is grpc.StatusCode.NOT_FOUND and commit:
        return HEURISTIC_HAZARD
    return ""


def named_heuristic(reported: str) -> str:
    """A participant's heuristic outcome as one of the three names (XA's): it labels a metric
    and is logged, so free text from a participant would grow both without bound. Anything
    else says the outcome there is not what it should be, and unknown: a hazard."""
    if not reported or reported in HEURISTIC_OUTCOMES:
        return reported
    return HEURISTIC_HAZARD


# What a participant said (a reason, an error), cut: it is kept with the transaction and
# answered to its client, whose answer must fit one message (32 branches of a 200 KB reason did
# not, and a committed transaction was reported RESOURCE_EXHAUSTED).
_said = limits.reason_kept


def rpc_failure(error: grpc.aio.AioRpcError, timeout_s: float) -> str:
    code = error.code()
    if misdirected(error):
        return _said(f"not reached: the wrong participant answered ({error.details()})")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within the {round(timeout_s * 1000)} ms deadline"
    if code is grpc.StatusCode.UNAVAILABLE:
        return _said(f"unavailable ({error.details()})")
    return _said(f"{code.name}: {error.details()}")
