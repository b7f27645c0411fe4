"""The command line: every command's arguments, and `main`.

Part of `dtm.cli`: see its docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from dtm import config, limits
from dtm.cli.heuristics import (
    cmd_heuristics,
    cmd_heuristics_forget,
)
from dtm.cli.local import (
    cmd_config,
    cmd_crashpoints,
    cmd_log_dump,
    run_server,
)
from dtm.cli.participants import (
    cmd_branches,
    cmd_branches_forget,
    cmd_force,
    cmd_locks,
    cmd_participants,
    cmd_participants_remove,
)
from dtm.cli.session import (
    BRANCH_STATE_NAMES,
    DEFAULT_TIMEOUT_S,
    EXIT_BROKEN_PIPE,
    EXIT_USAGE,
    FORCE_WARNING,
    STATE_NAMES,
    STUCK_AFTER_S_DEFAULT,
    CliError,
    Session,
    _stdout_to_devnull,
)
from dtm.cli.transactions import (
    _address,
    _call_seconds,
    _participant_name,
    _seconds,
    _transaction_id,
    cmd_submit,
    cmd_txn_list,
    cmd_txn_retry,
    cmd_txn_show,
)
from dtm.coordinator.heuristics import UNKNOWN_ATTEMPT

# ---- the command line ----

# What `dtm force` checks before forcing (`_refuse_contradiction`), for its --help: the
# refusal's exit status is what a script tests.
FORCE_CHECKS = """\
The coordinator is asked first: refused (exit 5) while it still decides the transaction, or
when it decided the other way, or, for --commit, when it has no record of the transaction
(presumed abort) unless --coordinator-lost. A coordinator that cannot be reached at all does
not stop a force."""


def _force_description() -> str:
    """FORCE_WARNING without its first line, with FORCE_CHECKS before its "Re-run with
    --i-understand" (the warning is also what a force without that flag prints)."""
    why, rerun = FORCE_WARNING.split("\n\n", 1)[1].rsplit("\n\n", 1)
    return f"{why}\n\n{FORCE_CHECKS}\n\n{rerun}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_limit(parser: argparse.ArgumentParser, help: str) -> None:
    """--limit N of a list command, within what the servers' list calls accept."""
    parser.add_argument(
        "--limit",
        type=_bounded_int(1, limits.LIST_TRANSACTIONS_LIMIT_MAX),
        default=limits.LIST_TRANSACTIONS_LIMIT_DEFAULT,
        metavar="N",
        help=help,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dtm",
        description="Operate dtm: run the servers, submit and inspect transactions, look at\n"
        "participants' locks and branches. `dtm COMMAND --help` for each command.",
        epilog="exit status: 0 ok; 1 error (unreachable, refused, bad input); 2 usage, or a\n"
        "  configuration refused (--config, DTM_*, TLS files missing or not working);\n"
        "  3 the answer is no (transaction aborted, participant unhealthy); 4 outcome unknown;\n"
        "  5 refused as unsafe (`force`, `branches forget`: the coordinator decided otherwise,\n"
        "  or may still need the branch);\n"
        "  141 the output's reader went away (`dtm config | head -1`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--coordinator",
        type=_address,
        metavar="HOST:PORT",
        default=None,
        help="the coordinator (default: [participant] coordinator of the configuration, "
        "DTM_PARTICIPANT_COORDINATOR, else 127.0.0.1:50050)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="TOML configuration file (default: $DTM_CONFIG); also passed to "
        "`dtm coordinator` and `dtm service`",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--timeout",
        type=_call_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g})",
    )
    # The client side of dtm.security: the certificate to call with (an operator's, since
    # the admin calls need one). Its --authz-* flags are server policy, so they are not here.
    tls = parser.add_argument_group("TLS", "mutual TLS, when the servers use it")
    tls.add_argument("--tls-ca", type=Path, metavar="PATH", help="CA certificate (DTM_TLS_CA)")
    tls.add_argument("--tls-cert", type=Path, metavar="PATH", help="certificate (DTM_TLS_CERT)")
    tls.add_argument("--tls-key", type=Path, metavar="PATH", help="private key (DTM_TLS_KEY)")
    tls.add_argument(
        "--coordinator-identity",
        metavar="NAME",
        help="the name the coordinator's certificate must carry (default: coordinator_identity "
        'in [cli], DTM_CLI_COORDINATOR_IDENTITY, DTM_AUTHZ_COORDINATOR, else "coordinator")',
    )
    # --json is accepted after the command too; SUPPRESS keeps the global one otherwise.
    as_json = _Parser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "coordinator",
        add_help=False,
        help="run the coordinator in the foreground (`dtm coordinator --help` for its flags)",
    )
    service = commands.add_parser(
        "service",
        add_help=False,
        help="run one service in the foreground (`dtm service NAME --help` for its flags)",
        usage="dtm service NAME [FLAGS...]",
        description=f"Run one service in the foreground. NAME: {', '.join(config.SERVICES)}.\n"
        "Each has its own flags: `dtm service NAME --help` lists them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    service.add_argument(
        "name", nargs="?", choices=config.SERVICES, metavar="NAME", help="the service to run"
    )
    # add_help=False hands --help to the service's own parser; with no NAME, there is none
    # to hand it to, so run_server prints this parser's help instead.
    service.set_defaults(service_help=service.format_help)

    submit = commands.add_parser(
        "submit",
        parents=[as_json],
        help="submit a transaction described in JSON",
        description='FILE: {"transaction_id": "...", "timeout_ms": 5000, "branches": '
        '[{"participant": "inventory", "type": "dtm.v1.ReserveStock", "operation": '
        '{"lines": [{"sku": "sku-apple", "quantity": 1}]}}]}. transaction_id and timeout_ms '
        "are optional (an id is generated, so that the transaction can be looked up). "
        "A type not compiled into dtm (a service of your own) is asked of the participant the "
        "branch names, by server reflection. Exit status 0 committed, 3 aborted, 4 unknown: "
        "the answer was lost (the coordinator "
        "went away, or no answer within the transaction's timeout and --timeout) and the "
        "transaction, named with its id, may still commit; `dtm txn show ID` or submit again "
        "with the same transaction_id. 1 when the coordinator cannot be reached: nothing was "
        "sent. 130 interrupted (Ctrl-C) while it was out: unknown as for 4, and named so.",
    )
    submit.add_argument("file", type=Path, metavar="FILE", help="the JSON file, or - for stdin")
    submit.set_defaults(handler=cmd_submit)

    txn = commands.add_parser("txn", help="list, show or retry transactions")
    txn_commands = txn.add_subparsers(dest="txn_command", metavar="COMMAND", required=True)
    txn_list = txn_commands.add_parser(
        "list",
        parents=[as_json],
        help="recent transactions, newest first",
        description="In doubt: deciding, committing or unknown (a participant may not know "
        "the outcome yet). Stuck: in doubt and retried in phase 2, or older than "
        f"--stuck-after (looked for among the {limits.LIST_TRANSACTIONS_LIMIT_MAX:,} newest in "
        "doubt).",
    )
    which = txn_list.add_mutually_exclusive_group()
    which.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help=f"only these states (repeat or comma-separate): {', '.join(STATE_NAMES)}",
    )
    which.add_argument("--in-doubt", action="store_true", help="deciding, committing or unknown")
    which.add_argument("--stuck", action="store_true", help="in doubt and retried, or old")
    txn_list.add_argument(
        "--stuck-after",
        type=_seconds,
        default=STUCK_AFTER_S_DEFAULT,
        metavar="SECONDS",
        help="age after which an in-doubt transaction is stuck "
        f"(default {STUCK_AFTER_S_DEFAULT:g})",
    )
    _add_limit(
        txn_list,
        f"at most N (default {limits.LIST_TRANSACTIONS_LIMIT_DEFAULT}, "
        f"at most {limits.LIST_TRANSACTIONS_LIMIT_MAX})",
    )
    txn_list.set_defaults(handler=cmd_txn_list)
    txn_show = txn_commands.add_parser("show", parents=[as_json], help="one transaction")
    txn_show.add_argument("id", type=_transaction_id, metavar="ID")
    txn_show.set_defaults(handler=cmd_txn_show)
    txn_retry = txn_commands.add_parser(
        "retry",
        parents=[as_json],
        help="retry phase 2 of a committing transaction now (skip the backoff)",
    )
    txn_retry.add_argument("id", type=_transaction_id, metavar="ID")
    txn_retry.set_defaults(handler=cmd_txn_retry)

    participants = commands.add_parser(
        "participants",
        parents=[as_json],
        help="the registry, with each participant's health and incarnation",
        description="Exit status 3 when a participant is not SERVING.",
    )
    participants.set_defaults(handler=cmd_participants)
    participants_commands = participants.add_subparsers(
        dest="participants_command", metavar="COMMAND", required=False
    )
    remove = participants_commands.add_parser(
        "remove",
        parents=[as_json],
        help="unregister a decommissioned participant (durable; stop it first)",
        description="Refused while a transaction not yet finished has a branch there. A "
        "participant registers again when it starts, so stop the service first: removing one "
        "that still answers its health check SERVING is done, with a warning.",
    )
    remove.add_argument("name", type=_participant_name, metavar="NAME", help="the participant")
    remove.set_defaults(handler=cmd_participants_remove)

    # SUPPRESS, as for --json: a subcommand's copy (`branches forget`) must not reset what
    # was given before it (`dtm branches --participant orders forget ...`).
    parser.set_defaults(participant=None, address=None)
    target = _Parser(add_help=False)
    target.add_argument(
        "--participant",
        type=_participant_name,
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="only this participant",
    )
    target.add_argument(
        "--address",
        type=_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="ask the participant at this address directly, without the coordinator",
    )
    # `force` and `branches forget` act on one branch: the flag names where it is, and one of
    # the two is required (cmd_force says so), so "only this participant" would mislead.
    holder = _Parser(add_help=False)
    holder.add_argument(
        "--participant",
        type=_participant_name,
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="the participant holding the branch, found through the coordinator "
        "(this or --address is required)",
    )
    holder.add_argument(
        "--address",
        type=_address,
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="the participant holding the branch, reached at this address directly (not "
        "looked up in the coordinator's registry); the check asks the coordinator it says it "
        "uses (--coordinator, if given, must be that one)",
    )
    locks = commands.add_parser(
        "locks",
        parents=[as_json, target],
        help="locks held and waited for, per participant",
        description=f"Each participant lists its {limits.LOCKS_LISTED_MAX:,} longest-held "
        f"locks, in resource order, and of each the first {limits.LOCK_OWNERS_LISTED_MAX} "
        "holders and waiters. A note on stderr says when it holds more locks than it listed, "
        "and '(+N more)' ends a cut HOLDERS or WAITERS cell (--json: holders_total, "
        "waiters_total).",
    )
    locks.set_defaults(handler=cmd_locks)
    branches = commands.add_parser(
        "branches", parents=[as_json, target], help="every participant's branches"
    )
    branch_filter = branches.add_mutually_exclusive_group()
    branch_filter.add_argument(
        "--in-doubt", action="store_true", help="only prepared branches waiting for a decision"
    )
    branch_filter.add_argument(
        "--awaiting",
        action="store_true",
        help="only forced branches kept until their coordinator decides them (to forget)",
    )
    branch_filter.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help=f"only these states (repeat or comma-separate): {', '.join(BRANCH_STATE_NAMES)}",
    )
    _add_limit(branches, "the newest N per participant")
    branches.set_defaults(handler=cmd_branches)
    branches_commands = branches.add_subparsers(
        dest="branches_command", metavar="COMMAND", required=False
    )
    forget_branch = branches_commands.add_parser(
        "forget",
        parents=[as_json, holder],
        help="stop keeping a forced branch for its coordinator, once reconciled (durable)",
        description="A forced branch is kept until its coordinator sends a decision for it. "
        "A coordinator that never logged the transaction, or lost its log, never will: once "
        "you have reconciled the branch, forget it here. The coordinator is asked first: "
        "refused (exit 5) while it may still send the branch its decision, or has not yet "
        "recorded the heuristic outcome the branch would report to it, or cannot be reached.",
    )
    forget_branch.add_argument("id", type=_transaction_id, metavar="ID", help="the transaction")
    forget_branch.add_argument("branch", type=_branch_index, metavar="BRANCH", help="its index")
    forget_branch.add_argument(
        "--coordinator-lost",
        action="store_true",
        help="the coordinator lost its log, or is gone for good: forget even though it cannot "
        "be reached, or has no record of the transaction (which otherwise means it aborted, "
        "by presumed abort, and a forced commit is still to be reported to it)",
    )
    forget_branch.set_defaults(handler=cmd_branches_forget)

    # In its own module, which reads the processes' log files as well as asking them.
    from dtm.cli import trace

    trace.register(commands, as_json, target)

    # In its own module, which reads the four services with dtm.invariants.
    from dtm.cli import check

    check.register(commands, as_json)

    force = commands.add_parser(
        "force",
        parents=[as_json, holder],
        help="heuristically commit or roll back an in-doubt branch (dangerous)",
        description=_force_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    force.add_argument("id", type=_transaction_id, metavar="ID", help="the transaction")
    force.add_argument("branch", type=_branch_index, metavar="BRANCH", help="its index")
    decision = force.add_mutually_exclusive_group(required=True)
    decision.add_argument(
        "--commit", action="store_true", dest="commit", default=None, help="commit the branch"
    )
    decision.add_argument(
        "--rollback", action="store_false", dest="commit", help="roll the branch back"
    )
    force.add_argument(
        "--i-understand", action="store_true", help="confirm: this may break atomicity"
    )
    force.add_argument(
        "--coordinator-lost",
        action="store_true",
        help="the coordinator lost its log: force --commit even though it has no record of "
        "the transaction (which otherwise means it aborted, by presumed abort)",
    )
    force.set_defaults(handler=cmd_force)

    heuristics = commands.add_parser(
        "heuristics",
        parents=[as_json],
        help="heuristic outcomes the coordinator keeps (branches that did not follow the "
        "decision), until forgotten",
    )
    _add_limit(heuristics, "the oldest N")
    heuristics.set_defaults(handler=cmd_heuristics)
    heuristics_commands = heuristics.add_subparsers(
        dest="heuristics_command", metavar="COMMAND", required=False
    )
    forget = heuristics_commands.add_parser(
        "forget",
        parents=[as_json],
        help="stop reporting a heuristic outcome once it is reconciled (durable)",
    )
    forget.add_argument("id", type=_transaction_id, metavar="ID", help="the transaction")
    forget.add_argument("branch", type=_branch_index, metavar="BRANCH", help="its index")
    forget.add_argument(
        "--attempt",
        type=_attempt,
        default=None,
        metavar="HEX",
        help="which attempt of the transaction id, when several have one kept for the branch: "
        "its fingerprint, or the start of it, as the ATTEMPT column shows it ('-': the one "
        "whose attempt is not known)",
    )
    forget.set_defaults(handler=cmd_heuristics_forget)

    log = commands.add_parser("log", help="write-ahead log tools")
    log_commands = log.add_subparsers(dest="log_command", metavar="COMMAND", required=True)
    dump = log_commands.add_parser(
        "dump",
        parents=[as_json],
        help="print every record of a log (read-only)",
        description="Exit status 1 when the log is corrupted (CORRUPTED), is not a dtm log, or "
        "has a segment of a newer frame format (NEWER FRAME FORMAT); a TORN TAIL (a crash's "
        "interrupted write, which opening the log cuts) is not an error.",
    )
    dump.add_argument(
        "path",
        type=config.path_argument,  # "" is no path, not the working directory
        metavar="PATH",
        help="a log directory (DATA_DIR/<process>/wal) or segment",
    )
    dump.set_defaults(handler=cmd_log_dump)

    crash = commands.add_parser("crashpoints", parents=[as_json], help="list the crash points")
    crash.set_defaults(handler=cmd_crashpoints)
    show_config = commands.add_parser(
        "config",
        parents=[as_json],
        help="print the configuration in effect (file, DTM_* variables, defaults)",
    )
    show_config.set_defaults(handler=cmd_config)
    return parser


def _bounded_int(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is out of range {minimum}..{maximum}")
        return value

    return parse


#: A branch's index within its transaction: a usage error beyond the last one there can be,
#: before anything is asked (the coordinator's answer to it would be about something else).
_branch_index = _bounded_int(0, limits.BRANCHES_PER_TRANSACTION_MAX - 1)


def _attempt(text: str) -> bytes:
    """--attempt: a transaction fingerprint, or its first bytes, in hex; "-" (as the ATTEMPT
    column shows it) for an outcome whose attempt is not known: empty."""
    if text == UNKNOWN_ATTEMPT:
        return b""
    try:
        fingerprint = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not hex digits in pairs (as the ATTEMPT column of `dtm heuristics`)"
        ) from None
    if not fingerprint or len(fingerprint) > limits.TRANSACTION_FINGERPRINT_BYTES_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r}: 1 to {limits.TRANSACTION_FINGERPRINT_BYTES_MAX} bytes of hex"
        )
    return fingerprint


def main(argv: Sequence[str] | None = None) -> int:
    """The `dtm` console script. Returns the exit status (see EXIT_*)."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        options, extra = parser.parse_known_args(arguments)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    try:
        if options.command in ("coordinator", "service"):
            # Everything after the command is the server's own command line.
            return run_server(options, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        session = Session(options, sys.stdout)
        with session.channels:
            status: int = options.handler(session)
        # Flushed here, so that a reader gone away is caught below rather than at exit.
        session.out.flush()
        return status
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    except CliError as error:
        print(f"dtm: error: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        return 130
