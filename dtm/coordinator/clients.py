"""How the coordinator talks to one participant.

`ParticipantClient` is the plain unary contract (Prepare, Commit, Rollback), which any
participant in any language implements. The engine only sees this interface, so a batching
client can stand in for it without touching the protocol code.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from dtm import security
from dtm.core.transaction import ProtocolError, Vote
from dtmpb.v1 import coordinator_pb2, participant_pb2, participant_pb2_grpc

PB_TO_VOTE = {
    coordinator_pb2.VOTE_PREPARED: Vote.PREPARED,
    coordinator_pb2.VOTE_READ_ONLY: Vote.READ_ONLY,
    coordinator_pb2.VOTE_REFUSED: Vote.REFUSED,
    coordinator_pb2.VOTE_COMMITTED: Vote.COMMITTED,
}


def no_vote(participant: str, value: int) -> str:
    """What a Prepare answered with no vote is: the participant's protocol error (the vote is
    required; proto3 sends VOTE_UNSPECIFIED for a field left unset), not the coordinator's."""
    return (
        f"{participant} answered Prepare with no vote (vote {value}); a Prepare is answered "
        "VOTE_PREPARED, VOTE_READ_ONLY, VOTE_REFUSED or, to a one-phase Prepare, VOTE_COMMITTED"
    )


class ParticipantClient:
    def __init__(
        self,
        name: str,
        address: str,
        tls: security.TlsConfig | None = None,
        incarnation: str = "",
    ) -> None:
        self.name = name
        self.address = address
        # Sent in every request with the name, so that whatever answers at `address` can tell
        # a call that is not for it (participant.proto, PrepareRequest.participant).
        self.incarnation = incarnation
        # With TLS the participant's certificate must carry its registered name.
        self.channel = security.channel(address, tls, server_identity=name)
        self.stub = participant_pb2_grpc.ParticipantStub(self.channel)

    async def prepare(
        self,
        transaction_id: str,
        branch: int,
        operation: any_pb2.Any,
        one_phase: bool,
        timeout_s: float,
        fingerprint: bytes = b"",
    ) -> tuple[Vote, str, str, bool]:
        """The vote, its reason, `id_reused` and `committed_earlier` (see PrepareResponse).
        ProtocolError for an answer with no vote."""
        request = participant_pb2.PrepareRequest(
            transaction_id=transaction_id,
            branch=branch,
            operation=operation,
            one_phase=one_phase,
            transaction_fingerprint=fingerprint,
            participant=self.name,
            incarnation=self.incarnation,
        )
        response = await self.stub.Prepare(request, timeout=timeout_s)
        vote = PB_TO_VOTE.get(response.vote)
        if vote is None:
            raise ProtocolError(no_vote(self.name, response.vote))
        return vote, response.reason, response.id_reused, response.committed_earlier

    async def commit(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        request = participant_pb2.CommitRequest(
            transaction_id=transaction_id,
            branch=branch,
            transaction_fingerprint=fingerprint,
            participant=self.name,
            incarnation=self.incarnation,
        )
        await self.stub.Commit(request, timeout=timeout_s)

    async def rollback(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        request = participant_pb2.RollbackRequest(
            transaction_id=transaction_id,
            branch=branch,
            transaction_fingerprint=fingerprint,
            participant=self.name,
            incarnation=self.incarnation,
        )
        await self.stub.Rollback(request, timeout=timeout_s)

    async def close(self) -> None:
        await self.channel.close(None)
