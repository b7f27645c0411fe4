"""The on-disk format: frames, checkpoint markers, and the scan of a segment's bytes.

Part of the write-ahead log: see `dtm.wal` for the format and the recovery rules."""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import TypeAlias

import crc32c

from dtm.limits import (
    LOG_RECORD_BYTES_MAX,
    RECORD_TYPE_MAX,
)

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

# The file header every segment this build creates starts with (segments written before it
# have none: frame format 1, read as ever). Its first 12 bytes, the magic and the frame
# format, stay where they are in every format to come, so that a build tells a segment of a
# newer format ("run a newer dtm") from a corrupted one (which recovery might cut as torn).
# As a frame's payload_length the magic's first 4 bytes read 761,099,364, above any length
# allowed, so no segment without a header starts with them. 24 bytes: frames stay 8-aligned.
_FILE_MAGIC = b"dtm-wal\n"
_FILE_HEADER = struct.Struct("<8sIIQ")  # magic, frame format, crc32c, first LSN
FILE_HEADER_BYTES = _FILE_HEADER.size
_FRAME_FORMAT_FIELD = struct.Struct("<I")
_FRAME_FORMAT_END = 12  # the magic and the frame format: the part every format keeps
_CHECKSUM_START = _FRAME_FORMAT_END  # then, in format 1, the checksum and the first LSN
#: The frame format this build writes and the newest it reads (a segment with no header is 1).
#: Bumped when the frame layout changes (another checksum, a wider length, compression); what
#: the records mean is versioned apart, by the LogFormat record (`dtm.records.LOG_FORMAT`).
#: A newer format's header must not hold, in bytes 12 to 24, the checksum and LSN a header of
#: a known format would hold there: such a header reads as one whose format field is damaged
#: (`_damaged_format`). Any checksum over the header's own bytes (its format included) keeps
#: clear of it, but for one chance in 2**32.
FRAME_FORMAT = 1


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


def _encode_file_header(first_lsn: int, frame_format: int = FRAME_FORMAT) -> bytes:
    """The header of a new segment whose first record will have LSN `first_lsn`; its CRC-32C
    covers every byte of it but its own field, as a frame's does. (`frame_format`: the header
    a segment of that format has, or would have, in this layout.)"""
    header = bytearray(_FILE_HEADER.pack(_FILE_MAGIC, frame_format, 0, first_lsn))
    _CRC.pack_into(header, 12, _crc(header[16:], _crc(header[:12])))
    return bytes(header)


class _Start(enum.Enum):
    """How a segment's bytes start."""

    HEADERLESS = "headerless"  # written before file headers (or nothing at all): format 1
    HEADER = "header"  # a whole header of a format this build reads
    TORN = "torn"  # a header cut short by a crash while the file was created: no record
    NEWER = "newer"  # a header stating a frame format newer than this build's
    BAD = "bad"  # a header no crash can leave: corruption


@dataclass(frozen=True, slots=True)
class _FileStart:
    kind: _Start
    frame_format: int = FRAME_FORMAT  # the one stated, or the one a headerless file is in
    frames_at: int = 0  # the byte offset of the first frame
    reason: str = ""  # for TORN, NEWER and BAD: what the header's bytes say


def _file_start(data: bytes, first_lsn: int | None) -> _FileStart:
    """Read the file header of a segment's bytes; `first_lsn` is the LSN in the segment's
    name (None: a file not named like a segment, whose header's own LSN is taken)."""
    if data[:4] != _FILE_MAGIC[:4]:
        # Fewer bytes of the magic read as the start of a frame's header: a torn first frame
        # of a headerless segment, or of a header; either way no record, cut the same.
        return _FileStart(_Start.HEADERLESS)
    if len(data) >= _FRAME_FORMAT_END and data.startswith(_FILE_MAGIC):
        (stated,) = _FRAME_FORMAT_FIELD.unpack_from(data, 8)
        if stated > FRAME_FORMAT:
            damaged = _damaged_format(data, stated)
            if damaged:
                return _FileStart(_Start.BAD, stated, reason=damaged)
            return _FileStart(_Start.NEWER, stated, reason=newer_frame_format_problem(stated))
    header = data[:FILE_HEADER_BYTES].ljust(FILE_HEADER_BYTES, b"\0")
    _, stated, stored_crc, stored_lsn = _FILE_HEADER.unpack(header)
    expected = _encode_file_header(stored_lsn if first_lsn is None else first_lsn)
    if data.startswith(expected):
        return _FileStart(_Start.HEADER, FRAME_FORMAT, FILE_HEADER_BYTES)
    landed = data.rstrip(b"\0")  # the zeros after it may be bytes that never landed
    if expected.startswith(landed):
        return _FileStart(
            _Start.TORN, reason=f"a file header cut short ({len(landed)} of {len(header)} bytes)"
        )
    if header[:8] != _FILE_MAGIC:
        reason = f"bytes {header[:8].hex()} where a file header's magic would be"
    elif stated == 0:  # a format field no whole header holds
        reason = f"a file header stating frame format {stated}"
    elif first_lsn is not None and stored_lsn != first_lsn:
        reason = f"a file header stating first LSN {stored_lsn}, not {first_lsn} as its name says"
    else:
        actual = _crc(header[16:], _crc(header[:12]))
        reason = (
            f"file header checksum mismatch: stored {stored_crc:#010x}, computed {actual:#010x}"
        )
    return _FileStart(_Start.BAD, stated, reason=reason)


