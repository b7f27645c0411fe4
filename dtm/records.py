"""Write-ahead log record types of the coordinator and the participant SDK.

One table maps each type number to its name and protobuf payload, so that the log, the
recovery code and `dtm log dump` agree on what every record means.
"""

from __future__ import annotations

import dataclasses
import io
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from enum import IntEnum
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, cast

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from dtm.wal.frames import newer_problem
from dtmpb.v1 import log_pb2

if TYPE_CHECKING:  # dtm.wal imports this module
    from dtm.wal import Log, LogRecord


class RecordType(IntEnum):
    # coordinator
    PARTICIPANT_REGISTERED = 1
    COMMIT_DECIDED = 2
    TRANSACTION_ENDED = 3
    HEURISTIC_RECORDED = 4
    COORDINATOR_CHECKPOINT = 5
    HEURISTIC_FORGOTTEN = 6
    PARTICIPANT_UNREGISTERED = 7
    # participant
    BRANCH_PREPARED = 16
    BRANCH_COMMITTED = 17
    BRANCH_ROLLED_BACK = 18
    PARTICIPANT_CHECKPOINT = 19
    BRANCH_FORGOTTEN = 20
    BRANCH_RECONCILED = 21
    # either process
    LOG_FORMAT = 32


class ReplayError(Exception):
    """An intact record (its checksum holds) that replay cannot apply: a type from a newer
    version (after a downgrade), a payload that does not parse, a record its predecessors do
    not explain, a snapshot the service does not read. The process must not start: it would
    serve a state that is not its log's."""

    def __init__(self, log: Path | None, lsn: int, record_type: int, reason: str) -> None:
        self.log = log
        self.lsn = lsn
        self.record_type = record_type
        try:
            kind = RecordType(record_type).name
        except ValueError:
            kind = f"type {record_type}"
            reason = "a record type this version does not know (written by a newer one?)"
        self.reason = reason
        where = "write-ahead log" if log is None else f"write-ahead log {log}"
        dump = "python -m dtm.wal dump" if log is None else f"python -m dtm.wal dump {log}"
        super().__init__(
            f"cannot replay the {where}: record at LSN {lsn} ({kind}): {reason}; the process "
            f"refuses to start (inspect the log with `{dump}`)"
        )


PAYLOADS: dict[RecordType, type[Message]] = {
    RecordType.PARTICIPANT_REGISTERED: log_pb2.ParticipantRegistered,
    RecordType.COMMIT_DECIDED: log_pb2.CommitDecided,
    RecordType.TRANSACTION_ENDED: log_pb2.TransactionEnded,
    RecordType.HEURISTIC_RECORDED: log_pb2.HeuristicRecorded,
    RecordType.COORDINATOR_CHECKPOINT: log_pb2.CoordinatorCheckpoint,
    RecordType.HEURISTIC_FORGOTTEN: log_pb2.HeuristicForgotten,
    RecordType.PARTICIPANT_UNREGISTERED: log_pb2.ParticipantUnregistered,
    RecordType.BRANCH_PREPARED: log_pb2.BranchPrepared,
    RecordType.BRANCH_COMMITTED: log_pb2.BranchCommitted,
    RecordType.BRANCH_ROLLED_BACK: log_pb2.BranchRolledBack,
    RecordType.PARTICIPANT_CHECKPOINT: log_pb2.ParticipantCheckpoint,
    RecordType.BRANCH_FORGOTTEN: log_pb2.BranchForgotten,
    RecordType.BRANCH_RECONCILED: log_pb2.BranchReconciled,
    RecordType.LOG_FORMAT: log_pb2.LogFormat,
}

#: The format of the records this build writes, and the newest it reads (every older one too).
#: Bumped when a build writes something an older build would misread; adding a field that an
#: older build may ignore without harm needs no bump. 1: a log that states no format (69c5909
#: and before). 2: heuristic outcomes are kept per attempt of a transaction id
#: (HeuristicRecorded.transaction_fingerprint), which format 1 collapses into one per branch.
LOG_FORMAT = 2
_FORMAT_UNSTATED = 1


def log_format_record() -> tuple[int, bytes]:
    """The record stating this build's format: first in every checkpoint, and appended when a
    process opens a log that states an older format or none."""
    return RecordType.LOG_FORMAT, log_pb2.LogFormat(format=LOG_FORMAT).SerializeToString()


def stamp_format(log: Log, replayed: Iterable[LogRecord]) -> None:
    """After a replay of `replayed` succeeded, state this build's format in `log` if they
    state another or none (a new log, or one an older release wrote): an older release
    then refuses the log (a record type it does not know) instead of misreading what this
    one writes. Not waited for: the next record made durable covers it, and a crash before
    that leaves the log as it was, stamped at the next start."""
    if stated_format(replayed) != LOG_FORMAT:
        log.append(*log_format_record())


def stated_format(records: Iterable[LogRecord]) -> int:
    """The format the last LogFormat record of `records` states (1 when none does)."""
    stated = _FORMAT_UNSTATED
    for record in records:
        if record.record_type == RecordType.LOG_FORMAT:
            stated = log_pb2.LogFormat.FromString(record.payload).format
    return stated


