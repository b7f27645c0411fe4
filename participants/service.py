"""What a service author writes: business logic for one participant, with no gRPC and no log.

The SDK (participants.server) supplies the rest: the gRPC server, registration with the
coordinator, idempotency per (transaction, branch), the branch state machine, locks, durable
branch state and recovery. A service only has to be deterministic: given the same state and the
same operation, `prepare` gives the same answer, because recovery replays the log through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from participants.locks import LockMode

Operation = TypeVar("Operation", bound=Message)


class InvalidOperation(ValueError):
    """The operation is malformed (negative quantity, missing field...): INVALID_ARGUMENT."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """The operation was validated and tentatively applied; it is held until the decision."""


@dataclass(frozen=True, slots=True)
class ReadOnly:
    """Nothing to hold and nothing to do in phase 2."""


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


PrepareResult = Prepared | ReadOnly | Refused


#: What `Service.snapshot` returns: the state's bytes, or pieces of them in order.
StatePieces = bytes | list[bytes]


def state_bytes(state: StatePieces) -> bytes:
    """The bytes a snapshot's pieces make: what `Service.restore` is given."""
    return state if isinstance(state, bytes) else b"".join(state)


@dataclass(frozen=True, slots=True)
class LockRequest:
    resource: str
    mode: LockMode = LockMode.EXCLUSIVE
    #: The refusal of a prepare whose wait for this lock runs out, when the resource being
    #: held means something the client must act on ("order id o-1 is already being
    #: created..."). Empty: the lock table's "lock timeout on R after N ms", which reads as
    #: "retry".
    timeout_reason: str = ""


class Service(Protocol, Generic[Operation]):
    """Business logic of one participant. `key` is "<transaction id>/<branch>"."""

    #: Registered name, e.g. "inventory".
    name: str
    #: The protobuf message this service accepts as its operation, e.g. shop_pb2.ReserveStock.
    operation_type: type[Operation]

    def validate(self, operation: Operation) -> None:
        """Raise InvalidOperation for a malformed operation. Must not change state.
        By default every decodable `operation_type` is accepted."""
        return None

    def locks(self, operation: Operation) -> Sequence[LockRequest]:
        """Resources to lock before prepare; held until the branch is decided. By default
        none: a quantity (stock, money, points) is isolated by escrow in `prepare`, and a
        lock held across both phases would refuse every concurrent branch on it."""
        return ()

    def prepare(self, key: str, operation: Operation) -> PrepareResult:
        """Validate against the state and tentatively apply (reserve, hold, stage)."""

    def commit(self, key: str, operation: Operation) -> None:
        """Make the tentative effects of a Prepared branch permanent. Must not fail."""

    def rollback(self, key: str, operation: Operation) -> None:
        """Undo the tentative effects of a Prepared branch. Must not fail."""

    def snapshot(self) -> StatePieces:
        """The whole state, tentative effects included, for a log checkpoint: bytes, or a list
        of pieces whose concatenation is those bytes (handed to the log as they are, so that a
        large state is not copied on the event loop). `restore` gets the concatenation."""

    def restore(self, state: bytes) -> None:
        """Replace the state with a snapshot taken by `snapshot`. Raise ValueError for bytes
        that are not one of this service's snapshots: the process then refuses to start,
        naming the log record, instead of serving some other state."""

    def add_read_api(self, server: grpc.aio.Server) -> list[str]:
        """Register the service's own read API; return the full service names added. By
        default none."""
        return []


#: What every service must write itself; `Service` has a default for the rest.
REQUIRED_METHODS = ("prepare", "commit", "rollback", "snapshot", "restore")
#: What a class that does not subclass `Service` must write too.
DEFAULTED_METHODS = ("validate", "locks", "add_read_api")


def service_problem(service: object) -> str | None:
    """What keeps `service` from being run as a participant, or None. Checked at start: a
    method left out surfaced only at the first call that needed it (a TypeError at start for
    add_read_api, every branch refused for locks or prepare), far from its cause."""
    kind = type(service)
    missing = [
        method
        for method in REQUIRED_METHODS
        if getattr(kind, method, None) in (None, getattr(Service, method))
    ]
    missing += [method for method in DEFAULTED_METHODS if not hasattr(kind, method)]
    if missing:
        return (
            f"service {kind.__name__} does not implement {', '.join(missing)}: a participant "
            f"writes {', '.join(REQUIRED_METHODS)}, and inherits {', '.join(DEFAULTED_METHODS)} "
            "when its class subclasses participants.service.Service[ItsOperation]"
        )
    operation_type = getattr(service, "operation_type", None)
    if not (isinstance(operation_type, type) and issubclass(operation_type, Message)):
        return (
            f"service {kind.__name__}: operation_type must be the generated protobuf message "
            f"class of the operation it takes (its_pb2.ItsOperation), not {operation_type!r}"
        )
    return None
