"""The asyncio face of the log: group commit on the event loop or on a sync thread, and a
log without a disk for unit tests.

Part of the write-ahead log: see `dtm.wal` for the format and the recovery rules."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, Self

from dtm import crashpoints
from dtm.limits import (
    LOG_SEGMENT_BYTES_MAX,
)
from dtm.wal.errors import (
    BatchSizes,
    LogFatalError,
    LogRecord,
    exit_on_fatal,
)
from dtm.wal.files import (
    FileSystem,
)
from dtm.wal.frames import (
    CheckpointPayload,
    _check_record,
    _joined,
    payload_size,
)
from dtm.wal.log import (
    WriteAheadLog,
    _CheckpointWrite,
)


class Log(Protocol):
    """What the coordinator and the participant SDK need from a log.

    Small on purpose, so that a replicated store (e.g. etcd) can back it later.
    `append` is cheap and synchronous; nothing that depends on a record may leave the process
    before `wait_durable` of its LSN returns.
    """

    def append(self, record_type: int, payload: bytes) -> int: ...
    async def wait_durable(self, lsn: int) -> None: ...
    async def append_durable(self, record_type: int, payload: bytes) -> int: ...
    async def checkpoint(self, records: Sequence[tuple[int, CheckpointPayload]]) -> None: ...
    async def close(self) -> None: ...
    @property
    def appended_lsn(self) -> int: ...
    @property
    def durable_lsn(self) -> int: ...
    @property
    def fsync_count(self) -> int: ...
    @property
    def records_appended(self) -> int: ...
    @property
    def batch_sizes(self) -> BatchSizes: ...


class _Generation:
    """The waiters of one fsync: resolved together by one call_soon_threadsafe."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[None]] = []


