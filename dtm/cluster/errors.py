"""What goes wrong with a cluster, as exceptions.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations


class ClusterError(RuntimeError):
    """A process did not start, exited, or did not become ready; the message says which and
    ends with the tail of its log."""


class ClusterStateError(ClusterError):
    """DIR/cluster.json exists but cannot be read or does not describe a cluster."""


class ClusterBusyError(ClusterError):
    """Another `up`, `down` or demo holds DIR/cluster.lock."""


class ClusterLockError(ClusterError):
    """DIR/cluster.lock cannot be opened or locked (a directory, a dangling symlink...)."""


class PortTakenError(ClusterError):
    """A process exited at its start because another program holds its port, which it cannot
    leave (its clients keep the address): the machine's doing, not the cluster's. The
    message names the port, the program holding it and what to do."""

    def __init__(self, message: str, name: str, port: int, *, metrics: bool = False) -> None:
        super().__init__(message)
        self.name = name
        self.port = port
        #: The port of its /metrics endpoint, not its gRPC one.
        self.metrics = metrics
