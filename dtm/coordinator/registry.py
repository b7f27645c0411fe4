"""The registry of participants: who they are, where they listen, what they can do.

Registrations are logged (and forced) before they are acknowledged, so that after a restart
the coordinator can still reach every participant of a commit it must finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq

from dtm import limits, security
from dtm.batcher import BatchPolicy
from dtm.coordinator.clients import ParticipantClient
from dtm.coordinator.ports import ParticipantPort
from dtmpb.v1 import coordinator_pb2


class RegistrationError(ValueError):
    """A registration that is malformed: INVALID_ARGUMENT."""


# What is wrong with a participant's name, or None (the SDK checks its own with it too).
name_problem = limits.participant_name_problem


def validate_registration(request: coordinator_pb2.RegisterParticipantRequest) -> None:
    problem = name_problem(request.name) or limits.incarnation_problem(request.incarnation)
    if problem:
        raise RegistrationError(problem)
    address = request.address
    if len(address) > limits.ADDRESS_LENGTH_MAX:
        raise RegistrationError(f"address is longer than {limits.ADDRESS_LENGTH_MAX} characters")
    port = limits.address_port(address)
    if port is None or not 0 < port < 65536:
        raise RegistrationError(
            f"address {address[:80]!r} is not host:port (a port of 1..65535, no spaces)"
            + limits.unbracketed_host_hint(address)
        )
    types = request.capabilities.operation_types
    if len(types) > limits.OPERATION_TYPES_MAX:
        raise RegistrationError(
            f"{len(types)} operation types; at most {limits.OPERATION_TYPES_MAX} per participant"
        )
    for name in types:
        if not 0 < len(name) <= limits.OPERATION_TYPE_CHARS_MAX:
            raise RegistrationError(
                f"operation type names must be 1..{limits.OPERATION_TYPE_CHARS_MAX} characters "
                f"(got {len(name)}): a Submit's type URL is at most {limits.TYPE_URL_CHARS_MAX}, "
                "so a longer name could never match one"
            )
        if "/" in name or " " in name or not name.isprintable():
            # Submit compares the name after a type URL's last "/": this could never match.
            raise RegistrationError(
                f"operation type {name[:80]!r} is not a message name: give the fully-qualified "
                "name (e.g. dtm.v1.ReserveStock), not a type URL; no spaces"
            )


# Registered names a refusal naming an unregistered participant lists. The registry holds up
# to PARTICIPANTS_MAX names of up to 64 characters, and a status keeps only the first
# grpc_edge.STATUS_DETAILS_CHARS_MAX characters of its message: all 256 cut off the way out.
NAMES_SHOWN_MAX = 3
# A name a caller sent, as a refusal quotes it: its first 64 characters escaped (repr), then
# cut here, since 64 unprintable characters escape to 640. A registered operation type is
# cut here too (OPERATION_TYPE_CHARS_MAX is 512).
NAME_QUOTED_CHARS_MAX = 80


def _cut(text: str) -> str:
    if len(text) <= NAME_QUOTED_CHARS_MAX:
        return text
    return f"{text[: NAME_QUOTED_CHARS_MAX - 3]}..."


def quoted(name: str) -> str:
    """A name a caller sent, for a refusal: at most 64 characters, escaped, and cut (64
    unprintable characters escape to 640)."""
    return _cut(repr(name[:64]))


def _some(first: list[str], count: int) -> str:
    """`first` (at most NAMES_SHOWN_MAX of `count` names), each cut, and how many more: a
    refusal ends with it (a status keeps its first grpc_edge.STATUS_DETAILS_CHARS_MAX
    characters)."""
    shown = ", ".join(map(_cut, first))
    more = count - len(first)
    return f"{shown} and {more} more: `dtm participants`" if more > 0 else shown


class Registry:
    def __init__(
        self, policy: BatchPolicy | None = None, tls: security.TlsConfig | None = None
    ) -> None:
        self.participants: dict[str, coordinator_pb2.ParticipantInfo] = {}
        self.policy = policy or BatchPolicy()
        self.tls = tls
        self._ports: dict[str, ParticipantPort] = {}
        # Ports for an old address or an unregistered participant: closed once idle (calls in
        # flight may still use them), so that a participant that changes address at every
        # restart does not leave a channel open each time.
        self._retired: list[ParticipantPort] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._hurried = False

    def is_change(self, info: coordinator_pb2.ParticipantInfo) -> bool:
        known = self.participants.get(info.name)
        return (
            known is None
            or known.address != info.address
            or known.capabilities != info.capabilities
            or known.incarnation != info.incarnation
        )

    def replacing(self, name: str, incarnation: str) -> coordinator_pb2.ParticipantInfo | None:
        """The registration under `name` when it is of another incarnation than `incarnation`
        (the asker was replaced: its decisions are owed to that one), or None: the asker is the
        registered incarnation, or cannot be told from it (an empty incarnation on either side,
        as everywhere else; or `name` not registered, so owed nothing)."""
        info = self.participants.get(name)
        if info is None or not incarnation or info.incarnation in ("", incarnation):
            return None
        return info

    def put(self, info: coordinator_pb2.ParticipantInfo) -> None:
        if len(self.participants) >= limits.PARTICIPANTS_MAX and info.name not in self.participants:
            raise RegistrationError(
                f"the registry is full ({limits.PARTICIPANTS_MAX} participants, the most it "
                "holds): remove one no longer used (`dtm participants remove NAME`), then this "
                "one registers (a participant of the SDK tries again until then)"
            )
        old = self.participants.get(info.name)
        self.participants[info.name] = info
        if old is not None and (
            old.address != info.address
            or old.capabilities != info.capabilities
            or old.incarnation != info.incarnation
        ):
            port = self._ports.pop(info.name, None)
            if port is not None:
                self._retire(port)

    def renew(self, name: str, registered_at_ms: int) -> None:
        """`name` registered again with no change (a participant restarted on its log, at its
        address): `dtm participants` shows this registration's time, not the first one's,
        which read as if the process had run since (Engine.renew logs it). Its port, if it
        fell back to unary calls (its Exchange was answered UNIMPLEMENTED), is retired, so
        that the next call batches as the participant declared (it may have been upgraded at
        the same address). A registration with a change makes a new port anyway (`put`)."""
        self.participants[name].registered_at_unix_ms = registered_at_ms
        port = self._ports.get(name)
        if port is not None and port.fell_back:
            del self._ports[name]
            self._retire(port)

    def remove(self, name: str) -> coordinator_pb2.ParticipantInfo | None:
        """Forget a participant (an operator unregistered it). Its port is retired, not
        closed: what it still carries (the rollbacks of transactions already ended) goes out."""
        info = self.participants.pop(name, None)
        port = self._ports.pop(name, None)
        if port is not None:
            self._retire(port)
        return info

    @property
    def retired(self) -> int:
        """Retired ports not yet closed."""
        return len(self._retired)

    def _retire(self, port: ParticipantPort) -> None:
        self._retired.append(port)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving (a replay): closed at shutdown
            return
        task = loop.create_task(self._close_when_drained(port))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_drained(self, port: ParticipantPort) -> None:
        await port.drain()
        await port.close()
        await port.client.close()
        self._retired.remove(port)  # after: a close() cancelling this one closes it again

    def port(self, name: str) -> ParticipantPort:
        port = self._ports.get(name)
        if port is None:
            info = self.participants[name]
            client = ParticipantClient(name, info.address, self.tls, info.incarnation)
            port = ParticipantPort(client, info.capabilities.batch, self.policy)
            if self._hurried:
                port.hurry()
            self._ports[name] = port
        return port

    def ports(self) -> dict[str, ParticipantPort]:
        return dict(self._ports)

    def registered_names(self) -> str:
        """The registered names, for a refusal naming one that is not, after its way out: the
        first NAMES_SHOWN_MAX in order, and how many more (`dtm participants` lists them)."""
        if not self.participants:
            return "none is registered yet"
        first = heapq.nsmallest(NAMES_SHOWN_MAX, self.participants)
        return f"registered: {_some(first, len(self.participants))}"

    def unknown_branch(self, index: int, name: str) -> str:
        """Why a Submit whose branch `index` is at `name`, not registered, is refused
        (NOT_FOUND, nothing run: the id stays free), and what to do: before the names."""
        return (
            f"branch {index}: participant {quoted(name)} is not registered: name a registered "
            "participant, or start that one (it registers itself), then submit again; "
            f"{self.registered_names()}"
        )

    def wrong_type(self, index: int, name: str, type_name: str) -> str:
        """Why a Submit whose branch `index` sends `name` an operation of `type_name`, which it
        does not take, is refused (INVALID_ARGUMENT, nothing run), then what it takes."""
        types = self.participants[name].capabilities.operation_types
        return (
            f"branch {index}: participant {name} does not take {quoted(type_name)}; it takes "
            f"{_some(list(types[:NAMES_SHOWN_MAX]), len(types))}"
        )

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
        for task in list(self._closing):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._closing, return_exceptions=True)
        for port in [*self._ports.values(), *self._retired]:
            await port.close()
            await port.client.close()
        self._ports.clear()
        self._retired.clear()
