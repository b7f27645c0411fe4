"""The heuristic outcomes the coordinator keeps until an operator forgets them.

A heuristic outcome is a branch that did not follow the decision, or whose outcome is unknown
(dtm.coordinator.ports.reported_heuristic). XA keeps them until they are forgotten, and so
does this table: it is rebuilt from the log (HeuristicRecorded, HeuristicForgotten) and from
checkpoints, so it outlives the transaction's own status (the coordinator forgets finished
transactions after FINISHED_TRANSACTIONS_KEPT newer ones) and restarts. No I/O here: the
engine logs, this keeps.

Kept per attempt: a transaction id can be run again (a late retry, other content under a
spent id), each attempt with its own fingerprint, and each attempt's branch its own heuristic
outcome. An empty fingerprint (a record from before the field, a report without one) cannot
tell attempts apart (`same_attempt`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from dtm import limits
from dtmpb.v1 import coordinator_pb2, log_pb2

Key = tuple[str, int, bytes]  # (transaction id, branch, transaction fingerprint)


def key_of(record: log_pb2.HeuristicRecorded | log_pb2.HeuristicForgotten) -> Key:
    return (record.transaction_id, record.branch, record.transaction_fingerprint)


#: How an outcome whose attempt is not known (kept with no fingerprint) is named: the ATTEMPT
#: column of `dtm heuristics`, and `dtm heuristics forget --attempt`.
UNKNOWN_ATTEMPT = "-"


def named_by(fingerprint: bytes, attempt: bytes | None) -> bool:
    """Whether a kept outcome's `fingerprint` is the attempt an operator named: any for None
    (none named), only an unknown one (no fingerprint) for empty, else one that starts with
    `attempt`. No prefix names an empty fingerprint, hence the empty attempt."""
    if attempt is None:
        return True
    if not attempt:
        return not fingerprint
    return fingerprint.startswith(attempt)


def same_attempt(fingerprint: bytes, other: bytes) -> bool:
    """Whether two fingerprints may name one attempt: equal, or either empty (unknown), as
    QueryOutcome takes them."""
    return not fingerprint or not other or fingerprint == other


class HeuristicTable:
    """Oldest first, at most `kept_max`: beyond, `keep` returns the oldest it dropped."""

    def __init__(self, kept_max: int = limits.HEURISTICS_KEPT_MAX) -> None:
        assert kept_max > 0
        self.kept_max = kept_max
        self._kept: OrderedDict[Key, log_pb2.HeuristicRecorded] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def __iter__(self) -> Iterator[log_pb2.HeuristicRecorded]:
        return iter(self._kept.values())

    def keep(self, record: log_pb2.HeuristicRecorded) -> list[log_pb2.HeuristicRecorded]:
        """Keep `record` (a newer one for the same branch and attempt replaces it); returns
        what the bound pushed out, oldest first."""
        key = key_of(record)
        self._kept.pop(key, None)
        self._kept[key] = record
        dropped: list[log_pb2.HeuristicRecorded] = []
        while len(self._kept) > self.kept_max:  # bounded: one iteration per insertion
            dropped.append(self._kept.popitem(last=False)[1])
        return dropped

    def get(self, key: Key) -> log_pb2.HeuristicRecorded | None:
        return self._kept.get(key)

    def of_branch(self, transaction_id: str, branch: int) -> list[log_pb2.HeuristicRecorded]:
        """Every attempt's outcome kept for the branch, oldest first. A scan, bounded by
        `kept_max`: only reports and forgets ask, never a transaction's own path."""
        return [
            record
            for (kept_id, kept_branch, _), record in self._kept.items()
            if kept_id == transaction_id and kept_branch == branch
        ]

    def forget(self, key: Key) -> log_pb2.HeuristicRecorded | None:
        return self._kept.pop(key, None)

    def clear(self) -> None:
        self._kept.clear()


def heuristic_pb(record: log_pb2.HeuristicRecorded) -> coordinator_pb2.HeuristicOutcome:
    """The public view of a kept record."""
    if record.one_phase_unknown:
        decision = coordinator_pb2.OUTCOME_UNKNOWN
    elif record.committed:
        decision = coordinator_pb2.OUTCOME_COMMITTED
    else:
        decision = coordinator_pb2.OUTCOME_ABORTED
    return coordinator_pb2.HeuristicOutcome(
        transaction_id=record.transaction_id,
        branch=record.branch,
        participant=record.participant,
        outcome=record.outcome,
        decision=decision,
        detail=record.detail,
        recorded_at_unix_ms=record.recorded_at_unix_ms,
        found_by_inquiry=record.found_by_inquiry,
        transaction_fingerprint=record.transaction_fingerprint,
    )