def _damaged_format(data: bytes, stated: int) -> str:
    """Why a whole header stating frame format `stated`, newer than this build's, is a known
    format's header whose format field is damaged (a flipped bit), or "" (a newer dtm's, as
    far as can be told): its checksum is the one of a header of that known format with its
    LSN, which a header written as `stated` holds once in 2**32 (FRAME_FORMAT's comment)."""
    if len(data) < FILE_HEADER_BYTES:
        return ""  # cut short: too little to tell
    checksum_and_lsn = data[_CHECKSUM_START:FILE_HEADER_BYTES]
    (stored_lsn,) = _LSN.unpack_from(data, FILE_HEADER_BYTES - _LSN.size)
    for known in range(1, FRAME_FORMAT + 1):
        if _encode_file_header(stored_lsn, known)[_CHECKSUM_START:] == checksum_and_lsn:
            return (
                f"a file header stating frame format {stated}, with the checksum of frame "
                f"format {known}: a damaged format field, not a segment of a newer dtm"
            )
    return ""


def newer_frame_format_problem(stated: int) -> str:
    """Why a segment in frame format `stated`, newer than this build's, is not read: worded
    as the refusal of a newer LogFormat (`dtm.records.newer_format_problem`)."""
    return newer_problem("frame format", stated, FRAME_FORMAT)


def newer_problem(kind: str, stated: int, newest: int) -> str:
    """Why a log in `kind` `stated`, above the `newest` this build reads, must not be read."""
    return (
        f"the log is in {kind} {stated}, written by a newer dtm; this build reads {kind}s 1 "
        f"to {newest}: run a dtm that reads {kind} {stated} (going back to an older release "
        "after a newer one has written the log is not supported)"
    )


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
    start: int = 0  # where the frames begin: after the file header, if there is one

    @property
    def valid_end(self) -> int:
        return self.frames[-1].end if self.frames else self.start

    @property
    def corruption(self) -> str:
        """Why the bad frame is corruption, not a torn tail (`later_valid_offset` is set)."""
        if self.later_valid_offset == self.bad_offset:
            return self.bad_reason  # the bad frame is itself whole
        return (
            f"{self.bad_reason}, yet a valid record follows at byte offset "
            f"{self.later_valid_offset}"
        )


def _scan(data: bytes, first_lsn: int | None, start: int = 0) -> _Scan:
    """Parse frames in order from byte `start`; `first_lsn` None accepts whatever LSN the
    first frame carries."""
    frames: list[_Frame] = []
    offset = start
    expected_lsn = first_lsn
    while offset < len(data):
        decoded = _decode_frame(data, offset)
        if isinstance(decoded, _Frame) and expected_lsn not in (None, decoded.lsn):
            # A whole frame (its checksum holds) out of sequence: no crash writes one, so it
            # is corruption even at the very end, never a torn tail to cut.
            reason = f"a whole record with LSN {decoded.lsn} where {expected_lsn} was expected"
            return _Scan(frames, len(data), offset, reason, offset, start)
        if isinstance(decoded, str):
            later = _find_valid_frame(data, offset + 8)
            return _Scan(frames, len(data), offset, decoded, later, start)
        frames.append(decoded)
        expected_lsn = decoded.lsn + 1
        offset = decoded.end
    return _Scan(frames, len(data), start=start)


def _scan_file(data: bytes, first_lsn: int | None) -> tuple[_FileStart, _Scan | None]:
    """Read a segment's file header, then scan its frames; no scan for a header that stops
    the reading (NEWER, BAD). A torn header is a torn tail at byte 0 (no record follows)."""
    file_start = _file_start(data, first_lsn)
    if file_start.kind in (_Start.NEWER, _Start.BAD):
        return file_start, None
    if file_start.kind is _Start.TORN:
        return file_start, _Scan([], len(data), 0, file_start.reason)
    return file_start, _scan(data, first_lsn, file_start.frames_at)


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


def _not_a_segment_start(data: bytes, first_lsn: int | None, start: int = 0) -> str | None:
    """Why the bytes of a segment whose first record is bad, with no valid record after it,
    cannot be a torn first write of that segment; None when they can.

    A crash leaves a prefix of what was written, then zeros where the file grew but its data
    did not land. So the header's bytes up to its last non-zero one must begin the header of
    the segment's first record (the LSN in its name), and only zeros may follow them, or
    follow the end of the record that the whole header (zeros included) announces. Anything
    else is no log segment, or one whose start was overwritten: cutting it would empty it.
    `start`: where the first record begins (after the file header, if there is one)."""
    header = data[start : start + _HEADER_BYTES]
    landed = header.rstrip(b"\0")  # the zeros after it may be bytes that never landed
    why = _not_a_header_start(landed, first_lsn)
    if why is not None:
        return why
    record_end = start + len(landed)
    if landed and len(header) == _HEADER_BYTES and _not_a_header_start(header, first_lsn) is None:
        record_end = start + _aligned(_HEADER_BYTES + _HEADER.unpack(header)[0])
    rest = data[record_end:].lstrip(b"\0")
    if rest:
        where = "its first record would end" if landed else "a zero-filled header"
        return f"bytes at byte offset {len(data) - len(rest)}, after where {where}"
    return None
