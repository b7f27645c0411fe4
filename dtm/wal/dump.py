"""Reading a log without changing it: `dtm log dump` (and `python -m dtm.wal dump`).

Part of the write-ahead log: see `dtm.wal` for the format and the recovery rules."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from google.protobuf.message import DecodeError

from dtm import records as record_types
from dtm.wal.frames import (
    _MARKER_BEGIN,
    _MARKER_TYPE,
    _SEGMENT_NAME,
    _Checkpoint,
    _checkpoint_status,
    _decode_marker,
    _FileStart,
    _not_a_segment_start,
    _scan_file,
    _Start,
)
from dtmpb.v1 import log_pb2


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
    described = f"{name} {record_types.record_text(message)}".rstrip()
    if isinstance(message, log_pb2.LogFormat):
        # Dumped anyway (read-only), but the records after it may read wrong here.
        newer = record_types.newer_format_problem(message.format)
        if newer is not None:
            described += f" (NEWER FORMAT: {newer}; the records after it may show wrongly here)"
    return described


def _header_line(name: str, file_start: _FileStart) -> str:
    if file_start.kind is _Start.HEADER:
        return f"file={name} frame_format={file_start.frame_format} header={file_start.frames_at}"
    return f"file={name} frame_format={file_start.frame_format} header=none"


def dump(path: Path) -> Iterator[str]:
    """One line per segment file (`file=NAME frame_format=N header=BYTES`, `header=none` for
    a segment written before file headers; no line for an empty file, nor for one whose
    header is cut short, which its TORN TAIL line names) followed by one line per record of
    it, for a log directory or one segment file; never modifies anything.

    A segment whose header states a newer frame format ends the output with a line saying so
    ("NEWER FRAME FORMAT"): its records cannot be read by this build.

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
        first_lsn = int(match.group(1)) if match else None
        data = file.read_bytes()
        file_start, segment_scan = _scan_file(data, first_lsn)
        if file_start.kind is _Start.NEWER:
            # What opening the log refuses (LogNewerFormatError); the records are unreadable.
            yield f"NEWER FRAME FORMAT {file}: {file_start.reason}"
            return
        if segment_scan is None:
            yield f"CORRUPTED {file} at byte offset 0: {file_start.reason}"
            return
        first_bad = segment_scan.bad_offset == segment_scan.start
        torn_header = file_start.kind is _Start.TORN
        if first_bad and not torn_header and segment_scan.later_valid_offset is None:
            reason = _not_a_segment_start(data, first_lsn, segment_scan.start)
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
        if data and not torn_header:
            yield _header_line(file.name, file_start)
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
        elif torn_header:
            yield (
                f"TORN TAIL {where}; a crash while the file was created: opening the log "
                "drops this segment (the only one gets its header written again)"
            )
        else:
            lost = segment_scan.size - segment_scan.bad_offset
            yield f"TORN TAIL {where}; opening the log truncates these {lost} bytes"
        return


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dtm.wal ARGS`: `dtm log ARGS`, the one implementation of the command (its
    checks, messages and exit statuses; its usage lines say `dtm log`). This module's own
    copy crashed on a missing path and printed nothing for an empty file."""
    from dtm.cli import main as cli_main  # late: dtm.cli reaches this package

    return cli_main(["log", *(sys.argv[1:] if argv is None else argv)])
