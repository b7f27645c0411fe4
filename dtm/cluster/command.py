"""The command: `python -m dtm.cluster up|down|status` (make up, make down, make status).

Part of `dtm.cluster`: see its docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, astuple
from pathlib import Path
from typing import Any

import grpc

from dtm import config, limits, security

# From `dtm`'s CLI, reused: its --timeout validator (a positive, finite number of seconds:
# nan or inf made a deadline never reached, 0 or -1 one always past) and its handling of a
# standard output closed by its reader (`status | head -1`), and its table layout.
from dtm.cli import EXIT_BROKEN_PIPE, _stdout_to_devnull
from dtm.cli import _seconds as _positive_seconds
from dtm.cli import tables as fmt
from dtm.cluster.errors import (
    ClusterError,
    ClusterStateError,
)
from dtm.cluster.lock import (
    locked,
)
from dtm.cluster.ports import (
    FreePorts,
    Ports,
)
from dtm.cluster.runner import (
    Cluster,
)
from dtm.cluster.settings import (
    COORDINATOR,
    DATA_DIR_DEFAULT,
    MS_MAX,
    PROCESSES,
    START_TIMEOUT_S,
    STOP_GRACE_S,
    WAIT_S_MAX,
)
from dtm.cluster.state import (
    _initial_document,
    _read_initial,
)
from dtm.wal.files import file_in_the_way


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
    metrics = options.metrics_ports
    if not isinstance(metrics, list):  # none, or free ones: chosen besides the gRPC ports
        return None
    return next((port for port in metrics if port in grpc_ports), None)


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


#: `--ports free`: five ports free when `up` starts, each moved to another should another
#: program take it before its server binds it (FreePorts).
PORTS_FREE = "free"


def _parse_ports(text: str) -> Ports:
    return Ports.free() if text == PORTS_FREE else Ports(*_port_list(text))


DEFAULT_METRICS_PORTS = "9100,9101,9102,9103,9104"


#: `--tls-dir off`: plaintext, even where cluster.json records a TLS dir (`./off` names a
#: directory called off).
TLS_OFF = "off"


def _parse_tls_dir(text: str) -> Path | str:
    return TLS_OFF if text == TLS_OFF else Path(text)


def _parse_metrics_ports(text: str) -> list[int] | str:
    """[] for 'off' (no /metrics endpoints), PORTS_FREE for 'free' (five chosen when a
    cluster starts, besides its gRPC ports), else the five ports."""
    if text == PORTS_FREE:
        return PORTS_FREE
    return [] if text == "off" else _port_list(text)


def _metrics_of(
    metrics: list[int] | str, ports: Ports
) -> tuple[dict[str, list[str]], Ports | None]:
    """(extra_args, metrics_ports) of a cluster on `ports` whose /metrics ports are
    `metrics`: free ones (FreePorts, which a start moves should another program take one
    first) besides `ports`, or those given."""
    if isinstance(metrics, str):  # PORTS_FREE
        return {}, Ports.free(avoid=astuple(ports))
    return _metrics_args(metrics), None


def _print_addresses(cluster: Cluster) -> None:
    for name in PROCESSES:
        pid = cluster.pid(name)
        # Where to scrape: with `--metrics-ports free` nothing else said which ports it chose.
        metrics = cluster.metrics_address(name)
        scrape = f"   metrics {metrics}" if metrics else ""
        print(f"  {name:<13} {cluster.address(name):<17} pid {pid}{scrape}")
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
        problem = f"{error.strerror}{file_in_the_way(options.data_dir)}"
        print(
            f"up failed: cannot use {options.data_dir} as the data dir: {problem}", file=sys.stderr
        )
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
            # `--ports free` (`--metrics-ports free`) asks for no ports in particular: those
            # it runs on will do.
            if value != _settings_of(existing)[name]
            and not isinstance(value, FreePorts)
            and value != PORTS_FREE
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
    ports = options.ports or Ports()
    extra_args, metrics_ports = _metrics_of(metrics, ports)
    return Cluster(
        options.data_dir,
        ports,
        initial=requested.get("initial"),
        test_control=bool(options.test_control),
        prepare_timeout_ms=options.prepare_timeout_ms,
        start_timeout_s=options.timeout,
        tls_dir=tls_dir,
        extra_args=extra_args,
        metrics_ports=metrics_ports,
    )


def _replacing_flags(options: argparse.Namespace) -> list[tuple[str, bool]]:
    """The flags that, all given, replace an unreadable cluster.json (each a setting whose
    default would otherwise stand in for what it records), and whether each was given."""
    return [
        ("--ports", options.ports is not None),
        ("--tls-dir DIR|off", options.tls_dir is not None),
        ("--[no-]test-control", options.test_control is not None),
        ("--metrics-ports PORTS|off|free", options.metrics_ports is not None),
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
    extra_args, metrics_ports = stopped.extra_args, None
    if "metrics" in requested:
        others = {
            name: args for name, args in extra_args.items() if args[:1] != ["--metrics-listen"]
        }
        metrics = requested["metrics"]
        if metrics == PORTS_FREE:
            extra_args, metrics_ports = others, Ports.free(avoid=astuple(settings["ports"]))
        else:
            extra_args = {**others, **metrics}
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
        metrics_ports=metrics_ports,
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
    metrics = options.metrics_ports
    if metrics is not None:
        requested["metrics"] = metrics if metrics == PORTS_FREE else _metrics_args(metrics)
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


def _setting_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):  # test_control: as its flags say it, not Python's True/False
        return "on" if value else "off"
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
    killed = cluster.stop(grace_s=options.grace)
    print(f"stopped {', '.join(running)}" if running else "nothing was running")
    for name in killed:
        # Not a graceful stop: what it had in flight was cut short.
        left = _LEFT_BY_A_KILL[COORDINATOR if name == COORDINATOR else "service"]
        print(
            f"down: {name} was still running {options.grace:g} s after SIGTERM: killed "
            f"(SIGKILL); {left} (its log: {cluster.log_path(name)})",
            file=sys.stderr,
        )
    return 0


#: What a SIGKILL instead of a graceful stop leaves, by kind of process.
_LEFT_BY_A_KILL = {
    COORDINATOR: (
        "its transactions in flight were not finished: its next start recovers them from its "
        "log, and the services keep their branches in doubt until then"
    ),
    "service": "its prepared branches come back from its log, in doubt, at its next start",
}


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
    # None: the coordinator cannot say (not running, or not answering), so neither can this.
    registered: dict[str, str] | None
    try:
        registered = cluster.registered() if cluster.running(COORDINATOR) else None
    except grpc.RpcError:
        registered = None
    rows: list[list[str]] = []
    ready = 0
    lost: list[str] = []
    for name in PROCESSES:
        pid = cluster.pid(name)
        health = cluster.health(name) if pid is not None else "not running"
        # Registered at its own address, as `up` waits for: the name alone said "yes" while
        # another process had it, and every order for it went there.
        seen = registered.get(name) if registered is not None else None
        if name == COORDINATOR:
            mark, registered_here = "-", True
        elif registered is None:
            mark, registered_here = "unknown (coordinator down)", False
        elif seen is None:
            mark, registered_here = "no", False
        elif seen == cluster.address(name):
            mark, registered_here = "yes", True
        else:
            mark, registered_here = f"no (another at {seen})", False
        ready += health == "SERVING" and registered_here
        rows.append(
            [name, cluster.address(name), str(pid) if pid is not None else "-", health, mark]
        )
        if registered is not None and not registered_here and pid is not None:
            lost += _registration_lost(cluster, name)
    # Widths from the cells, as every `dtm` table: fixed ones were overrun by a probe that
    # timed out ("UNREACHABLE (DEADLINE_EXCEEDED)") or a long address.
    fmt.table(["process", "address", "pid", "health", "registered"], rows, sys.stdout)
    # Below the table: what `up` would say of them (it fails on them too), and what to do.
    for text in lost:
        print(text)
    # Exit status for scripts: 0 only when everything is up, each service registered at
    # its own address.
    return 0 if ready == len(PROCESSES) else 3


def _registration_lost(cluster: Cluster, name: str) -> list[str]:
    """Cluster.registration_lost of `name`, as a list (empty: not lost, or the coordinator
    stopped answering since the table's look)."""
    try:
        lost = cluster.registration_lost(name)
    except grpc.RpcError:
        return []
    return [] if lost is None else [lost]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dtm.cluster",
        description="Start, stop or inspect the coordinator and the four services.",
    )
    parser.add_argument(
        "command",
        choices=("up", "down", "status"),
        help="up: start what is not running and wait until every service is registered; "
        "down: stop every process (SIGTERM, then SIGKILL after --grace); status: each "
        "process's pid, health and registration, and what to do for a running service the "
        "coordinator no longer lists (exit 0 only when all are ready, else 3; 1 when it "
        "cannot probe them)",
    )
    parser.add_argument(
        "--data-dir",
        type=config.path_argument,
        default=DATA_DIR_DEFAULT,
        help="where cluster.json, pidfiles, logs and each server's log of record live "
        f"(default: {DATA_DIR_DEFAULT})",
    )
    # `up` on a running cluster compares the flags given with its settings: a flag left out
    # is None here, and a new cluster takes the default then.
    parser.add_argument(
        "--ports",
        type=_parse_ports,
        default=None,
        help="coordinator,inventory,orders,payment,notification, or 'free' for five free "
        "ones (up chooses another for a process whose port was taken before it bound it); "
        "default: as cluster.json records, else 50050..50054",
    )
    parser.add_argument(
        "--initial",
        type=Path,
        default=None,
        help="initial stock and accounts as JSON (see participants/services/catalog.py), "
        "written to DATA_DIR/initial.json for inventory and payment, which read it only while "
        "their logs are empty (default: as cluster.json records, else the built-in catalog)",
    )
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
        "'off' for none; 'free' for five free ones, moved as --ports free moves them)",
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
        help=f"how long up waits for every process to be ready (s, default {START_TIMEOUT_S:g}, "
        f"at most {WAIT_S_MAX:g})",
    )
    parser.add_argument(
        "--grace",
        type=_wait_seconds,
        default=STOP_GRACE_S,
        help=f"how long down waits after SIGTERM before SIGKILL (s, default {STOP_GRACE_S:g}, "
        f"at most {WAIT_S_MAX:g})",
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
