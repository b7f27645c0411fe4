"""Shared/exclusive locks on named resources, isolating concurrent transaction branches.

A participant service takes a lock for each resource (SKU, account id, order id) a branch
touches; the owner is the branch. Everything runs on one asyncio event loop, so the lock table
needs no thread locking: every method below runs to completion between two awaits.

Rules held here (protocol.md, "Locks and timeouts"):
- A lock wait that exceeds its timeout fails the waiter (LockTimeout), never the holder.
- A wait that would close a cycle in the wait-for graph fails the requester at once
  (DeadlockDetected) rather than after the timeout; holders are never disturbed.
- Locks are released only all together, by `release_all`, when the branch is decided or
  reclaimed.
- Waiters are granted in FIFO order (upgrades first), so a stream of later shared requests
  cannot starve a queued exclusive one.
- An `acquire` that raises leaves no trace in the table; one that returns holds the lock.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
        # A timeout or task cancellation cancels the future at once, but the waiter leaves the
        # queue only when its task runs again; until then it must neither block nor be granted.
        return not self.future.done()


@dataclass(slots=True)
class _Lock:
    holders: dict[str, _Hold] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)  # FIFO, upgrades ahead of new requests


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
        self.grants = 0  # successful acquire and acquire_now calls, re-entrant ones included
        # The deadlock search's work: queue entries and holders it looked at, edges it followed.
        # Tests count it instead of timing the search.
        self.search_steps = 0

    async def acquire(
        self, owner: str, resource: str, mode: LockMode, timeout_s: float | None = None
    ) -> None:
        """Take `resource` in `mode` for `owner`, waiting at most `timeout_s` (None: default).

        Raises LockTimeout, DeadlockDetected or LockRefused (queue full, owner already waiting
        on this resource, or released while waiting); on cancellation re-raises CancelledError.
        """
        if self.try_acquire(owner, resource, mode):
            return
        lock = self._locks[resource]
        hold = lock.holders.get(owner)
        previous = None if hold is None else hold.mode
        if any(waiter.owner == owner and waiter.live for waiter in lock.waiters):
            raise LockRefused(f"{owner} is already waiting on {resource}")
        if len(lock.waiters) >= WAITERS_PER_RESOURCE_MAX:
            raise LockRefused(f"too many waiters on {resource}")
        waiter = _Waiter(
            owner, mode, previous, self._clock(), asyncio.get_running_loop().create_future()
        )
        # Upgrades are kept together at the front of the queue, in their own arrival order.
        position = (
            sum(1 for queued in lock.waiters if queued.previous is not None)
            if previous is not None
            else len(lock.waiters)
        )
        lock.waiters.insert(position, waiter)
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

    def acquire_now(self, owner: str, resource: str, mode: LockMode) -> None:
        """Re-take a lock of a branch recovered as prepared after a restart, without waiting."""
        assert owner and resource, (owner, resource)
        lock = self._locks.setdefault(resource, _Lock())
        conflicting = self._conflicting_holders(lock, owner, mode)
        # After a restart only recovered prepared branches hold locks, and they were compatible
        # before the crash: a conflict here is a bug in recovery.
        assert not conflicting, f"{owner} re-takes {resource} held by {conflicting}"
        hold = lock.holders.get(owner)
        if hold is None or not _covers(hold.mode, mode):
            self._grant(resource, lock, owner, mode)
        self.grants += 1

    def release_all(self, owner: str) -> list[str]:
        """Release every lock of `owner` and fail its pending waits; returns released resources."""
        released: list[str] = []
        for resource in sorted(self._resources_of.pop(owner, ())):
            lock = self._locks[resource]
            for waiter in [waiter for waiter in lock.waiters if waiter.owner == owner]:
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

    def snapshot(self) -> list[LockSnapshot]:
        return [
            LockSnapshot(
                resource=resource,
                mode=(
                    LockMode.EXCLUSIVE
                    if any(hold.mode is LockMode.EXCLUSIVE for hold in lock.holders.values())
                    else LockMode.SHARED
                ).value,
                holders=tuple(lock.holders),
                # A lock with waiters always has a holder (_wake grants the head otherwise).
                held_since=min(hold.since for hold in lock.holders.values()),
                waiters=tuple(
                    (waiter.owner, waiter.mode.value, waiter.since)
                    for waiter in lock.waiters
                    if waiter.live
                ),
            )
            for resource, lock in sorted(self._locks.items())
        ]

    # ---- the table's mutations ----

    def _grant(self, resource: str, lock: _Lock, owner: str, mode: LockMode) -> None:
        hold = lock.holders.get(owner)
        if hold is None:
            lock.holders[owner] = _Hold(mode, self._clock())
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
        waiter.queued = False
        self._forget_if_unrelated(resource, lock, waiter.owner)

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
        if owner in lock.holders or any(waiter.owner == owner for waiter in lock.waiters):
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

    def _waits_for(self, owner: str) -> set[str]:
        """Owners that must move before one of `owner`'s waits can be granted."""
        blockers: set[str] = set()
        for resource in self._resources_of.get(owner, ()):
            lock = self._locks[resource]
            for position, waiter in enumerate(lock.waiters):
                self.search_steps += 1
                if waiter.owner != owner or not waiter.live:
                    continue
                self.search_steps += len(lock.holders) + position
                blockers.update(self._conflicting_holders(lock, owner, waiter.mode))
                # FIFO: a conflicting waiter ahead is granted first, so this one waits on it too.
                blockers.update(
                    ahead.owner
                    for ahead in lock.waiters[:position]
                    if ahead.owner != owner
                    and ahead.live
                    and not _compatible(ahead.mode, waiter.mode)
                )
        return blockers

    def _find_cycle(self, owner: str) -> list[str] | None:
        """A path owner -> ... -> owner in the wait-for graph, or None.

        Depth-first; each owner is expanded at most once, so the search is bounded by the
        number of owners waiting. Sorted expansion keeps the reported cycle deterministic.
        """
        stack = [[owner, blocker] for blocker in sorted(self._waits_for(owner), reverse=True)]
        expanded: set[str] = set()
        while stack:
            path = stack.pop()
            last = path[-1]
            if last == owner:
                return path
            if last in expanded:
                continue
            expanded.add(last)
            self.search_steps += 1
            stack.extend([*path, nxt] for nxt in sorted(self._waits_for(last), reverse=True))
        return None
