"""The write-ahead log itself: segments, appends, fsyncs, checkpoints and recovery.

Part of the write-ahead log: see `dtm.wal` for the format and the recovery rules."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from dtm import crashpoints
from dtm.limits import (
    CHECKPOINT_RECORDS_MAX,
    LOG_SEGMENT_BYTES_MAX,
)
from dtm.wal.errors import (
    BatchSizes,
    LogCorruptedError,
    LogFatalError,
    LogNewerFormatError,
    LogRecord,
    _logger,
    _not_a_log_segment,
    exit_on_fatal,
)
from dtm.wal.files import (
    AppendFile,
    DirectoryLock,
    FileSystem,
    OsFileSystem,
)
from dtm.wal.frames import (
    _HEADER_BYTES,
    _MARKER,
    _MARKER_BEGIN,
    _MARKER_COMPLETE,
    _MARKER_TYPE,
    _SEGMENT_NAME,
    FILE_HEADER_BYTES,
    CheckpointPayload,
    _aligned,
    _check_record,
    _Checkpoint,
    _checkpoint_status,
    _encode_file_header,
    _encode_frame,
    _encode_marker,
    _joined,
    _not_a_segment_start,
    _Scan,
    _scan_file,
    _segment_name,
    _Start,
    payload_size,
)


@dataclass(eq=False, slots=True)
class _Segment:
    first_lsn: int
    path: Path
    size: int  # bytes, the file header included
    frames_at: int = 0  # where its first frame goes: after its file header (none before them)

    @property
    def has_records(self) -> bool:
        return self.size > self.frames_at


def _scan_segment(fs: FileSystem, segment: _Segment) -> _Scan:
    """Read and scan a segment; raises LogNewerFormatError for a file header of a newer frame
    format, and LogCorruptedError for a bad one or for a segment with no valid record that
    cannot be a torn first write: no log segment, which must never be cut or deleted."""
    data = fs.read_file(segment.path)
    file_start, segment_scan = _scan_file(data, segment.first_lsn)
    if file_start.kind is _Start.NEWER:
        raise LogNewerFormatError(segment.path, file_start.reason)
    if segment_scan is None:
        raise LogCorruptedError(segment.path, 0, file_start.reason)
    first_bad = segment_scan.bad_offset == segment_scan.start
    if first_bad and file_start.kind is not _Start.TORN and segment_scan.later_valid_offset is None:
        why = _not_a_segment_start(data, segment.first_lsn, segment_scan.start)
        if why is not None:
            raise LogCorruptedError(segment.path, 0, _not_a_log_segment(why))
    return segment_scan


@dataclass(eq=False, slots=True)
class _CheckpointWrite:
    """A checkpoint segment being written: its file, its records (markers included) with the
    LSNs reserved for them from `begin_lsn` on, and what the writing came to."""

    handle: AppendFile
    path: Path
    begin_lsn: int
    records: list[tuple[int, CheckpointPayload]]
    written: int = 0  # bytes
    synced: bool = False  # fsynced by the writer (LoopCommitLog's thread)
    error: BaseException | None = None

    @property
    def complete_lsn(self) -> int:
        return self.begin_lsn + len(self.records) - 1


@dataclass(frozen=True, slots=True)
class _SyncTicket:
    """What one sync covers, captured under the lock before any fsync runs."""

    target_lsn: int
    fsync_handles: tuple[AppendFile, ...]
    retired: tuple[AppendFile, ...]  # closed once this sync is done: nobody uses them any more
    sync_directory: bool
    obsolete: tuple[_Segment, ...]
    end: tuple[int, int]  # (first LSN, size) of the current segment: durable once synced

    @property
    def has_work(self) -> bool:
        return bool(self.fsync_handles or self.retired or self.sync_directory or self.obsolete)


# ---- test mode: a crash point loses what was not fsynced ----
#
# A process crash keeps every write in the page cache; only a power loss drops the unsynced
# ones. To test "persist before you speak" against that too, `dtm chaos` arms some crash points
# with LOSE_UNSYNCED_VARIABLE set: before the process exits there, each open log writes a
# marker naming its durable end, and the next open cuts everything after it, as a power loss
# would. (The cut waits for the restart, so a write racing the exit cannot survive it.)
LOSE_UNSYNCED_VARIABLE = "DTM_CRASH_LOSES_UNSYNCED"
_UNSYNCED_MARKER = "unsynced-cut"
_losing_unsynced = os.environ.get(LOSE_UNSYNCED_VARIABLE) == "1"
_open_logs: weakref.WeakSet[WriteAheadLog] = weakref.WeakSet()


#: At wal.before_fsync the test mode first stalls this long, as a slow disk would: whatever the
#: process queued before the fsync began (replies on gRPC's own threads) leaves meanwhile.
SLOW_FSYNC_S = 0.03


def _cut_unsynced_at_crash(point: str = "") -> None:
    if point == "wal.before_fsync":
        time.sleep(SLOW_FSYNC_S)
    for log in _open_logs:
        if log._closed:
            continue
        first_lsn, size = log._durable_end
        (log._directory / _UNSYNCED_MARKER).write_text(f"{first_lsn} {size}\n")


def _apply_unsynced_cut(fs: FileSystem, directory: Path) -> None:
    """Cut the log back to the durable end a crash point recorded (the test mode above)."""
    if _UNSYNCED_MARKER not in fs.list_dir(directory):
        return
    marker = directory / _UNSYNCED_MARKER
    parts = fs.read_file(marker).split()
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise LogCorruptedError(marker, 0, "malformed unsynced-cut marker (a chaos test file)")
    first_lsn, size = int(parts[0]), int(parts[1])
    _logger.warning(
        "%s: a crash point in test mode (%s) lost the writes not fsynced: cutting them",
        directory,
        LOSE_UNSYNCED_VARIABLE,
    )
    for name in fs.list_dir(directory):
        match = _SEGMENT_NAME.match(name)
        if match and int(match.group(1)) >= first_lsn:
            keep = size if int(match.group(1)) == first_lsn else 0
            path = directory / name
            if fs.file_size(path) > keep:
                _logger.warning(
                    "%s: cutting the unsynced writes after byte %d (test mode)", path, keep
                )
                handle = fs.open_append(path)
                try:
                    handle.truncate(keep)
                    handle.fsync()
                finally:
                    handle.close()
    fs.remove(marker)
    fs.fsync_dir(directory)


if _losing_unsynced:
    crashpoints.before_exit(_cut_unsynced_at_crash)


class WriteAheadLog:
    """One process's log. Not thread-safe: `GroupCommitLog` serialises access with a lock.

    Use `WriteAheadLog.open`; the constructor runs recovery.
    """

    def __init__(
        self,
        directory: Path,
        *,
        file_system: FileSystem | None = None,
        segment_bytes_max: int = LOG_SEGMENT_BYTES_MAX,
        on_fatal: Callable[[str], None] = exit_on_fatal,
    ) -> None:
        if segment_bytes_max < FILE_HEADER_BYTES + _aligned(_HEADER_BYTES + _MARKER.size):
            raise ValueError(f"segment_bytes_max {segment_bytes_max} is too small")
        self._directory = directory
        self._fs: FileSystem = file_system if file_system is not None else OsFileSystem()
        self._segment_bytes_max = segment_bytes_max
        self._on_fatal = on_fatal
        self._segments: list[_Segment] = []  # live segments, oldest first; the last is current
        # Segments no longer appended to, whose handles the sync thread may still be using.
        # Never fsynced again: rotation fsyncs the old segment itself, and a segment replaced by
        # a checkpoint needs no fsync (the checkpoint covers its records, and until the
        # checkpoint is durable that segment is the last one, where a torn tail is allowed).
        self._retired: list[AppendFile] = []
        self._obsolete: list[_Segment] = []  # replaced by a checkpoint, deleted by the next sync
        self._directory_sync_pending = False
        # While a checkpoint segment is written elsewhere (`_start_checkpoint`), the frames
        # appended meanwhile, which follow it in that segment. Bounded by what the process
        # appends during one checkpoint write (its in-flight limits), tens of milliseconds.
        self._held: bytearray | None = None
        self._next_lsn = 1
        self._durable_lsn = 0
        self._fsync_count = 0
        self._records_appended = 0
        self._syncs = 0
        self._records_synced = 0
        self._largest_batch = 0
        self._fatal_message: str | None = None
        self._closed = False
        # (first LSN, size) of the segment holding the durable tail: all before it is on disk.
        # Only for the test mode that loses unsynced writes at a crash point (see
        # `_cut_unsynced_at_crash`); one lock, as the sync thread and the appender both move it.
        self._durable_end = (0, 0)
        self._durable_end_lock = threading.Lock()
        self._directory_lock: DirectoryLock | None = None
        self._handle, self._recovered = self._recover()
        if _losing_unsynced:
            _open_logs.add(self)

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        file_system: FileSystem | None = None,
        segment_bytes_max: int = LOG_SEGMENT_BYTES_MAX,
        on_fatal: Callable[[str], None] = exit_on_fatal,
    ) -> tuple[WriteAheadLog, list[LogRecord]]:
        """Recover the log in `directory` (created if missing); returns the records to replay."""
        log = cls(
            directory,
            file_system=file_system,
            segment_bytes_max=segment_bytes_max,
            on_fatal=on_fatal,
        )
        recovered, log._recovered = log._recovered, []
        return log, recovered

    # ---- properties ----

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def appended_lsn(self) -> int:
        return self._next_lsn - 1

    @property
    def durable_lsn(self) -> int:
        return self._durable_lsn

    @property
    def size_bytes(self) -> int:
        return sum(segment.size for segment in [*self._obsolete, *self._segments])

    @property
    def segment_paths(self) -> list[Path]:
        return [segment.path for segment in self._segments]

    @property
    def fsync_count(self) -> int:
        """File fsyncs issued (directory fsyncs not counted)."""
        return self._fsync_count

    @property
    def records_appended(self) -> int:
        """Records appended through `append` since open (checkpoint records not counted)."""
        return self._records_appended

    @property
    def batch_sizes(self) -> BatchSizes:
        return BatchSizes(self._syncs, self._records_synced, self._largest_batch)

    # ---- writing ----

    def append(self, record_type: int, payload: bytes) -> int:
        """Write one record to the OS (not synced); returns its LSN."""
        self._check_usable()
        _check_record(record_type, len(payload))
        lsn = self._next_lsn
        frame = _encode_frame(lsn, record_type, payload)
        if self._held is not None:
            # It follows a checkpoint still being written: in memory until that is on file.
            self._held += frame
        else:
            current = self._segments[-1]
            # (`has_records`, inline: this runs for every record.)
            if (
                current.size > current.frames_at
                and current.size + len(frame) > self._segment_bytes_max
            ):
                self._rotate()
            self._write_frame(frame)
        self._next_lsn = lsn + 1
        self._records_appended += 1
        return lsn

    def sync(self) -> int:
        """Make every appended record durable; returns the highest durable LSN."""
        ticket = self._begin_sync()
        if ticket.has_work:
            self._perform_sync(ticket)
            self._complete_sync(ticket)
        return self._durable_lsn

    def checkpoint(self, records: Sequence[tuple[int, CheckpointPayload]]) -> None:
        """Replace the whole log by `records` (the caller's snapshot of live state), durably."""
        self._begin_checkpoint(records)
        self.sync()

    def close(self) -> None:
        """Sync and close. A failed log just closes its files."""
        if self._closed:
            return
        if self._fatal_message is None:
            self.sync()
        self._closed = True
        for handle in self._retired:
            handle.close()
        self._retired.clear()
        self._handle.close()
        if self._directory_lock is not None:
            self._directory_lock.release()

    # ---- the steps, split so GroupCommitLog can fsync outside its lock ----

    def _begin_sync(self) -> _SyncTicket:
        """Capture what the next fsync covers (under the caller's lock)."""
        self._check_usable()
        # The LSNs reserved by a checkpoint being written, and the records held after it, are
        # not on file yet: neither async log syncs until `_finish_checkpoint`. Not an
        # assert: `python -O` must not turn this into records called durable that are not.
        if self._held is not None:
            raise RuntimeError(f"sync of {self._directory} while a checkpoint is being written")
        target_lsn = self._next_lsn - 1
        ticket = _SyncTicket(
            target_lsn=target_lsn,
            fsync_handles=(self._handle,) if target_lsn > self._durable_lsn else (),
            retired=tuple(self._retired),
            sync_directory=self._directory_sync_pending,
            obsolete=tuple(self._obsolete),
            end=(self._segments[-1].first_lsn, self._segments[-1].size),
        )
        self._directory_sync_pending = False
        return ticket

    def _perform_sync(self, ticket: _SyncTicket) -> None:
        """The slow part: may run without the lock while appends continue."""
        try:
            for handle in ticket.fsync_handles:
                handle.fsync()
            if ticket.sync_directory:
                self._fs.fsync_dir(self._directory)
            self._advance_durable_end(ticket.end)  # before the deletions below
            # Only now is the checkpoint (and its file name) durable: the old segments can go.
            if ticket.obsolete:
                for segment in ticket.obsolete:
                    self._fs.remove(segment.path)
                self._fs.fsync_dir(self._directory)
        except OSError as error:
            self._fatal(f"sync of write-ahead log {self._directory} failed: {error}")

    def _complete_sync(self, ticket: _SyncTicket) -> None:
        """Publish the result of `_perform_sync` (under the caller's lock)."""
        batch = ticket.target_lsn - self._durable_lsn
        if batch > 0:
            self._syncs += 1
            self._records_synced += batch
            self._largest_batch = max(self._largest_batch, batch)
            self._durable_lsn = ticket.target_lsn
        self._fsync_count += len(ticket.fsync_handles)
        for handle in ticket.retired:
            handle.close()
        self._retired = [h for h in self._retired if all(h is not t for t in ticket.retired)]
        self._obsolete = [s for s in self._obsolete if s not in ticket.obsolete]

    def _begin_checkpoint(self, records: Sequence[tuple[int, CheckpointPayload]]) -> int:
        """Write a checkpoint segment here and now (not synced); returns the LSN of its
        complete marker. For the synchronous `checkpoint` (and tests): the async logs write it
        off the event loop."""
        job = self._start_checkpoint(records)
        self._write_checkpoint(job, fsync=False)  # the next sync covers it, appends included
        if job.error is not None and not isinstance(job.error, OSError):
            # Not the disk's doing (a bug, or a test's simulated crash): the segments are
            # switched and the file half-written, so this object must not be used again.
            self._held = None
            self._fatal_message = f"checkpoint of {self._directory} failed: {job.error!r}"
            raise job.error
        self._finish_checkpoint(job)
        return job.complete_lsn

    def _start_checkpoint(
        self, records: Sequence[tuple[int, CheckpointPayload]]
    ) -> _CheckpointWrite:
        """Open the checkpoint's segment and reserve its LSNs. Until `_finish_checkpoint`,
        appends are held in memory (they follow the checkpoint in its segment) and nothing may
        sync; `_write_checkpoint` may meanwhile run on another thread."""
        self._check_usable()
        if self._held is not None:
            raise ValueError(f"a checkpoint of {self._directory} is already being written")
        if len(records) > CHECKPOINT_RECORDS_MAX:
            raise ValueError(
                f"checkpoint of {len(records)} records exceeds CHECKPOINT_RECORDS_MAX "
                f"({CHECKPOINT_RECORDS_MAX})"
            )
        for record_type, payload in records:
            _check_record(record_type, payload_size(payload))
        current = self._segments[-1]
        if not current.has_records:
            # An empty current segment is already named after the next LSN: reuse it.
            assert current.first_lsn == self._next_lsn
            self._obsolete.extend(self._segments[:-1])
        else:
            # Its header is made durable by the checkpoint's own fsync; a crash before that
            # leaves a torn header at most, in the last segment: recovery drops it.
            try:
                handle, current = self._create_segment(self._next_lsn)
            except OSError as error:
                # Half a header may stay under the name the next segment takes (appended
                # to, not replaced): this object must not create it again.
                self._fatal(f"creating checkpoint segment of LSN {self._next_lsn}: {error}")
            self._retired.append(self._handle)
            self._obsolete.extend(self._segments)
            self._handle = handle
            self._directory_sync_pending = True
        self._segments = [current]
        begin_lsn = self._next_lsn
        frames: list[tuple[int, CheckpointPayload]] = [
            (_MARKER_TYPE, _encode_marker(_MARKER_BEGIN, begin_lsn, len(records))),
            *records,
            (_MARKER_TYPE, _encode_marker(_MARKER_COMPLETE, begin_lsn, len(records))),
        ]
        self._next_lsn += len(frames)
        self._held = bytearray()
        return _CheckpointWrite(self._handle, current.path, begin_lsn, frames)

    @staticmethod
    def _write_checkpoint(job: _CheckpointWrite, fsync: bool) -> None:
        """Join, frame and write the checkpoint's records, and fsync them if asked. Touches
        nothing but `job` (its file is written by nobody else until `_finish_checkpoint`), so
        any thread may run it."""
        try:
            for lsn, (record_type, payload) in enumerate(job.records, job.begin_lsn):
                frame = _encode_frame(lsn, record_type, _joined(payload))
                job.handle.write(frame)
                job.written += len(frame)
            if fsync:
                # The bulk of the segment is made durable here, off the loop; the loop's next
                # fsync then covers only the records held behind it.
                job.handle.fsync()
                job.synced = True
        except BaseException as error:  # reported on the log's own thread (_finish_checkpoint)
            job.error = error

    def _finish_checkpoint(self, job: _CheckpointWrite) -> None:
        """Account for the written checkpoint and write the records held behind it."""
        held, self._held = self._held, None
        if job.error is not None:
            # A half-written checkpoint is harmless on disk (recovery drops it) but leaves this
            # object unable to continue, so a failed write here is fatal.
            self._fatal(f"write of checkpoint to {job.path} failed: {job.error}")
        segment = self._segments[-1]
        assert segment.path == job.path and not segment.has_records
        segment.size += job.written
        self._fsync_count += job.synced
        if held:
            self._write_frame(held)

    # ---- internals ----

    def _write_frame(self, frame: bytearray) -> None:
        segment = self._segments[-1]
        try:
            self._handle.write(frame)
        except OSError as error:
            # Fatal, as PostgreSQL PANICs on a failed WAL write: the caller has already changed
            # its state in memory (a branch COMMITTED, a transaction DECIDING) on the strength
            # of this record, and cannot take that back. Restarting replays the log, which is
            # the truth; a torn frame at its tail is cut off then.
            self._fatal(f"write to write-ahead log {segment.path} failed: {error}")
        segment.size += len(frame)

    def _rotate(self) -> None:
        # fsync the old segment before the new one receives anything: recovery treats bad data
        # in a non-last segment as corruption, which is only right if that data was durable.
        # This fsync and the directory fsync run on the appending thread, once per segment.
        try:
            self._handle.fsync()
        except OSError as error:
            self._fatal(f"fsync of write-ahead log {self._segments[-1].path} failed: {error}")
        self._fsync_count += 1
        try:
            handle, segment = self._create_segment(self._next_lsn)
            handle.fsync()  # its header: durable before the directory names the file
        except OSError as error:  # as a failed write: the appending caller has acted already
            self._fatal(
                f"creating write-ahead log segment for LSN {self._next_lsn} failed: {error}"
            )
        self._fsync_count += 1
        self._retired.append(self._handle)
        self._handle = handle
        self._segments.append(segment)
        try:
            self._fs.fsync_dir(self._directory)
        except OSError as error:
            self._fatal(f"fsync of directory {self._directory} failed: {error}")
        # The old segment is whole on disk, and the new one's header.
        self._advance_durable_end((self._next_lsn, segment.size))

    def _create_segment(self, first_lsn: int) -> tuple[AppendFile, _Segment]:
        """Create the segment whose first record will have LSN `first_lsn`, with its file
        header written (not synced)."""
        path = self._directory / _segment_name(first_lsn)
        handle = self._fs.open_append(path)
        try:
            handle.write(_encode_file_header(first_lsn))
        except BaseException:
            handle.close()
            raise
        return handle, _Segment(first_lsn, path, FILE_HEADER_BYTES, FILE_HEADER_BYTES)

    def _advance_durable_end(self, end: tuple[int, int]) -> None:
        with self._durable_end_lock:
            self._durable_end = max(self._durable_end, end)

    def _check_usable(self) -> None:
        if self._fatal_message is not None:
            raise LogFatalError(self._fatal_message)
        if self._closed:
            raise ValueError(f"write-ahead log {self._directory} is closed")

    def _fatal(self, message: str) -> NoReturn:
        self._fatal_message = message
        self._on_fatal(message)  # by default never returns
        raise LogFatalError(message)

    def _recover(self) -> tuple[AppendFile, list[LogRecord]]:
        fs, directory = self._fs, self._directory
        for created in fs.make_dirs(directory):
            fs.fsync_dir(created.parent)  # a new directory's name is durable only then
        # Before recovery touches anything: a second process recovering a live log would cut
        # and delete what the first one is writing.
        self._directory_lock = fs.lock_dir(directory)
        try:
            return self._recover_segments()
        except BaseException:
            self._directory_lock.release()
            raise

    def _recover_segments(self) -> tuple[AppendFile, list[LogRecord]]:
        fs, directory = self._fs, self._directory
        _apply_unsynced_cut(fs, directory)
        segments: list[_Segment] = []
        for name in fs.list_dir(directory):
            match = _SEGMENT_NAME.match(name)
            if match:
                segments.append(_Segment(int(match.group(1)), directory / name, 0))
        segments.sort(key=lambda segment: segment.first_lsn)
        if not segments:
            handle, segment = self._create_segment(1)
            handle.fsync()
            fs.fsync_dir(directory)
            self._fsync_count += 1
            self._segments = [segment]
            self._durable_end = (1, segment.size)
            return handle, []

        scans: dict[int, _Scan] = {}

        def scan(segment: _Segment) -> _Scan:
            if id(segment) not in scans:
                scans[id(segment)] = _scan_segment(fs, segment)
            return scans[id(segment)]

        # 1. Replay starts at the newest complete checkpoint; anything older is left over from a
        #    crash before the checkpoint's deletions, and is removed unread.
        start = 0
        for index in reversed(range(len(segments))):
            if _checkpoint_status(scan(segments[index]))[0] is _Checkpoint.COMPLETE:
                start = index
                break
        if start > 0:
            for segment in segments[:start]:
                _scan_segment(fs, segment)  # one that is no log segment is never deleted
            # The checkpoint may be complete only in the page cache (the process died before
            # its fsync): make it durable before deleting the segments it replaces, or a power
            # loss in between would leave neither.
            kept = fs.open_append(segments[start].path)
            try:
                kept.fsync()
            finally:
                kept.close()
            self._fsync_count += 1
            for segment in segments[:start]:
                fs.remove(segment.path)
            fs.fsync_dir(directory)
            segments = segments[start:]

        # 2. A trailing segment with no valid record, or with an interrupted checkpoint, holds
        #    nothing that was ever acknowledged: drop it, and the one before becomes the tail
        #    (a checkpoint does not fsync the old segment first, so that one may be torn too).
        dropped = False
        while len(segments) > 1:
            last_scan = scan(segments[-1])
            if last_scan.later_valid_offset is not None:
                raise LogCorruptedError(
                    segments[-1].path, last_scan.bad_offset or 0, last_scan.corruption
                )
            status, _ = _checkpoint_status(last_scan)
            if last_scan.frames and status is not _Checkpoint.INCOMPLETE:
                break
            fs.remove(segments.pop().path)
            dropped = True
        if dropped:
            fs.fsync_dir(directory)
        # The only segment starting with an interrupted checkpoint: one that reused the empty
        # segment of a new log. Nothing acknowledged precedes it (older segments are deleted
        # only once a checkpoint is durable) or follows it (appends wait behind a checkpoint),
        # so the log is empty and the whole segment is a torn tail, cut below.
        only = scan(segments[0])
        if (
            len(segments) == 1
            and segments[0].first_lsn == 1
            and only.later_valid_offset is None
            and _checkpoint_status(only)[0] is _Checkpoint.INCOMPLETE
        ):
            scans[id(segments[0])] = _Scan(
                [], only.size, only.start, "an interrupted checkpoint", start=only.start
            )

        # 3. Validate every remaining segment strictly, except for a torn tail of the last one.
        recovered: list[LogRecord] = []
        expected_lsn = segments[0].first_lsn
        for index, segment in enumerate(segments):
            segment_scan = scan(segment)
            is_last = index == len(segments) - 1
            if segment.first_lsn != expected_lsn:
                raise LogCorruptedError(
                    segment.path,
                    0,
                    f"segment starts at LSN {segment.first_lsn} but the previous segment ends "
                    f"at LSN {expected_lsn - 1}",
                )
            if segment_scan.bad_offset is not None:
                if not is_last:
                    raise LogCorruptedError(
                        segment.path,
                        segment_scan.bad_offset,
                        f"{segment_scan.bad_reason} in a segment that is not the last one",
                    )
                if segment_scan.later_valid_offset is not None:
                    raise LogCorruptedError(
                        segment.path, segment_scan.bad_offset, segment_scan.corruption
                    )
            status, record_count = _checkpoint_status(segment_scan)
            marker_indexes: set[int] = set()
            if status is _Checkpoint.COMPLETE and index == 0:
                marker_indexes = {0, record_count + 1}
            elif status is not _Checkpoint.NONE:
                offset = segment_scan.frames[0].offset
                raise LogCorruptedError(segment.path, offset, f"checkpoint is {status.value}")
            for frame_index, frame in enumerate(segment_scan.frames):
                if frame.record_type == _MARKER_TYPE:
                    if frame_index not in marker_indexes:
                        raise LogCorruptedError(
                            segment.path, frame.offset, "checkpoint marker out of place"
                        )
                    continue
                recovered.append(LogRecord(frame.lsn, frame.record_type, frame.payload))
            if segment_scan.frames:
                expected_lsn = segment_scan.frames[-1].lsn + 1
            if not is_last:
                segment.size = segment_scan.size

        # 4. Cut the torn tail, and fsync what was read: after a process crash the replayed
        #    records may still be only in the page cache, and we are about to act on them.
        last = segments[-1]
        last_scan = scan(last)
        handle = fs.open_append(last.path)
        try:
            if last_scan.bad_offset is not None:
                _logger.warning(
                    "write-ahead log %s: torn write at byte offset %d (%s); truncating %d bytes",
                    last.path,
                    last_scan.bad_offset,
                    last_scan.bad_reason,
                    last_scan.size - last_scan.bad_offset,
                )
                handle.truncate(last_scan.bad_offset)
            last.size, last.frames_at = last_scan.valid_end, last_scan.start
            if last.size == 0:
                # No header and no record: a crash while the file was created (its header
                # torn or not written), or an empty segment of a release before headers.
                # Written now, as its creation would have.
                handle.write(_encode_file_header(last.first_lsn))
                last.size = last.frames_at = FILE_HEADER_BYTES
            handle.fsync()
            fs.fsync_dir(directory)
        except BaseException:
            handle.close()
            raise
        self._fsync_count += 1
        self._segments = segments
        self._next_lsn = expected_lsn
        self._durable_lsn = expected_lsn - 1
        self._durable_end = (last.first_lsn, last.size)
        return handle, recovered
