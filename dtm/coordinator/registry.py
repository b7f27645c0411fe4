"""The registry of participants: who they are, where they listen, what they can do.

Registrations are logged (and forced) before they are acknowledged, so that after a restart
the coordinator can still reach every participant of a commit it must finish.
"""

from __future__ import annotations

from dtm import limits, security
from dtm.coordinator.clients import ParticipantClient
from dtm.coordinator.ports import BatchPolicy, ParticipantPort
from dtmpb.v1 import coordinator_pb2


class RegistrationError(ValueError):
    """A registration that is malformed: INVALID_ARGUMENT."""


def validate_registration(request: coordinator_pb2.RegisterParticipantRequest) -> None:
    if not limits.PARTICIPANT_NAME_PATTERN.fullmatch(request.name):
        raise RegistrationError(
            f"participant name {request.name[:80]!r} is malformed: 1..64 characters of [a-z0-9_-]"
        )
    address = request.address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RegistrationError(f"address {address[:80]!r} is not host:port")
    if len(address) > limits.ADDRESS_LENGTH_MAX:
        raise RegistrationError(f"address is longer than {limits.ADDRESS_LENGTH_MAX} characters")
    for name in request.capabilities.operation_types:
        if not 0 < len(name) <= limits.TEXT_FIELD_LENGTH_MAX:
            raise RegistrationError("operation type names must be 1..1024 characters")


class Registry:
    def __init__(
        self, policy: BatchPolicy | None = None, tls: security.TlsConfig | None = None
    ) -> None:
        self.participants: dict[str, coordinator_pb2.ParticipantInfo] = {}
        self.policy = policy or BatchPolicy()
        self.tls = tls
        self._ports: dict[str, ParticipantPort] = {}
        # Ports for an old address, closed at shutdown (calls in flight may still use them).
        self._retired: list[ParticipantPort] = []
        self._hurried = False

    def is_change(self, info: coordinator_pb2.ParticipantInfo) -> bool:
        known = self.participants.get(info.name)
        return (
            known is None
            or known.address != info.address
            or known.capabilities != info.capabilities
        )

    def put(self, info: coordinator_pb2.ParticipantInfo) -> None:
        if len(self.participants) >= limits.PARTICIPANTS_MAX and info.name not in self.participants:
            raise RegistrationError(f"at most {limits.PARTICIPANTS_MAX} participants")
        old = self.participants.get(info.name)
        self.participants[info.name] = info
        if old is not None and (
            old.address != info.address or old.capabilities != info.capabilities
        ):
            port = self._ports.pop(info.name, None)
            if port is not None:
                self._retired.append(port)

    def port(self, name: str) -> ParticipantPort:
        port = self._ports.get(name)
        if port is None:
            info = self.participants[name]
            client = ParticipantClient(name, info.address, self.tls)
            port = ParticipantPort(client, info.capabilities.batch, self.policy)
            if self._hurried:
                port.hurry()
            self._ports[name] = port
        return port

    def ports(self) -> dict[str, ParticipantPort]:
        return dict(self._ports)

    def accepts(self, name: str, type_name: str) -> bool:
        allowed = self.participants[name].capabilities.operation_types
        return not allowed or type_name in allowed

    def one_phase(self, name: str) -> bool:
        return self.participants[name].capabilities.one_phase

    def hurry(self) -> None:
        """No more lingering in any batched call, nor in those of ports made from now on:
        see Batcher.hurry."""
        self._hurried = True
        for port in [*self._ports.values(), *self._retired]:
            port.hurry()

    async def close(self) -> None:
        for port in [*self._ports.values(), *self._retired]:
            await port.close()
            await port.client.close()
        self._ports.clear()
        self._retired.clear()
