from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_COMMITTED: _ClassVar[Outcome]
    OUTCOME_ABORTED: _ClassVar[Outcome]
    OUTCOME_UNKNOWN: _ClassVar[Outcome]

class TransactionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSACTION_STATE_UNSPECIFIED: _ClassVar[TransactionState]
    TRANSACTION_STATE_PREPARING: _ClassVar[TransactionState]
    TRANSACTION_STATE_DECIDING: _ClassVar[TransactionState]
    TRANSACTION_STATE_COMMITTING: _ClassVar[TransactionState]
    TRANSACTION_STATE_COMMITTED: _ClassVar[TransactionState]
    TRANSACTION_STATE_ABORTING: _ClassVar[TransactionState]
    TRANSACTION_STATE_ABORTED: _ClassVar[TransactionState]
    TRANSACTION_STATE_UNKNOWN: _ClassVar[TransactionState]

class Vote(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOTE_UNSPECIFIED: _ClassVar[Vote]
    VOTE_PREPARED: _ClassVar[Vote]
    VOTE_READ_ONLY: _ClassVar[Vote]
    VOTE_REFUSED: _ClassVar[Vote]
    VOTE_COMMITTED: _ClassVar[Vote]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_COMMITTED: Outcome
OUTCOME_ABORTED: Outcome
OUTCOME_UNKNOWN: Outcome
TRANSACTION_STATE_UNSPECIFIED: TransactionState
TRANSACTION_STATE_PREPARING: TransactionState
TRANSACTION_STATE_DECIDING: TransactionState
TRANSACTION_STATE_COMMITTING: TransactionState
TRANSACTION_STATE_COMMITTED: TransactionState
TRANSACTION_STATE_ABORTING: TransactionState
TRANSACTION_STATE_ABORTED: TransactionState
TRANSACTION_STATE_UNKNOWN: TransactionState
VOTE_UNSPECIFIED: Vote
VOTE_PREPARED: Vote
VOTE_READ_ONLY: Vote
VOTE_REFUSED: Vote
VOTE_COMMITTED: Vote

class Capabilities(_message.Message):
    __slots__ = ("one_phase", "batch", "operation_types")
    ONE_PHASE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_TYPES_FIELD_NUMBER: _ClassVar[int]
    one_phase: bool
    batch: bool
    operation_types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, one_phase: _Optional[bool] = ..., batch: _Optional[bool] = ..., operation_types: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterParticipantRequest(_message.Message):
    __slots__ = ("name", "address", "capabilities", "incarnation", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    capabilities: Capabilities
    incarnation: str
    replace: bool
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., incarnation: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class RegisterParticipantResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    def __init__(self, changed: _Optional[bool] = ...) -> None: ...

class UnregisterParticipantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterParticipantResponse(_message.Message):
    __slots__ = ("participant",)
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    participant: ParticipantInfo
    def __init__(self, participant: _Optional[_Union[ParticipantInfo, _Mapping]] = ...) -> None: ...

class ListParticipantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParticipantInfo(_message.Message):
    __slots__ = ("name", "address", "capabilities", "registered_at_unix_ms", "incarnation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    capabilities: Capabilities
    registered_at_unix_ms: int
    incarnation: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., registered_at_unix_ms: _Optional[int] = ..., incarnation: _Optional[str] = ...) -> None: ...

class ListParticipantsResponse(_message.Message):
    __slots__ = ("participants",)
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    participants: _containers.RepeatedCompositeFieldContainer[ParticipantInfo]
    def __init__(self, participants: _Optional[_Iterable[_Union[ParticipantInfo, _Mapping]]] = ...) -> None: ...

class BranchRequest(_message.Message):
    __slots__ = ("participant", "operation")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    participant: str
    operation: _any_pb2.Any
    def __init__(self, participant: _Optional[str] = ..., operation: _Optional[_Union[_any_pb2.Any, _Mapping]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("transaction_id", "branches", "timeout_ms")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branches: _containers.RepeatedCompositeFieldContainer[BranchRequest]
    timeout_ms: int
    def __init__(self, transaction_id: _Optional[str] = ..., branches: _Optional[_Iterable[_Union[BranchRequest, _Mapping]]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("transaction_id", "outcome", "reason", "branches")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    outcome: Outcome
    reason: str
    branches: _containers.RepeatedCompositeFieldContainer[BranchStatus]
    def __init__(self, transaction_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ..., branches: _Optional[_Iterable[_Union[BranchStatus, _Mapping]]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("transactions",)
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    transactions: _containers.RepeatedCompositeFieldContainer[SubmitRequest]
    def __init__(self, transactions: _Optional[_Iterable[_Union[SubmitRequest, _Mapping]]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("code", "response", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    response: SubmitResponse
    message: str
    def __init__(self, code: _Optional[int] = ..., response: _Optional[_Union[SubmitResponse, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitResult, _Mapping]]] = ...) -> None: ...

class BranchStatus(_message.Message):
    __slots__ = ("branch", "participant", "vote", "reason", "acknowledged", "phase_two_attempts", "last_error", "heuristic")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    PHASE_TWO_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    branch: int
    participant: str
    vote: Vote
    reason: str
    acknowledged: bool
    phase_two_attempts: int
    last_error: str
    heuristic: str
    def __init__(self, branch: _Optional[int] = ..., participant: _Optional[str] = ..., vote: _Optional[_Union[Vote, str]] = ..., reason: _Optional[str] = ..., acknowledged: _Optional[bool] = ..., phase_two_attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., heuristic: _Optional[str] = ...) -> None: ...

class Transaction(_message.Message):
    __slots__ = ("transaction_id", "state", "reason", "created_at_unix_ms", "decided_at_unix_ms", "branches", "timeout_ms", "committed_earlier", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_EARLIER_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    state: TransactionState
    reason: str
    created_at_unix_ms: int
    decided_at_unix_ms: int
    branches: _containers.RepeatedCompositeFieldContainer[BranchStatus]
    timeout_ms: int
    committed_earlier: str
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., state: _Optional[_Union[TransactionState, str]] = ..., reason: _Optional[str] = ..., created_at_unix_ms: _Optional[int] = ..., decided_at_unix_ms: _Optional[int] = ..., branches: _Optional[_Iterable[_Union[BranchStatus, _Mapping]]] = ..., timeout_ms: _Optional[int] = ..., committed_earlier: _Optional[str] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class GetTransactionRequest(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class ListTransactionsRequest(_message.Message):
    __slots__ = ("states", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[TransactionState]
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[TransactionState, str]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTransactionsResponse(_message.Message):
    __slots__ = ("transactions", "cut_at_message_limit", "more_match")
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    CUT_AT_MESSAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MORE_MATCH_FIELD_NUMBER: _ClassVar[int]
    transactions: _containers.RepeatedCompositeFieldContainer[Transaction]
    cut_at_message_limit: bool
    more_match: bool
    def __init__(self, transactions: _Optional[_Iterable[_Union[Transaction, _Mapping]]] = ..., cut_at_message_limit: _Optional[bool] = ..., more_match: _Optional[bool] = ...) -> None: ...

class QueryOutcomeRequest(_message.Message):
    __slots__ = ("transaction_id", "participant", "transaction_fingerprint", "incarnation")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    participant: str
    transaction_fingerprint: bytes
    incarnation: str
    def __init__(self, transaction_id: _Optional[str] = ..., participant: _Optional[str] = ..., transaction_fingerprint: _Optional[bytes] = ..., incarnation: _Optional[str] = ...) -> None: ...

class QueryOutcomeResponse(_message.Message):
    __slots__ = ("outcome", "presumed_abort")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    PRESUMED_ABORT_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    presumed_abort: bool
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., presumed_abort: _Optional[bool] = ...) -> None: ...

class RetryTransactionRequest(_message.Message):
    __slots__ = ("transaction_id",)
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    def __init__(self, transaction_id: _Optional[str] = ...) -> None: ...

class HeuristicOutcome(_message.Message):
    __slots__ = ("transaction_id", "branch", "participant", "outcome", "decision", "detail", "recorded_at_unix_ms", "found_by_inquiry", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FOUND_BY_INQUIRY_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    participant: str
    outcome: str
    decision: Outcome
    detail: str
    recorded_at_unix_ms: int
    found_by_inquiry: bool
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., participant: _Optional[str] = ..., outcome: _Optional[str] = ..., decision: _Optional[_Union[Outcome, str]] = ..., detail: _Optional[str] = ..., recorded_at_unix_ms: _Optional[int] = ..., found_by_inquiry: _Optional[bool] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class ListHeuristicsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListHeuristicsResponse(_message.Message):
    __slots__ = ("heuristics", "total")
    HEURISTICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    heuristics: _containers.RepeatedCompositeFieldContainer[HeuristicOutcome]
    total: int
    def __init__(self, heuristics: _Optional[_Iterable[_Union[HeuristicOutcome, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class ForgetHeuristicRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class ForgetHeuristicResponse(_message.Message):
    __slots__ = ("forgotten",)
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    forgotten: HeuristicOutcome
    def __init__(self, forgotten: _Optional[_Union[HeuristicOutcome, _Mapping]] = ...) -> None: ...

class ReportHeuristicRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "participant", "incarnation", "transaction_fingerprint", "forced", "decision", "detail")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    participant: str
    incarnation: str
    transaction_fingerprint: bytes
    forced: Outcome
    decision: Outcome
    detail: str
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ..., transaction_fingerprint: _Optional[bytes] = ..., forced: _Optional[_Union[Outcome, str]] = ..., decision: _Optional[_Union[Outcome, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ReportHeuristicResponse(_message.Message):
    __slots__ = ("heuristic",)
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    heuristic: HeuristicOutcome
    def __init__(self, heuristic: _Optional[_Union[HeuristicOutcome, _Mapping]] = ...) -> None: ...
