"""What the participant's gRPC edge shares: vote and error codes, metadata keys, request
checks, and the refusal of a call meant for another participant.

Part of `participants.server`: see its docstring."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from dtm import grpc_edge, limits
from dtm.core import branch as core
from dtm.core.branch import BranchVote
from dtmpb.v1 import coordinator_pb2, participant_pb2
from participants.branches import (
    IdReused,
)

VOTE_TO_PB = {
    BranchVote.PREPARED: coordinator_pb2.VOTE_PREPARED,
    BranchVote.READ_ONLY: coordinator_pb2.VOTE_READ_ONLY,
    BranchVote.REFUSED: coordinator_pb2.VOTE_REFUSED,
    BranchVote.COMMITTED: coordinator_pb2.VOTE_COMMITTED,
}
ERROR_TO_CODE = {
    core.ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    core.ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    core.ErrorKind.HEURISTIC: grpc.StatusCode.FAILED_PRECONDITION,
}
_INVALID_ARGUMENT_CODE = grpc.StatusCode.INVALID_ARGUMENT.value[0]
# Trailing metadata key that tells the coordinator a branch was forced heuristically.
HEURISTIC_METADATA_KEY = "dtm-heuristic"
# Trailing metadata key of a call refused because it was meant for another participant (another
# name, or another incarnation of this one): the coordinator reads it as "not reached".
MISDIRECTED_METADATA_KEY = "dtm-misdirected"
# Trailing metadata of an inquiry the coordinator refused because another incarnation of this
# participant is registered now (its value): this process was replaced, and stops.
REPLACED_METADATA_KEY = "dtm-replaced"
# RegisterParticipant answers that no retry can change: the process stops (exit status 1).
REGISTRATION_FATAL = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)

if TYPE_CHECKING:  # the process serves these; they only call back into it
    from participants.server.process import ParticipantServer


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class FaultState:
    def __init__(self) -> None:
        self.mode = participant_pb2.FAULT_MODE_NONE
        self.delay_ms = 0


def _check_ids(transaction_id: str, branch: int, fingerprint: bytes) -> str | None:
    """What is wrong with the ids any Prepare, Commit or Rollback carries, or None."""
    if len(fingerprint) > limits.TRANSACTION_FINGERPRINT_BYTES_MAX:
        return (
            f"transaction_fingerprint is {len(fingerprint)} bytes; at most "
            f"{limits.TRANSACTION_FINGERPRINT_BYTES_MAX}"
        )
    return limits.branch_ids_problem(transaction_id, branch)


def _check_prepare(item: participant_pb2.PrepareRequest) -> str | None:
    return _check_ids(item.transaction_id, item.branch, item.transaction_fingerprint)


def _vote_pb(vote: BranchVote, reason: str, one_phase: bool) -> participant_pb2.PrepareResponse:
    if vote is BranchVote.COMMITTED and not one_phase:  # committed by an earlier attempt
        return participant_pb2.PrepareResponse(
            vote=coordinator_pb2.VOTE_COMMITTED, reason=reason, committed_earlier=True
        )
    return participant_pb2.PrepareResponse(vote=VOTE_TO_PB[vote], reason=reason)


def _id_reused(error: IdReused) -> participant_pb2.PrepareResponse:
    return participant_pb2.PrepareResponse(
        vote=coordinator_pb2.VOTE_REFUSED, reason=str(error), id_reused=str(error)
    )


def misdirected(
    name: str, incarnation: str, participant: str, wanted_incarnation: str
) -> str | None:
    """Why a call addressed to (`participant`, `wanted_incarnation`) is not for this participant
    (`name`, `incarnation`), or None. Empty fields are not checked (an older coordinator, or a
    caller that does not know)."""
    if participant and participant != name:
        return (
            f"this is participant {name!r}, not {participant[:80]!r}: the coordinator's registry "
            f"is stale (another participant now listens at the address registered for "
            f"{participant[:80]!r}); nothing was changed"
        )
    if wanted_incarnation and incarnation and wanted_incarnation != incarnation:
        return (
            f"this is participant {name!r} incarnation {incarnation!r}, not incarnation "
            f"{wanted_incarnation[:80]!r}: another process registered under this name, or this "
            "one's log was replaced; nothing was changed"
        )
    return None


def _replacement(error: grpc.aio.AioRpcError) -> str | None:
    """The incarnation registered instead of this one, when `error` is the coordinator's
    refusal of an inquiry from a replaced incarnation, else None."""
    if error.code() is not grpc.StatusCode.FAILED_PRECONDITION:
        return None
    metadata: Any = error.trailing_metadata() or ()
    return next((str(value) for key, value in metadata if key == REPLACED_METADATA_KEY), None)


async def refuse_misdirected(
    server: ParticipantServer,
    context: grpc.aio.ServicerContext[Any, Any],
    addresses: Sequence[tuple[str, str]],
) -> None:
    """Refuse a call whose (participant, incarnation) addresses are malformed
    (INVALID_ARGUMENT) or name another participant or incarnation (FAILED_PRECONDITION, with
    the dtm-misdirected metadata), before it reads or changes anything."""
    # The fields' form first: a malformed name ("Inventory", "inventory ", control
    # characters, megabytes) was answered as misdirected, blaming a stale registry, with
    # the dtm-misdirected metadata the coordinator acts on (found by a bug hunt).
    for who, which in addresses:
        malformed = limits.addressing_problem(who, which)
        if malformed is not None:
            await grpc_edge.abort(context, grpc.StatusCode.INVALID_ARGUMENT, malformed)
    name, mine = server.service.name, server.engine.incarnation
    problem = next(
        (p for who, which in addresses if (p := misdirected(name, mine, who, which))), None
    )
    if problem is not None:
        server.log_.warning("call for another participant refused", reason=problem)
        context.set_trailing_metadata(((MISDIRECTED_METADATA_KEY, name),))
        await grpc_edge.abort(context, grpc.StatusCode.FAILED_PRECONDITION, problem)
