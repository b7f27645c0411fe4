"""Write-ahead log record types of the coordinator and the participant SDK.

One table maps each type number to its name and protobuf payload, so that the log, the
recovery code and `dtm log dump` agree on what every record means.
"""

from __future__ import annotations

from enum import IntEnum

from google.protobuf.message import Message

from dtmpb.v1 import log_pb2


class RecordType(IntEnum):
    # coordinator
    PARTICIPANT_REGISTERED = 1
    COMMIT_DECIDED = 2
    TRANSACTION_ENDED = 3
    HEURISTIC_RECORDED = 4
    COORDINATOR_CHECKPOINT = 5
    # participant
    BRANCH_PREPARED = 16
    BRANCH_COMMITTED = 17
    BRANCH_ROLLED_BACK = 18
    PARTICIPANT_CHECKPOINT = 19


PAYLOADS: dict[RecordType, type[Message]] = {
    RecordType.PARTICIPANT_REGISTERED: log_pb2.ParticipantRegistered,
    RecordType.COMMIT_DECIDED: log_pb2.CommitDecided,
    RecordType.TRANSACTION_ENDED: log_pb2.TransactionEnded,
    RecordType.HEURISTIC_RECORDED: log_pb2.HeuristicRecorded,
    RecordType.COORDINATOR_CHECKPOINT: log_pb2.CoordinatorCheckpoint,
    RecordType.BRANCH_PREPARED: log_pb2.BranchPrepared,
    RecordType.BRANCH_COMMITTED: log_pb2.BranchCommitted,
    RecordType.BRANCH_ROLLED_BACK: log_pb2.BranchRolledBack,
    RecordType.PARTICIPANT_CHECKPOINT: log_pb2.ParticipantCheckpoint,
}


def decode(record_type: int, payload: bytes) -> tuple[str, Message | None]:
    """Name and parsed payload of a record; (name, None) for a type this build does not know."""
    try:
        kind = RecordType(record_type)
    except ValueError:
        return f"UNKNOWN_{record_type}", None
    message = PAYLOADS[kind]()
    message.ParseFromString(payload)
    return kind.name, message
