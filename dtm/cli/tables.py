"""Output helpers of the `dtm` command: plain-text tables for people, plain dicts for --json.

The JSON shapes are a contract for scripts: enum values are lower-case names without their
prefix ("committed", not "TRANSACTION_STATE_COMMITTED" or 4), times are Unix milliseconds
(numbers, not the strings protobuf's JSON mapping makes of int64), ages are seconds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from dtm.coordinator.heuristics import UNKNOWN_ATTEMPT
from dtmpb.v1 import coordinator_pb2, participant_pb2

#: Longest cell of a table column that holds free text (reasons, errors); --json has it whole.
CELL_CHARS_MAX = 60


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """'committed' for TransactionState 4: the value's name without `prefix`, lower case."""
    try:
        name: str = enum.Name(value)
    except ValueError:  # a value from a newer server
        return str(value)
    return name.removeprefix(prefix).lower()


def state_name(value: int) -> str:
    return enum_name(coordinator_pb2.TransactionState, value, "TRANSACTION_STATE_")


def vote_name(value: int) -> str:
    return "" if value == 0 else enum_name(coordinator_pb2.Vote, value, "VOTE_")


def outcome_name(value: int) -> str:
    return enum_name(coordinator_pb2.Outcome, value, "OUTCOME_")


def branch_state_name(value: int) -> str:
    return enum_name(participant_pb2.BranchState, value, "BRANCH_STATE_")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def age_s(since_unix_ms: int, now: int | None = None) -> float:
    if since_unix_ms <= 0:
        return 0.0
    return max(0.0, ((now_ms() if now is None else now) - since_unix_ms) / 1000)


