"""Commands on heuristic outcomes: heuristics, heuristics forget.

Part of `dtm.cli`: see its docstring."""

from __future__ import annotations

import sys

import grpc

from dtm import limits
from dtm.cli import tables as fmt
from dtm.cli.session import (
    EXIT_OK,
    CliError,
    Session,
    rpc_error,
)
from dtm.coordinator.heuristics import UNKNOWN_ATTEMPT
from dtmpb.v1 import (
    coordinator_pb2,
)

# ---- heuristic outcomes ----


def cmd_heuristics(session: Session) -> int:
    response = session.call_coordinator(
        "ListHeuristics", coordinator_pb2.ListHeuristicsRequest(limit=session.options.limit)
    )
    found = list(response.heuristics)
    if session.json:
        fmt.emit_json([fmt.heuristic_dict(h) for h in found], session.out)
        if response.total > len(found):
            # The list is the JSON contract; that it is cut goes where the table says it.
            print(
                f"dtm: note: {len(found)} of {response.total} heuristic outcomes listed: "
                f"{_how_to_see_more(len(found), session.options.limit)}",
                file=sys.stderr,
            )
        return EXIT_OK
    if not found:
        # Not "every branch followed its decision": a forced branch reaches this list once its
        # Commit or Rollback, or its participant's report after an inquiry, reached the
        # coordinator; until then its participant keeps it awaiting.
        print(
            "no heuristic outcomes known to the coordinator; forced branches not yet "
            "reconciled with it are listed by `dtm branches --awaiting`",
            file=session.out,
        )
        return EXIT_OK
    now = fmt.now_ms()
    fmt.table(
        [
            "TRANSACTION",
            "BRANCH",
            "ATTEMPT",
            "PARTICIPANT",
            "OUTCOME",
            "DECISION",
            "FOUND BY",
            "AGE",
            "DETAIL",
        ],
        [
            [
                h.transaction_id,
                h.branch,
                fmt.attempt(h),
                h.participant,
                h.outcome,
                fmt.outcome_name(h.decision),
                fmt.found_by(h),
                fmt.duration(fmt.age_s(h.recorded_at_unix_ms, now)),
                fmt.clip(h.detail) or "-",
            ]
            for h in found
        ],
        session.out,
    )
    if response.total > len(found):
        print(
            f"({len(found)} of {response.total}: "
            f"{_how_to_see_more(len(found), session.options.limit)})",
            file=session.out,
        )
    return EXIT_OK


def _how_to_see_more(listed: int, asked: int) -> str:
    """What shows the heuristic outcomes beyond the `listed` oldest, `asked` for: a larger
    --limit, up to the most one answer holds; past that (the coordinator keeps up to
    HEURISTICS_KEPT_MAX, and lists fewer than asked when they would not fit one message),
    only forgetting the oldest, once reconciled, brings the next into the list."""
    if listed >= asked and listed < limits.LIST_TRANSACTIONS_LIMIT_MAX:
        return "--limit for more"
    return (
        f"{listed:,}, the oldest, are the most listed at once: "
        "forget those reconciled (dtm heuristics forget ID BRANCH) to list the next"
    )


def cmd_heuristics_forget(session: Session) -> int:
    options = session.options
    request = coordinator_pb2.ForgetHeuristicRequest(
        transaction_id=options.id, branch=options.branch
    )
    if options.attempt is not None:  # set, even empty (`--attempt -`: an unknown attempt)
        request.transaction_fingerprint = options.attempt
    try:
        response = session.coordinator.ForgetHeuristic(request, timeout=session.timeout)
    except grpc.RpcError as error:
        address = session.coordinator_address
        if isinstance(error, grpc.Call) and error.code() is grpc.StatusCode.NOT_FOUND:
            # Its own message names the API call (ListHeuristics); here, the command.
            of_attempt = (
                ""
                if options.attempt is None
                else f" of attempt {options.attempt.hex() or UNKNOWN_ATTEMPT}"
            )
            raise CliError(
                f"the coordinator at {address} keeps no heuristic outcome{of_attempt} for "
                f"{options.id}/{options.branch}: never recorded, or already forgotten "
                "(`dtm heuristics` lists them)"
            ) from None
        raise rpc_error(error, "the coordinator", address, session) from None
    if session.json:
        fmt.emit_json(fmt.heuristic_dict(response.forgotten), session.out)
        return EXIT_OK
    forgotten = response.forgotten
    print(
        f"forgot the {forgotten.outcome} of {forgotten.transaction_id}/{forgotten.branch} "
        f"at {forgotten.participant} (attempt {fmt.attempt(forgotten)})",
        file=session.out,
    )
    return EXIT_OK
