"""`dtm trace TXN_ID`: one transaction as every process knows it, in one command.

Three views, each from what already shows it: the coordinator's record (`dtm txn show`), each
registered participant's branches of it (`dtm branches`, asked for that transaction only),
and every log line that names it (`txn=<id>`, which dtm.logs puts on each of them) from every
process's log file, merged in time order. A source that cannot be read (the coordinator or a
participant down, a log unreadable) is reported in its place and the others are still shown:
a trace is most wanted when something is down.

Exit status: 0 the transaction was found; 3 (the answer is no) every source answered and none
knows it; 1 a source failed, so the trace is incomplete; 2 a malformed id, before any call.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dtm import cli, cluster, config
from dtm.cli import tables as fmt
from dtm.cli.transactions import _transaction_id
from dtmpb.v1 import coordinator_pb2, participant_pb2

#: Log lines shown by default, and at most: a transaction whose phase 2 is retried for long
#: leaves a line per attempt in each log.
LINES_DEFAULT = 500
LINES_MAX = 100_000
#: The time that begins each line dtm.logs writes; lines are merged on it (it sorts as text).
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def register(
    commands: Any, as_json: argparse.ArgumentParser, target: argparse.ArgumentParser
) -> None:
    """Add `trace` to the `dtm` command's subcommands (`as_json` and `target`: the parsers
    of --json and of --participant/--address the other commands share)."""
    trace = commands.add_parser(
        "trace",
        parents=[as_json, target],
        help="one transaction across every process: coordinator, participants, log lines",
        description="The coordinator's record of the transaction (as `dtm txn show`), each "
        "registered participant's branches of it (as `dtm branches`; --participant or "
        "--address for one), and every line naming it (txn=ID) in the processes' logs, "
        "merged in time order (the first --limit). Logs: "
        f"--logs, else DIR/logs of --data-dir (default {cluster.DATA_DIR_DEFAULT}, where "
        "`make up` keeps them). The servers log each step of a transaction at DEBUG "
        "(DTM_LOG_LEVEL=DEBUG), only its end at INFO. Exit status 0 found; 3 known nowhere; "
        "1 a process or log could not be read (the rest is shown); 2 a malformed ID.",
    )
    trace.add_argument("id", type=_transaction_id, metavar="TXN_ID", help="the transaction")
    where = trace.add_mutually_exclusive_group()
    where.add_argument(
        "--logs",
        type=_existing_path,
        nargs="+",
        action="extend",
        metavar="PATH",
        help="log files, or directories of NAME.log files (the process is the file's name)",
    )
    where.add_argument(
        "--data-dir",
        type=config.path_argument,
        metavar="DIR",
        help=f"a cluster's data directory: its logs are DIR/logs/NAME.log (default "
        f"{cluster.DATA_DIR_DEFAULT}, when it holds them)",
    )
    trace.add_argument(
        "--limit",
        type=cli._bounded_int(1, LINES_MAX),
        default=LINES_DEFAULT,
        metavar="N",
        help=f"at most N log lines, the first in time order (default {LINES_DEFAULT})",
    )
    trace.set_defaults(handler=run)


def _existing_path(text: str) -> Path:
    """--logs PATH (argparse type): one that does not exist is a mistake in the command."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return path


# ---- what each source says ----


@dataclass
class CoordinatorView:
    address: str
    transaction: coordinator_pb2.Transaction | None = None
    error: str = ""  # it could not be asked


@dataclass
class ParticipantView:
    name: str
    address: str
    branches: list[participant_pb2.BranchInfo] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class LogLine:
    process: str
    line: str
    stamp: str  # of the line, else of the last line of its file found before it


@dataclass
class LogsView:
    #: (process, path) of each file read.
    files: list[tuple[str, Path]] = field(default_factory=list)
    lines: list[LogLine] = field(default_factory=list)
    matched: int = 0  # lines naming the transaction, shown or not
    errors: list[str] = field(default_factory=list)
    #: Why no file was read ("": some were).
    missing: str = ""


@dataclass
class Trace:
    transaction_id: str
    coordinator: CoordinatorView
    participants: list[ParticipantView]
    registry_error: str
    logs: LogsView

    @property
    def known(self) -> bool:
        return (
            self.coordinator.transaction is not None
            or any(p.branches for p in self.participants)
            or self.logs.matched > 0
        )

    @property
    def failures(self) -> list[str]:
        """The sources that could not be read (each section says why)."""
        failed = ["the coordinator"] if self.coordinator.error else []
        if self.registry_error and not self.coordinator.error:
            failed.append("the coordinator's registry")
        failed += [f"participant {p.name}" for p in self.participants if p.error]
        return failed + self.logs.errors


def run(session: cli.Session) -> int:
    options = session.options
    files = _log_files(options.logs, options.data_dir)
    coordinator = _coordinator_view(session, options.id)
    participants, registry_error = _participant_views(session, options.id)
    logs = _read_logs(files, options.id, options.limit)
    trace = Trace(options.id, coordinator, participants, registry_error, logs)
    if session.json:
        fmt.emit_json(_trace_dict(trace), session.out)
    else:
        _print_trace(trace, session)
    return _status(trace, session)