def duration(seconds: float) -> str:
    """A short human duration: 0.4s, 12.3s, 4m05s, 3h07m, 2d04h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def clip(text: str, limit: int = CELL_CHARS_MAX) -> str:
    text = " ".join(text.split())  # one line per row, whatever the reason contains
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    for row in [list(headers), *cells]:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        print("  ".join([*padded, row[-1]]).rstrip(), file=out)


def emit_json(document: object, out: TextIO | None = None) -> None:
    print(json.dumps(document, indent=2, sort_keys=False), file=out or sys.stdout)


# ---- the JSON shapes ----


def branch_status_dict(branch: coordinator_pb2.BranchStatus) -> dict[str, Any]:
    return {
        "branch": branch.branch,
        "participant": branch.participant,
        "vote": vote_name(branch.vote) or None,
        "reason": branch.reason,
        "acknowledged": branch.acknowledged,
        "phase_two_attempts": branch.phase_two_attempts,
        "last_error": branch.last_error,
        "heuristic": branch.heuristic,
    }


def heuristic_dict(heuristic: coordinator_pb2.HeuristicOutcome) -> dict[str, Any]:
    return {
        "transaction_id": heuristic.transaction_id,
        "branch": heuristic.branch,
        "participant": heuristic.participant,
        "outcome": heuristic.outcome,
        "decision": outcome_name(heuristic.decision),
        "detail": heuristic.detail,
        "recorded_at_unix_ms": heuristic.recorded_at_unix_ms,
        "found_by_inquiry": heuristic.found_by_inquiry,
        "transaction_fingerprint": heuristic.transaction_fingerprint.hex(),
    }


#: Hex digits of a fingerprint the ATTEMPT column shows: enough to tell an id's attempts
#: apart (`dtm heuristics forget --attempt` takes them).
ATTEMPT_HEX_DIGITS = 12


def attempt(heuristic: coordinator_pb2.HeuristicOutcome) -> str:
    """The attempt of the transaction id a heuristic outcome belongs to ("-": not known)."""
    return heuristic.transaction_fingerprint.hex()[:ATTEMPT_HEX_DIGITS] or UNKNOWN_ATTEMPT


def found_by(heuristic: coordinator_pb2.HeuristicOutcome) -> str:
    """How the coordinator learned of a heuristic outcome: its participant's report after an
    inquiry, or phase 2 (a Commit, a Rollback or the one-phase probe answered with it)."""
    return "inquiry" if heuristic.found_by_inquiry else "phase 2"


def transaction_dict(txn: coordinator_pb2.Transaction, now: int | None = None) -> dict[str, Any]:
    return {
        "transaction_id": txn.transaction_id,
        "state": state_name(txn.state),
        "reason": txn.reason,
        "created_at_unix_ms": txn.created_at_unix_ms,
        "decided_at_unix_ms": txn.decided_at_unix_ms,
        "age_s": round(age_s(txn.created_at_unix_ms, now), 3),
        "timeout_ms": txn.timeout_ms,
        # The participant that showed an earlier attempt committed it ("" otherwise): the
        # state reads committed, while this attempt decided abort (its branches are told so).
        "committed_earlier": txn.committed_earlier,
        "phase_two_attempts": sum(b.phase_two_attempts for b in txn.branches),
        "branches": [branch_status_dict(b) for b in txn.branches],
    }


def branch_info_dict(participant: str, info: participant_pb2.BranchInfo) -> dict[str, Any]:
    return {
        "participant": participant,
        "transaction_id": info.transaction_id,
        "branch": info.branch,
        "state": branch_state_name(info.state),
        "reason": info.reason,
        "updated_at_unix_ms": info.updated_at_unix_ms,
        "heuristic": info.heuristic,
        "awaiting_coordinator": info.awaiting_coordinator,
        "forgotten": info.forgotten,
    }


def branch_heuristic(info: participant_pb2.BranchInfo) -> str:
    """A forced outcome, and whether the branch is kept for its coordinator."""
    if not info.heuristic:
        return "-"
    if info.awaiting_coordinator:
        return f"{info.heuristic} (awaiting coordinator)"
    if info.forgotten:
        return f"{info.heuristic} (forgotten)"
    return info.heuristic


def lock_dict(participant: str, lock: participant_pb2.LockInfo) -> dict[str, Any]:
    return {
        "participant": participant,
        "resource": lock.resource,
        "mode": lock.mode,
        "holders": list(lock.holders),
        "held_since_unix_ms": lock.held_since_unix_ms,
        "held_for_s": round(age_s(lock.held_since_unix_ms), 3),
        "waiters": list(lock.waiters),
        # The lists name the first LOCK_OWNERS_LISTED_MAX (0: a participant older than these).
        "holders_total": max(lock.holders_total, len(lock.holders)),
        "waiters_total": max(lock.waiters_total, len(lock.waiters)),
    }


# ---- summaries for table cells ----


def owners(listed: Sequence[str], total: int) -> str:
    """'a, b (+3 more)': the owners a participant listed of a lock's `total` (ListLocks lists
    the first LOCK_OWNERS_LISTED_MAX of its holders and of its waiters)."""
    text = ", ".join(listed)
    hidden = total - len(listed)
    return f"{text} (+{hidden} more)" if hidden > 0 else text


def branches_summary(txn: coordinator_pb2.Transaction) -> str:
    """'4: 3 prepared, 1 refused' (+ ', 2/3 acked' once phase 2 matters)."""
    votes: dict[str, int] = {}
    for branch in txn.branches:
        name = vote_name(branch.vote) or "no vote"
        votes[name] = votes.get(name, 0) + 1
    parts = [f"{count} {name}" for name, count in votes.items()]
    updating = [b for b in txn.branches if b.vote == coordinator_pb2.VOTE_PREPARED]
    if updating and txn.state in (
        coordinator_pb2.TRANSACTION_STATE_COMMITTING,
        coordinator_pb2.TRANSACTION_STATE_COMMITTED,
    ):
        acked = sum(1 for b in updating if b.acknowledged)
        parts.append(f"{acked}/{len(updating)} acked")
    return f"{len(txn.branches)}: {', '.join(parts)}"


def last_error(txn: coordinator_pb2.Transaction) -> str:
    for branch in txn.branches:
        if branch.last_error:
            return f"{branch.participant}: {branch.last_error}"
    return ""


def key_values(pairs: Mapping[str, object], out: TextIO) -> None:
    width = max(len(key) for key in pairs)
    for key, value in pairs.items():
        print(f"{key.ljust(width)}  {value}", file=out)
