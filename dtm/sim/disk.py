"""The simulated disk: an append-only log with group commit and a crash that cuts its tail."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dtm.sim import messages as msg

if TYPE_CHECKING:
    from dtm.sim.world import Node, World


class Disk:
    """A log: durable records, then a volatile tail that a crash may cut anywhere.

    Group commit as in dtm.wal.GroupCommitLog: one fsync at a time, covering every record
    appended before it started; records appended meanwhile wait for the next one. Waiters are
    called back in a step of their own after the fsync, so a crash can fall between the record
    becoming durable and the message that depends on it.
    """

    def __init__(
        self, world: World, owner: Node, on_durable: Callable[[list[msg.Record]], None]
    ) -> None:
        self.world = world
        self.owner = owner
        self.records: list[msg.Record] = []
        self.durable = 0  # records[:durable] are durable
        self.fsyncs = 0
        self._on_durable = on_durable
        self._syncing = False
        self._waiters: list[tuple[int, Callable[[], None]]] = []

    def append(self, record: msg.Record) -> int:
        self.records.append(record)
        return len(self.records)  # the LSN: 1-based position

    def wait_durable(self, lsn: int, callback: Callable[[], None]) -> None:
        if lsn <= self.durable:
            callback()
            return
        self._waiters.append((lsn, callback))
        if not self._syncing:
            self._start_fsync()

    def _start_fsync(self) -> None:
        covered = len(self.records)
        self._syncing = True
        faults = self.world.faults
        delay = self.world.rng.randint(faults.fsync_ms_min, faults.fsync_ms_max)
        self.world.after(
            delay, self.owner, f"fsync up to lsn {covered} done", lambda: self._synced(covered)
        )

    def _synced(self, covered: int) -> None:
        self._syncing = False
        self.fsyncs += 1
        newly = self.records[self.durable : covered]
        self.durable = covered
        self._on_durable(newly)
        ready = [callback for lsn, callback in self._waiters if lsn <= covered]
        self._waiters = [(lsn, callback) for lsn, callback in self._waiters if lsn > covered]
        if ready:

            def call_back() -> None:
                for callback in ready:
                    callback()

            self.world.after(0, self.owner, f"{len(ready)} durable waiter(s) resume", call_back)
        if self._waiters:
            self._start_fsync()

    def crash(self) -> int:
        """Lose the unsynced tail but a random prefix of it. Returns the records lost."""
        keep = self.durable
        survival = self.world.faults.unsynced_survival_probability
        while keep < len(self.records) and self.world.rng.random() < survival:
            keep += 1
        lost = len(self.records) - keep
        del self.records[keep:]
        newly = self.records[self.durable :]
        self.durable = keep
        self._on_durable(newly)  # what survived is on disk now: the restart reads it
        self._waiters.clear()
        self._syncing = False
        return lost
