"""Append-only, checksummed write-ahead log of the coordinator and the participant SDK.

On-disk format (all integers little-endian). A log is a directory of segment files named
``{first_lsn:020d}.wal``. A segment is a sequence of frames, each starting at an 8-byte aligned
offset (etcd style: the length field is never split across a sector, so it is never torn)::

    offset  size  field
         0     4  payload_length   bytes of payload, at most LOG_RECORD_BYTES_MAX
         4     4  crc32c           CRC-32C of bytes [0, 4) + [8, frame_end): every byte of the
                                   frame except this field, padding included
         8     8  lsn              log sequence number: 1, 2, 3, ... across all segments
        16     4  record_type      1..RECORD_TYPE_MAX for callers; 0 is reserved for WAL markers
        20     n  payload
      20+n     p  zero padding up to the next multiple of 8

The LSN does the job of SQLite's salts: a frame must carry exactly the LSN that follows its
predecessor (the first frame of a segment carries the LSN in the file name), so stale or recycled
bytes never validate. Checkpoints write a new segment that starts with a CHECKPOINT_BEGIN marker,
then the caller's snapshot records, then a CHECKPOINT_COMPLETE marker; older segments are deleted
only once that segment and the directory are durable. Markers are record type 0, never returned
to callers. `LoopCommitLog` writes a checkpoint's segment on a worker thread, so a large snapshot
does not stall the event loop; records appended meanwhile follow it in the same segment.

Recovery rules (principles.md section 3): a bad frame at the very end of the last segment is a
torn write and is truncated; a bad frame followed by any valid frame, or bad data in any other
segment, is corruption and the process refuses to start (`LogCorruptedError`). So is a segment
with no valid record whose bytes cannot be a torn first write (`_not_a_segment_start`): it is
no log segment, and cutting it would leave an empty log. A failed fsync is fatal and is never
retried (PostgreSQL's rule after "fsyncgate"); so is a failed write, whose caller has already
acted on the record in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import enum
import errno
import fcntl
import logging
import os
import random as random_module
import re
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol, Self, TypeAlias

import crc32c
from google.protobuf.message import DecodeError

from dtm import crashpoints
from dtm import records as record_types
from dtm.limits import (
    CHECKPOINT_RECORDS_MAX,
    LOG_RECORD_BYTES_MAX,
    LOG_SEGMENT_BYTES_MAX,
    RECORD_TYPE_MAX,
)

__all__ = [
    "CHECKPOINT_RECORDS_MAX",
    "RECORD_TYPE_MAX",
    "AppendFile",
    "BatchSizes",
    "CheckpointPayload",
    "CrashingFileSystem",
    "FileSystem",
    "GroupCommitLog",
    "Log",
    "LogCorruptedError",
    "LogFatalError",
    "LogRecord",
    "MemoryLog",
    "OsFileSystem",
    "WriteAheadLog",
    "dump",
    "exit_on_fatal",
    "main",
    "payload_size",
]

# EX_IOERR from sysexits.h: the exit status after a failed fsync.
FATAL_EXIT_STATUS = 74

_HEADER = struct.Struct("<IIQI")  # payload_length, crc32c, lsn, record_type
_HEADER_BYTES = _HEADER.size
_CRC = struct.Struct("<I")
_ALIGNMENT = 8
_MARKER_TYPE = 0
_MARKER = struct.Struct("<BQI")  # kind, checkpoint begin LSN, number of checkpoint records
_MARKER_BEGIN = 1
_MARKER_COMPLETE = 2
_PAYLOAD_BYTES_MAX = max(LOG_RECORD_BYTES_MAX, _MARKER.size)
_SEGMENT_NAME = re.compile(r"^(\d{20})\.wal$")
# The LSN field of a header: its bytes, and its encoding.
_LSN_START, _LSN_END = 8, 16
_LSN = struct.Struct("<Q")

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Errors and records
# ---------------------------------------------------------------------------------------------


class LogCorruptedError(Exception):
    """The log holds bad data that a crash cannot explain; the process must not start."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"write-ahead log corrupted: {path} at byte offset {offset}: {reason}; this is not "
            "a torn write at the end of the log, so the process refuses to start (restore the "
            "log or inspect it with `python -m dtm.wal dump`)"
        )


