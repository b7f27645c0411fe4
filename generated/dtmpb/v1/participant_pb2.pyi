from google.protobuf import any_pb2 as _any_pb2
from dtmpb.v1 import coordinator_pb2 as _coordinator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FaultMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAULT_MODE_NONE: _ClassVar[FaultMode]
    FAULT_MODE_REFUSE: _ClassVar[FaultMode]
    FAULT_MODE_SLOW: _ClassVar[FaultMode]
    FAULT_MODE_DOWN: _ClassVar[FaultMode]
    FAULT_MODE_REJECT_DECISIONS: _ClassVar[FaultMode]

class BranchState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BRANCH_STATE_UNSPECIFIED: _ClassVar[BranchState]
    BRANCH_STATE_PREPARING: _ClassVar[BranchState]
    BRANCH_STATE_PREPARED: _ClassVar[BranchState]
    BRANCH_STATE_COMMITTED: _ClassVar[BranchState]
    BRANCH_STATE_ROLLED_BACK: _ClassVar[BranchState]
    BRANCH_STATE_REFUSED: _ClassVar[BranchState]
    BRANCH_STATE_READ_ONLY: _ClassVar[BranchState]
FAULT_MODE_NONE: FaultMode
FAULT_MODE_REFUSE: FaultMode
FAULT_MODE_SLOW: FaultMode
FAULT_MODE_DOWN: FaultMode
FAULT_MODE_REJECT_DECISIONS: FaultMode
BRANCH_STATE_UNSPECIFIED: BranchState
BRANCH_STATE_PREPARING: BranchState
BRANCH_STATE_PREPARED: BranchState
BRANCH_STATE_COMMITTED: BranchState
BRANCH_STATE_ROLLED_BACK: BranchState
BRANCH_STATE_REFUSED: BranchState
BRANCH_STATE_READ_ONLY: BranchState

class PrepareRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "operation", "one_phase", "transaction_fingerprint", "participant", "incarnation")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    ONE_PHASE_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    operation: _any_pb2.Any
    one_phase: bool
    transaction_fingerprint: bytes
    participant: str
    incarnation: str
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., operation: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., one_phase: _Optional[bool] = ..., transaction_fingerprint: _Optional[bytes] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("vote", "reason", "invalid_argument", "id_reused", "committed_earlier")
    VOTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INVALID_ARGUMENT_FIELD_NUMBER: _ClassVar[int]
    ID_REUSED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_EARLIER_FIELD_NUMBER: _ClassVar[int]
    vote: _coordinator_pb2.Vote
    reason: str
    invalid_argument: str
    id_reused: str
    committed_earlier: bool
    def __init__(self, vote: _Optional[_Union[_coordinator_pb2.Vote, str]] = ..., reason: _Optional[str] = ..., invalid_argument: _Optional[str] = ..., id_reused: _Optional[str] = ..., committed_earlier: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "transaction_fingerprint", "participant", "incarnation")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    transaction_fingerprint: bytes
    participant: str
    incarnation: str
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., transaction_fingerprint: _Optional[bytes] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "transaction_fingerprint", "participant", "incarnation")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    transaction_fingerprint: bytes
    participant: str
    incarnation: str
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., transaction_fingerprint: _Optional[bytes] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrepareBatchRequest(_message.Message):
    __slots__ = ("prepares", "participant", "incarnation")
    PREPARES_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    prepares: _containers.RepeatedCompositeFieldContainer[PrepareRequest]
    participant: str
    incarnation: str
    def __init__(self, prepares: _Optional[_Iterable[_Union[PrepareRequest, _Mapping]]] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class PrepareBatchResponse(_message.Message):
    __slots__ = ("votes",)
    VOTES_FIELD_NUMBER: _ClassVar[int]
    votes: _containers.RepeatedCompositeFieldContainer[PrepareResponse]
    def __init__(self, votes: _Optional[_Iterable[_Union[PrepareResponse, _Mapping]]] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("transaction_id", "branch", "commit", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    commit: bool
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., commit: _Optional[bool] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class DecideBatchRequest(_message.Message):
    __slots__ = ("decisions", "participant", "incarnation")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    participant: str
    incarnation: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class DecisionResult(_message.Message):
    __slots__ = ("ok", "error", "heuristic", "code")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    heuristic: str
    code: int
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., heuristic: _Optional[str] = ..., code: _Optional[int] = ...) -> None: ...

class DecideBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DecisionResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DecisionResult, _Mapping]]] = ...) -> None: ...

class ExchangeRequest(_message.Message):
    __slots__ = ("decisions", "prepares", "participant", "incarnation")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    PREPARES_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    prepares: _containers.RepeatedCompositeFieldContainer[PrepareRequest]
    participant: str
    incarnation: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ..., prepares: _Optional[_Iterable[_Union[PrepareRequest, _Mapping]]] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class ExchangeResponse(_message.Message):
    __slots__ = ("votes", "results")
    VOTES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    votes: _containers.RepeatedCompositeFieldContainer[PrepareResponse]
    results: _containers.RepeatedCompositeFieldContainer[DecisionResult]
    def __init__(self, votes: _Optional[_Iterable[_Union[PrepareResponse, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[DecisionResult, _Mapping]]] = ...) -> None: ...

class RecoverRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PreparedBranch(_message.Message):
    __slots__ = ("transaction_id", "branch", "prepared_at_unix_ms")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PREPARED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    prepared_at_unix_ms: int
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., prepared_at_unix_ms: _Optional[int] = ...) -> None: ...

