"""What /proc says about a process: alive, ours (its command line), listening on a port.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dtm.cluster.settings import (
    MODULES,
)


@dataclass
class _Process:
    name: str
    pid: int | None = None
    # Set when this object started the process (then it can be reaped); None when it was
    # found through a pidfile, started by another `python -m dtm.cluster up`.
    popen: subprocess.Popen[bytes] | None = None


_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


def _listening_inodes(port: int) -> set[str] | None:
    """The inodes of the sockets listening on `port` (IPv4 and IPv6), or None when /proc
    cannot tell."""
    return _port_inodes(port, listening_only=True)


def _port_inodes(port: int, *, listening_only: bool) -> set[str] | None:
    """The inodes of the TCP sockets on local port `port` (IPv4 and IPv6): those listening
    only, or every one (a socket bound and not listening holds the port as well), or None
    when /proc cannot tell."""
    inodes: set[str] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:  # bounded by the machine's sockets
            fields = line.split()
            if len(fields) <= 9 or (listening_only and fields[3] != _TCP_LISTEN):
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found else None


def _port_holders(port: int) -> list[int] | None:
    """The pids of the processes holding a TCP socket on local port `port` (this user's:
    another's open files cannot be read), listening ones first; None when /proc cannot
    tell. Scans every process: for an error message, not for a hot path."""
    listening = _port_inodes(port, listening_only=True)
    every = _port_inodes(port, listening_only=False)
    if listening is None or every is None:
        return None
    holders: dict[int, bool] = {}  # pid -> whether it listens there
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        held = _socket_inodes(int(entry)) & every
        if held:
            holders[int(entry)] = bool(held & listening)
    return sorted(holders, key=lambda pid: (not holders[pid], pid))


def _describe(pid: int) -> str:
    """`pid` and its command line, as much of it as /proc shows."""
    args = _cmdline(pid)
    shown = " ".join(arg for arg in args or () if arg)
    return f"pid {pid} ({shown[:200]})" if shown else f"pid {pid}"


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open."""
    inodes: set[str] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in names:  # bounded by the process's open files
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _cmdline(pid: int) -> list[str] | None:
    """The process's arguments, or None when /proc cannot tell (not Linux, or gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists but belongs to someone else
    # A zombie still answers signal 0; it is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_ours(pid: int, name: str, data_dir: Path) -> bool:
    """Whether `pid` is process `name` of the cluster in `data_dir` (resolved).

    Guards against pid reuse (a stale pidfile must never make us signal a stranger) and
    against a copied data dir, whose pidfiles name the original's processes: the module alone
    would match those, so the `--data-dir` they were started with must be this one too. That
    pair identifies a process: its log's lock lets one process per data dir run."""
    if not _alive(pid):
        return False
    args = _cmdline(pid)
    if args is None:
        return True
    return MODULES[name] in args and _has_option(args, "--data-dir", str(data_dir))


def _has_option(args: Sequence[str], flag: str, value: str) -> bool:
    """Whether `flag value` appears, as two arguments, in `args` (as `command` builds it)."""
    return (flag, value) in itertools.pairwise(args)