def newer_format_problem(stated: int) -> str | None:
    """Why a log stating format `stated` must not be replayed by this build; None if it can."""
    if stated <= LOG_FORMAT:
        return None
    return newer_problem("format", stated, LOG_FORMAT)


def without_format_records(
    records: Iterable[LogRecord], log: Path | None = None
) -> Iterator[LogRecord]:
    """`records` but for their LogFormat ones, for replay; raises ReplayError at a LogFormat
    record stating a format newer than this build's, before any record after it is read."""
    for record in records:
        if record.record_type != RecordType.LOG_FORMAT:
            yield record
            continue
        try:
            stated = log_pb2.LogFormat.FromString(record.payload).format
        except DecodeError as error:
            raise ReplayError(log, record.lsn, record.record_type, str(error)) from error
        problem = newer_format_problem(stated)
        if problem is not None:
            raise ReplayError(log, record.lsn, record.record_type, problem)


def field_key(number: int) -> bytes:
    """The key of a length-delimited protobuf field (a message, bytes or a string)."""
    return varint((number << 3) | 2)


def encoded_field(key: bytes, value: bytes | memoryview) -> bytes:
    """A length-delimited field encoded by hand: its key, its length, its bytes. A message
    holding only this field parses as that message; pieces like it concatenate into one."""
    return b"".join((key, varint(len(value)), value))


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def in_parts(pieces: list[bytes], size: int) -> list[list[bytes]]:
    """`pieces` (whole serialized fields of one message type) cut, in order, into as few runs
    of at most `size` bytes as they allow; a piece larger than `size` stands alone. Each run
    is one checkpoint record's payload, joined by the log (`dtm.wal.CheckpointPayload`) where
    it writes it: on its own thread with `LoopCommitLog`, under its lock with `GroupCommitLog`.

    A checkpoint is one message that may outgrow a log record (LOG_RECORD_BYTES_MAX): written
    as several records cut between fields, merged in order on replay, it is the whole, since
    serialized protobuf messages concatenate (repeated fields append)."""
    # Cut where the running total of the pieces' sizes passes `size` (found by bisection):
    # slicing a list copies references, not the 10 MB window of decided branches.
    ends = list(accumulate(map(len, pieces)))
    parts: list[list[bytes]] = []
    start = 0
    # Bounded by len(pieces): every step takes at least one piece.
    while start < len(pieces):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, bisect_right(ends, base + size, lo=start))
        parts.append(pieces[start:stop])
        start = stop
    return parts


def coalesced(records: Iterable[LogRecord], record_type: int) -> Iterator[LogRecord]:
    """`records`, each run of `record_type` ones (a checkpoint written in parts by `in_parts`)
    given as one record whose payload is theirs end to end: parsed, the whole message."""
    run: list[LogRecord] = []
    for record in records:
        if record.record_type == record_type:
            run.append(record)
            continue
        if run:
            yield _one(run)
            run = []
        yield record
    if run:
        yield _one(run)


def _one(run: list[LogRecord]) -> LogRecord:
    if len(run) == 1:
        return run[0]
    return dataclasses.replace(run[0], payload=b"".join(r.payload for r in run))


def decode(record_type: int, payload: bytes) -> tuple[str, Message | None]:
    """Name and parsed payload of a record; (name, None) for a type this build does not know."""
    try:
        kind = RecordType(record_type)
    except ValueError:
        return f"UNKNOWN_{record_type}", None
    message = PAYLOADS[kind]()
    message.ParseFromString(payload)
    return kind.name, message


def record_text(message: Message) -> str:
    """A record's payload as one line of protobuf text format (`dtm log dump`), with every
    field shown, at its default too, but for empty texts. Text format leaves a proto3 field at
    its default out, and those are the ones that say which branch a record is about (branch 0,
    the first of every transaction) and which outcome it holds (`committed: false`): a
    BranchReconciled of branch 0 whose coordinator decided abort read `transaction_id: "t"`."""
    out = io.StringIO()
    _print_fields(message, out)
    return out.getvalue().rstrip()


_TEXTS = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def _print_fields(message: Message, out: io.StringIO) -> None:
    # (The stubs type a descriptor's fields as the pure-Python or the upb class.)
    for field in cast("list[FieldDescriptor]", message.DESCRIPTOR.fields):
        value = getattr(message, field.name)
        if field.is_repeated:
            for item in value:
                _print_value(field, item, out)
        elif field.message_type is not None or field.has_presence:  # a message, a oneof
            if message.HasField(field.name):
                _print_value(field, value, out)
        elif value or field.type not in _TEXTS:  # an empty text reads the same either way
            _print_value(field, value, out)


def _print_value(field: FieldDescriptor, value: object, out: io.StringIO) -> None:
    if field.message_type is None or field.message_type.full_name == "google.protobuf.Any":
        # An Any's own printing shows what it packs.
        text_format.PrintField(field, value, out, as_one_line=True)
        return
    out.write(f"{field.name} {{ ")
    assert isinstance(value, Message)
    _print_fields(value, out)
    out.write("} ")