def _resolve_waiters(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if not waiter.done():  # a cancelled waiter is done
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class _AsyncLog:
    """What both asyncio faces of a `WriteAheadLog` share: opening, counters, append_durable."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self._wal = wal
        self._closed: asyncio.Future[None] | None = None  # `_close`, once begun

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        file_system: FileSystem | None = None,
        segment_bytes_max: int = LOG_SEGMENT_BYTES_MAX,
        on_fatal: Callable[[str], None] = exit_on_fatal,
    ) -> tuple[Self, list[LogRecord]]:
        wal, recovered = WriteAheadLog.open(
            directory,
            file_system=file_system,
            segment_bytes_max=segment_bytes_max,
            on_fatal=on_fatal,
        )
        return cls(wal), recovered

    @property
    def wal(self) -> WriteAheadLog:
        return self._wal

    def abandon(self) -> None:
        """Let go of a log nothing was appended to (a start refused at replay): close its
        files, and stop whatever else it started, synchronously, with no loop needed."""
        self._wal.close()

    @property
    def appended_lsn(self) -> int:
        return self._wal.appended_lsn

    @property
    def durable_lsn(self) -> int:
        return self._wal.durable_lsn

    @property
    def fsync_count(self) -> int:
        return self._wal.fsync_count

    @property
    def records_appended(self) -> int:
        return self._wal.records_appended

    @property
    def batch_sizes(self) -> BatchSizes:
        return self._wal.batch_sizes

    def append(self, record_type: int, payload: bytes) -> int:
        raise NotImplementedError

    async def wait_durable(self, lsn: int) -> None:
        raise NotImplementedError

    async def append_durable(self, record_type: int, payload: bytes) -> int:
        lsn = self.append(record_type, payload)
        await self.wait_durable(lsn)
        return lsn

    async def close(self) -> None:
        """Make everything appended durable and close the files. A caller cancelled meanwhile
        leaves the closing to run to its end; every call waits for that end."""
        self._refuse_records()
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closed)

    def _refuse_records(self) -> None:
        """From now on `append` and `checkpoint` raise ValueError."""
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class GroupCommitLog(_AsyncLog):
    """A `WriteAheadLog` for asyncio code: one background thread fsyncs for everyone.

    While an fsync runs, records appended meanwhile wait for the next one, so one fsync covers
    as many transactions as arrive during the previous one. Only the waiters whose LSN the
    completed fsync covers are woken (the covered LSN is captured before the fsync starts).
    Construct it anywhere; it binds to the running loop on the first `wait_durable`.

    A checkpoint's segment is written by that thread too, with the steps `LoopCommitLog`
    gives its writer (`WriteAheadLog._start_checkpoint` on the loop, `_write_checkpoint` off
    it, `_finish_checkpoint`), then fsynced by its next sync with the records held behind it.
    """

    def __init__(self, wal: WriteAheadLog) -> None:
        super().__init__(wal)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requested: _Generation | None = None  # waiters for the next fsync
        self._in_flight: tuple[int, _Generation] | None = None  # (covered LSN, its waiters)
        self._checkpoint: _CheckpointWrite | None = None  # started, for the thread to write
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dtm-wal-sync", daemon=True)
        self._thread.start()

    # ---- the Log interface ----

    def append(self, record_type: int, payload: bytes) -> int:
        with self._lock:
            self._check_open()
            return self._wal.append(record_type, payload)

    async def wait_durable(self, lsn: int) -> None:
        if lsn <= self._wal.durable_lsn and self._error is None:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._raise_if_failed()
            if lsn <= self._wal.durable_lsn:
                return
            if lsn > self._wal.appended_lsn:
                raise ValueError(f"LSN {lsn} was never appended (last is {self.appended_lsn})")
            if self._loop is None:
                self._loop = loop
            assert self._loop is loop, "a GroupCommitLog serves one event loop"
            if self._in_flight is not None and lsn <= self._in_flight[0]:
                generation = self._in_flight[1]
            else:
                if self._requested is None:
                    self._requested = _Generation()
                    self._wake.notify()
                generation = self._requested
            generation.waiters.append(waiter)
        await waiter
        assert lsn <= self._wal.durable_lsn

    async def checkpoint(self, records: Sequence[tuple[int, CheckpointPayload]]) -> None:
        # Here, in order with appends, the new segment is opened and its LSNs reserved; the sync
        # thread writes it, off the loop (`_write_checkpoint`): a participant's is about 10 MB,
        # and written here it held the loop 148 ms. Appends meanwhile are held behind it.
        with self._lock:
            self._check_open()
            self._checkpoint = self._wal._start_checkpoint(records)  # raises if one is pending
            self._wake.notify()
            complete_lsn = self._checkpoint.complete_lsn
        await self.wait_durable(complete_lsn)

    def _refuse_records(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify()  # the thread syncs what is left, then ends

    async def _close(self) -> None:
        # Shielded by `close`: a cancelled close used to leave the files open and the directory
        # locked, and the next close returned at once, closing nothing.
        await asyncio.to_thread(self._thread.join)
        self._wal.close()

    def abandon(self) -> None:
        """As `_AsyncLog.abandon`, and stop the sync thread: closing only the files left it
        waiting for ever, one thread per start refused at replay (found by a review)."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join()  # idle: nothing was appended, so nothing to sync
        self._wal.close()

    # ---- the sync thread ----

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # A fresh exception per caller: re-raising one instance would chain tracebacks.
            raise LogFatalError(f"write-ahead log failed: {self._error}") from self._error

    def _check_open(self) -> None:
        self._raise_if_failed()
        if self._closing:
            raise ValueError(f"write-ahead log {self._wal.directory} is closed")

    def _run(self) -> None:
        try:
            while self._sync_once():
                pass
        except BaseException as error:  # anything else is a bug, but waiters must not hang
            self._fail(error)

    def _sync_once(self) -> bool:
        """One group fsync, after writing the checkpoint started if any; False when closing and
        nothing is left to sync."""
        with self._wake:
            while self._requested is None and self._checkpoint is None and not self._closing:
                self._wake.wait()
            job = self._checkpoint
        if job is not None:
            # No lock: appends go on, held in memory behind the checkpoint, and nothing else
            # syncs meanwhile (this thread is the only one that does). The fsync below covers it.
            self._wal._write_checkpoint(job, fsync=False)
        with self._wake:
            if job is not None:
                # In the same hold as `_begin_sync`: a checkpoint started in between would hold
                # records again, and a sync then is refused.
                self._checkpoint = None
                self._wal._finish_checkpoint(job)  # LogFatalError if the write failed
            elif self._checkpoint is not None:
                # Started since the first hold: its records are held and no sync may begin
                # (`_begin_sync` refused, and failed the log). The next round writes it first;
                # its sync covers these waiters, still in `_requested`.
                return True
            ticket = self._wal._begin_sync()
            # Taken only now: had `_begin_sync` raised, `_fail` must still find them.
            generation = self._requested or _Generation()
            self._requested = None
            if not ticket.has_work and not generation.waiters:
                return not self._closing
            self._in_flight = (ticket.target_lsn, generation)
        crashpoints.hit("wal.before_fsync")
        self._wal._perform_sync(ticket)  # no lock: appends continue during the fsync
        crashpoints.hit("wal.after_fsync")
        with self._lock:
            self._wal._complete_sync(ticket)
            self._in_flight = None
            loop = self._loop
        if generation.waiters and loop is not None:
            loop.call_soon_threadsafe(_resolve_waiters, generation.waiters, None)
        return True

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self._error = error
            generations = [self._requested]
            if self._in_flight is not None:
                generations.append(self._in_flight[1])
            self._requested = None
            self._in_flight = None
            loop = self._loop
        waiters = [w for g in generations if g is not None for w in g.waiters]
        if waiters and loop is not None:
            # A closed loop raises RuntimeError: then nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_waiters, waiters, error)


class LoopCommitLog(_AsyncLog):
    """A `WriteAheadLog` for asyncio code that fsyncs on the event loop's own thread.

    Group commit per loop iteration, the shape of Redis's `appendfsync always`: a waiter
    registers a future, and one flush callback (scheduled with call_soon, so it runs after
    everything already ready) makes every record appended so far durable with one fsync and
    wakes every waiter. While that fsync runs, new requests queue in the sockets; their records
    form the next group. That groups batched calls (many records each), not unary ones: gRPC's
    asyncio server hands the loop one call per completion-queue event, so each fsync covers
    the one or two that reached it (a participant served unary calls uses `GroupCommitLog`:
    participants.server.settings.wal_sync_mode).

    Why not a sync thread (`GroupCommitLog`): each hand-off to and from a thread costs two
    context switches and a GIL transfer, and on the 2-core box of docs/performance that cost
    more CPU than the fsync itself: a participant alone spent 1.68 ms of CPU per batched call
    with the thread and 0.97 ms inline. The price is that the loop stalls for the length of
    an fsync (about 0.2-1 ms on an SSD); with a slow disk choose the thread (`[log] sync`).

    A checkpoint's segment, though, is joined, framed, written and fsynced on a worker thread
    of its own: a participant's is about 10 MB, and building it on the loop stalled every
    transaction in flight for 300-550 ms under load. Meanwhile the loop goes on serving;
    records appended meanwhile are held in memory and written after the checkpoint, and no
    fsync runs until it is on file (`_checkpoint_written`): waiters for durability wait for the
    checkpoint, the loop does not. The loop's next fsync covers the held records, the
    directory and the deletion of the old segments.
    """

    def __init__(self, wal: WriteAheadLog) -> None:
        super().__init__(wal)
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._error: BaseException | None = None
        self._closing = False
        self._writing: asyncio.Future[None] | None = None  # a checkpoint's segment, off the loop
        # Its own thread, not the loop's default executor: work queued there (to_thread) must
        # not delay a checkpoint that every durability wait is waiting for.
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- the Log interface ----

    def append(self, record_type: int, payload: bytes) -> int:
        self._check_open()
        return self._wal.append(record_type, payload)

    async def wait_durable(self, lsn: int) -> None:
        self._raise_if_failed()
        if lsn <= self._wal.durable_lsn:
            return
        if lsn > self._wal.appended_lsn:
            raise ValueError(f"LSN {lsn} was never appended (last is {self.appended_lsn})")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        await waiter

    async def checkpoint(self, records: Sequence[tuple[int, CheckpointPayload]]) -> None:
        self._check_open()
        job = self._wal._start_checkpoint(records)  # raises if one is being written already
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "dtm-wal-checkpoint")
        writing = asyncio.get_running_loop().run_in_executor(
            self._writer, self._wal._write_checkpoint, job, True
        )
        self._writing = writing
        # Registered before anyone awaits `writing`, so it runs first: by the time this caller
        # (or close) resumes, the held records are on file and the log is whole again.
        writing.add_done_callback(lambda done: self._checkpoint_written(job, done))
        # Shielded: a cancelled caller must not leave the log half-switched; the write goes on
        # and `_checkpoint_written` completes it.
        await asyncio.shield(writing)
        await self.wait_durable(job.complete_lsn)

    def _refuse_records(self) -> None:
        self._closing = True

    async def _close(self) -> None:
        if self._writing is not None:
            await asyncio.shield(self._writing)
        if self._writer is not None:
            self._writer.shutdown(wait=False)  # idle: the write above is done
        if self._error is None:
            self._sync()
        _resolve_waiters(self._waiters, self._error)
        self._waiters = []
        self._wal.close()

    # ---- the flush ----

    def _checkpoint_written(self, job: _CheckpointWrite, done: asyncio.Future[None]) -> None:
        self._writing = None
        if job.error is None and (done.cancelled() or done.exception() is not None):
            # Never ran, or failed outside `_write_checkpoint`: not a checkpoint on file.
            job.error = RuntimeError("checkpoint write did not run to its end")
        try:
            self._wal._finish_checkpoint(job)
        except Exception as error:  # LogFatalError when on_fatal returns: every waiter gets it
            self._error = error
        if self._waiters and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._writing is not None:
            return  # the waiters stay; _checkpoint_written schedules the flush that covers them
        if self._closed is not None and self._closed.done():
            return  # close made everything durable and answered every waiter
        waiters, self._waiters = self._waiters, []
        if self._error is None:
            self._sync()
        # Every waiter registered after appending: this one fsync covered all of them.
        _resolve_waiters(waiters, None if self._error is None else self._fatal_error())

    def _sync(self) -> None:
        try:
            ticket = self._wal._begin_sync()
            crashpoints.hit("wal.before_fsync")
            self._wal._perform_sync(ticket)
            crashpoints.hit("wal.after_fsync")
            self._wal._complete_sync(ticket)
        except Exception as error:  # LogFatalError when on_fatal returns; anything else: a bug
            self._error = error

    def _fatal_error(self) -> LogFatalError:
        # A fresh exception per caller: re-raising one instance would chain tracebacks.
        error = LogFatalError(f"write-ahead log failed: {self._error}")
        error.__cause__ = self._error
        return error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._fatal_error()

    def _check_open(self) -> None:
        self._raise_if_failed()
        if self._closing:
            raise ValueError(f"write-ahead log {self._wal.directory} is closed")


