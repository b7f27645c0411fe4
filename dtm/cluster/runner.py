"""`Cluster`: start, watch, restart, kill and stop the five processes; wait until ready.

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dtm import security
from dtm.cluster.errors import (
    ClusterError,
    ClusterStateError,
    PortTakenError,
)
from dtm.cluster.ports import (
    FreePorts,
    Ports,
)
from dtm.cluster.procfs import (
    _describe,
    _is_ours,
    _listening_inodes,
    _port_holders,
    _port_inodes,
    _Process,
    _socket_inodes,
)
from dtm.cluster.settings import (
    COORDINATOR,
    HEALTH_CALL_TIMEOUT_S,
    LOG_SCAN_BYTES,
    LOG_TAIL_LINES,
    METRICS_FLAG,
    MODULES,
    POLL_INTERVAL_S,
    PORT_MOVES_MAX,
    PROCESSES,
    SERVICES,
    START_MARKER,
    START_TIMEOUT_S,
    STOP_GRACE_S,
)
from dtm.cluster.state import (
    _initial_document,
    _read_initial,
    _read_state,
    _recorded_settings,
    _write_atomically,
)
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc


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
        metrics_ports: Ports | None = None,
    ) -> None:
        """`metrics_ports`: each process's Prometheus /metrics port (its --metrics-listen,
        first of its `extra_args`, which cluster.json records); FreePorts, as for `ports`,
        lets a start move one that another program took first."""
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
        self.metrics_ports = metrics_ports
        if metrics_ports is not None:
            if any(METRICS_FLAG in args for args in self.extra_args.values()):
                raise ValueError(f"{METRICS_FLAG} in extra_args as well as metrics_ports")
            for name in PROCESSES:
                self.extra_args[name] = [METRICS_FLAG, "", *self.extra_args.get(name, [])]
                self._set_metrics_address(name)
        self._processes = {name: _Process(name) for name in PROCESSES}
        # Where each process's log was when this object last started it: what it wrote
        # since (the log is appended across restarts).
        self._log_offsets: dict[str, int] = {}

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

    def metrics_address(self, name: str) -> str | None:
        """HOST:PORT of the /metrics endpoint of `name`, or None when it has none."""
        args = self.extra_args.get(self._known(name), [])
        return args[1] if args[:1] == [METRICS_FLAG] and len(args) > 1 else None

    def _set_metrics_address(self, name: str) -> None:
        """Point --metrics-listen of `name` (first of its extra_args) at metrics_ports."""
        assert self.metrics_ports is not None
        self.extra_args[name][1] = f"{self.host}:{self.metrics_ports.of(name)}"

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
            marker = f"{START_MARKER}{time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n"
            log.write(marker.encode())
            log.flush()
            self._log_offsets[name] = log.tell()
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
        # The coordinator moves only with every service: one already running dials it at the
        # address it was started with (a chaos heal after a coordinator kill would otherwise
        # move the coordinator away from its services).
        fixed = [COORDINATOR] if any(self.running(name) for name in SERVICES) else []
        deadline = time.monotonic() + self.start_timeout_s
        try:
            if COORDINATOR in wanted and not self.running(COORDINATOR):
                self._spawn(COORDINATOR)
                started.append(COORDINATOR)
                # Services register as soon as they start; with the coordinator already
                # serving they do so on the first try instead of retrying with backoff.
                self._wait_started(deadline, [COORDINATOR], started, fixed, registration=False)
            for name in wanted:
                if not self.running(name):
                    self._spawn(name)
                    started.append(name)
            self._wait_started(deadline, PROCESSES, started, fixed, registration=True)
        except BaseException:
            self._stop_processes(started, STOP_GRACE_S)
            raise

    def _wait_started(
        self,
        deadline: float,
        names: Sequence[str],
        started: Sequence[str],
        fixed: Sequence[str],
        *,
        registration: bool,
    ) -> None:
        """`_wait`, but a process of `started` (not of `fixed`) that found its free port taken
        (FreePorts) starts again on another, up to PORT_MOVES_MAX times. Only while starting:
        the coordinator moves before any service has its address, and a service's new
        address is what it registers. Any other process whose port was taken: PortTakenError."""
        for _ in range(PORT_MOVES_MAX):
            try:
                self._wait(deadline, names, registration=registration)
                return
            except PortTakenError as taken:
                if not self._movable(taken, started, fixed):
                    raise
                self._move(taken.name, metrics=taken.metrics)
        self._wait(deadline, names, registration=registration)

    def _movable(self, taken: PortTakenError, started: Sequence[str], fixed: Sequence[str]) -> bool:
        """Whether the start may move `taken`'s port: one free_ports chose, of a process it
        started. Nothing dials a /metrics endpoint at an address it was told before."""
        if taken.name not in started:
            return False
        if taken.metrics:
            return isinstance(self.metrics_ports, FreePorts)
        return taken.name not in fixed and isinstance(self.ports, FreePorts)

    def port_taken(self, name: str) -> PortTakenError | None:
        """Why `name`, started by this object, exited at its start, when its log says (since
        that start) that its port was in use: the port, who holds it, what to do. None when
        it runs, was not started by this object, or exited for another reason."""
        popen = self._processes[self._known(name)].popen
        if popen is None or popen.poll() is None:
            return None
        try:
            with self.log_path(name).open("rb") as log:
                log.seek(self._log_offsets.get(name, 0))
                output = log.read().decode(errors="replace")
        except OSError:
            return None
        metrics = self.metrics_address(name)
        # dtm.metrics's words for it.
        if metrics and f"cannot serve metrics on {metrics}: " in output:
            if "is the port already in use?" not in output:
                return None
            port = int(metrics.rpartition(":")[2])
            if self._held_by_own(port):
                return None
            where = f"its /metrics endpoint, {metrics}"
            text = self._port_taken_text(name, port, where, "its scrapers know")
            return PortTakenError(text, name, port, metrics=True)
        # grpc_edge.bind's words for it (with TLS, it adds another possible cause).
        if f"cannot listen on {self.address(name)}: is the port already in use?" not in output:
            return None
        port = self.ports.of(name)
        # With TLS the same words may mean credentials gRPC rejected: a port nothing holds
        # (as far as /proc tells) leaves that to the log.
        if self.tls_dir is not None and _port_inodes(port, listening_only=False) == set():
            return None
        if self._held_by_own(port):
            return None
        knows = "the services and clients know" if name == COORDINATOR else "the coordinator knows"
        text = self._port_taken_text(name, port, self.address(name), knows)
        return PortTakenError(text, name, port)

    def _held_by_own(self, port: int) -> bool:
        """Whether one of this cluster's own running processes holds `port`: then the start
        failed on the cluster's doing (an old incarnation still up, two processes given one
        port), which a PortTakenError would blame on another program, and chaos would count
        as the environment's, not a failure of its own."""
        own = {pid for name in PROCESSES if (pid := self.pid(name)) is not None}
        return bool(own & set(_port_holders(port) or ()))

    def _port_taken_text(self, name: str, port: int, where: str, knows: str) -> str:
        holders = _port_holders(port)
        if holders:
            held = f"is held by {', '.join(_describe(pid) for pid in holders)}"
            remedy = f"stop that program (`kill {holders[0]}`), or wait until it lets go"
        else:
            held = "was in use (no process of this user holds it now: another user's, or let go)"
            remedy = f"find what holds it (`ss -tanp 'sport = :{port}'`) and stop it"
        return (
            f"{name} could not start: port {port} ({where}) {held}, its log "
            f"{self.log_path(name)} says. It must use that port ({knows} it by that "
            f"address): {remedy}, then start it again (`python -m dtm.cluster up --data-dir "
            f"{self.data_dir}` starts what is not running). Not the cluster's fault: another "
            "program bound that port first"
        )

    def _move(self, name: str, *, metrics: bool = False) -> None:
        """Start `name` again on another free port (of its /metrics endpoint when
        `metrics`), and record it."""
        grpc_ports, metrics_ports = self.ports, self.metrics_ports
        avoided = asdict(metrics_ports).values() if metrics_ports is not None else ()
        if metrics:
            assert isinstance(metrics_ports, FreePorts)  # as _movable checked
            taken = self.metrics_address(name)
            self.metrics_ports = metrics_ports.moved(name, self.host, asdict(grpc_ports).values())
            self._set_metrics_address(name)
            now = self.metrics_address(name)
        else:
            assert isinstance(grpc_ports, FreePorts)  # as _movable checked
            taken = self.address(name)
            self.ports = grpc_ports.moved(name, self.host, avoided)
            now = self.address(name)
        self._write_state()
        with self.log_path(name).open("a") as log:
            log.write(f"{taken} was taken before {name} bound it; moving to {now}\n")
        self._spawn(name)

    def stop(self, grace_s: float = STOP_GRACE_S) -> list[str]:
        """SIGTERM every process, SIGKILL those still running after `grace_s`. The coordinator
        goes first, and alone: its graceful stop finishes phase 2, which needs the services
        still up. Returns the names of those that had to be killed."""
        killed = self._stop_processes([COORDINATOR], grace_s)
        return killed + self._stop_processes(list(SERVICES), grace_s)

    def _stop_processes(self, names: Sequence[str], grace_s: float) -> list[str]:
        """SIGTERM, then SIGKILL after `grace_s`; the names of those killed."""
        targets = [self._processes[name] for name in names]
        for process in targets:
            self._signal(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        killed = []
        for process in targets:
            if not self._wait_exit(process, deadline):
                self._signal(process, signal.SIGKILL)
                self._wait_exit(process, time.monotonic() + grace_s)
                self._note_killed(process.name, grace_s)
                killed.append(process.name)
        for process in targets:
            self._forget(process)
        return killed

    def _note_killed(self, name: str, grace_s: float) -> None:
        """Say so at the end of its log: a kill writes no last line of its own, and the log
        would end on whatever the process last wrote, as if it were still running."""
        with contextlib.suppress(OSError), self.log_path(name).open("a") as log:
            log.write(
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {name} still running {grace_s:g} s "
                "after SIGTERM: killed (SIGKILL) by dtm.cluster\n"
            )

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

        The port stays (its clients keep the address): when another program took it while
        the process was down, the wait raises PortTakenError naming that program and what to
        do (with `wait=False`, `port_taken` says so once the process has exited).
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
                taken = self.port_taken(name)
                if taken is not None:
                    raise taken
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
                return self._unregistered(name, registered.get(name))
        return None

    def _unregistered(self, name: str, seen: str | None) -> tuple[str, str]:
        """What is wrong with service `name`, which the coordinator lists at `seen` (None: not
        at all) instead of its own address: a service still starting registers on its own
        (retrying while the coordinator does not answer), so that is only "not ready". But a
        service registers once, when it starts: one whose log says it has registered since its
        last start, and that the coordinator no longer lists at its address (an operator ran
        `dtm participants remove`, or another process took the name), never will. Waiting
        for it took `up` its whole --timeout: ClusterError now, saying what to do."""
        where = f"registered at {seen}" if seen else "not registered"
        problem = name, f"{where} with the coordinator, expected {self.address(name)}"
        try:
            lost = self.registration_lost(name)
        except grpc.RpcError as error:
            return COORDINATOR, f"ListParticipants failed: {error}"
        if lost is None:
            return problem
        raise ClusterError(lost)

    def registration_lost(self, name: str) -> str | None:
        """Why the coordinator will not list service `name` at its address until it is
        restarted, and what to do (`up` fails with it, `status` shows it); None when its log
        does not say it registered since its last start (it may still be starting), or when
        the coordinator lists it there. grpc.RpcError when the coordinator does not answer."""
        # Its log first, the coordinator again after: the other way round, a registration
        # made between the two reads would pass for one the coordinator has lost.
        if not self._registered_since_start(name):
            return None
        seen = self.registered().get(name)
        if seen == self.address(name):
            return None
        where = f"lists it at {seen}" if seen else "does not list it"
        pid = self.pid(name)
        return (
            f"{name} (pid {pid}) registered with the coordinator when it started (its log "
            f"{self.log_path(name)} says so), but the coordinator now {where}: it was removed "
            f"(`dtm participants remove {name}`), or another process took its name. A service "
            "registers only when it starts, so it gets no orders until restarted: stop it "
            f"(`kill {pid}`) and run `up` again, which starts it anew (or `down`, then `up`)"
        )

    def _registered_since_start(self, name: str) -> bool:
        """Whether the log of `name` says it registered with the coordinator since it was
        last started (the marker `_spawn` writes): read from its last LOG_SCAN_BYTES, so a
        line further back is not found, and `up` waits as before."""
        try:
            with self.log_path(name).open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - LOG_SCAN_BYTES))
                tail = log.read().decode(errors="replace")
        except OSError:
            return False
        since_start = tail[tail.rfind(START_MARKER) + 1 :]  # the whole tail if none
        # As participants.server logs it: "TIME INFO    NAME: registered coordinator=...".
        registered = re.compile(rf"^\S+ INFO +{re.escape(name)}: registered( |$)", re.MULTILINE)
        return registered.search(since_start) is not None

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