class RecoverResponse(_message.Message):
    __slots__ = ("branches",)
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    branches: _containers.RepeatedCompositeFieldContainer[PreparedBranch]
    def __init__(self, branches: _Optional[_Iterable[_Union[PreparedBranch, _Mapping]]] = ...) -> None: ...

class SetFaultRequest(_message.Message):
    __slots__ = ("mode", "delay_ms")
    MODE_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    mode: FaultMode
    delay_ms: int
    def __init__(self, mode: _Optional[_Union[FaultMode, str]] = ..., delay_ms: _Optional[int] = ...) -> None: ...

class SetFaultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BranchInfo(_message.Message):
    __slots__ = ("transaction_id", "branch", "state", "reason", "updated_at_unix_ms", "heuristic", "awaiting_coordinator", "forgotten", "transaction_fingerprint")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    AWAITING_COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    state: BranchState
    reason: str
    updated_at_unix_ms: int
    heuristic: str
    awaiting_coordinator: bool
    forgotten: bool
    transaction_fingerprint: bytes
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., state: _Optional[_Union[BranchState, str]] = ..., reason: _Optional[str] = ..., updated_at_unix_ms: _Optional[int] = ..., heuristic: _Optional[str] = ..., awaiting_coordinator: _Optional[bool] = ..., forgotten: _Optional[bool] = ..., transaction_fingerprint: _Optional[bytes] = ...) -> None: ...

class ListBranchesRequest(_message.Message):
    __slots__ = ("states", "awaiting_coordinator", "participant", "incarnation", "transaction_id", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    AWAITING_COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[BranchState]
    awaiting_coordinator: bool
    participant: str
    incarnation: str
    transaction_id: str
    limit: int
    def __init__(self, states: _Optional[_Iterable[_Union[BranchState, str]]] = ..., awaiting_coordinator: _Optional[bool] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ..., transaction_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListBranchesResponse(_message.Message):
    __slots__ = ("branches", "more_kept")
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    MORE_KEPT_FIELD_NUMBER: _ClassVar[int]
    branches: _containers.RepeatedCompositeFieldContainer[BranchInfo]
    more_kept: bool
    def __init__(self, branches: _Optional[_Iterable[_Union[BranchInfo, _Mapping]]] = ..., more_kept: _Optional[bool] = ...) -> None: ...

class LockInfo(_message.Message):
    __slots__ = ("resource", "mode", "holders", "held_since_unix_ms", "waiters", "holders_total", "waiters_total")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    HELD_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WAITERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    resource: str
    mode: str
    holders: _containers.RepeatedScalarFieldContainer[str]
    held_since_unix_ms: int
    waiters: _containers.RepeatedScalarFieldContainer[str]
    holders_total: int
    waiters_total: int
    def __init__(self, resource: _Optional[str] = ..., mode: _Optional[str] = ..., holders: _Optional[_Iterable[str]] = ..., held_since_unix_ms: _Optional[int] = ..., waiters: _Optional[_Iterable[str]] = ..., holders_total: _Optional[int] = ..., waiters_total: _Optional[int] = ...) -> None: ...

class ListLocksRequest(_message.Message):
    __slots__ = ("participant", "incarnation", "limit")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    participant: str
    incarnation: str
    limit: int
    def __init__(self, participant: _Optional[str] = ..., incarnation: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListLocksResponse(_message.Message):
    __slots__ = ("locks", "locks_total")
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    LOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[LockInfo]
    locks_total: int
    def __init__(self, locks: _Optional[_Iterable[_Union[LockInfo, _Mapping]]] = ..., locks_total: _Optional[int] = ...) -> None: ...

class ForceOutcomeRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "commit", "i_understand_this_is_heuristic", "participant", "incarnation", "coordinator_lost")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    I_UNDERSTAND_THIS_IS_HEURISTIC_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_LOST_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    commit: bool
    i_understand_this_is_heuristic: bool
    participant: str
    incarnation: str
    coordinator_lost: bool
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., commit: _Optional[bool] = ..., i_understand_this_is_heuristic: _Optional[bool] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ..., coordinator_lost: _Optional[bool] = ...) -> None: ...

class ForceOutcomeResponse(_message.Message):
    __slots__ = ("branch",)
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    branch: BranchInfo
    def __init__(self, branch: _Optional[_Union[BranchInfo, _Mapping]] = ...) -> None: ...

class ForgetBranchRequest(_message.Message):
    __slots__ = ("transaction_id", "branch", "participant", "incarnation", "coordinator_lost")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_LOST_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    branch: int
    participant: str
    incarnation: str
    coordinator_lost: bool
    def __init__(self, transaction_id: _Optional[str] = ..., branch: _Optional[int] = ..., participant: _Optional[str] = ..., incarnation: _Optional[str] = ..., coordinator_lost: _Optional[bool] = ...) -> None: ...

class ForgetBranchResponse(_message.Message):
    __slots__ = ("branch",)
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    branch: BranchInfo
    def __init__(self, branch: _Optional[_Union[BranchInfo, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("participant", "incarnation")
    PARTICIPANT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    participant: str
    incarnation: str
    def __init__(self, participant: _Optional[str] = ..., incarnation: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("name", "incarnation", "address", "capabilities", "coordinator", "registered")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    name: str
    incarnation: str
    address: str
    capabilities: _coordinator_pb2.Capabilities
    coordinator: str
    registered: bool
    def __init__(self, name: _Optional[str] = ..., incarnation: _Optional[str] = ..., address: _Optional[str] = ..., capabilities: _Optional[_Union[_coordinator_pb2.Capabilities, _Mapping]] = ..., coordinator: _Optional[str] = ..., registered: _Optional[bool] = ...) -> None: ...
