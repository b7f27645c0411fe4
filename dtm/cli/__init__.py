"""The `dtm` command: run the servers, submit and inspect transactions, operate participants.

    dtm coordinator [FLAGS]            run the coordinator in the foreground
    dtm service NAME [FLAGS]           run inventory, orders, payment or notification
    dtm submit FILE.json               submit a transaction described in JSON
    dtm txn list [FILTERS]             recent transactions
    dtm txn show ID                    one transaction, branch by branch
    dtm txn retry ID                   retry phase 2 of a committing transaction now
    dtm participants                   the registry, with each participant's health and incarnation
    dtm participants remove NAME       unregister a decommissioned participant
    dtm locks                          the locks every participant holds, and who waits
    dtm branches                       every participant's branches
    dtm branches forget ID BRANCH ...  stop keeping a forced branch for its coordinator
    dtm trace ID                       one transaction across every process and its logs
    dtm check                          the shop's invariants over the services' state now
    dtm force ID BRANCH ...            heuristic commit/rollback of an in-doubt branch
    dtm heuristics                     heuristic outcomes the coordinator keeps
    dtm heuristics forget ID BRANCH    stop reporting one, once it is reconciled
    dtm log dump PATH                  every record of a write-ahead log
    dtm crashpoints                    the named crash points (DTM_CRASH_AT)
    dtm config                         the configuration in effect

Every command that reads prints a table, or JSON with --json. The coordinator's address is
--coordinator, else [participant] coordinator of the configuration (file, DTM_CONFIG,
DTM_PARTICIPANT_COORDINATOR), else 127.0.0.1:50050. The calls are plain blocking gRPC.
"""

from __future__ import annotations

from dtm.cli.parser import (
    _bounded_int,
    build_parser,
    main,
)
from dtm.cli.participants import (
    _targets,
)
from dtm.cli.session import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_NO,
    EXIT_OK,
    EXIT_UNKNOWN,
    EXIT_UNSAFE,
    EXIT_USAGE,
    CliError,
    Session,
    _stdout_to_devnull,
    rpc_error,
)
from dtm.cli.transactions import (
    _address,
    _print_transaction,
    _seconds,
    load_submission,
)

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_NO",
    "EXIT_OK",
    "EXIT_UNKNOWN",
    "EXIT_UNSAFE",
    "EXIT_USAGE",
    "CliError",
    "Session",
    "_address",
    "_bounded_int",
    "_print_transaction",
    "_seconds",
    "_stdout_to_devnull",
    "_targets",
    "build_parser",
    "load_submission",
    "main",
    "rpc_error",
]
