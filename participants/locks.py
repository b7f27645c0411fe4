"""Shared/exclusive locks on named resources, isolating concurrent transaction branches.

A participant service takes a lock for each resource (SKU, account id, order id) a branch
touches; the owner is the branch. Everything runs on one asyncio event loop, so the lock table
needs no thread locking: every method below runs to completion between two awaits.

Rules held here (protocol.md, "Locks and timeouts"):
- A lock wait that exceeds its timeout fails the waiter (LockTimeout), never the holder.
- A wait that would close a cycle in the wait-for graph fails the requester at once
  (DeadlockDetected) rather than after the timeout; holders are never disturbed.
- So does a request that conflicts with a hold of another branch of its own transaction
  (HeldByOwnTransaction): that hold lasts until the transaction is decided, which waits for
  the requester's vote.
- Locks are released only all together, by `release_all`, when the branch is decided or
  reclaimed.
- Waiters are granted in FIFO order (upgrades first), so a stream of later shared requests
  cannot starve a queued exclusive one.
- An `acquire` that raises leaves no trace in the table; one that returns holds the lock.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import heapq
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtm.limits import WAITERS_PER_RESOURCE_MAX


class LockMode(enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


def _compatible(held: LockMode, wanted: LockMode) -> bool:
    return held is LockMode.SHARED and wanted is LockMode.SHARED


def _covers(held: LockMode, wanted: LockMode) -> bool:
    return held is LockMode.EXCLUSIVE or wanted is LockMode.SHARED


class LockRefused(Exception):
    """The lock was not granted; `reason` becomes the branch's REFUSED vote reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LockTimeout(LockRefused):
    def __init__(self, resource: str, timeout_s: float) -> None:
        super().__init__(f"lock timeout on {resource} after {round(timeout_s * 1000)} ms")
        self.resource = resource
        self.timeout_s = timeout_s


class DeadlockDetected(LockRefused):
    def __init__(self, resource: str, cycle: Sequence[str]) -> None:
        super().__init__(f"deadlock on {resource}: {' -> '.join(cycle)}")
        self.resource = resource
        self.cycle = tuple(cycle)


class HeldByOwnTransaction(LockRefused):
    """A deadlock of one transaction with itself (counted as a deadlock): another branch of it
    holds the resource in a conflicting mode. That branch keeps it until the transaction is
    decided, which waits for this branch's vote, so the wait could only run out."""

    def __init__(self, resource: str, sibling: str, mode: LockMode) -> None:
        super().__init__(
            f"{sibling} of this transaction already holds {resource} ({mode.value}): one "
            "transaction cannot take it twice unless both take it shared; put the work on "
            "it in one branch"
        )
        self.resource = resource
        self.sibling = sibling


@dataclass(frozen=True)
class LockSnapshot:
    resource: str
    mode: str  # "exclusive" if any holder holds it exclusively, else "shared"
    holders: tuple[str, ...]  # in grant order
    held_since: float  # clock value of the oldest current hold
    waiters: tuple[tuple[str, str, float], ...]  # (owner, mode, waiting since), queue order


@dataclass(slots=True)
class _Hold:
    mode: LockMode
    since: float


class _WaitFuture(asyncio.Future[None]):
    """A lock wait's future, that calls `on_cancel` the moment it is cancelled.

    A timeout (asyncio.timeout) or a task cancellation cancels the future its task awaits at
    once (Task.cancel), but the task runs again only in a later step of the loop. A waiter left
    queued until then still counted against WAITERS_PER_RESOURCE_MAX: right after a mass
    timeout, a request that ran first was refused "too many waiters" with nobody waiting."""

    on_cancel: Callable[[], None] | None = None

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.on_cancel is not None:
            self.on_cancel()
        return True


@dataclass(slots=True, eq=False)  # eq=False: waiters are compared by identity in the queue
class _Waiter:
    owner: str
    mode: LockMode
    previous: LockMode | None  # the owner's hold before this request; not None: an upgrade
    since: float
    future: asyncio.Future[None]
    queued: bool = True
    granted: bool = False

    @property
    def live(self) -> bool:
        # A wait that ended leaves the queue as it ends (_WaitFuture, release_all, _wake), so
        # a queued waiter is live; this guards a future cancelled by other means.
        return not self.future.done()


@dataclass(frozen=True, slots=True)
class _Holders:
    """A node of the wait-for graph standing for every holder of `resource` (_queue_edges)."""

    resource: str


_Node = str | _Holders


