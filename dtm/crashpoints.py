"""Named crash points: places where a process can be made to die abruptly (os._exit, no
cleanup, no flush), to prove recovery from a crash at every step of a transaction.

Armed by the environment variable DTM_CRASH_AT="<point>" (die at its first hit) or
"<point>@<n>" (die at its n-th hit). Off by default; when off, `hit` costs one global load and
one comparison. `python -m dtm.crashpoints` lists them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

CRASH_EXIT_STATUS = 86
ENVIRONMENT_VARIABLE = "DTM_CRASH_AT"

POINTS: dict[str, str] = {
    # coordinator
    "coordinator.after_vote_received": "a vote arrived, not yet counted",
    "coordinator.before_decision_write": "every vote PREPARED, commit record not yet appended",
    "coordinator.after_decision_write": "commit record appended, fsync not yet done",
    "coordinator.after_decision_durable": "commit durable; no Commit sent, client not answered",
    "coordinator.after_client_reply": "20 ms after the client was answered; phase 2 in flight",
    "coordinator.mid_phase_two": "a Commit acknowledged, not yet counted (others may be pending)",
    "coordinator.before_end_record": "every Commit acknowledged, end record not yet written",
    "coordinator.after_abort_decided": "abort decided, rollbacks not yet sent",
    "coordinator.during_recovery": "log replayed, recovered commits not yet resumed",
    # participant (any service)
    "participant.before_prepare_record": "prepare applied in memory, record not yet appended",
    "participant.after_prepare_record": "prepare record appended, fsync not yet done",
    "participant.after_prepare_durable": "prepare record durable, PREPARED vote not yet sent",
    "participant.after_commit_durable": "commit record durable, acknowledgement not yet sent",
    "participant.after_rollback_applied": "rollback applied, acknowledgement not yet sent",
    "participant.during_recovery": "log replayed, not yet serving",
    # the log, in any process
    "wal.before_fsync": "records written to the OS, fsync not yet called",
    "wal.after_fsync": "fsync done, waiters not yet released",
}


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition("@")
    if name not in POINTS:
        known = ", ".join(sorted(POINTS))
        raise SystemExit(f"{ENVIRONMENT_VARIABLE}={value!r}: unknown crash point (known: {known})")
    if count and (not count.isdigit() or int(count) < 1):
        raise SystemExit(f"{ENVIRONMENT_VARIABLE}={value!r}: the count after @ must be >= 1")
    return name, int(count or 1)


_armed = _parse(os.environ.get(ENVIRONMENT_VARIABLE))
ARMED: str | None = _armed[0] if _armed else None
_remaining = _armed[1] if _armed else 0


_before_exit: list[Callable[[str], None]] = []


def before_exit(hook: Callable[[str], None]) -> None:
    """Run `hook(point)` when a crash point fires, just before the exit (a test mode: see
    dtm.wal.LOSE_UNSYNCED_VARIABLE)."""
    _before_exit.append(hook)


def hit(name: str) -> None:
    """Die here if this point is armed (and its count is reached)."""
    if name != ARMED:
        return
    _die(name)


def _die(name: str) -> None:
    global _remaining
    assert name in POINTS, f"unregistered crash point {name}"
    _remaining -= 1
    if _remaining > 0:
        return
    os.write(2, f"crash point {name} hit: exiting abruptly\n".encode())
    for hook in _before_exit:
        hook(name)
    os._exit(CRASH_EXIT_STATUS)


def main() -> int:
    width = max(map(len, POINTS))
    for name, description in POINTS.items():
        print(f"{name:<{width}}  {description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
