"""The ports of a cluster, and free ones to start it on.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Collection
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path

from dtm.cluster.settings import (
    EPHEMERAL_RANGE_PATH,
    PORT_FLOOR,
    PROCESSES,
    _random,
)


@dataclass(frozen=True, eq=False)
class Ports:
    coordinator: int = 50050
    inventory: int = 50051
    orders: int = 50052
    payment: int = 50053
    notification: int = 50054

    # The same five ports are the same however chosen (FreePorts): `up` compares what a
    # cluster runs on with what cluster.json records.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ports) and astuple(self) == astuple(other)

    def __hash__(self) -> int:
        return hash(astuple(self))

    def of(self, name: str) -> int:
        port: int = getattr(self, name)
        return port

    @classmethod
    def free(cls, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> FreePorts:
        """Five ports free right now (none of `avoid`: the gRPC ports, for /metrics ones), for
        tests that must not clash with a running cluster."""
        return FreePorts(*_free_ports_besides(len(PROCESSES), avoid, host))


@dataclass(frozen=True, eq=False)
class FreePorts(Ports):
    """Ports `free_ports` chose, not ones a user asked for. Free when chosen is all they
    are: another program may bind one before its server does (a busy machine's other test
    runs did, failing test_node_example), so a launcher may move that process to another."""

    def moved(self, name: str, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> FreePorts:
        """These ports, with `name` on another free one (none of these five, nor `avoid`)."""
        (port,) = _free_ports_besides(1, {*asdict(self).values(), *avoid}, host)
        return replace(self, **{name: port})


def _free_ports_besides(count: int, avoid: Collection[int], host: str) -> list[int]:
    """`count` free ports, none of `avoid`."""
    avoided = set(avoid)
    # `len(avoided)` more: at most that many of them are among those avoided.
    chosen = free_ports(count + len(avoided), host)
    return [port for port in chosen if port not in avoided][:count]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now, below the kernel's ephemeral range.

    Not the kernel's choice (bind to port 0): that comes from the ephemeral range, and once
    the probe lets it go, the kernel may give it to any outgoing connection as its source
    port (the services dialling the coordinator, each readiness probe's fresh channel) before
    our server binds it; the demo failed so about one run in two. Below the range, only a
    program that binds that very port can take it. All sockets stay bound until every port
    is chosen, so the ports are distinct.
    """
    low, _ = _ephemeral_range()
    below = range(PORT_FLOOR, low)
    # Enough tries that ports in use do not matter, without building the whole range.
    candidates = _random.sample(below, min(len(below), max(64, 8 * count)))
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            if len(ports) == count:
                break
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                probe.bind((host, port))
            except OSError:
                continue  # in use (or not ours to bind): the next one
            ports.append(port)
        # A range that leaves no room below it (an unusual sysctl): the kernel's choice.
        while len(ports) < count:
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((host, 0))
            ports.append(probe.getsockname()[1])
        return ports


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out on its own (Linux's sysctl; its default elsewhere)."""
    try:
        low, high = Path(EPHEMERAL_RANGE_PATH).read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999
