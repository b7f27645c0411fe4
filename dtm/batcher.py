"""Batching of calls: items queue while a destination's calls are in flight and leave
together in the next call, within bounds (items, bytes, calls in flight) and two bounded
waits that make calls fewer under load (BatchPolicy).

Used for the coordinator's calls to each participant (dtm.coordinator.ports) and for a client
gateway's SubmitBatch calls (dtm.orderflow). It knows nothing of what the items are: `send`
carries a batch, `urgent` says which items someone waits for, `size` what an item weighs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dtm import limits, logs

LINGER_MS_DEFAULT = 10.0
DECISION_LINGER_MS_DEFAULT = 5.0


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    enabled: bool = True
    # Calls in flight per participant. 1 makes batches largest; on 2 cores that wins: make bench
    # measured 547-579 txn/s (p99 220 ms) with 1 against 412-452 (p99 340 ms) with 2; with the
    # 10 ms linger below, 640-708 with 1 against 516-533 with 2.
    in_flight_max: int = 1
    items_max: int = limits.BATCH_ITEMS_MAX
    # A batch also closes before its estimated size passes this: the channel refuses a larger
    # message, and every item of it would fail (an item larger alone still leaves alone).
    bytes_max: int = limits.EXCHANGE_BYTES_MAX
    # Under load, wait this long after a call returns before sending the next one, so that the
    # batch grows: a participant's fixed cost per call (about 1 ms of CPU) then spreads over
    # more transactions. make bench (64 clients) measured, by linger: 0 ms 509 txn/s and 11
    # items per call; 5 ms 529 and 18; 10 ms 690 and 31; 15 ms 708 and 41; 20 ms 639 and 47.
    linger_ms: float = LINGER_MS_DEFAULT
    # ... but only when the call that just returned carried at least this many items (the sign
    # of load): a lone transaction never waits.
    linger_after_items: int = 8
    # Decisions that no prepare travels with wait this long for one before they leave on their
    # own: no client waits for them, and a participant's call costs about 1 ms of CPU whatever
    # it carries. A prepare that arrives meanwhile takes them along at once. With one client,
    # 5 ms halved the CPU per transaction and took p50 from 8.3 to 5.8 ms (see
    # docs/architecture.md, "Decisions ride with the next prepare").
    decision_linger_ms: float = DECISION_LINGER_MS_DEFAULT
    # The deadline of a Commit or Rollback, and of an Exchange that carries only decisions:
    # the engine's phase_two_timeout_ms (CoordinatorConfig), which its probes use too.
    phase_two_timeout_ms: int = limits.PHASE_TWO_CALL_TIMEOUT_MS


Item = TypeVar("Item")


class Batcher(Generic[Item]):
    """Queue items; send them in bounded batches through at most `in_flight_max` calls.

    `urgent` items (prepares: a client waits for them) may take one call beyond the limit when
    every call in flight carries only non-urgent items (decisions, which no client waits for),
    so a prepare never queues behind the previous transaction's commit at low load. Non-urgent
    items alone wait up to `decision_linger_ms` for an urgent one to travel with.
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Coroutine[Any, Any, None]],
        policy: BatchPolicy,
        tasks: set[asyncio.Task[None]],
        urgent: Callable[[Item], bool] = lambda item: False,
        component: str = "coordinator",
        size: Callable[[Item], int] = lambda item: 0,
    ) -> None:
        self._send = send
        self._component = component
        self._policy = policy
        self._urgent = urgent
        self._size = size
        self._queue: deque[Item] = deque()
        self._in_flight = 0
        self._in_flight_urgent = 0  # calls in flight carrying at least one urgent item
        self._queued_urgent = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None  # a linger's, while one runs
        self._timer_for_decisions = False  # that linger is decisions waiting for a prepare
        self._closed = False
        self._hurried = False
        # Ids of queued items dropped (`drop`): still in the queue until it is compacted.
        self._dropped: set[int] = set()
        self._tasks = tasks
        self.calls = 0
        self.items = 0

    @property
    def queued(self) -> int:
        return len(self._queue) - len(self._dropped)

    def queued_items(self) -> list[Item]:
        self._compact()
        return list(self._queue)

    def close(self) -> list[Item]:
        """Send nothing more: a flush still scheduled (a linger timer) finds it closed. The
        items still queued, never sent, are handed back."""
        self._closed = True
        unsent = self.queued_items()
        self._queue.clear()
        self._queued_urgent = 0
        return unsent

    def drop(self, items: Sequence[Item]) -> None:
        """Remove these items (by identity), all still queued (never sent), for good: for the
        items that ran out of time waiting for a call slot. Amortized O(1) each: they stay in
        the queue, uncounted, until the next batch leaves or they are half of it. Taking them
        out one expiry at a time cost O(queue) each, and behind a participant that hangs, with
        its queue full of decisions, prepares expire by the hundred a second."""
        dropped = self._dropped
        dropped.update(map(id, items))
        self._queued_urgent -= sum(map(self._urgent, items))
        if 2 * len(dropped) > len(self._queue):
            self._compact()

    def _compact(self) -> None:
        """Take the dropped items out of the queue (O(queue), once per batch sent at most)."""
        dropped = self._dropped
        if dropped:
            self._queue = deque(item for item in self._queue if id(item) not in dropped)
            dropped.clear()  # none of them is referenced here now: their ids may be reused

    def hurry(self) -> None:
        """Stop lingering, from now on: what is queued leaves as soon as a call may carry it.
        For a graceful shutdown, which wants phase 2 done rather than calls saved."""
        self._hurried = True
        if self._timer is not None:
            self._cut_short()

    def add(self, item: Item) -> None:
        self._queue.append(item)
        urgent = self._urgent(item)
        self._queued_urgent += urgent
        if not self._may_send():
            return
        if not self._scheduled:
            # At once (call_soon: everything queued in this loop iteration leaves together),
            # unless only decisions are queued: they wait a little for a prepare to ride with.
            self._schedule(0 if urgent else self._policy.decision_linger_ms, not urgent)
        elif urgent and self._timer is not None and self._timer_for_decisions:
            # Only a wait for decisions is cut short by a prepare; a linger under load is not.
            self._cut_short()

    def _schedule(self, delay_ms: float, decisions_only: bool) -> None:
        self._scheduled = True
        loop = asyncio.get_running_loop()
        if delay_ms <= 0 or self._hurried:
            loop.call_soon(self._flush)
            return
        self._timer = loop.call_later(delay_ms / 1000, self._flush)
        self._timer_for_decisions = decisions_only

    def _cut_short(self) -> None:
        assert self._timer is not None
        self._timer.cancel()
        self._timer = None
        self._schedule(0, False)

    def _may_send(self) -> bool:
        if self._in_flight < self._policy.in_flight_max:
            return True
        return (
            self._in_flight == self._policy.in_flight_max
            and self._in_flight_urgent == 0
            and self._queued_urgent > 0
        )

    def _flush(self) -> None:
        self._scheduled = False
        self._timer = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if self._dropped:  # none of them may leave in a batch
            self._compact()
        while self._queue and self._may_send():
            batch = self._take(extra_slot=self._in_flight >= self._policy.in_flight_max)
            count = len(batch)
            urgent = sum(map(self._urgent, batch))
            self._queued_urgent -= urgent
            self._in_flight += 1
            self._in_flight_urgent += urgent > 0
            self.calls += 1
            self.items += count
            task = loop.create_task(self._run(batch, urgent > 0))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _take(self, extra_slot: bool) -> list[Item]:
        """The next batch, from the front of the queue: at most `items_max` items and
        `bytes_max` bytes (the first item is always taken). The call slot beyond the limit
        exists for the urgent items, so a batch sent on it takes them first: decisions queued
        ahead of them would otherwise fill it and leave them waiting behind a full call."""
        if extra_slot:
            queued = list(self._queue)  # at most one such flush per call in flight
            self._queue = deque(
                [item for item in queued if self._urgent(item)]
                + [item for item in queued if not self._urgent(item)]
            )
        queue, policy = self._queue, self._policy
        batch = [queue.popleft()]
        size = self._size(batch[0])
        # Bounded by items_max.
        while queue and len(batch) < policy.items_max:
            size += self._size(queue[0])
            if size > policy.bytes_max:
                break
            batch.append(queue.popleft())
        return batch

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        logs.report_failure(task, self._component, "a batched call")

    async def _run(self, batch: list[Item], urgent: bool) -> None:
        try:
            await self._send(batch)
        finally:
            self._in_flight -= 1
            self._in_flight_urgent -= urgent
            if self._queue and not self._scheduled and self._may_send():
                policy = self._policy
                if policy.linger_ms > 0 and len(batch) >= policy.linger_after_items:
                    self._schedule(policy.linger_ms, False)
                elif self._queued_urgent == 0:
                    self._schedule(policy.decision_linger_ms, True)
                else:
                    self._schedule(0, False)
