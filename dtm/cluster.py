"""Run the coordinator and the four order-flow services as separate real processes.

`Cluster` is what tests, the demo, chaos runs and benchmarks use: it starts every process in
its own process group (so a SIGKILL is a real crash of that process alone), sends its output to
a log file, and waits until each one answers the standard gRPC health check and the coordinator
lists all four services at their expected addresses.

Layout under the data directory (the servers keep their logs of record beside it):

    DIR/cluster.json        ports and settings, so `down` and `status` find the processes
    DIR/cluster.lock        held (flock) by `up`, `down` and the demo while they run
    DIR/pids/NAME.pid       one pidfile per process
    DIR/logs/NAME.log       each process's stdout and stderr (appended across restarts)
    DIR/initial.json        the initial stock and accounts, when given
    DIR/coordinator/, DIR/inventory/, ...   each server's own durable state

CLI (used by `make up`, `make down`, `make status`):

    python -m dtm.cluster up|down|status --data-dir DIR

`up` on a cluster that runs (wholly or partly) keeps its settings: it starts the processes
that are down as they were started, and it is refused when a flag given asks for another
setting than cluster.json records (--tls-dir on a plaintext cluster, say): `down` first.
When all five run, it checks that they are ready (each service registered at its own
address) and fails saying what is not. `up` on a stopped cluster that cluster.json records
starts it again with those settings, but those the flags give (`--tls-dir off` for
plaintext), and prints the ones it reused. A cluster.json it cannot use (unreadable, a key
it never holds, a value of the wrong type or range, a recorded initial.json gone) fails `up`
and starts nothing, unless the flags give every setting: never the defaults in its place.

`up`, `down` and the demo hold an exclusive lock on DIR/cluster.lock while they run: a second
one on the same data dir fails at once ("another dtm.cluster command is running on DIR")
instead of starting or stopping processes under the first one's feet. `status` only reads,
and takes no lock (it must not make an `up` fail).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtm import config, limits, security

# From `dtm`'s CLI, reused: its --timeout validator (a positive, finite number of seconds:
# nan or inf made a deadline never reached, 0 or -1 one always past) and its handling of a
# standard output closed by its reader (`status | head -1`).
from dtm.cli import EXIT_BROKEN_PIPE, _stdout_to_devnull
from dtm.cli import _seconds as _positive_seconds
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc

COORDINATOR = "coordinator"
SERVICES = ("inventory", "orders", "payment", "notification")
#: Every process, in start order: the coordinator first, so services register at once.
PROCESSES = (COORDINATOR, *SERVICES)

MODULES = {
    COORDINATOR: "dtm.coordinator.server",
    **{name: f"participants.services.{name}" for name in SERVICES},
}

START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
#: The longest --timeout and --grace: far above any start or stop, and a bound on how long a
#: command may wait (1e300 s was accepted: finite, but an `up` that never ends).
WAIT_S_MAX = 3_600.0
# Readiness is observed by polling (a process exposes no event a parent could await); short
# enough to add little to a start, long enough not to spin.
POLL_INTERVAL_S = 0.05
HEALTH_CALL_TIMEOUT_S = 0.5
LOG_TAIL_LINES = 25
#: free_ports picks from [PORT_FLOOR, start of the ephemeral range): above the well-known
#: ports and the usual fixed ones (the default /metrics ports 9100..9104 among them).
PORT_FLOOR = 10000
EPHEMERAL_RANGE_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
# Its own generator: a test that seeds the module-level one must not make two runs pick
# the same ports.
_random = random.SystemRandom()
#: The largest recorded *_timeout_ms, as the coordinator's own settings allow.
MS_MAX = limits.TRANSACTION_TIMEOUT_MS_MAX


class ClusterError(RuntimeError):
    """A process did not start, exited, or did not become ready; the message says which and
    ends with the tail of its log."""


class ClusterStateError(ClusterError):
    """DIR/cluster.json exists but cannot be read or does not describe a cluster."""


class ClusterBusyError(ClusterError):
    """Another `up`, `down` or demo holds DIR/cluster.lock."""


class ClusterLockError(ClusterError):
    """DIR/cluster.lock cannot be opened or locked (a directory, a dangling symlink...)."""


LOCK_NAME = "cluster.lock"


@contextlib.contextmanager
def locked(data_dir: Path | str) -> Iterator[None]:
    """Hold DIR/cluster.lock (an exclusive flock) for the block; ClusterBusyError at once when
    another process holds it. The data dir must exist.

    Two `up`s at once on one data dir left the cluster broken and out of reach of `down`
    (found by a bug hunt): one adopted the coordinator the other had just started, the other
    failed and stopped everything it had started, pidfiles included. The lock goes with its
    open file, so a process killed while holding it (even by SIGKILL) releases it, and the
    servers never inherit it (Python opens files non-inheritable)."""
    path = Path(data_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise _lock_error(path, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterBusyError(
                f"another dtm.cluster command is running on {Path(data_dir).resolve()} "
                "(`up`, `down` or a demo); try again once it is done"
            ) from None
        except OSError as error:
            raise _lock_error(path, error) from None
        yield
    finally:
        os.close(fd)


def _lock_error(path: Path, error: OSError) -> ClusterLockError:
    """One line naming the lock file, what is wrong with it and what to do: the raw OSError
    ("[Errno 21] Is a directory") said neither (found by a bug hunt)."""
    if path.is_symlink() and not path.exists():
        what = f"a dangling symlink to {os.readlink(path)} ({error.strerror or error})"
    elif path.is_dir():
        what = "a directory"
    else:
        what = error.strerror or str(error)
    return ClusterLockError(
        f"cannot use the lock file {path.absolute()}: {what}; it holds nothing but the lock: "
        "remove it (or fix it) and try again. Until then `up`, `down` and the demo cannot act "
        "on this data dir (`down` cannot stop the processes running there)"
    )


@dataclass(frozen=True)
class Ports:
    coordinator: int = 50050
    inventory: int = 50051
    orders: int = 50052
    payment: int = 50053
    notification: int = 50054

    def of(self, name: str) -> int:
        port: int = getattr(self, name)
        return port

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        """Five ports free right now, for tests that must not clash with a running cluster."""
        return cls(*free_ports(len(PROCESSES), host))


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
            listens = len(fields) > 9 and fields[3] == _TCP_LISTEN
            if listens and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found else None


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


class Cluster:
    """The coordinator and the four services as real processes on loopback ports.

    Blocking methods (`start`, `stop`, `restart`, `kill`) suit tests and CLIs; the `*_async`
    variants run them on a worker thread so that an event loop driving load keeps running
    while a process restarts.
    """

    def __init__(
        self,
        data_dir: Path | str,
        ports: Ports | None = None,
        *,
        initial: Mapping[str, Any] | None = None,
        test_control: bool = False,
        prepare_timeout_ms: int | None = None,
        transaction_timeout_ms: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        extra_args: Mapping[str, Sequence[str]] | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = START_TIMEOUT_S,
        tls_dir: Path | str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.ports = ports or Ports()
        self.host = host
        self.initial = dict(initial) if initial is not None else None
        self.test_control = test_control
        self.prepare_timeout_ms = prepare_timeout_ms
        self.transaction_timeout_ms = transaction_timeout_ms
        self.extra_env = dict(extra_env or {})
        self.extra_args = {name: list(args) for name, args in (extra_args or {}).items()}
        self.start_timeout_s = start_timeout_s
        # Certificates from `python -m dtm.tools.certs`: every process then speaks mutual TLS
        # as its own identity, and the probes below call as "operator".
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        #: What a client of this cluster (its probes, or a test) dials with.
        self.client_tls = (
            security.TlsConfig.for_identity(self.tls_dir, "operator") if self.tls_dir else None
        )
        unknown = set(self.extra_args) - set(PROCESSES)
        if unknown:
            raise ValueError(f"extra_args for unknown processes: {', '.join(sorted(unknown))}")
        self._processes = {name: _Process(name) for name in PROCESSES}

    # ---- addresses and paths ----

    def address(self, name: str) -> str:
        return f"{self.host}:{self.ports.of(self._known(name))}"

    @property
    def coordinator_address(self) -> str:
        return self.address(COORDINATOR)

    @property
    def addresses(self) -> dict[str, str]:
        """Every process's address, coordinator first."""
        return {name: self.address(name) for name in PROCESSES}

    @property
    def service_addresses(self) -> dict[str, str]:
        """The four services' addresses (what `dtm.invariants.read_snapshot` takes)."""
        return {name: self.address(name) for name in SERVICES}

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.data_dir / "pids"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{self._known(name)}.log"

    def pid_path(self, name: str) -> Path:
        return self.pids_dir / f"{self._known(name)}.pid"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "cluster.json"

    @property
    def initial_path(self) -> Path:
        return self.data_dir / "initial.json"

    def _known(self, name: str) -> str:
        if name not in self._processes:
            raise KeyError(f"unknown process {name!r}; known: {', '.join(PROCESSES)}")
        return name

    # ---- processes ----

    def pid(self, name: str) -> int | None:
        """The pid of a running process, or None."""
        process = self._processes[self._known(name)]
        if process.pid is None or not self._running(process):
            return None
        return process.pid

    def running(self, name: str) -> bool:
        return self.pid(name) is not None

    def _running(self, process: _Process) -> bool:
        if process.pid is None:
            return False
        if process.popen is not None:
            return process.popen.poll() is None
        return _is_ours(process.pid, process.name, self.data_dir)

    def command(self, name: str, extra_args: Sequence[str] = ()) -> list[str]:
        """The command line that starts `name` (plus `extra_args` for this start only)."""
        args = [sys.executable, "-m", MODULES[self._known(name)], "--listen", self.address(name)]
        args += ["--data-dir", str(self.data_dir)]
        if name == COORDINATOR:
            if self.prepare_timeout_ms is not None:
                args += ["--prepare-timeout-ms", str(self.prepare_timeout_ms)]
            if self.transaction_timeout_ms is not None:
                args += ["--transaction-timeout-ms", str(self.transaction_timeout_ms)]
        else:
            args += ["--coordinator", self.coordinator_address]
            if self.test_control:
                args.append("--test-control")
            if self.initial is not None:
                args += ["--initial", str(self.initial_path)]
        if self.tls_dir is not None:
            args += security.arguments(security.TlsConfig.for_identity(self.tls_dir, name))
        return args + self.extra_args.get(name, []) + list(extra_args)

    def _spawn(
        self,
        name: str,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        process = self._processes[name]
        # Never start a second one over a live one: its pidfile would be overwritten and the
        # first left out of reach of `down` (a demo started on the data dir of a running
        # cluster did that).
        other = self._pidfile_pid(name)
        if other is not None and other != process.pid and _is_ours(other, name, self.data_dir):
            raise ClusterError(
                f"{name} already runs in {self.data_dir} as pid {other} (its pidfile "
                f"{self.pid_path(name)}); stop it with `python -m dtm.cluster down "
                f"--data-dir {self.data_dir}` first"
            )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env, **(env or {})}
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
            log.flush()
            # A new session: own process group, detached from the terminal, so Ctrl-C in the
            # terminal does not reach it and a group kill reaches it alone.
            popen = subprocess.Popen(
                self.command(name, extra_args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        process.pid = popen.pid
        process.popen = popen
        self.pid_path(name).write_text(f"{popen.pid}\n")

    def _write_state(self) -> None:
        state = {
            "host": self.host,
            "ports": asdict(self.ports),
            "test_control": self.test_control,
            "prepare_timeout_ms": self.prepare_timeout_ms,
            "transaction_timeout_ms": self.transaction_timeout_ms,
            "initial": self.initial is not None,
            "tls_dir": str(self.tls_dir) if self.tls_dir is not None else None,
            # A later `up` that restarts a dead process must start it as it was started
            # (e.g. with its --metrics-listen), so they are part of the state.
            "extra_args": self.extra_args,
        }
        _write_atomically(self.state_path, json.dumps(state, indent=2) + "\n")

    def start(self, names: Sequence[str] | None = None) -> None:
        """Start every process not already running (or only `names`), then wait until all of
        them are healthy and the coordinator lists the four services. On failure the processes
        this call started are stopped and ClusterError says what went wrong."""
        wanted = [name for name in PROCESSES if names is None or name in names]
        for name in names or ():
            self._known(name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.initial is not None:
            document = _initial_document(self.initial)
            _write_atomically(self.initial_path, json.dumps(document, indent=2) + "\n")
        self._write_state()
        started: list[str] = []
        deadline = time.monotonic() + self.start_timeout_s
        try:
            if COORDINATOR in wanted and not self.running(COORDINATOR):
                self._spawn(COORDINATOR)
                started.append(COORDINATOR)
                # Services register as soon as they start; with the coordinator already
                # serving they do so on the first try instead of retrying with backoff.
                self._wait(deadline, [COORDINATOR], registration=False)
            for name in wanted:
                if not self.running(name):
                    self._spawn(name)
                    started.append(name)
            self._wait(deadline, PROCESSES, registration=True)
        except BaseException:
            self._stop_processes(started, STOP_GRACE_S)
            raise

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every process, SIGKILL those still running after `grace_s`. The coordinator
        goes first, and alone: its graceful stop finishes phase 2, which needs the services
        still up."""
        self._stop_processes([COORDINATOR], grace_s)
        self._stop_processes(list(SERVICES), grace_s)

    def _stop_processes(self, names: Sequence[str], grace_s: float) -> None:
        targets = [self._processes[name] for name in names]
        for process in targets:
            self._signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in targets:
            if not self._wait_exit(process, deadline):
                self._signal(process, signal.SIGKILL)
                self._wait_exit(process, time.monotonic() + grace_s)
        for process in targets:
            self._forget(process)

    def kill(self, name: str) -> int | None:
        """SIGKILL `name` (a real crash: no shutdown code runs) and wait until it is gone.
        Returns the pid killed, or None if it was not running."""
        process = self._processes[self._known(name)]
        pid = self.pid(name)
        if pid is None:
            return None
        self._signal(process, signal.SIGKILL)
        if not self._wait_exit(process, time.monotonic() + STOP_GRACE_S):
            raise ClusterError(f"{name} (pid {pid}) survived SIGKILL for {STOP_GRACE_S} s")
        self._forget(process)
        return pid

    def pause(self, name: str) -> int | None:
        """SIGSTOP `name`: it holds every call, answering none, until `resume` (a process that
        hangs). Returns its pid, or None if it was not running."""
        process = self._processes[self._known(name)]
        pid = self.pid(name)
        if pid is not None:
            self._signal(process, signal.SIGSTOP)
        return pid

    def resume(self, name: str) -> None:
        """SIGCONT `name` after `pause`."""
        self._signal(self._processes[self._known(name)], signal.SIGCONT)

    def terminate(self, name: str, grace_s: float = STOP_GRACE_S) -> None:
        """Graceful stop of one process (SIGTERM, then SIGKILL after `grace_s`)."""
        self._stop_processes([self._known(name)], grace_s)

    def restart(
        self,
        name: str,
        *,
        kill: bool = False,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
    ) -> None:
        """Stop `name` if it runs (SIGKILL when `kill`, else gracefully), start it again on the
        same port and data, and wait until the whole cluster is ready again.

        `env` and `extra_args` apply to this start only (e.g. env={"DTM_CRASH_AT": ...} to arm
        a crash point); the next restart without them starts the process plainly again.
        `wait=False` returns as soon as the process is spawned, for a start that is expected
        to die (a crash point hit during recovery): see `wait_exit`.
        """
        if kill:
            self.kill(name)
        else:
            self.terminate(name)
        self._spawn(self._known(name), env, extra_args)
        if wait:
            self.wait_ready(timeout_s=self.start_timeout_s)

    def exit_code(self, name: str) -> int | None:
        """The exit status of a process this object started and that has exited on its own
        (negative: killed by that signal), or None while it runs or when it is not ours."""
        popen = self._processes[self._known(name)].popen
        return None if popen is None else popen.poll()

    def wait_exit(self, name: str, timeout_s: float) -> int | None:
        """Block until `name` (started by this object) exits; its exit status, or None if it
        is still running after `timeout_s` (or was not started by this object)."""
        popen = self._processes[self._known(name)].popen
        if popen is None:
            return None
        try:
            return popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def _signal(self, process: _Process, signum: signal.Signals) -> None:
        if process.pid is None or not self._running(process):
            return
        # The process leads its own group (start_new_session); signalling the group also
        # reaches anything it spawned.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    def _wait_exit(self, process: _Process, deadline: float) -> bool:
        if process.pid is None:
            return True
        if process.popen is not None:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
            return True
        # Not our child: it cannot be waited on, only watched.
        while _is_ours(process.pid, process.name, self.data_dir):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def _forget(self, process: _Process) -> None:
        """Drop `process` and its pidfile, unless the pidfile names another live process of
        ours (then it is not this object's to delete: another `up` wrote it)."""
        pid, process.pid, process.popen = process.pid, None, None
        written = self._pidfile_pid(process.name)
        if (
            written is not None
            and written != pid
            and _is_ours(written, process.name, self.data_dir)
        ):
            return
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self.pid_path(process.name).unlink()

    def _pidfile_pid(self, name: str) -> int | None:
        """The pid DIR/pids/NAME.pid names, or None (no file, unreadable, not a number)."""
        try:
            return int(self.pid_path(name).read_text().strip())
        except (OSError, ValueError):
            return None

    # ---- readiness ----

    def health(self, name: str, timeout_s: float = HEALTH_CALL_TIMEOUT_S) -> str:
        """The grpc.health.v1 status of `name` ("SERVING", ...), or "UNREACHABLE (...)"."""
        # A fresh channel per probe: a reused one would sit in reconnect backoff after the
        # first refused connection and hide a server that has just come up.
        with security.sync_channel(self.address(name), self.client_tls, name) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
                )
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                return f"UNREACHABLE ({code.name if code else error})"
        status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return status

    def registered(self, timeout_s: float = HEALTH_CALL_TIMEOUT_S) -> dict[str, str]:
        """Participant name -> address, as the coordinator lists them."""
        with security.sync_channel(
            self.coordinator_address, self.client_tls, COORDINATOR
        ) as channel:
            response = coordinator_pb2_grpc.CoordinatorStub(channel).ListParticipants(
                coordinator_pb2.ListParticipantsRequest(), timeout=timeout_s
            )
        return {info.name: info.address for info in response.participants}

    def _not_ready(self, names: Sequence[str], registration: bool) -> tuple[str, str] | None:
        """(process, what is wrong) for the first process not ready, or None when all are."""
        # Exits first, for every process: a crash is final and its log says why, whereas
        # an unhealthy process earlier in the list may only be slow.
        for name in names:
            process = self._processes[name]
            if process.popen is not None and process.popen.poll() is not None:
                raise ClusterError(
                    f"{name} (pid {process.pid}) exited with code {process.popen.returncode} "
                    f"while starting; {self.log_path(name)} ends with:\n{self.log_tail(name)}"
                )
            if process.popen is None and process.pid is not None and not self._running(process):
                raise ClusterError(
                    f"{name} (pid {process.pid}) is gone; {self.log_path(name)} ends with:\n"
                    f"{self.log_tail(name)}"
                )
        for name in names:
            if self._processes[name].pid is None:
                return name, "not started"
            if not self._served(name):
                return name, "its log does not say it serves yet"
            status = self.health(name)
            if status != "SERVING":
                return name, f"health check answers {status}"
        if not registration:
            return None
        try:
            registered = self.registered()
        except grpc.RpcError as error:
            return COORDINATOR, f"ListParticipants failed: {error}"
        for name in SERVICES:
            if registered.get(name) != self.address(name):
                seen = registered.get(name)
                where = f"registered at {seen}" if seen else "not registered"
                return name, f"{where} with the coordinator, expected {self.address(name)}"
        return None

    def _served(self, name: str) -> bool:
        """Whether a process this object started listens on its own port yet. Its port
        answering health checks is not enough: another server on that port answers them too,
        while ours has not even tried to bind (found by a bug hunt: `up` on the ports of a
        running cluster reported it ready, and its services registered with that cluster's
        coordinator). A process found through its pidfile, or where /proc cannot tell, is
        left to the health check."""
        process = self._processes[name]
        if process.popen is None or process.pid is None:
            return True
        listening = _listening_inodes(self.ports.of(name))
        if listening is None:
            return True
        return bool(listening & _socket_inodes(process.pid))

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until every process is SERVING and registered; ClusterError otherwise."""
        self._wait(time.monotonic() + timeout_s, PROCESSES, registration=True)

    def _wait(self, deadline: float, names: Sequence[str], *, registration: bool) -> None:
        while True:
            problem = self._not_ready(names, registration)
            if problem is None:
                return
            if time.monotonic() >= deadline:
                name, what = problem
                raise ClusterError(
                    f"{name} not ready in time ({what}); "
                    f"{self.log_path(name)} ends with:\n{self.log_tail(name)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])

    # ---- async variants: the blocking work runs on a worker thread ----

    async def start_async(self) -> None:
        await asyncio.to_thread(self.start)

    async def stop_async(self, grace_s: float = STOP_GRACE_S) -> None:
        await asyncio.to_thread(self.stop, grace_s)

    async def restart_async(
        self,
        name: str,
        *,
        kill: bool = False,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        wait: bool = True,
    ) -> None:
        await asyncio.to_thread(
            lambda: self.restart(name, kill=kill, env=env, extra_args=extra_args, wait=wait)
        )

    async def kill_async(self, name: str) -> int | None:
        return await asyncio.to_thread(self.kill, name)

    # ---- context managers ----

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Cluster:
        await self.start_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop_async()

    # ---- attaching to processes started elsewhere ----

    @classmethod
    def attach(cls, data_dir: Path | str) -> Cluster:
        """A Cluster for processes started by another `up`, found through DIR/cluster.json and
        DIR/pids/. Pidfiles of processes that are gone (or whose pid now belongs to another
        program) are ignored. ClusterStateError when cluster.json is unreadable, or records
        a value of the wrong type or range, or a key it never holds (naming the key)."""
        directory = Path(data_dir)
        path = directory / "cluster.json"
        state = _read_state(path)
        # No cluster.json: a cluster of the defaults, which nothing has started.
        settings = {} if state is None else _recorded_settings(state, path)
        state = state or {}
        try:
            cluster = cls(directory, **settings)
        except (TypeError, ValueError, AttributeError) as error:
            raise ClusterStateError(f"{path} does not describe a cluster: {error}") from None
        if state.get("initial"):
            # Keep passing the same file on restarts (the services ignore it once they have
            # a log, but the command line stays the same).
            try:
                cluster.initial = _read_initial(cluster.initial_path)
            except ClusterError as error:
                raise ClusterStateError(
                    f'{path} records an initial document ("initial": true), but {error}'
                ) from None
        cluster.adopt_pidfiles()
        return cluster

    def adopt_pidfiles(self) -> None:
        """Take the processes DIR/pids/ names that are still ours as this cluster's (what
        `down` falls back to when cluster.json is unreadable)."""
        for name, process in self._processes.items():
            pid = self._pidfile_pid(name)
            if pid is not None and _is_ours(pid, name, self.data_dir):
                process.pid = pid


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` whole: a reader, or the next `down` after a crash mid-write, finds the
    old file or the new one, never one cut short."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    # The rename is durable once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_state(path: Path) -> dict[str, Any] | None:
    """cluster.json as saved by `up`; None when there is none."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        raise ClusterStateError(f"cannot read {path}: {error}") from None
    try:
        state = json.loads(text)
    except ValueError as error:
        raise ClusterStateError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(state, dict):
        raise ClusterStateError(f"{path} does not describe a cluster: not a JSON object")
    return state


#: The keys `_write_state` writes. Any other is refused rather than ignored: a hand-edited
#: "tls-dir" read as no TLS dir at all would restart a TLS cluster in plaintext.
STATE_KEYS = (
    "host",
    "ports",
    "test_control",
    "prepare_timeout_ms",
    "transaction_timeout_ms",
    "initial",
    "tls_dir",
    "extra_args",
)


def _recorded_settings(state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Cluster's keyword arguments from cluster.json, each value checked: `bool("false")`
    turned fault injection on, `list("--x")` made three arguments of one, and port 0 or
    99999 reached the servers (found by a bug hunt). ClusterStateError names the key.
    "ports" is required, with all five; a key older files lack takes its default."""

    def wrong(
        key: str, expected: str, value: object = None, *, show: bool = True
    ) -> ClusterStateError:
        shown = f", not {_bounded_json(value)}" if show else ""
        return ClusterStateError(
            f"{path} does not describe a cluster: {key} must be {expected}{shown}"
        )

    unknown = [key for key in state if key not in STATE_KEYS]
    if unknown:
        names = ", ".join(_bounded_json(key) for key in unknown[:5])
        raise ClusterStateError(
            f"{path} does not describe a cluster: unknown key {names} "
            f"(it holds {', '.join(STATE_KEYS)})"
        )
    if "ports" not in state:
        raise wrong('"ports"', "recorded", show=False)
    ports = state["ports"]
    if not isinstance(ports, dict):
        raise wrong('"ports"', f"an object with {', '.join(PROCESSES)}", ports)
    for name in ports:
        if name not in PROCESSES:
            raise wrong(
                f'"ports" key {_bounded_json(name)}', f"one of {', '.join(PROCESSES)}", show=False
            )
    values = []
    for name in PROCESSES:
        if name not in ports:
            raise wrong(f'"ports"."{name}"', "recorded (all five are)", show=False)
        port = ports[name]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise wrong(f'"ports"."{name}"', "a number 1..65535", port)
        values.append(port)
    settings: dict[str, Any] = {"ports": Ports(*values)}

    host = state.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise wrong('"host"', "a non-empty string", host)
    settings["host"] = host
    for key in ("test_control", "initial"):
        if not isinstance(state.get(key, False), bool):
            raise wrong(f'"{key}"', "true or false", state[key])
    settings["test_control"] = state.get("test_control", False)
    for key in ("prepare_timeout_ms", "transaction_timeout_ms"):
        value = state.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MS_MAX
        ):
            raise wrong(f'"{key}"', f"null or a number 1..{MS_MAX}", value)
        settings[key] = value
    tls_dir = state.get("tls_dir")
    if tls_dir is not None and (not isinstance(tls_dir, str) or not tls_dir):
        raise wrong('"tls_dir"', "null (plaintext) or a directory (a string)", tls_dir)
    settings["tls_dir"] = tls_dir
    extra_args = state.get("extra_args")
    if extra_args is None:
        extra_args = {}
    elif not isinstance(extra_args, dict):
        raise wrong('"extra_args"', "an object of process names", extra_args)
    for name, args in extra_args.items():
        if name not in PROCESSES:
            raise wrong(
                f'"extra_args" key {_bounded_json(name)}',
                f"one of {', '.join(PROCESSES)}",
                show=False,
            )
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise wrong(f'"extra_args"."{name}"', "a list of strings", args)
    settings["extra_args"] = extra_args
    return settings


def _bounded_json(value: object, limit: int = 80) -> str:
    """`value` as JSON on one line, cut to `limit` characters (a message, not a dump)."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_initial(path: Path) -> dict[str, Any]:
    """An initial stock/accounts document (--initial, or the copy in the data dir)."""
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise ClusterError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise ClusterError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise ClusterError(f'{path} must be a JSON object: {{"stock": ..., "accounts": ...}}')
    return document


# ---- CLI ----


def _port_list(text: str) -> list[int]:
    """Five comma-separated ports, in PROCESSES order; argparse reports what is wrong."""
    parts = text.split(",")
    if len(parts) != len(PROCESSES):
        raise argparse.ArgumentTypeError(
            f"give {len(PROCESSES)} ports ({', '.join(PROCESSES)}), got {len(parts)}"
        )
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: ports are numbers 1..65535") from None
    if not all(0 < value < 65536 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are numbers 1..65535")
    # One port for two processes: all but the first to bind failed to start.
    twice = next((port for index, port in enumerate(values) if port in values[:index]), None)
    if twice is not None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {twice} is given twice; each process needs a port of its own"
        )
    return values


def _port_in_both(options: argparse.Namespace) -> int | None:
    """A port both --ports and --metrics-ports give (a process's /metrics endpoint could not
    bind it), or None."""
    grpc_ports = asdict(options.ports).values() if options.ports is not None else ()
    return next((port for port in options.metrics_ports or () if port in grpc_ports), None)


def _prepare_timeout_ms(text: str) -> int:
    """--prepare-timeout-ms (argparse type): what the coordinator's own flag takes. Any
    integer was recorded in cluster.json, and the coordinator refused it at its start: that
    `up` failed, and every later one refused the data dir for what it recorded."""
    try:
        value = config.integer(1, MS_MAX).parse(text, True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {error} (milliseconds each Prepare may take)"
        ) from None
    assert isinstance(value, int)  # what integer() parses to
    return value


def _wait_seconds(text: str) -> float:
    """--timeout and --grace (argparse type): positive, finite, at most WAIT_S_MAX."""
    value = _positive_seconds(text)
    if value > WAIT_S_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {WAIT_S_MAX:g} s")
    return value


def _parse_ports(text: str) -> Ports:
    return Ports(*_port_list(text))


DEFAULT_METRICS_PORTS = "9100,9101,9102,9103,9104"


#: `--tls-dir off`: plaintext, even where cluster.json records a TLS dir (`./off` names a
#: directory called off).
TLS_OFF = "off"


def _parse_tls_dir(text: str) -> Path | str:
    return TLS_OFF if text == TLS_OFF else Path(text)


def _parse_metrics_ports(text: str) -> list[int]:
    """[] for 'off' (no /metrics endpoints), else the five ports."""
    return [] if text == "off" else _port_list(text)


def _print_addresses(cluster: Cluster) -> None:
    for name in PROCESSES:
        pid = cluster.pid(name)
        print(f"  {name:<13} {cluster.address(name):<17} pid {pid}")
    print(f"  logs: {cluster.logs_dir}")


def _from_pidfiles(data_dir: Path) -> Cluster:
    """The processes DIR/pids/ names, for when cluster.json cannot say more (their ports and
    settings are then unknown)."""
    cluster = Cluster(data_dir)
    cluster.adopt_pidfiles()
    return cluster


def _running(cluster: Cluster) -> list[str]:
    return [name for name in PROCESSES if cluster.running(name)]


def _up(options: argparse.Namespace) -> int:
    try:
        # Up front, so that a data dir that cannot be one (a file, a path through a file)
        # is named as such rather than failing later on one of the files inside it.
        options.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"up failed: cannot use {options.data_dir} as the data dir: {error}", file=sys.stderr)
        return 1
    try:
        with locked(options.data_dir):
            cluster = _cluster_to_start(options)
            if cluster is None:
                return 0
            cluster.start()
    except BrokenPipeError:
        raise  # our standard output, not the cluster: main handles it
    except (ClusterError, OSError) as error:
        print(f"up failed: {error}", file=sys.stderr)
        return 1
    print(f"up (data dir {cluster.data_dir}):")
    _print_addresses(cluster)
    return 0


def _cluster_to_start(options: argparse.Namespace) -> Cluster | None:
    """The processes already running, with the settings they were started with, else a new
    cluster from the options; None when everything already runs. ClusterError when some run
    and the options ask for other settings than theirs (a flag not given asks for nothing)."""
    state_path = options.data_dir / "cluster.json"
    recorded = state_path.exists()
    try:
        existing = Cluster.attach(options.data_dir)
    except ClusterStateError as error:
        if _running(_from_pidfiles(options.data_dir)):
            raise ClusterError(f"{error}; stop its processes with `down` first") from None
        # Nothing runs. The flags' defaults must not stand in for what the file records: a
        # TLS cluster whose initial.json went missing, or with a typo in cluster.json,
        # came back in PLAINTEXT on the default ports, and cluster.json was rewritten so
        # (found by a bug hunt). Only flags that give every setting replace it.
        missing = [flag for flag, given in _replacing_flags(options) if not given]
        if missing:
            raise ClusterError(
                f"{error}\nnothing was started: fix {state_path}; or replace what it records "
                f"by giving every setting by flag (missing: {', '.join(missing)}); or "
                "remove it to start from the flags and their defaults"
            ) from None
        print(f"up: {error}; replacing it with the settings the flags give", file=sys.stderr)
        existing, recorded = Cluster(options.data_dir), False
    requested = _requested_settings(options)
    running = _running(existing)
    if running:
        differences = [
            f"{name} {_setting_text(_settings_of(existing)[name])} -> {_setting_text(value)}"
            for name, value in requested.items()
            if value != _settings_of(existing)[name]
        ]
        if differences:
            raise ClusterError(
                f"running with different settings ({'; '.join(differences)}): run `down` "
                "first, then `up` with the new ones"
            )
    if len(running) == len(PROCESSES):
        # Running is not enough: a service another process took the name of, or one an
        # operator removed, gets no orders (`up` said "already running" while every order
        # failed NOT_FOUND: a bug hunt's find). A service registers when it starts, so `up`
        # waits as it does for one it starts, and fails saying what is wrong.
        problem = existing._not_ready(PROCESSES, registration=True)
        if problem is not None:
            name, what = problem
            print(
                f"all five run, but {name} is not ready ({what}); "
                f"waiting up to {options.timeout:g} s",
                file=sys.stderr,
            )
            try:
                existing.wait_ready(timeout_s=options.timeout)
            except ClusterError as error:
                raise ClusterError(
                    f"{error}\n(a service registers with the coordinator when it starts: "
                    "`down` then `up` starts them all again)"
                ) from None
        print(f"already running (data dir {existing.data_dir}):")
        _print_addresses(existing)
        return None
    if running:
        print(f"partly running ({', '.join(running)}); starting the others")
        existing.start_timeout_s = options.timeout
        return existing
    if recorded:
        return _restart_recorded(existing, requested, options.timeout)
    metrics = options.metrics_ports
    if metrics is None:
        metrics = _parse_metrics_ports(DEFAULT_METRICS_PORTS)
    tls_dir = requested.get("tls_dir")
    _check_tls_dir(tls_dir, "--tls-dir")
    return Cluster(
        options.data_dir,
        options.ports or Ports(),
        initial=requested.get("initial"),
        test_control=bool(options.test_control),
        prepare_timeout_ms=options.prepare_timeout_ms,
        start_timeout_s=options.timeout,
        tls_dir=tls_dir,
        extra_args=_metrics_args(metrics),
    )


def _replacing_flags(options: argparse.Namespace) -> list[tuple[str, bool]]:
    """The flags that, all given, replace an unreadable cluster.json (each a setting whose
    default would otherwise stand in for what it records), and whether each was given."""
    return [
        ("--ports", options.ports is not None),
        ("--tls-dir DIR|off", options.tls_dir is not None),
        ("--[no-]test-control", options.test_control is not None),
        ("--metrics-ports PORTS|off", options.metrics_ports is not None),
    ]


def _restart_recorded(stopped: Cluster, requested: dict[str, Any], timeout: float) -> Cluster:
    """The cluster cluster.json records, none of it running, to start again: its settings,
    but those the flags give. `down` then `up` without --tls-dir brought a TLS cluster back
    in plaintext, on the default ports (found by a bug hunt): a flag left out asked for the
    defaults, not for what the cluster was."""
    recorded = _settings_of(stopped)
    reused = {name: value for name, value in recorded.items() if name not in requested}
    settings = {**recorded, **requested}
    if reused:
        described = "; ".join(f"{name} {_setting_text(value)}" for name, value in reused.items())
        print(f"settings from {stopped.state_path} (flags override them):\n  {described}")
    if recorded["tls_dir"] is not None and settings["tls_dir"] is None:
        print(
            f"WARNING: --tls-dir off: this cluster ran with mutual TLS ({recorded['tls_dir']}); "
            "it now starts in PLAINTEXT, with no authorization: anyone who can reach its "
            "ports can submit and administer",
            file=sys.stderr,
        )
    source = "--tls-dir" if "tls_dir" in requested else f"tls_dir of {stopped.state_path}"
    _check_tls_dir(settings["tls_dir"], source)
    extra_args = stopped.extra_args
    if "metrics" in requested:
        others = {
            name: args for name, args in extra_args.items() if args[:1] != ["--metrics-listen"]
        }
        extra_args = {**others, **requested["metrics"]}
    return Cluster(
        stopped.data_dir,
        settings["ports"],
        initial=settings["initial"],
        test_control=bool(settings["test_control"]),
        prepare_timeout_ms=settings["prepare_timeout_ms"],
        transaction_timeout_ms=stopped.transaction_timeout_ms,
        host=stopped.host,
        start_timeout_s=timeout,
        tls_dir=settings["tls_dir"],
        extra_args=extra_args,
    )


def _check_tls_dir(tls_dir: Path | None, source: str) -> None:
    """ClusterError unless `tls_dir` (when TLS is on) holds the CA and the operator's files,
    what every start needs first: a moved directory failed with a traceback or a server's
    error instead."""
    missing = _missing_tls_file(tls_dir)
    if missing is not None:
        raise ClusterError(
            f"{missing} is missing ({source} is {tls_dir}): give --tls-dir with the "
            "certificates of `python -m dtm.tools.certs`, or --tls-dir off for plaintext"
        )


def _missing_tls_file(tls_dir: Path | None) -> Path | None:
    """The first of the files the probes (as "operator") need that `tls_dir` lacks."""
    if tls_dir is None:
        return None
    config = security.TlsConfig.for_identity(tls_dir, "operator")
    return next(
        (path for path in (config.ca_cert, config.cert, config.key) if not path.is_file()), None
    )


def _metrics_args(ports: Sequence[int]) -> dict[str, list[str]]:
    return {
        name: ["--metrics-listen", f"127.0.0.1:{port}"]
        for name, port in zip(PROCESSES, ports, strict=False)
    }


def _requested_settings(options: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags of `up` ask for, only those given (a flag left out keeps what
    a running cluster has), as `_settings_of` shows them."""
    requested: dict[str, Any] = {}
    if options.ports is not None:
        requested["ports"] = options.ports
    if options.initial is not None:
        requested["initial"] = _initial_document(_read_initial(options.initial))
    if options.test_control is not None:
        requested["test_control"] = options.test_control
    if options.prepare_timeout_ms is not None:
        requested["prepare_timeout_ms"] = options.prepare_timeout_ms
    if options.tls_dir == TLS_OFF:
        requested["tls_dir"] = None
    elif options.tls_dir is not None:
        requested["tls_dir"] = Path(options.tls_dir).resolve()
    if options.metrics_ports is not None:
        requested["metrics"] = _metrics_args(options.metrics_ports)
    return requested


def _settings_of(cluster: Cluster) -> dict[str, Any]:
    """What cluster.json records of a cluster, by the names `_requested_settings` uses."""
    return {
        "ports": cluster.ports,
        "initial": None if cluster.initial is None else _initial_document(cluster.initial),
        "test_control": cluster.test_control,
        "prepare_timeout_ms": cluster.prepare_timeout_ms,
        "tls_dir": cluster.tls_dir,
        "metrics": {
            name: args
            for name, args in cluster.extra_args.items()
            if args[:1] == ["--metrics-listen"]
        },
    }


def _initial_document(initial: dict[str, Any]) -> dict[str, Any]:
    """An initial state as the services read it: both keys, even if a caller gave one (and
    so as `up` compares it with a running cluster's: the same file twice is no change)."""
    return {"stock": {}, "accounts": {}, **initial}


def _setting_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, Ports):
        return ",".join(str(port) for port in asdict(value).values())
    if isinstance(value, dict) and ("stock" in value or "accounts" in value):
        counts = [
            str(len(part)) if isinstance(part, (dict, list)) else "?"
            for part in (value.get("stock"), value.get("accounts"))
        ]
        return f"(a document: {counts[0]} SKUs, {counts[1]} accounts)"
    if isinstance(value, dict) and all(isinstance(args, list) for args in value.values()):
        ports = [str(args[-1]).rsplit(":", 1)[-1] for args in value.values() if args]
        return ",".join(ports) or "off"
    return str(value)


def _down(options: argparse.Namespace) -> int:
    if not options.data_dir.is_dir():
        print("nothing was running")  # and no data dir to lock
        return 0
    try:
        with locked(options.data_dir):
            return _stop_all(options)
    except BrokenPipeError:
        raise
    except (ClusterError, OSError) as error:
        print(f"down failed: {error}", file=sys.stderr)
        return 1


def _stop_all(options: argparse.Namespace) -> int:
    try:
        cluster = Cluster.attach(options.data_dir)
    except ClusterStateError as error:
        # Stopping must not depend on that file: the pidfiles name the processes, and each
        # one's command line confirms it before it is signalled.
        print(f"down: {error}; stopping the processes its pidfiles name", file=sys.stderr)
        cluster = _from_pidfiles(options.data_dir)
    running = _running(cluster)
    cluster.stop(grace_s=options.grace)
    print(f"stopped {', '.join(running)}" if running else "nothing was running")
    return 0


def _status(options: argparse.Namespace) -> int:
    try:
        cluster = Cluster.attach(options.data_dir)
    except ClusterStateError as error:
        fallback = _from_pidfiles(options.data_dir)
        pids = [f"{name} (pid {fallback.pid(name)})" for name in _running(fallback)]
        print(f"status: {error}", file=sys.stderr)
        print(
            f"status: running, by their pidfiles: {', '.join(pids) or 'none'}"
            + ("; `down` stops them" if pids else ""),
            file=sys.stderr,
        )
        return 1
    # The probes call as "operator" with the recorded TLS files: a moved directory made
    # them fail with a traceback (found by a bug hunt).
    missing = _missing_tls_file(cluster.tls_dir)
    if missing is not None:
        pids = [f"{name} (pid {cluster.pid(name)})" for name in _running(cluster)]
        print(
            f"status: cannot probe the cluster: {missing} is missing (the tls_dir "
            f"{cluster.state_path} records); running, by their pidfiles: "
            f"{', '.join(pids) or 'none'}",
            file=sys.stderr,
        )
        return 1
    try:
        return _print_status(cluster)
    except BrokenPipeError:
        raise
    except OSError as error:  # e.g. a TLS file that cannot be read
        print(f"status: cannot probe the cluster: {error}", file=sys.stderr)
        return 1


def _print_status(cluster: Cluster) -> int:
    try:
        registered = cluster.registered() if cluster.running(COORDINATOR) else {}
    except grpc.RpcError:
        registered = {}
    print(f"{'process':<13} {'address':<17} {'pid':>8}  {'health':<26} registered")
    ready = 0
    for name in PROCESSES:
        pid = cluster.pid(name)
        health = cluster.health(name) if pid is not None else "not running"
        # Registered at its own address, as `up` waits for: the name alone said "yes" while
        # another process had it, and every order for it went there.
        seen = registered.get(name)
        if name == COORDINATOR:
            mark, registered_here = "-", True
        elif seen is None:
            mark, registered_here = "no", False
        elif seen == cluster.address(name):
            mark, registered_here = "yes", True
        else:
            mark, registered_here = f"no (another at {seen})", False
        ready += health == "SERVING" and registered_here
        pid_text = str(pid) if pid is not None else "-"
        print(f"{name:<13} {cluster.address(name):<17} {pid_text:>8}  {health:<26} {mark}")
    # Exit status for scripts: 0 only when everything is up, each service registered at
    # its own address.
    return 0 if ready == len(PROCESSES) else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dtm.cluster",
        description="Start, stop or inspect the coordinator and the four services.",
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--data-dir", type=Path, default=Path(".dtm-data"))
    # `up` on a running cluster compares the flags given with its settings: a flag left out
    # is None here, and a new cluster takes the default then.
    parser.add_argument(
        "--ports",
        type=_parse_ports,
        default=None,
        help="coordinator,inventory,orders,payment,notification (default: as cluster.json "
        "records, else 50050..50054)",
    )
    parser.add_argument("--initial", type=Path, default=None, help="initial stock/accounts JSON")
    parser.add_argument(
        "--test-control",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow fault injection (default: as cluster.json records, else off)",
    )
    parser.add_argument(
        "--metrics-ports",
        type=_parse_metrics_ports,
        default=None,
        help="Prometheus /metrics ports of coordinator,inventory,orders,payment,notification "
        f"(up only; default: as cluster.json records, else {DEFAULT_METRICS_PORTS}; "
        "'off' for none)",
    )
    parser.add_argument(
        "--prepare-timeout-ms",
        type=_prepare_timeout_ms,
        default=None,
        help=f"the coordinator's deadline of each Prepare, 1..{MS_MAX} (default: as "
        "cluster.json records, else the coordinator's own setting, "
        f"{limits.PREPARE_TIMEOUT_MS_DEFAULT} unless configured)",
    )
    parser.add_argument(
        "--timeout",
        type=_wait_seconds,
        default=START_TIMEOUT_S,
        help=f"start timeout (s, at most {WAIT_S_MAX:g})",
    )
    parser.add_argument(
        "--grace",
        type=_wait_seconds,
        default=STOP_GRACE_S,
        help=f"SIGTERM grace (s, at most {WAIT_S_MAX:g})",
    )
    parser.add_argument(
        "--tls-dir",
        type=_parse_tls_dir,
        default=None,
        help="mutual TLS with certificates from `make certs`; 'off' for plaintext (default: "
        "as cluster.json records, else plaintext)",
    )
    options = parser.parse_args(argv)
    shared = _port_in_both(options)
    if shared is not None:  # before anything is written: the start would fail
        parser.error(f"argument --metrics-ports: {shared} is also in --ports")
    commands = {"up": _up, "down": _down, "status": _status}
    try:
        status = commands[options.command](options)
        # Flushed here, so that a reader gone away is caught below rather than at exit.
        sys.stdout.flush()
    except BrokenPipeError:
        # `status | head -1`: exit quietly, as `dtm` does (and as a shell reports a
        # process that SIGPIPE ended), not with a traceback or "up failed".
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    return status


if __name__ == "__main__":
    sys.exit(main())
