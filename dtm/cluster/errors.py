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
