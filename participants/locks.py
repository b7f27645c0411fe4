"""Shared/exclusive locks on named resources, isolating concurrent transaction branches.

A participant service takes a lock for each resource (SKU, account id, order id) a branch
touches; the owner is the branch. Everything runs on one asyncio event loop, so the lock table
needs no thread locking: every method below runs to completion between two awaits.

Rules held here (protocol.md, "Locks and timeouts"):
- A lock wait that exceeds its timeout fails the waiter (LockTimeout), never the holder.
- A wait that would close a cycle in the wait-for graph fails the requester at once
  (DeadlockDetected) rather than after the timeout; holders are never disturbed. A branch
  that voted PREPARED (`pin`) keeps its locks until its transaction (`transaction_of`) is
  decided, which waits for the vote of every branch of it, so a wait for it is a wait for its
  siblings' waits: such a branch stands for its whole transaction in the graph. A branch that
  has not voted stands for itself: it lets its locks go at its own vote if that is READ_ONLY
  or REFUSED. A cycle that a branch's vote closes is broken at the vote (`pin`): the wait of
  another branch of its transaction in it is refused.
- So does a request that conflicts with a hold of a pinned branch of its own transaction
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
    that voted PREPARED (`LockManager.pin`) holds the resource in a conflicting mode. That
    branch keeps it until the transaction is decided, which waits for this branch's vote, so
    the wait could only run out."""

    def __init__(self, resource: str, sibling: str, mode: LockMode) -> None:
        super().__init__(
            f"branch {sibling} of this transaction already holds {resource} ({mode.value}): "
            "one transaction cannot take it twice unless both take it shared; put the work "
            "on it in one branch"
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


@dataclass(frozen=True, slots=True)
class _Unvoted:
    """A node of the wait-for graph standing for one branch that has not voted PREPARED (not
    pinned): its locks may go at its own vote (READ_ONLY, REFUSED), so a wait for it waits only
    for its own waits, not its siblings'."""

    owner: str


# A transaction (LockManager._transaction; entered through a pinned branch of it, or any owner
# without a `transaction_of`), an unvoted branch, or the holders of a lock.
_Node = str | _Holders | _Unvoted
# Whom a waiter waits for on one resource (`_queue_edges`): an owner, or a lock's holders.
_Blocker = str | _Holders
# One edge of the wait-for graph as branches: (the waiting branch, the branch it waits for);
# None on the side of a `_Holders` node.
_Hop = tuple[str | None, str | None]


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
        self,
        *,
        wait_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        transaction_of: Callable[[str], str] | None = None,
    ) -> None:
        """`transaction_of` names the transaction of an owner (a branch); None: every owner is
        a transaction of its own. A branch that voted PREPARED (`pin`) is its transaction in
        the deadlock search: it holds its locks until the transaction is decided, which waits
        for every other branch of it to vote, so a wait for it is a wait for all its siblings'
        waits. One that has not voted may let its locks go at its vote (READ_ONLY, REFUSED):
        a wait for it is a wait for its own waits only.

        It is asked once per owner, as the owner enters the table, and its answer is kept
        until the owner leaves it (`release_all`): it may read state that changes meanwhile
        (the branch engine's, whose branch is decided before its locks go)."""
        assert wait_timeout_s > 0, wait_timeout_s
        self._wait_timeout_s = wait_timeout_s
        self._clock = clock
        self._transaction_of = transaction_of
        # The lock table. A resource with no holders and no waiters has no entry.
        self._locks: dict[str, _Lock] = {}
        # Index of the table: owner -> resources it holds or waits on, so that release_all and
        # the deadlock search visit only the owner's entries instead of scanning every lock.
        self._resources_of: dict[str, set[str]] = {}
        # transaction -> its owners in _resources_of (kept only with a `transaction_of`), for
        # the deadlock search to reach every branch of a transaction.
        self._branches: dict[str, set[str]] = {}
        # owner in _resources_of -> its transaction, as `transaction_of` named it when the
        # owner entered the table: the same key leaves `_branches` as entered it.
        self._transaction_by_owner: dict[str, str] = {}
        # Owners in _resources_of that voted PREPARED (`pin`; only with a `transaction_of`):
        # their locks last until their transaction is decided.
        self._pinned: set[str] = set()
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
    ) -> None:
        """Take `resource` in `mode` for `owner`, waiting at most `timeout_s` (None: default).

        A conflicting hold of another branch of `owner`'s own transaction (`transaction_of`)
        that voted PREPARED (`pin`) is refused at once (HeldByOwnTransaction), as no wait for
        it can end before the transaction does.

        Raises LockTimeout, DeadlockDetected or LockRefused (queue full, owner already waiting
        on this resource, or released while waiting); on cancellation re-raises CancelledError.
        """
        if self.try_acquire(owner, resource, mode):
            return
        lock = self._locks[resource]
        if self._transaction_of is not None:
            self._refuse_if_own_transaction_holds(resource, lock, owner, mode)
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
        self._index(owner, resource)
        # Queued first, then searched: an upgrade placed ahead of others adds edges into the
        # requester too. Only this request added edges, so any new cycle passes through it (a
        # cycle that a vote closes is looked for at the vote: `pin`).
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
    ) -> None:
        refusal = self._held_by_own_transaction(resource, lock, owner, mode)
        if refusal is not None:
            self.deadlocks += 1
            raise refusal

    def _held_by_own_transaction(
        self, resource: str, lock: _Lock, owner: str, mode: LockMode
    ) -> HeldByOwnTransaction | None:
        """The refusal of `owner`'s request when a pinned sibling's hold conflicts with it."""
        transaction = self._transaction(owner)
        for holder in self._conflicting_holders(lock, owner, mode):
            if holder in self._pinned and self._transaction(holder) == transaction:
                return HeldByOwnTransaction(resource, holder, lock.holders[holder].mode)
        return None

    def pin(self, owner: str) -> None:
        """`owner` voted PREPARED: its locks now last until its transaction is decided, which
        waits for the vote of every other branch of it. A wait for them is from now on a wait
        for those branches' own waits too, which may close a cycle that nothing else would
        find before the waits run out (a sibling queued behind this branch's request, now
        granted, is one): each such wait of a branch of this transaction is refused now
        (HeldByOwnTransaction, or DeadlockDetected with the cycle). Nothing without a
        `transaction_of` (every owner its own transaction), or for an owner holding nothing
        (its locks went, a one-phase commit say)."""
        if self._transaction_of is None or owner not in self._resources_of:
            return
        self._pinned.add(owner)
        # A new cycle starts with a wait of a branch of the transaction: none, no search (the
        # usual case, one branch per transaction here, costs no pass over any queue).
        if not self._waits(self._transaction_by_owner[owner]):
            return
        while (hops := self._search(owner)) is not None:
            self._refuse_wait(owner, hops)

    def _waits(self, transaction: str) -> bool:
        """Whether a branch of `transaction` has a request queued. Plain loops over the
        unsorted index: this runs at every PREPARED vote (`pin`), where sorting the branches
        and two nested generators were half of the pin's cost."""
        for branch in self._branches[transaction]:
            for resource in self._resources_of[branch]:
                if branch in self._locks[resource].waiting:
                    return True
        return False

    def _refuse_wait(self, pinned: str, hops: list[_Hop]) -> None:
        """Refuse the wait that `hops`, a cycle from pinned branch `pinned`'s transaction back
        to it, starts with: a branch of that transaction's."""
        victim = hops[0][0]
        assert victim is not None, hops
        for resource in sorted(self._resources_of[victim]):
            lock = self._locks[resource]
            waiter = lock.waiting.get(victim)
            if waiter is not None and waiter.live:
                break
        else:
            raise AssertionError(f"{victim} starts a cycle without waiting")
        cycle = _cycle_of_branches(pinned, hops)
        start = cycle.index(victim)
        refusal = self._held_by_own_transaction(
            resource, lock, victim, waiter.mode
        ) or DeadlockDetected(resource, [*cycle[start:-1], *cycle[: start + 1]])
        self.deadlocks += 1
        self._dequeue(resource, lock, waiter)
        waiter.future.set_exception(refusal)
        self._wake(resource, lock)
        self._discard_if_idle(resource, lock)

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
        if self._transaction_of is not None:
            # Prepared: held until the transaction is decided. Nobody waits at a replay, so
            # there is no cycle to look for (`pin`).
            self._pinned.add(owner)
        self.grants += 1

    def release_all(self, owner: str) -> list[str]:
        """Release every lock of `owner` and fail its pending waits; returns released resources."""
        released: list[str] = []
        resources = self._resources_of.pop(owner, ())
        if resources:
            self._unindex(owner)
        for resource in sorted(resources):
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
            self._index(owner, resource)
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
                self._unindex(owner)

    def _index(self, owner: str, resource: str) -> None:
        """Record that `owner` holds or waits on `resource` (the table's index)."""
        resources = self._resources_of.get(owner)
        if resources is None:
            resources = self._resources_of[owner] = set()
            if self._transaction_of is not None:
                transaction = self._transaction_by_owner[owner] = self._transaction_of(owner)
                self._branches.setdefault(transaction, set()).add(owner)
        resources.add(resource)

    def _unindex(self, owner: str) -> None:
        """`owner` left `_resources_of`: it holds and waits for nothing any more."""
        if self._transaction_of is None:
            return
        self._pinned.discard(owner)
        transaction = self._transaction_by_owner.pop(owner)
        branches = self._branches.get(transaction)
        if branches is not None:
            branches.discard(owner)
            if not branches:
                del self._branches[transaction]

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

    def _queue_edges(self, resource: str) -> dict[str, list[_Blocker]]:
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
        edges: dict[str, list[_Blocker]] = {}
        nearest_exclusive: str | None = None  # owner of the nearest exclusive request so far
        shared_since: list[str] = []  # owners of the shared requests queued behind that one
        for waiter in lock.waiters:
            self.search_steps += 1
            if not waiter.live:
                continue
            owner = waiter.owner
            blockers: list[_Blocker]
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

    def _transaction(self, owner: str) -> str:
        """`owner`'s transaction: as named when it entered the table, or (a requester not in
        it yet) as `transaction_of` names it now."""
        if self._transaction_of is None:
            return owner
        transaction = self._transaction_by_owner.get(owner)
        return self._transaction_of(owner) if transaction is None else transaction

    def _node_of(self, owner: str) -> _Node:
        """The node standing for `owner` in the wait-for graph: its transaction once it is
        pinned (or without a `transaction_of`), else itself (`_Unvoted`)."""
        if self._transaction_of is None:
            return owner
        if owner in self._pinned:
            return self._transaction_by_owner[owner]
        return _Unvoted(owner)

    def _branches_of(self, transaction: str) -> Iterable[str]:
        """The owners of `transaction` that hold or wait for a lock."""
        if self._transaction_of is None:
            return (transaction,)
        return sorted(self._branches.get(transaction, ()))

    def _find_cycle(self, owner: str) -> list[str] | None:
        """A path owner -> ... -> owner in the wait-for graph, as branches, or None.

        A pinned branch stands for its transaction (`_node_of`): an edge into it goes on from
        every waiting branch of the transaction, as its locks go only when all its branches
        have voted. So a branch queued behind a pinned sibling is a cycle, and so are two
        transactions each with a branch waiting for a pinned one of the other. The path is
        reported as branches, a sibling step included ("t1/1 -> t2/0 -> t2/1 -> t1/0 -> t1/1":
        t2/0's hold waits for t2/1's vote).
        """
        hops = self._search(owner)
        return None if hops is None else _cycle_of_branches(owner, hops)

    def _search(self, owner: str) -> list[_Hop] | None:
        """The hops of a path from `owner`'s node back to it, or to its transaction (entered
        through a pinned sibling, which waits for `owner`'s vote), or None.

        Depth-first, each node expanded once, each queue read once (`_queue_edges`): linear
        in the queues and holders it reaches. An expanded node with an edge back to the start
        ends it, so the cycle reported is a short one. Sorted expansion keeps it
        deterministic."""
        transaction = self._transaction(owner)
        # A cycle needs a wait for some branch of the transaction (its own siblings' included).
        if not any(self._waited_on(branch) for branch in self._branches_of(transaction)):
            return None
        start = self._node_of(owner)
        queues: dict[str, dict[str, list[_Blocker]]] = {}

        def edges(node: _Node) -> list[tuple[_Node, _Hop]]:
            if isinstance(node, _Holders):
                holders = sorted(self._locks[node.resource].holders)
                self.search_steps += len(holders)
                return [(self._node_of(holder), (None, holder)) for holder in holders]
            hops: dict[_Node, _Hop] = {}
            branches = (node.owner,) if isinstance(node, _Unvoted) else self._branches_of(node)
            for branch in branches:
                for resource in self._resources_of.get(branch, ()):
                    queue = queues.get(resource)
                    if queue is None:
                        queue = queues[resource] = self._queue_edges(resource)
                    for blocker in queue.get(branch, ()):
                        target, hop = (
                            (blocker, (branch, None))
                            if isinstance(blocker, _Holders)
                            else (self._node_of(blocker), (branch, blocker))
                        )
                        known = hops.get(target)
                        # The least hop to each target: reported the same on every run.
                        if known is None or _hop_order(hop) < _hop_order(known):
                            hops[target] = hop
            return sorted(hops.items(), key=lambda item: _node_order(item[0]))

        parents: dict[_Node, tuple[_Node, _Hop] | None] = {}
        stack: list[tuple[_Node, tuple[_Node, _Hop] | None]] = [(start, None)]
        while stack:
            node, via = stack.pop()
            if node in parents:
                continue
            parents[node] = via
            blockers = edges(node)
            for target, hop in blockers:
                if target in (start, transaction):
                    return _hops_to(parents, node, hop)
            stack.extend(
                (target, (node, hop)) for target, hop in reversed(blockers) if target not in parents
            )
        return None


def _node_order(node: _Node) -> tuple[int, str]:
    if isinstance(node, _Holders):
        return (2, node.resource)
    if isinstance(node, _Unvoted):
        return (1, node.owner)
    return (0, node)


def _hop_order(hop: _Hop) -> tuple[str, str]:
    return (hop[0] or "", hop[1] or "")


def _hops_to(
    parents: dict[_Node, tuple[_Node, _Hop] | None], node: _Node, last: _Hop
) -> list[_Hop]:
    """The hops from the search's start to `node`, then `last`."""
    hops = [last]
    via = parents[node]
    while via is not None:
        node, hop = via
        hops.append(hop)
        via = parents[node]
    hops.reverse()
    return hops


def _cycle_of_branches(owner: str, hops: list[_Hop]) -> list[str]:
    """The branches along `hops`, from `owner` back to it; a step between two branches of one
    transaction (leaving it by another branch than the one reached) is a sibling's vote."""
    cycle = [owner]
    for waiter, blocker in hops:
        if waiter is not None and waiter != cycle[-1]:
            cycle.append(waiter)
        if blocker is not None:
            cycle.append(blocker)
    if cycle[-1] != owner:
        cycle.append(owner)
    return cycle