@dataclass(slots=True)
class _Lock:
    holders: dict[str, _Hold] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)  # FIFO, upgrades ahead of new requests
    # Owner -> its waiter in `waiters` (an owner queues at most once per resource), kept in
    # step with it: the duplicate check and "does the owner still wait here" read this, not
    # the queue, which holds up to WAITERS_PER_RESOURCE_MAX requests.
    waiting: dict[str, _Waiter] = field(default_factory=dict)


def _held_since(lock: _Lock) -> float:
    # A lock with waiters always has a holder (_wake grants the head otherwise).
    return min(hold.since for hold in lock.holders.values())


class LockManager:
    def __init__(
        self, *, wait_timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        assert wait_timeout_s > 0, wait_timeout_s
        self._wait_timeout_s = wait_timeout_s
        self._clock = clock
        # The lock table. A resource with no holders and no waiters has no entry.
        self._locks: dict[str, _Lock] = {}
        # Index of the table: owner -> resources it holds or waits on, so that release_all and
        # the deadlock search visit only the owner's entries instead of scanning every lock.
        self._resources_of: dict[str, set[str]] = {}
        self.waits = 0  # requests that had to queue
        self.timeouts = 0  # LockTimeout raised
        self.deadlocks = 0  # DeadlockDetected raised
        # Requests refused at once, their resource's queue full: counted apart, or a hot key
        # past WAITERS_PER_RESOURCE_MAX would abort transactions with no lock counter moving.
        self.queue_full = 0
        self.grants = 0  # successful acquire and acquire_now calls, re-entrant ones included
        # The deadlock search's work: queue entries and holders it looked at, edges it followed.
        # Tests count it instead of timing the search.
        self.search_steps = 0

    async def acquire(
        self,
        owner: str,
        resource: str,
        mode: LockMode,
        timeout_s: float | None = None,
        *,
        sibling: Callable[[str], str | None] | None = None,
    ) -> None:
        """Take `resource` in `mode` for `owner`, waiting at most `timeout_s` (None: default).

        `sibling` names another owner that is a branch of `owner`'s own transaction ("branch
        1"), None for any other: a conflicting hold of one is refused at once
        (HeldByOwnTransaction), as no wait for it can end before the transaction does.

        Raises LockTimeout, DeadlockDetected or LockRefused (queue full, owner already waiting
        on this resource, or released while waiting); on cancellation re-raises CancelledError.
        """
        if self.try_acquire(owner, resource, mode):
            return
        lock = self._locks[resource]
        if sibling is not None:
            self._refuse_if_own_transaction_holds(resource, lock, owner, mode, sibling)
        hold = lock.holders.get(owner)
        previous = None if hold is None else hold.mode
        queued = lock.waiting.get(owner)
        if queued is not None:
            if queued.live:
                raise LockRefused(f"{owner} is already waiting on {resource}")
            # Not reached: every end of a wait takes it out of the queue first (a grant in
            # _wake and release_all before resolving its future, a timeout or a cancel in
            # _WaitFuture.cancel), and acquire does not yield between queueing a waiter and
            # awaiting it; tests/test_lock_races.py checks it at every turn. Nor would a waiter
            # cancelled without its callback leave the request queued below with nothing to
            # wake it: its task's _abandon wakes the queue when it runs (test_locks, forged).
            self._dequeue(resource, lock, queued)
        if len(lock.waiters) >= WAITERS_PER_RESOURCE_MAX:
            self.queue_full += 1
            raise LockRefused(
                f"too many waiters on {resource}: {len(lock.waiters)} requests already wait "
                f"for it (the limit), so this one was refused without waiting; a hot key: "
                "retry later, or spread the load over more keys"
            )
        future = _WaitFuture(loop=asyncio.get_running_loop())
        waiter = _Waiter(owner, mode, previous, self._clock(), future)
        future.on_cancel = functools.partial(self._leave_queue, resource, waiter)
        # Upgrades are kept together at the front of the queue, in their own arrival order.
        position = (
            sum(1 for queued in lock.waiters if queued.previous is not None)
            if previous is not None
            else len(lock.waiters)
        )
        lock.waiters.insert(position, waiter)
        lock.waiting[owner] = waiter
        self._resources_of.setdefault(owner, set()).add(resource)
        # Queued first, then searched: an upgrade placed ahead of others adds edges into the
        # requester too. Only this request added edges, so any new cycle passes through it.
        cycle = self._find_cycle(owner)
        if cycle is not None:
            self._dequeue(resource, lock, waiter)
            self.deadlocks += 1
            raise DeadlockDetected(resource, cycle)

        self.waits += 1
        timeout = self._wait_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                await waiter.future
        except TimeoutError:
            self._abandon(resource, waiter)
            self.timeouts += 1
            raise LockTimeout(resource, timeout) from None
        except asyncio.CancelledError:
            self._abandon(resource, waiter)
            raise
        self.grants += 1

    def _refuse_if_own_transaction_holds(
        self,
        resource: str,
        lock: _Lock,
        owner: str,
        mode: LockMode,
        sibling: Callable[[str], str | None],
    ) -> None:
        for holder in self._conflicting_holders(lock, owner, mode):
            name = sibling(holder)
            if name is not None:
                self.deadlocks += 1
                raise HeldByOwnTransaction(resource, name, lock.holders[holder].mode)

    def try_acquire(self, owner: str, resource: str, mode: LockMode) -> bool:
        """Take `resource` if that needs no wait (the common case: no task, no future);
        False, changing nothing, when `acquire` would have to queue."""
        assert owner and resource, (owner, resource)
        lock = self._locks.setdefault(resource, _Lock())
        hold = lock.holders.get(owner)
        if hold is not None and _covers(hold.mode, mode):
            self.grants += 1
            return True
        # An upgrade goes ahead of the queue: the queue may be waiting on the upgrader itself.
        if not self._conflicting_holders(lock, owner, mode) and (
            hold is not None or not lock.waiters
        ):
            self._grant(resource, lock, owner, mode)
            self.grants += 1
            return True
        return False

    def acquire_now(
        self, owner: str, resource: str, mode: LockMode, held_for_s: float = 0.0
    ) -> None:
        """Re-take a lock of a branch recovered as prepared after a restart, without waiting,
        as held since `held_for_s` ago (its prepare's age: the caller's clock need not be this
        manager's, a monotonic one by default whose zero moves with each process).

        Raises LockRefused, changing nothing, when another holder's mode conflicts: recovered
        prepared branches held their locks together before the crash, so the log does not
        match the service's `locks` (changed by an upgrade, say). Not an assert: stripped by
        `python -O`, it let two branches hold one resource exclusively."""
        assert owner and resource, (owner, resource)
        lock = self._locks.setdefault(resource, _Lock())
        conflicting = self._conflicting_holders(lock, owner, mode)
        if conflicting:
            raise LockRefused(
                f"{owner} cannot re-take {resource} ({mode.value}): held by "
                f"{', '.join(conflicting)}"
            )
        hold = lock.holders.get(owner)
        if hold is None or not _covers(hold.mode, mode):
            self._grant(resource, lock, owner, mode, self._clock() - held_for_s)
        self.grants += 1

    def release_all(self, owner: str) -> list[str]:
        """Release every lock of `owner` and fail its pending waits; returns released resources."""
        released: list[str] = []
        for resource in sorted(self._resources_of.pop(owner, ())):
            lock = self._locks[resource]
            waiter = lock.waiting.pop(owner, None)
            if waiter is not None:
                lock.waiters.remove(waiter)
                waiter.queued = False
                if waiter.live:
                    waiter.future.set_exception(LockRefused("released while waiting"))
            if lock.holders.pop(owner, None) is not None:
                released.append(resource)
            self._wake(resource, lock)
            self._discard_if_idle(resource, lock)
        return released

    def held_by(self, owner: str) -> dict[str, LockMode]:
        held: dict[str, LockMode] = {}
        for resource in sorted(self._resources_of.get(owner, ())):
            hold = self._locks[resource].holders.get(owner)
            if hold is not None:
                held[resource] = hold.mode
        return held

    @property
    def lock_count(self) -> int:
        """Resources held or waited for: the entries `snapshot` lists without a limit."""
        return len(self._locks)

    def snapshot(self, limit: int | None = None) -> list[LockSnapshot]:
        """Every lock, or the `limit` held longest (a stuck one is what an operator looks
        for), in resource order."""
        entries: Iterable[tuple[str, _Lock]] = self._locks.items()
        if limit is not None and len(self._locks) > limit:
            entries = heapq.nsmallest(limit, entries, key=lambda entry: _held_since(entry[1]))
        return [
            LockSnapshot(
                resource=resource,
                mode=(
                    LockMode.EXCLUSIVE
                    if any(hold.mode is LockMode.EXCLUSIVE for hold in lock.holders.values())
                    else LockMode.SHARED
                ).value,
                holders=tuple(lock.holders),
                held_since=_held_since(lock),
                waiters=tuple(
                    (waiter.owner, waiter.mode.value, waiter.since)
                    for waiter in lock.waiters
                    if waiter.live
                ),
            )
            for resource, lock in sorted(entries)
        ]

    # ---- the table's mutations ----

    def _grant(
        self, resource: str, lock: _Lock, owner: str, mode: LockMode, since: float | None = None
    ) -> None:
        hold = lock.holders.get(owner)
        if hold is None:
            lock.holders[owner] = _Hold(mode, self._clock() if since is None else since)
            self._resources_of.setdefault(owner, set()).add(resource)
        else:
            hold.mode = mode  # an upgrade keeps the original "held since"

    def _wake(self, resource: str, lock: _Lock) -> None:
        """Grant waiters from the head of the queue while they are compatible (FIFO)."""
        while lock.waiters:
            waiter = lock.waiters[0]
            if not waiter.live:
                self._dequeue(resource, lock, waiter)
                continue
            if self._conflicting_holders(lock, waiter.owner, waiter.mode):
                break
            self._dequeue(resource, lock, waiter)
            self._grant(resource, lock, waiter.owner, waiter.mode)
            waiter.granted = True
            waiter.future.set_result(None)

    def _dequeue(self, resource: str, lock: _Lock, waiter: _Waiter) -> None:
        lock.waiters.remove(waiter)
        del lock.waiting[waiter.owner]
        waiter.queued = False
        self._forget_if_unrelated(resource, lock, waiter.owner)

    def _leave_queue(self, resource: str, waiter: _Waiter) -> None:
        """A wait cancelled (timed out, or its task cancelled): out of the queue now, so that
        it no longer counts against the bound; its task, when it runs, finishes the rest
        (`_abandon`: the wake-up of the requests behind it)."""
        lock = self._locks.get(resource)
        if waiter.queued and lock is not None:
            self._dequeue(resource, lock, waiter)

    def _abandon(self, resource: str, waiter: _Waiter) -> None:
        """Undo every trace of a wait that ended in a timeout or a cancellation."""
        if waiter.future.done() and not waiter.future.cancelled():
            waiter.future.exception()  # a "released while waiting" is seen, not logged as lost
        lock = self._locks.get(resource)
        if lock is None:  # released by release_all, and nobody has used the resource since
            return
        if waiter.queued:
            self._dequeue(resource, lock, waiter)
        elif waiter.granted:
            # Granted in the same loop iteration as the timeout or cancel: give it back, unless
            # release_all took it already.
            hold = lock.holders.get(waiter.owner)
            if hold is not None and hold.mode is waiter.mode:
                if waiter.previous is None:
                    del lock.holders[waiter.owner]
                    self._forget_if_unrelated(resource, lock, waiter.owner)
                else:
                    hold.mode = waiter.previous
        self._wake(resource, lock)
        self._discard_if_idle(resource, lock)

    def _forget_if_unrelated(self, resource: str, lock: _Lock, owner: str) -> None:
        if owner in lock.holders or owner in lock.waiting:
            return
        resources = self._resources_of.get(owner)
        if resources is not None:
            resources.discard(resource)
            if not resources:
                del self._resources_of[owner]

    def _discard_if_idle(self, resource: str, lock: _Lock) -> None:
        if not lock.holders and not lock.waiters and self._locks.get(resource) is lock:
            del self._locks[resource]

    # ---- the wait-for graph, derived from the table ----

    @staticmethod
    def _conflicting_holders(lock: _Lock, owner: str, mode: LockMode) -> list[str]:
        return [
            holder
            for holder, hold in lock.holders.items()
            if holder != owner and not _compatible(hold.mode, mode)
        ]

    def _waited_on(self, owner: str) -> bool:
        """Whether another live waiter waits for `owner`: queued behind one of its holds, or
        behind its own queued request, in a mode that conflicts. A cycle through `owner` needs
        one, so a fresh branch at the back of a queue, that nobody waits for, needs no search."""
        for resource in self._resources_of.get(owner, ()):
            lock = self._locks[resource]
            hold = lock.holders.get(owner)
            if hold is not None:
                # One pass looks for both: a request conflicting with the hold, and one behind
                # the owner's own request (an upgrade) conflicting with that.
                mine: _Waiter | None = None
                for waiter in lock.waiters:
                    self.search_steps += 1
                    if not waiter.live:
                        continue
                    if waiter.owner == owner:
                        mine = waiter
                    elif not _compatible(hold.mode, waiter.mode) or (
                        mine is not None and not _compatible(mine.mode, waiter.mode)
                    ):
                        return True
                continue
            # Not held: the owner is queued here, usually at the back, so look from there.
            behind: list[_Waiter] = []
            for waiter in reversed(lock.waiters):
                self.search_steps += 1
                if not waiter.live:
                    continue
                if waiter.owner == owner:
                    if any(not _compatible(waiter.mode, other.mode) for other in behind):
                        return True
                    break
                behind.append(waiter)
        return False

    def _queue_edges(self, resource: str) -> dict[str, list[_Node]]:
        """Each live waiter's edges on `resource`: whom its owner waits for there.

        Not every edge of the wait-for graph, but the same owners reached through them, so
        the same cycles, in one pass over the queue (the whole graph has ~n^2/2 edges for a
        queue of n exclusive requests). A waiter waits for the holders its mode conflicts
        with, and (FIFO) for every conflicting live waiter ahead of it. Of those:
        - a shared request gets an edge to the nearest exclusive request ahead only: that one
          reaches every request ahead of it, and so every exclusive one;
        - an exclusive request gets edges to the shared requests between it and the nearest
          exclusive request ahead, and to that one;
        - the holders: all of them for an exclusive request, which when there are several
          and it is not an upgrade goes through one node standing for them (`_Holders`), so
          that n such requests behind h shared holders add n + h edges, not n * h.
        """
        lock = self._locks[resource]
        holders = list(lock.holders)
        exclusive_holders = [
            holder for holder, hold in lock.holders.items() if hold.mode is LockMode.EXCLUSIVE
        ]
        self.search_steps += len(holders)
        edges: dict[str, list[_Node]] = {}
        nearest_exclusive: str | None = None  # owner of the nearest exclusive request so far
        shared_since: list[str] = []  # owners of the shared requests queued behind that one
        for waiter in lock.waiters:
            self.search_steps += 1
            if not waiter.live:
                continue
            owner = waiter.owner
            blockers: list[_Node]
            if waiter.mode is LockMode.SHARED:
                blockers = [holder for holder in exclusive_holders if holder != owner]
                shared_since.append(owner)
            else:
                if owner in lock.holders or len(holders) <= 1:  # an upgrade, or one holder
                    blockers = [holder for holder in holders if holder != owner]
                else:
                    blockers = [_Holders(resource)]
                blockers += (ahead for ahead in shared_since if ahead != owner)
                shared_since = []
            if nearest_exclusive is not None and nearest_exclusive != owner:
                blockers.append(nearest_exclusive)
            if waiter.mode is LockMode.EXCLUSIVE:
                nearest_exclusive = owner
            self.search_steps += len(blockers)
            edges[owner] = blockers
        return edges

    def _find_cycle(self, owner: str) -> list[str] | None:
        """A path owner -> ... -> owner in the wait-for graph, or None.

        Depth-first from `owner`, each node expanded once, each queue read once
        (`_queue_edges`): linear in the queues and holders it reaches. An expanded node with an
        edge back to `owner` ends it, so the cycle reported is a short one. Sorted expansion
        keeps it deterministic.
        """
        if not self._waited_on(owner):
            return None
        queues: dict[str, dict[str, list[_Node]]] = {}

        def edges(node: _Node) -> list[_Node]:
            if isinstance(node, _Holders):
                blockers: list[_Node] = [*sorted(self._locks[node.resource].holders)]
                self.search_steps += len(blockers)
                return blockers
            owners: set[str] = set()
            groups: set[_Holders] = set()
            for resource in self._resources_of.get(node, ()):
                queue = queues.get(resource)
                if queue is None:
                    queue = queues[resource] = self._queue_edges(resource)
                for blocker in queue.get(node, ()):
                    if isinstance(blocker, _Holders):
                        groups.add(blocker)
                    else:
                        owners.add(blocker)
            return [*sorted(owners), *sorted(groups, key=lambda group: group.resource)]

        parents: dict[_Node, _Node | None] = {}
        stack: list[tuple[_Node, _Node | None]] = [(owner, None)]
        while stack:
            node, parent = stack.pop()
            if node in parents:
                continue
            parents[node] = parent
            blockers = edges(node)
            if owner in blockers:
                cycle = [owner]
                step: _Node | None = node
                while step is not None:
                    if not isinstance(step, _Holders):
                        cycle.append(step)
                    step = parents[step]
                cycle.reverse()
                return cycle
            stack.extend((nxt, node) for nxt in reversed(blockers) if nxt not in parents)
        return None