def _not_a_log_segment(why: str) -> str:
    return (
        f"not a log segment: no record starts at byte 0, not even a torn one ({why}): a "
        "file that does not belong to the log (move it out of the directory), or a segment "
        "whose start was overwritten; nothing was cut"
    )


class LogFatalError(Exception):
    """A write or an fsync failed; the log must not be used again."""


class LogInUseError(OSError):
    """Another process holds the log directory: two writers would corrupt it (each recovers,
    truncates and deletes segments the other is writing)."""


# Held (flock) by the process that has the log open, for as long as it is open; it names the
# holder's pid. The kernel drops the lock when the process dies, however it dies, so a
# crashed process never leaves a stale lock behind (unlike a pid file checked by name).
LOCK_FILE_NAME = "LOCK"


@dataclass(frozen=True, slots=True)
class LogRecord:
    lsn: int
    record_type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class BatchSizes:
    """Group commit effectiveness: how many records each sync made durable."""

    syncs: int
    records: int
    largest: int

    @property
    def mean(self) -> float:
        return self.records / self.syncs if self.syncs else 0.0


def exit_on_fatal(message: str) -> NoReturn:
    """Default fatal handler: a failed fsync may have dropped dirty pages, so stop right now."""
    _logger.critical("%s", message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(FATAL_EXIT_STATUS)


# ---------------------------------------------------------------------------------------------
# File systems
# ---------------------------------------------------------------------------------------------


class AppendFile(Protocol):
    """An open segment: writes go to its end."""

    def write(self, data: bytes | bytearray) -> None: ...
    def fsync(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def close(self) -> None: ...


class FileSystem(Protocol):
    """Every file operation the log performs, so tests and the simulator can crash the disk."""

    def make_dirs(self, directory: Path) -> list[Path]:
        """Create the directory and its missing parents; returns those it created, outermost
        first."""
        ...

    def list_dir(self, directory: Path) -> list[str]: ...
    def read_file(self, path: Path) -> bytes: ...
    def file_size(self, path: Path) -> int: ...

    def open_append(self, path: Path) -> AppendFile:
        """Open for appending, creating the file if it does not exist."""
        ...

    def remove(self, path: Path) -> None: ...
    def fsync_dir(self, directory: Path) -> None: ...

    def lock_dir(self, directory: Path) -> DirectoryLock:
        """Take the directory for this log alone, or raise LogInUseError."""
        ...


class DirectoryLock(Protocol):
    def release(self) -> None: ...


class _OsDirectoryLock:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None


class _MemoryDirectoryLock:
    __slots__ = ("_directory", "_file_system")

    def __init__(self, file_system: CrashingFileSystem, directory: Path) -> None:
        self._file_system = file_system
        self._directory = directory

    def release(self) -> None:
        self._file_system.locked.discard(self._directory)


class _OsAppendFile:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            # os.write on a regular file may write less than asked (e.g. the disk filled up).
            written = os.write(self._fd, view)
            view = view[written:]

    def fsync(self) -> None:
        # fdatasync flushes the data and the metadata needed to read it back (the file size), which
        # is all an append-only file needs; it skips mtime. Where it is missing, fall back to fsync.
        if hasattr(os, "fdatasync"):
            os.fdatasync(self._fd)
        else:  # pragma: no cover - macOS
            os.fsync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def close(self) -> None:
        os.close(self._fd)


class OsFileSystem:
    """The real disk."""

    def make_dirs(self, directory: Path) -> list[Path]:
        missing = [level for level in (directory, *directory.parents) if not level.is_dir()]
        directory.mkdir(parents=True, exist_ok=True)
        return missing[::-1]

    def list_dir(self, directory: Path) -> list[str]:
        return sorted(os.listdir(directory))

    def read_file(self, path: Path) -> bytes:
        return path.read_bytes()

    def file_size(self, path: Path) -> int:
        return os.stat(path).st_size

    def open_append(self, path: Path) -> AppendFile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        return _OsAppendFile(os.open(path, flags, 0o644))

    def remove(self, path: Path) -> None:
        os.remove(path)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock_dir(self, directory: Path) -> DirectoryLock:
        path = directory / LOCK_FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LogInUseError(
                f"the log directory {directory} is in use by another process (pid {holder}); "
                "one process per data directory: stop that process, or give this one its "
                "own --data-dir",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return _OsDirectoryLock(fd)


@dataclass(eq=False, slots=True)
class _MemoryFile:
    """An inode: what a read sees now, and what survives a crash."""

    content: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class _MemoryAppendFile:
    __slots__ = ("_epoch", "_file", "_file_system")

    def __init__(self, file_system: CrashingFileSystem, file: _MemoryFile) -> None:
        self._file_system = file_system
        self._file = file
        self._epoch = file_system.crash_count

    def _check(self) -> None:
        if self._epoch != self._file_system.crash_count:
            raise OSError(errno.EBADF, "file handle opened before a crash")

    def write(self, data: bytes | bytearray) -> None:
        with self._file_system.lock:
            self._check()
            self._file.content += data

    def fsync(self) -> None:
        with self._file_system.lock:
            self._check()
            self._file_system.consume_fsync_failure()
            self._file.durable = bytes(self._file.content)

    def truncate(self, size: int) -> None:
        with self._file_system.lock:
            self._check()
            del self._file.content[size:]

    def close(self) -> None:
        self._epoch = -1


class CrashingFileSystem:
    """An in-memory disk that loses everything not fsynced when `crash()` is called.

    Model (simple, and strict where real file systems are lenient):

    - A file's content survives a crash as of its last fsync. Unsynced writes are lost; with
      `crash(random)` a random prefix of the unsynced appended bytes survives instead (a torn
      write), as long as the file was only appended to since its last fsync.
    - A directory entry (a created or a removed name) survives a crash only once its directory was
      fsynced afterwards: a created file whose directory was never fsynced disappears, a removed
      file whose directory was not fsynced after the removal reappears with its durable content.
      With `crash(random)` each such unsynced entry change survives or not at random.
    - Directories themselves are durable as soon as they are made (not modelled).
    - `fail_next_fsync = True` makes the next fsync (of a file or a directory) raise EIO.
    - Handles opened before a crash raise EBADF afterwards.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the group commit thread fsyncs while the loop appends
        self.fail_next_fsync = False
        self.crash_count = 0
        self.fsync_count = 0
        self._directories: set[Path] = set()
        self._names: dict[Path, _MemoryFile] = {}
        self._durable_names: dict[Path, _MemoryFile] = {}
        self.locked: set[Path] = set()  # log directories held by an open log

    def process_died(self) -> None:
        """The process that had logs open here died, the machine did not: the kernel dropped
        its locks, and everything it wrote is still in the page cache."""
        with self.lock:
            self.locked.clear()

    def consume_fsync_failure(self) -> None:
        self.fsync_count += 1
        if self.fail_next_fsync:
            self.fail_next_fsync = False
            raise OSError(errno.EIO, "injected fsync failure")

    def crash(self, random: random_module.Random | None = None) -> None:
        with self.lock:
            survivors: dict[Path, _MemoryFile] = {}
            for path in sorted(self._names.keys() | self._durable_names.keys()):
                durable_file = self._durable_names.get(path)
                current_file = self._names.get(path)
                chosen = durable_file
                if random is not None and durable_file is not current_file:
                    chosen = random.choice([durable_file, current_file])
                if chosen is not None:
                    survivors[path] = chosen
            for file in {id(file): file for file in survivors.values()}.values():
                kept = file.durable
                unsynced = bytes(file.content[len(kept) :])
                if random is not None and file.content.startswith(kept) and unsynced:
                    kept += unsynced[: random.randint(0, len(unsynced))]
                file.content = bytearray(kept)
                file.durable = kept
            self._names = survivors
            self._durable_names = dict(survivors)
            self.locked.clear()  # the crashed process held them
            self.crash_count += 1

    # ---- FileSystem ----

    def make_dirs(self, directory: Path) -> list[Path]:
        with self.lock:
            missing = [d for d in (directory, *directory.parents) if d not in self._directories]
            self._directories.update(missing)
            return missing[::-1]

    def list_dir(self, directory: Path) -> list[str]:
        with self.lock:
            if directory not in self._directories:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(directory))
            return sorted(path.name for path in self._names if path.parent == directory)

    def read_file(self, path: Path) -> bytes:
        with self.lock:
            return bytes(self._lookup(path).content)

    def file_size(self, path: Path) -> int:
        with self.lock:
            return len(self._lookup(path).content)

    def open_append(self, path: Path) -> AppendFile:
        with self.lock:
            if path.parent not in self._directories:
                raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
            file = self._names.setdefault(path, _MemoryFile())
            return _MemoryAppendFile(self, file)

    def remove(self, path: Path) -> None:
        with self.lock:
            self._lookup(path)
            del self._names[path]

    def fsync_dir(self, directory: Path) -> None:
        with self.lock:
            self.consume_fsync_failure()
            for path in [path for path in self._durable_names if path.parent == directory]:
                del self._durable_names[path]
            for path, file in self._names.items():
                if path.parent == directory:
                    self._durable_names[path] = file

    def lock_dir(self, directory: Path) -> DirectoryLock:
        with self.lock:
            if directory in self.locked:
                raise LogInUseError(f"the log directory {directory} is in use")
            self.locked.add(directory)
            return _MemoryDirectoryLock(self, directory)

    def _lookup(self, path: Path) -> _MemoryFile:
        try:
            return self._names[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------


def _crc(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    return int(crc32c.crc32c(data, value))


def _frame_crc(view: memoryview, offset: int, end: int) -> int:
    return _crc(view[offset + 8 : end], _crc(view[offset : offset + 4]))


def _aligned(size: int) -> int:
    return (size + _ALIGNMENT - 1) & ~(_ALIGNMENT - 1)


def _segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.wal"


def _encode_frame(lsn: int, record_type: int, payload: bytes) -> bytearray:
    length = len(payload)
    frame = bytearray(_aligned(_HEADER_BYTES + length))
    _HEADER.pack_into(frame, 0, length, 0, lsn, record_type)
    frame[_HEADER_BYTES : _HEADER_BYTES + length] = payload
    view = memoryview(frame)
    crc = _crc(view[8:], _crc(view[:4]))
    _CRC.pack_into(frame, 4, crc)
    # Verify before writing, as recovery will read it: the header fields, the payload in place
    # and the checksum over the very bytes about to be written. (Inline rather than through
    # _decode_frame: this runs for every record on the hot path.)
    stored_length, stored_crc, stored_lsn, stored_type = _HEADER.unpack_from(frame)
    if (
        (stored_length, stored_lsn, stored_type) != (length, lsn, record_type)
        or stored_crc != _crc(view[8:], _crc(view[:4]))
        # startswith compares in place (memcmp); comparing a memoryview slice goes item by
        # item, 3 ms per MB: most of a large checkpoint's framing.
        or not frame.startswith(payload, _HEADER_BYTES)
    ):
        raise AssertionError(f"frame of LSN {lsn} does not read back as written")
    return frame


def _encode_marker(kind: int, begin_lsn: int, record_count: int) -> bytes:
    return _MARKER.pack(kind, begin_lsn, record_count)


def _decode_marker(payload: bytes) -> tuple[int, int, int] | None:
    if len(payload) != _MARKER.size:
        return None
    kind, begin_lsn, record_count = _MARKER.unpack(payload)
    if kind not in (_MARKER_BEGIN, _MARKER_COMPLETE):
        return None
    return kind, begin_lsn, record_count


@dataclass(frozen=True, slots=True)
class _Frame:
    offset: int
    end: int
    lsn: int
    record_type: int
    payload: bytes


def _decode_frame(data: bytes, offset: int) -> _Frame | str:
    """The frame at `offset`, or why there is no valid frame there (LSN not checked)."""
    size = len(data)
    if offset + _HEADER_BYTES > size:
        return f"short header: {size - offset} of {_HEADER_BYTES} bytes"
    payload_length, crc, lsn, record_type = _HEADER.unpack_from(data, offset)
    if payload_length == 0 and crc == 0 and lsn == 0 and record_type == 0:
        return "zero-filled header"
    if payload_length > _PAYLOAD_BYTES_MAX:
        return f"payload length {payload_length} exceeds the maximum {_PAYLOAD_BYTES_MAX}"
    end = offset + _aligned(_HEADER_BYTES + payload_length)
    if end > size:
        return f"short record: {size - offset} of {end - offset} bytes"
    actual = _frame_crc(memoryview(data), offset, end)
    if actual != crc:
        return f"checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"
    payload = data[offset + _HEADER_BYTES : offset + _HEADER_BYTES + payload_length]
    return _Frame(offset, end, lsn, record_type, payload)


@dataclass(frozen=True, slots=True)
class _Scan:
    """Every valid frame of a segment up to the first bad one."""

    frames: list[_Frame]
    size: int
    bad_offset: int | None = None
    bad_reason: str = ""
    later_valid_offset: int | None = None  # a valid frame after the bad one: corruption

    @property
    def valid_end(self) -> int:
        return self.frames[-1].end if self.frames else 0

    @property
    def corruption(self) -> str:
        """Why the bad frame is corruption, not a torn tail (`later_valid_offset` is set)."""
        if self.later_valid_offset == self.bad_offset:
            return self.bad_reason  # the bad frame is itself whole
        return (
            f"{self.bad_reason}, yet a valid record follows at byte offset "
            f"{self.later_valid_offset}"
        )


def _scan(data: bytes, first_lsn: int | None) -> _Scan:
    """Parse frames in order; `first_lsn` None accepts whatever LSN the first frame carries."""
    frames: list[_Frame] = []
    offset = 0
    expected_lsn = first_lsn
    while offset < len(data):
        decoded = _decode_frame(data, offset)
        if isinstance(decoded, _Frame) and expected_lsn not in (None, decoded.lsn):
            # A whole frame (its checksum holds) out of sequence: no crash writes one, so it
            # is corruption even at the very end, never a torn tail to cut.
            reason = f"a whole record with LSN {decoded.lsn} where {expected_lsn} was expected"
            return _Scan(frames, len(data), offset, reason, offset)
        if isinstance(decoded, str):
            return _Scan(frames, len(data), offset, decoded, _find_valid_frame(data, offset + 8))
        frames.append(decoded)
        expected_lsn = decoded.lsn + 1
        offset = decoded.end
    return _Scan(frames, len(data))


def _find_valid_frame(data: bytes, start: int) -> int | None:
    """First aligned offset from `start` holding a frame whose header and checksum validate.

    Any such frame after a bad one means the bad one is not a torn tail: writes are appends, so a
    crash can only lose a suffix. Runs only when a bad frame was found, so a linear scan is fine.
    """
    for offset in range(start, len(data) - _HEADER_BYTES + 1, _ALIGNMENT):
        payload_length, _, lsn, _ = _HEADER.unpack_from(data, offset)
        if lsn == 0 or payload_length > _PAYLOAD_BYTES_MAX:
            continue  # cheap rejection before the checksum
        if offset + _aligned(_HEADER_BYTES + payload_length) > len(data):
            continue
        if isinstance(_decode_frame(data, offset), _Frame):
            return offset
    return None


class _Checkpoint(enum.Enum):
    NONE = "none"  # the segment does not start with a checkpoint
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # a crash interrupted writing it
    MALFORMED = "malformed"  # markers that no crash can produce


def _checkpoint_status(scan: _Scan) -> tuple[_Checkpoint, int]:
    """Whether the segment starts with a checkpoint, and how many records it holds."""
    if not scan.frames or scan.frames[0].record_type != _MARKER_TYPE:
        return _Checkpoint.NONE, 0
    begin = scan.frames[0]
    marker = _decode_marker(begin.payload)
    if marker is None or marker != (_MARKER_BEGIN, begin.lsn, marker[2]):
        return _Checkpoint.MALFORMED, 0
    record_count = marker[2]
    body = scan.frames[1 : 1 + record_count]
    if any(frame.record_type == _MARKER_TYPE for frame in body):
        return _Checkpoint.MALFORMED, record_count
    if len(scan.frames) <= 1 + record_count:
        return _Checkpoint.INCOMPLETE, record_count
    complete = scan.frames[1 + record_count]
    if _decode_marker(complete.payload) != (_MARKER_COMPLETE, begin.lsn, record_count):
        return _Checkpoint.MALFORMED, record_count
    if complete.record_type != _MARKER_TYPE:
        return _Checkpoint.MALFORMED, record_count
    return _Checkpoint.COMPLETE, record_count


def _check_record(record_type: int, size: int) -> None:
    if not 1 <= record_type <= RECORD_TYPE_MAX:
        raise ValueError(f"record type {record_type} is outside 1..{RECORD_TYPE_MAX}")
    if size > LOG_RECORD_BYTES_MAX:
        raise ValueError(
            f"record payload of {size} bytes exceeds LOG_RECORD_BYTES_MAX ({LOG_RECORD_BYTES_MAX})"
        )


# A checkpoint record's payload: its bytes, or the pieces they are the concatenation of. The log
# joins pieces where it writes the record: on a worker thread for `LoopCommitLog`, so that a
# 10 MB window of decided branches is not copied on the event loop (see `in_parts`).
CheckpointPayload: TypeAlias = bytes | list[bytes]


def payload_size(payload: CheckpointPayload) -> int:
    """The payload's length; raises TypeError for a piece that is not bytes (here, on the
    caller's thread, rather than when the log joins it on its own)."""
    if not isinstance(payload, list):
        return len(payload)
    if not all(type(piece) is bytes for piece in payload):
        raise TypeError("a checkpoint record's pieces must all be bytes")
    return sum(map(len, payload))


def _joined(payload: CheckpointPayload) -> bytes:
    # bytes.join drops the GIL while it copies more than a megabyte.
    return b"".join(payload) if isinstance(payload, list) else payload


# ---------------------------------------------------------------------------------------------
# The log
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Segment:
    first_lsn: int
    path: Path
    size: int


def _scan_segment(fs: FileSystem, segment: _Segment) -> _Scan:
    """Read and scan a segment; raises LogCorruptedError for one with no valid record that
    cannot be a torn first write: no log segment, which must never be cut or deleted."""
    data = fs.read_file(segment.path)
    segment_scan = _scan(data, segment.first_lsn)
    if segment_scan.bad_offset == 0 and segment_scan.later_valid_offset is None:
        why = _not_a_segment_start(data, segment.first_lsn)
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
        if segment_bytes_max < _aligned(_HEADER_BYTES + _MARKER.size):
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
            if current.size > 0 and current.size + len(frame) > self._segment_bytes_max:
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
        # not on file yet: `LoopCommitLog` never syncs until `_finish_checkpoint`. Not an
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
        complete marker."""
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
        if current.size == 0:
            # An empty current segment is already named after the next LSN: reuse it.
            assert current.first_lsn == self._next_lsn
            self._obsolete.extend(self._segments[:-1])
        else:
            path = self._directory / _segment_name(self._next_lsn)
            handle = self._fs.open_append(path)
            self._retired.append(self._handle)
            self._obsolete.extend(self._segments)
            self._handle = handle
            self._directory_sync_pending = True
            current = _Segment(self._next_lsn, path, 0)
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
        assert segment.path == job.path and segment.size == 0
        segment.size = job.written
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
        path = self._directory / _segment_name(self._next_lsn)
        try:
            handle = self._fs.open_append(path)
        except OSError as error:  # as a failed write: the appending caller has acted already
            self._fatal(f"creating write-ahead log segment {path} failed: {error}")
        self._retired.append(self._handle)
        self._handle = handle
        self._segments.append(_Segment(self._next_lsn, path, 0))
        try:
            self._fs.fsync_dir(self._directory)
        except OSError as error:
            self._fatal(f"fsync of directory {self._directory} failed: {error}")
        self._advance_durable_end((self._next_lsn, 0))  # the old segment is whole on disk

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
            path = directory / _segment_name(1)
            handle = fs.open_append(path)
            fs.fsync_dir(directory)
            self._segments = [_Segment(1, path, 0)]
            self._durable_end = (1, 0)
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
            scans[id(segments[0])] = _Scan([], only.size, 0, "an interrupted checkpoint")

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
            handle.fsync()
            fs.fsync_dir(directory)
        except BaseException:
            handle.close()
            raise
        self._fsync_count += 1
        last.size = last_scan.valid_end
        self._segments = segments
        self._next_lsn = expected_lsn
        self._durable_lsn = expected_lsn - 1
        self._durable_end = (last.first_lsn, last.size)
        return handle, recovered


# ---------------------------------------------------------------------------------------------
# The asyncio side
# ---------------------------------------------------------------------------------------------


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


class GroupCommitLog(_AsyncLog):
    """A `WriteAheadLog` for asyncio code: one background thread fsyncs for everyone.

    While an fsync runs, records appended meanwhile wait for the next one, so one fsync covers
    as many transactions as arrive during the previous one. Only the waiters whose LSN the
    completed fsync covers are woken (the covered LSN is captured before the fsync starts).
    Construct it anywhere; it binds to the running loop on the first `wait_durable`.
    """

    def __init__(self, wal: WriteAheadLog) -> None:
        super().__init__(wal)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requested: _Generation | None = None  # waiters for the next fsync
        self._in_flight: tuple[int, _Generation] | None = None  # (covered LSN, its waiters)
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
        # Writing is cheap and happens here, in order with appends; the fsyncs and the deletion of
        # old segments happen on the sync thread as part of the next sync.
        with self._lock:
            self._check_open()
            complete_lsn = self._wal._begin_checkpoint(records)
        await self.wait_durable(complete_lsn)

    async def close(self) -> None:
        """Make everything appended durable, stop the thread and close the files."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
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
        """One group fsync; False when closing and nothing is left to sync."""
        with self._wake:
            while self._requested is None and not self._closing:
                self._wake.wait()
            generation = self._requested or _Generation()
            self._requested = None
            ticket = self._wal._begin_sync()
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
    form the next group.

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
        self._closed: asyncio.Future[None] | None = None

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

    async def close(self) -> None:
        """Make everything appended durable and close the files. A caller cancelled meanwhile
        leaves the closing to run to its end; every call waits for that end."""
        self._closing = True
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closed)

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


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------


def _describe(record_type: int, payload: bytes) -> str:
    if record_type == _MARKER_TYPE:
        marker = _decode_marker(payload)
        if marker is None:
            return f"WAL_MARKER malformed payload={payload.hex()}"
        kind, begin_lsn, record_count = marker
        name = "CHECKPOINT_BEGIN" if kind == _MARKER_BEGIN else "CHECKPOINT_COMPLETE"
        return f"{name} begin_lsn={begin_lsn} records={record_count}"
    try:
        name, message = record_types.decode(record_type, payload)
    except DecodeError as error:
        return f"TYPE_{record_type} undecodable ({error}) payload={payload.hex()}"
    if message is None:
        return f"{name} payload={payload.hex()}"
    return f"{name} {record_types.record_text(message)}".rstrip()


def _not_a_header_start(header: bytes, first_lsn: int | None) -> str | None:
    """Why `header` (a record header, or its first bytes) cannot begin the first record of
    the segment of LSN `first_lsn` (None: any LSN); None when it can. A field cut short
    reads as its least possible value."""
    payload_length, _, lsn, record_type = _HEADER.unpack(header.ljust(_HEADER_BYTES, b"\0"))
    if payload_length > _PAYLOAD_BYTES_MAX:
        return f"payload length {payload_length} exceeds the maximum {_PAYLOAD_BYTES_MAX}"
    lsn_bytes = header[_LSN_START:_LSN_END]
    if len(lsn_bytes) == _LSN.size and (lsn == 0 or first_lsn not in (None, lsn)):
        expected = f"{first_lsn}, as its name says" if first_lsn is not None else "at least 1"
        return f"LSN {lsn} where {expected}"
    if first_lsn is not None and lsn_bytes != _LSN.pack(first_lsn)[: len(lsn_bytes)]:
        return f"LSN field starting {lsn_bytes.hex()}, not LSN {first_lsn} as its name says"
    if record_type > RECORD_TYPE_MAX:
        return f"record type {record_type} exceeds {RECORD_TYPE_MAX}"
    return None


def _not_a_segment_start(data: bytes, first_lsn: int | None) -> str | None:
    """Why the bytes of a segment whose first record is bad, with no valid record after it,
    cannot be a torn first write of that segment; None when they can.

    A crash leaves a prefix of what was written, then zeros where the file grew but its data
    did not land. So the header's bytes up to its last non-zero one must begin the header of
    the segment's first record (the LSN in its name), and only zeros may follow them, or
    follow the end of the record that the whole header (zeros included) announces. Anything
    else is no log segment, or one whose start was overwritten: cutting it would empty it."""
    header = data[:_HEADER_BYTES]
    landed = header.rstrip(b"\0")  # the zeros after it may be bytes that never landed
    why = _not_a_header_start(landed, first_lsn)
    if why is not None:
        return why
    record_end = len(landed)
    if landed and len(header) == _HEADER_BYTES and _not_a_header_start(header, first_lsn) is None:
        record_end = _aligned(_HEADER_BYTES + _HEADER.unpack(header)[0])
    rest = data[record_end:].lstrip(b"\0")
    if rest:
        where = "its first record would end" if landed else "a zero-filled header"
        return f"bytes at byte offset {len(data) - len(rest)}, after where {where}"
    return None


def dump(path: Path) -> Iterator[str]:
    """One line per record of a log directory or of one segment file; never modifies anything.

    A torn tail or corruption ends the output with a line saying so; so does a file whose first
    bytes cannot be a record header, even a torn one ("NOT A LOG": /etc/services, or garbage
    named like a segment), rather than reading as a log whose every byte is a torn tail. In a
    directory that line names the segment ("segment N of M is not a log segment"), after the
    records of the segments before it.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _SEGMENT_NAME.match(p.name))
    else:
        files = [path]
    for index, file in enumerate(files):
        match = _SEGMENT_NAME.match(file.name)
        data = file.read_bytes()
        segment_scan = _scan(data, int(match.group(1)) if match else None)
        if segment_scan.bad_offset == 0 and segment_scan.later_valid_offset is None:
            reason = _not_a_segment_start(data, int(match.group(1)) if match else None)
            if reason is not None:
                # Opening the log refuses it too (WriteAheadLog._recover_segments). In a
                # directory, the verdict is this segment's, not the whole log's: the records
                # of the segments before it are above.
                what = (
                    f"segment {index + 1} of {len(files)} is not a log segment"
                    if path.is_dir()
                    else "not a dtm write-ahead log segment"
                )
                yield f"NOT A LOG {file}: {what} (no record starts at byte 0: {reason})"
                return
        for frame in segment_scan.frames:
            description = _describe(frame.record_type, frame.payload)
            yield f"lsn={frame.lsn} {file.name}@{frame.offset} {description}"
        if segment_scan.bad_offset is None:
            continue
        where = f"{file} at byte offset {segment_scan.bad_offset}: {segment_scan.bad_reason}"
        if segment_scan.later_valid_offset is not None:
            yield (
                f"CORRUPTED {where}; a valid record follows at byte offset "
                f"{segment_scan.later_valid_offset}"
            )
        elif index < len(files) - 1:
            yield f"CORRUPTED {where}; the segment is not the last one"
        elif _checkpoint_status(segment_scan)[0] is _Checkpoint.INCOMPLETE:
            # What WriteAheadLog.open does with a last segment holding an interrupted checkpoint.
            if index > 0:
                yield (
                    f"TORN TAIL {where}; opening the log drops this segment (an interrupted "
                    "checkpoint)"
                )
            elif match and int(match.group(1)) == 1:
                yield (
                    f"TORN TAIL {where}; opening the log empties this segment (the interrupted "
                    "first checkpoint of a new log)"
                )
            else:
                yield (
                    f"CORRUPTED {where}; opening the log refuses it (a checkpoint that is the "
                    "whole log was durable, so it cannot be torn)"
                )
        else:
            lost = segment_scan.size - segment_scan.bad_offset
            yield f"TORN TAIL {where}; opening the log truncates these {lost} bytes"
        return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dtm.wal", description="Inspect a dtm write-ahead log."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dump_parser = commands.add_parser("dump", help="print every record of a log or segment")
    dump_parser.add_argument("path", type=Path, help="log directory or one .wal segment file")
    arguments = parser.parse_args(argv)
    status = 0
    for line in dump(arguments.path):
        print(line)
        if line.startswith(("CORRUPTED", "NOT A LOG")):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
