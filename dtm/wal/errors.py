"""The log's errors, the records it returns and the fatal exit.

Part of the write-ahead log: see `dtm.wal` for the format and the recovery rules."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

# EX_IOERR from sysexits.h: the exit status after a failed fsync.
FATAL_EXIT_STATUS = 74
# One logger for the whole log, whichever module of it speaks.
_logger = logging.getLogger("dtm.wal")


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


class LogNewerFormatError(Exception):
    """A segment's file header states a frame format newer than this build reads: a newer
    release wrote the log. The process must not start, and nothing is cut or rewritten."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"cannot read the write-ahead log segment {path}: {problem}; the process refuses "
            f"to start, nothing was changed (inspect the log with `python -m dtm.wal dump "
            f"{path.parent}`)"
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
