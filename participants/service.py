"""What a service author writes: business logic for one participant, with no gRPC and no log.

The SDK (participants.server) supplies the rest: the gRPC server, registration with the
coordinator, idempotency per (transaction, branch), the branch state machine, locks, durable
branch state and recovery. A service only has to be deterministic: given the same state and the
same operation, `prepare` gives the same answer, because recovery replays the log through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from dtm import config
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

    #: The service's own settings, or None (the default: it has none). A dataclass whose every
    #: field has a default and metadata=dtm.config.about(kind, help), e.g.
    #: ``about(integer(1, 1000), "...")``. `run` reads them as dtm reads its own: from the
    #: service's section of the configuration file (declared there in [services] custom),
    #: DTM_<NAME>_<KEY> variables and a flag per setting, and hands them to `configure`.
    settings_type: type[Any] | None = None

    def configure(self, settings: Any) -> None:
        """Take the settings `run` read (a `settings_type`), before recovery and the first
        call. A setting must not change what `prepare`, `commit` or `rollback` do (a replay
        after a restart with another value would differ from the run); `validate`, which
        runs at a branch's first Prepare only, may read it. By default nothing."""
        return None


def transaction_of(key: str) -> str:
    """The transaction id part of a branch key "<transaction id>/<branch>" (the `key` a
    Service's prepare, commit and rollback get): a transaction id has no "/"
    (limits.TRANSACTION_ID_PATTERN), so it is the part before the last one."""
    transaction_id, separator, _ = key.rpartition("/")
    # A key without "/" is not something the SDK produces; keep it whole rather than lose it.
    return transaction_id if separator else key


#: What every service must write itself; `Service` has a default for the rest.
REQUIRED_METHODS = ("prepare", "commit", "rollback", "snapshot", "restore")
#: What a class that does not subclass `Service` must write too.
DEFAULTED_METHODS = ("validate", "locks", "add_read_api")


def service_problem(service: object) -> str | None:
    """What keeps `service` from being run as a participant, or None. Checked at start: a
    method left out surfaced only at the first call that needed it (a TypeError at start for
    add_read_api, every branch refused for locks or prepare), far from its cause."""
    kind = type(service)
    missing = [method for method in REQUIRED_METHODS if not _implements(service, method)]
    missing += [method for method in DEFAULTED_METHODS if not hasattr(service, method)]
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
    return _settings_problem(service)


def _implements(service: object, method: str) -> bool:
    """Whether `service` has `method` of its own, not Service's default. Looked up on the
    instance, as the engine calls it: a method set in __init__ counts too."""
    found = getattr(service, method, None)
    return callable(found) and getattr(found, "__func__", found) is not getattr(Service, method)


def _settings_problem(service: object) -> str | None:
    """What is wrong with the service's own settings (settings_type, configure), or None."""
    settings_type = getattr(service, "settings_type", None)
    if settings_type is None:
        return None
    kind = type(service)
    name = getattr(service, "name", "")
    if name in config.SECTIONS:  # its section holds participant settings: no room for others
        return (
            f"service {kind.__name__}: [{name}] holds participant settings; a settings_type is "
            "for a service of one's own"
        )
    problem = config.settings_type_problem(settings_type)
    if problem:
        return f"service {kind.__name__}: {problem}"
    if not _implements(service, "configure"):
        return (
            f"service {kind.__name__} declares settings_type but no configure(settings), "
            "which takes them"
        )
    return None
