"""What travels over the simulated network and what lies on the simulated disks.

Every call is a request and a reply linked by a call id, so that a lost reply, a late reply
and a duplicate can all be told apart, as with gRPC calls and their deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from dtm.core.branch import BranchVote, ErrorKind

# ---- coordinator -> participant ----


@dataclass(frozen=True, slots=True)
class PrepareRequest:
    call: int
    transaction_id: str
    branch: int
    one_phase: bool

    def __str__(self) -> str:
        kind = "Prepare1PC" if self.one_phase else "Prepare"
        return f"{kind}({self.transaction_id}/{self.branch}) #{self.call}"


@dataclass(frozen=True, slots=True)
class CommitRequest:
    call: int
    transaction_id: str
    branch: int

    def __str__(self) -> str:
        return f"Commit({self.transaction_id}/{self.branch}) #{self.call}"


@dataclass(frozen=True, slots=True)
class RollbackRequest:
    call: int
    transaction_id: str
    branch: int

    def __str__(self) -> str:
        return f"Rollback({self.transaction_id}/{self.branch}) #{self.call}"


# ---- participant -> coordinator: replies ----


@dataclass(frozen=True, slots=True)
class VoteReply:
    call: int
    vote: BranchVote
    reason: str

    def __str__(self) -> str:
        return f"Vote {self.vote.value} #{self.call}"


@dataclass(frozen=True, slots=True)
class AckReply:
    call: int

    def __str__(self) -> str:
        return f"Ack #{self.call}"


@dataclass(frozen=True, slots=True)
class ErrorReply:
    call: int
    kind: ErrorKind
    message: str

    def __str__(self) -> str:
        return f"Error {self.kind.value} #{self.call}"


# ---- participant -> coordinator: the in-doubt inquiry, and its answer ----


@dataclass(frozen=True, slots=True)
class OutcomeQuery:
    call: int
    transaction_id: str

    def __str__(self) -> str:
        return f"QueryOutcome({self.transaction_id}) #{self.call}"


Answer: TypeAlias = Literal["committed", "aborted", "unspecified"]


@dataclass(frozen=True, slots=True)
class OutcomeAnswer:
    call: int
    outcome: Answer

    def __str__(self) -> str:
        return f"Outcome {self.outcome} #{self.call}"


Message: TypeAlias = (
    PrepareRequest
    | CommitRequest
    | RollbackRequest
    | VoteReply
    | AckReply
    | ErrorReply
    | OutcomeQuery
    | OutcomeAnswer
)
Reply: TypeAlias = VoteReply | AckReply | ErrorReply

# ---- log records ----


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """The coordinator's forced commit decision, with its updating branches."""

    transaction_id: str
    branches: tuple[tuple[int, str], ...]
    decided_at_ms: int


@dataclass(frozen=True, slots=True)
class EndRecord:
    """The coordinator's lazy record: every updating branch acknowledged the commit."""

    transaction_id: str


BranchRecordKind: TypeAlias = Literal["prepared", "committed", "rolled_back"]


@dataclass(frozen=True, slots=True)
class BranchRecord:
    """A participant's record, as participants/branches.py writes them."""

    kind: BranchRecordKind
    transaction_id: str
    branch: int
    one_phase: bool = False  # a one-phase commit record also stands for its prepare
    at_ms: int = 0  # when it was written, by its participant's wall clock (prepared_at_ms)


Record: TypeAlias = DecisionRecord | EndRecord | BranchRecord