def _coordinator_view(session: cli.Session, transaction_id: str) -> CoordinatorView:
    view = CoordinatorView(session.coordinator_address)
    try:
        view.transaction = session.coordinator.GetTransaction(
            coordinator_pb2.GetTransactionRequest(transaction_id=transaction_id),
            timeout=session.timeout,
        )
    except grpc.RpcError as error:
        if not (isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.NOT_FOUND):
            view.error = str(cli.rpc_error(error, "the coordinator", view.address, session))
    return view


def _participant_views(
    session: cli.Session, transaction_id: str
) -> tuple[list[ParticipantView], str]:
    """Each registered participant's branches of the transaction (asked at once, as `dtm
    branches` does), and why the registry could not be read ("" when it was)."""
    try:
        targets = cli._targets(session)
    except cli.CliError as error:
        return [], str(error)
    request = participant_pb2.ListBranchesRequest(transaction_id=transaction_id)
    pending = [
        (
            target,
            session.admin(target).ListBranches.future(
                target.addressed(request), timeout=session.timeout
            ),
        )
        for target in targets
    ]
    views = []
    for target, future in pending:
        view = ParticipantView(target.name, target.address)
        try:
            # A participant from before ListBranchesRequest.transaction_id lists its newest
            # branches of every transaction: the filter is applied here too.
            view.branches = [
                b for b in future.result().branches if b.transaction_id == transaction_id
            ]
        except grpc.RpcError as error:
            where = f"participant {target.name}"
            view.error = str(cli.rpc_error(error, where, target.address, session))
        views.append(view)
    return views, ""


# ---- the logs ----


def _log_files(given: Sequence[Path] | None, data_dir: Path | None) -> list[tuple[str, Path]] | str:
    """(process, path) of each log to read, the coordinator's first; or why there are none."""
    if given:
        files: list[Path] = []
        for path in given:
            files += _logs_in(path) if path.is_dir() else [path]
        if not files:
            return f"no *.log file in {', '.join(map(str, given))}"
    else:
        directory = cluster.Cluster(data_dir or cluster.DATA_DIR_DEFAULT).logs_dir
        files = _logs_in(directory) if directory.is_dir() else []
        if not files:
            return (
                f"no logs at {directory} (`make up` keeps each process's there): give "
                "--logs PATH or --data-dir DIR"
            )
    unique = list(dict.fromkeys(files))
    return sorted(((path.stem, path) for path in unique), key=_process_order)


def _logs_in(directory: Path) -> list[Path]:
    """The NAME.log files of a directory, or of its logs/ (a cluster's data dir given)."""
    found = sorted(directory.glob("*.log"))
    if not found and (directory / "logs").is_dir():
        found = sorted((directory / "logs").glob("*.log"))
    return found


def _process_order(entry: tuple[str, Path]) -> tuple[int, str, str]:
    """The cluster's processes in start order (the coordinator first), then the others."""
    name, path = entry
    rank = cluster.PROCESSES.index(name) if name in cluster.PROCESSES else len(cluster.PROCESSES)
    return rank, name, str(path)


def _read_logs(files: list[tuple[str, Path]] | str, transaction_id: str, limit: int) -> LogsView:
    view = LogsView()
    if isinstance(files, str):
        view.missing = files
        return view
    # The whole token: txn=t-1 must not find txn=t-10's lines.
    pattern = re.compile(rf"(?<!\S)txn={re.escape(transaction_id)}(?!\S)")
    needle = f"txn={transaction_id}"
    lines: list[LogLine] = []
    for process, path in files:
        found: list[LogLine] = []
        try:
            for line in _matching(path, process, needle, pattern):
                # Each file is written in time order: the first `limit` of the merge are
                # among the first `limit` of each, and only those are kept.
                if len(found) < limit:
                    found.append(line)
                view.matched += 1
        except OSError as error:
            view.errors.append(f"log {path} ({error.strerror or error})")
            continue
        view.files.append((process, path))
        lines += found
    # Stable: lines of the same millisecond keep the order of the files, then of each file.
    lines.sort(key=lambda entry: entry.stamp)
    view.lines = lines[:limit]
    return view


def _matching(path: Path, process: str, needle: str, pattern: re.Pattern[str]) -> Iterator[LogLine]:
    """The lines of one log that name the transaction, in file order. A line without a time
    of its own (not written by dtm.logs) takes the last one seen, so that it stays in place.
    Only lines holding `needle` are looked at closer: a log is mostly other transactions'."""
    stamp = ""
    with path.open(encoding="utf-8", errors="replace") as log:
        for raw in log:
            if needle not in raw:
                continue
            line = raw.rstrip("\n")
            if pattern.search(line):
                begins = _STAMP.match(line)
                stamp = begins.group() if begins else stamp
                yield LogLine(process, line, stamp)


# ---- output ----


