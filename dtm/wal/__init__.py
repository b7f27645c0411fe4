"""Append-only, checksummed write-ahead log of the coordinator and the participant SDK.

On-disk format (all integers little-endian). A log is a directory of segment files named
``{first_lsn:020d}.wal``. A segment is a file header, then a sequence of frames, each starting
at an 8-byte aligned offset (etcd style: the length field is never split across a sector, so
it is never torn). The file header, written when the file is created::

    offset  size  field
         0     8  magic          b"dtm-wal\\n"
         8     4  frame_format   FRAME_FORMAT: the layout of the frames below (1)
        12     4  crc32c         CRC-32C of bytes [0, 12) + [16, 24)
        16     8  first_lsn      the LSN of the segment's first record, as in its name

Bytes 0 to 12 keep their place in every frame format, so a segment of a newer one is refused
as such (`LogNewerFormatError`), never read as corruption or cut as a torn tail. A segment
without a header (written before headers) is frame format 1. Each frame::

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
segment, is corruption and the process refuses to start (`LogCorruptedError`); a file header
cut short is a torn tail, a whole one that does not hold is corruption. So is a segment
with no valid record whose bytes cannot be a torn first write (`_not_a_segment_start`): it is
no log segment, and cutting it would leave an empty log. A failed fsync is fatal and is never
retried (PostgreSQL's rule after "fsyncgate"); so is a failed write, whose caller has already
acted on the record in memory.

Modules: `frames` (the format above, and the scan of a segment's bytes), `log` (segments,
appends, fsyncs, checkpoints, recovery), `durability` (the asyncio face: group commit on the
event loop or on a thread; `MemoryLog` for unit tests), `files` (the real file system and a
crashing one for tests), `errors` (errors, `LogRecord`, the fatal exit), `dump` (`python -m
dtm.wal dump`). Everything callers use is imported here.
"""

from dtm.limits import CHECKPOINT_RECORDS_MAX, RECORD_TYPE_MAX
from dtm.wal.dump import dump, main
from dtm.wal.durability import GroupCommitLog, Log, LoopCommitLog, MemoryLog, async_log
from dtm.wal.errors import (
    BatchSizes,
    LogCorruptedError,
    LogFatalError,
    LogInUseError,
    LogNewerFormatError,
    LogRecord,
    exit_on_fatal,
)
from dtm.wal.files import AppendFile, CrashingFileSystem, FileSystem, OsFileSystem
from dtm.wal.frames import FRAME_FORMAT, CheckpointPayload, payload_size
from dtm.wal.log import LOSE_UNSYNCED_VARIABLE, WriteAheadLog

__all__ = [
    "CHECKPOINT_RECORDS_MAX",
    "FRAME_FORMAT",
    "LOSE_UNSYNCED_VARIABLE",
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
    "LogInUseError",
    "LogNewerFormatError",
    "LogRecord",
    "LoopCommitLog",
    "MemoryLog",
    "OsFileSystem",
    "WriteAheadLog",
    "async_log",
    "dump",
    "exit_on_fatal",
    "main",
    "payload_size",
]
