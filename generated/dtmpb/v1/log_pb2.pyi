from google.protobuf import any_pb2 as _any_pb2
from dtmpb.v1 import coordinator_pb2 as _coordinator_pb2
from dtmpb.v1 import participant_pb2 as _participant_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParticipantRegistered(_message.Message):
    __slots__ = ("participant",)
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    participant: _coordinator_pb2.ParticipantInfo
    def __init__(self, participant: _Optional[_Union[_coordinator_pb2.ParticipantInfo, _Mapping]] = ...) -> None: ...

class ParticipantUnregistered(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DecisionBranch(_message.Message):
    __slots__ = ("branch", "participant", "acknowledged", "heuristic")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    branch: int
    participant: str
    acknowledged: bool
    heuristic: str
    def __init__(self, branch: _Optional[int] = ..., participant: _Optional[str] = ..., acknowledged: _Optional[bool] = ..., heuristic: _Optional[str] = ...) -> None: ...

class CommitDecided(_message.Message):
    __slots__ = ("transaction_id", "branches", "decided_at_unix_ms", "fingerprint", "created_at_unix_ms", "timeout_ms")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branches: _containers.RepeatedCompositeFieldContainer[DecisionBranch]
    decided_at_unix_ms: int
    fingerprint: bytes
    created_at_unix_ms: int
    timeout_ms: int
    def __init__(self, transaction_id: _Optional[str] = ..., branches: _Optional[_Iterable[_Union[DecisionBranch, _Mapping]]] = ..., decided_at_unix_ms: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., created_at_unix_ms: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class TransactionEnded(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class HeuristicRecorded(_message.Message):
    __slots__ = ("transaction_id", "branch", "participant", "outcome", "detail", "recorded_at_unix_ms", "committed", "one_phase_unknown", "found_by_inquiry", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ONE_PHASE_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    FOUND_BY_INQUIRY_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    participant: str
    outcome: str
    detail: str
    recorded_at_unix_ms: int
    committed: bool
    one_phase_unknown: bool
    found_by_inquiry: bool
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., participant: _Optional[str] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ..., recorded_at_unix_ms: _Optional[int] = ..., committed: _Optional[bool] = ..., one_phase_unknown: _Optional[bool] = ..., found_by_inquiry: _Optional[bool] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class HeuristicForgotten(_message.Message):
    __slots__ = ("transaction_id", "branch", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class BranchPrepared(_message.Message):
    __slots__ = ("transaction_id", "branch", "operation", "prepared_at_unix_ms", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PREPARED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    operation: _any_pb2.Any
    prepared_at_unix_ms: int
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., operation: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., prepared_at_unix_ms: _Optional[int] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class BranchCommitted(_message.Message):
    __slots__ = ("transaction_id", "branch", "operation", "heuristic", "transaction_fingerprint", "decided_at_unix_ms")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    operation: _any_pb2.Any
    heuristic: str
    transaction_fingerprint: bytes
    decided_at_unix_ms: int
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., operation: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., heuristic: _Optional[str] = ..., transaction_fingerprint: _Optional[bytes] = ..., decided_at_unix_ms: _Optional[int] = ...) -> None: ...

class BranchRolledBack(_message.Message):
    __slots__ = ("transaction_id", "branch", "heuristic", "reason", "transaction_fingerprint", "decided_at_unix_ms", "refused", "one_phase")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    ONE_PHASE_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    heuristic: str
    reason: str
    transaction_fingerprint: bytes
    decided_at_unix_ms: int
    refused: bool
    one_phase: bool
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., heuristic: _Optional[str] = ..., reason: _Optional[str] = ..., transaction_fingerprint: _Optional[bytes] = ..., decided_at_unix_ms: _Optional[int] = ..., refused: _Optional[bool] = ..., one_phase: _Optional[bool] = ...) -> None: ...

class BranchForgotten(_message.Message):
    __slots__ = ("transaction_id", "branch")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ...) -> None: ...

class BranchReconciled(_message.Message):
    __slots__ = ("transaction_id", "branch", "committed", "reported")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    committed: bool
    reported: bool
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., committed: _Optional[bool] = ..., reported: _Optional[bool] = ...) -> None: ...

class DecidedBranch(_message.Message):
    __slots__ = ("transaction_id", "branch", "state", "reason", "vote", "heuristic", "transaction_fingerprint", "decided_at_unix_ms", "forgotten", "one_phase", "reconciled")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    ONE_PHASE_FIELD_NUMBER: _ClassVar[int]
    RECONCILED_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    state: _participant_pb2.BranchState
    reason: str
    vote: _coordinator_pb2.Vote
    heuristic: str
    transaction_fingerprint: bytes
    decided_at_unix_ms: int
    forgotten: bool
    one_phase: bool
    reconciled: bool
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., state: _Optional[_Union[_participant_pb2.BranchState, str]] = ..., reason: _Optional[str] = ..., vote: _Optional[_Union[_coordinator_pb2.Vote, str]] = ..., heuristic: _Optional[str] = ..., transaction_fingerprint: _Optional[bytes] = ..., decided_at_unix_ms: _Optional[int] = ..., forgotten: _Optional[bool] = ..., one_phase: _Optional[bool] = ..., reconciled: _Optional[bool] = ...) -> None: ...

class ParticipantCheckpoint(_message.Message):
    __slots__ = ("service_state", "prepared", "decided", "incarnation")
    SERVICE_STATE_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    service_state: _containers.RepeatedScalarFieldContainer[bytes]
    prepared: _containers.RepeatedCompositeFieldContainer[BranchPrepared]
    decided: _containers.RepeatedCompositeFieldContainer[DecidedBranch]
    incarnation: str
    def __init__(self, service_state: _Optional[_Iterable[bytes]] = ..., prepared: _Optional[_Iterable[_Union[BranchPrepared, _Mapping]]] = ..., decided: _Optional[_Iterable[_Union[DecidedBranch, _Mapping]]] = ..., incarnation: _Optional[str] = ...) -> None: ...

class CoordinatorCheckpoint(_message.Message):
    __slots__ = ("participants", "committing", "heuristics", "ended")
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    COMMITTING_FIELD_NUMBER: _ClassVar[int]
    HEURISTICS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    participants: _containers.RepeatedCompositeFieldContainer[_coordinator_pb2.ParticipantInfo]
    committing: _containers.RepeatedCompositeFieldContainer[CommitDecided]
    heuristics: _containers.RepeatedCompositeFieldContainer[HeuristicRecorded]
    ended: _containers.RepeatedCompositeFieldContainer[CommitDecided]
    def __init__(self, participants: _Optional[_Iterable[_Union[_coordinator_pb2.ParticipantInfo, _Mapping]]] = ..., committing: _Optional[_Iterable[_Union[CommitDecided, _Mapping]]] = ..., heuristics: _Optional[_Iterable[_Union[HeuristicRecorded, _Mapping]]] = ..., ended: _Optional[_Iterable[_Union[CommitDecided, _Mapping]]] = ...) -> None: ...

class LogFormat(_message.Message):
    __slots__ = ("format",)
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    format: int
    def __init__(self, format: _Optional[int] = ...) -> None: ...