def _trace_dict(trace: Trace) -> dict[str, Any]:
    coordinator = trace.coordinator
    return {
        "transaction_id": trace.transaction_id,
        "known": trace.known,
        "coordinator": {
            "address": coordinator.address,
            "found": coordinator.transaction is not None,
            "transaction": (
                None
                if coordinator.transaction is None
                else fmt.transaction_dict(coordinator.transaction)
            ),
            "error": coordinator.error or None,
        },
        "participants": [
            {
                "participant": p.name,
                "address": p.address,
                "branches": [fmt.branch_info_dict(p.name, b) for b in p.branches],
                "error": p.error or None,
            }
            for p in trace.participants
        ],
        "registry_error": trace.registry_error or None,
        "logs": {
            "files": [{"process": name, "path": str(path)} for name, path in trace.logs.files],
            "lines": [{"process": line.process, "line": line.line} for line in trace.logs.lines],
            "matched": trace.logs.matched,
            "cut": trace.logs.matched > len(trace.logs.lines),
            "errors": trace.logs.errors,
            "missing": trace.logs.missing or None,
        },
    }


def _print_trace(trace: Trace, session: cli.Session) -> None:
    out = session.out
    print(f"== coordinator at {trace.coordinator.address}", file=out)
    _print_coordinator(trace, session)
    print("\n== participants", file=out)
    _print_participants(trace, session)
    print(f"\n== log lines with txn={trace.transaction_id}", file=out)
    _print_logs(trace, session)
    if not trace.known and not trace.failures:
        print(
            f"\ntransaction {trace.transaction_id} is known nowhere: not to the coordinator, "
            "not to any participant, in no log read. Check the id (`dtm txn list` lists the "
            "recent ones)",
            file=out,
        )


def _print_coordinator(trace: Trace, session: cli.Session) -> None:
    view = trace.coordinator
    if view.error:
        print(f"no answer: {view.error}", file=session.out)
    elif view.transaction is None:
        print(
            f"no record of {trace.transaction_id}: never submitted here, or finished and "
            "forgotten since (the newest finished are kept; an abort is not logged, so a "
            "restart forgets it). Presumed abort: a participant that asks is told it aborted",
            file=session.out,
        )
    else:
        cli._print_transaction(view.transaction, session)


def _print_participants(trace: Trace, session: cli.Session) -> None:
    out = session.out
    if trace.registry_error and trace.coordinator.error:
        # Said above: the registry is the coordinator's.
        print(
            "not asked: the registry is the coordinator's; --address HOST:PORT (and "
            "--participant NAME) asks one participant directly",
            file=out,
        )
        return
    if trace.registry_error:
        print(f"not asked: {trace.registry_error}", file=out)
        return
    if not trace.participants:
        print("no participants registered", file=out)
        return
    rows = [
        [
            view.name,
            info.branch,
            fmt.branch_state_name(info.state),
            fmt.duration(fmt.age_s(info.updated_at_unix_ms)),
            fmt.clip(info.reason) or "-",
            _heuristic(info),
        ]
        for view in trace.participants
        for info in view.branches
    ]
    if rows:
        fmt.table(["PARTICIPANT", "BRANCH", "STATE", "AGE", "REASON", "HEURISTIC"], rows, out)
    for view in trace.participants:
        if view.error:
            print(f"{view.name}: no answer: {view.error}", file=out)
        elif not view.branches:
            print(f"{view.name}: no branch of this transaction", file=out)


def _heuristic(info: participant_pb2.BranchInfo) -> str:
    """A forced outcome, and whether its coordinator's decision has reached it since."""
    shown = fmt.branch_heuristic(info)
    if info.heuristic and not info.awaiting_coordinator and not info.forgotten:
        return f"{shown} (reconciled)"
    return shown


def _print_logs(trace: Trace, session: cli.Session) -> None:
    out, logs = session.out, trace.logs
    for problem in logs.errors:
        print(f"not read: {problem}", file=out)
    if logs.missing:
        print(logs.missing, file=out)
        return
    if not logs.lines:
        read = ", ".join(name for name, _ in logs.files) or "none"
        print(
            f"no line names it in the logs read ({read}); the servers log each step of a "
            "transaction at DEBUG (DTM_LOG_LEVEL=DEBUG), only its end at INFO",
            file=out,
        )
        return
    width = max(len(line.process) for line in logs.lines)
    for line in logs.lines:
        print(f"{line.process.ljust(width)}  {line.line}", file=out)
    if logs.matched > len(logs.lines):
        print(f"(the first {len(logs.lines)} of {logs.matched}: --limit for more)", file=out)


def _status(trace: Trace, session: cli.Session) -> int:
    if session.json and trace.logs.matched > len(trace.logs.lines):
        # The document is the JSON contract; that it is cut goes where the table says it.
        print(
            f"dtm: note: the first {len(trace.logs.lines)} of {trace.logs.matched} log lines "
            "listed: --limit for more",
            file=sys.stderr,
        )
    failures = trace.failures
    if failures:
        # On stderr too, as the other commands report a failure; what did answer is shown.
        print(
            f"dtm: error: the trace is incomplete: no answer from {', '.join(failures)}",
            file=sys.stderr,
        )
        return cli.EXIT_ERROR
    return cli.EXIT_OK if trace.known else cli.EXIT_NO