def async_log(wal: WriteAheadLog, sync: str = "loop") -> LoopCommitLog | GroupCommitLog:
    """The asyncio face of `wal` for a sync mode of dtm.config.WAL_SYNC_MODES."""
    if sync == "loop":
        return LoopCommitLog(wal)
    if sync == "thread":
        return GroupCommitLog(wal)
    raise ValueError(f"unknown log sync mode {sync!r}: use loop or thread")


class MemoryLog:
    """A `Log` without a disk: everything is durable at once. For unit tests of the cores."""

    def __init__(self) -> None:
        self._records: list[LogRecord] = []
        self._next_lsn = 1
        self._records_appended = 0
        self._closed = False

    @property
    def records(self) -> list[LogRecord]:
        """What a restart would replay: the last checkpoint and everything after it."""
        return list(self._records)

    @property
    def appended_lsn(self) -> int:
        return self._next_lsn - 1

    @property
    def durable_lsn(self) -> int:
        return self._next_lsn - 1

    @property
    def fsync_count(self) -> int:
        return 0

    @property
    def records_appended(self) -> int:
        return self._records_appended

    @property
    def batch_sizes(self) -> BatchSizes:
        return BatchSizes(0, 0, 0)

    def append(self, record_type: int, payload: bytes) -> int:
        if self._closed:
            raise ValueError("memory log is closed")
        _check_record(record_type, len(payload))
        lsn = self._next_lsn
        self._records.append(LogRecord(lsn, record_type, payload))
        self._next_lsn += 1
        self._records_appended += 1
        return lsn

    async def wait_durable(self, lsn: int) -> None:
        if lsn > self.appended_lsn:
            raise ValueError(f"LSN {lsn} was never appended (last is {self.appended_lsn})")

    async def append_durable(self, record_type: int, payload: bytes) -> int:
        return self.append(record_type, payload)

    async def checkpoint(self, records: Sequence[tuple[int, CheckpointPayload]]) -> None:
        for record_type, payload in records:
            _check_record(record_type, payload_size(payload))
        self._records = []
        for record_type, payload in records:
            self._records.append(LogRecord(self._next_lsn, record_type, _joined(payload)))
            self._next_lsn += 1

    async def close(self) -> None:
        self._closed = True
