"""The log lines of phase-2 calls (Commit, Rollback, a one-phase probe) that fail: bounded per
participant. A participant stopped under load failed the Rollbacks of every abort a few times
each, a WARNING apiece: 6,474 lines in about 2 s for 1,079 aborted orders (found by a bug
hunt). Now each participant gets at most WARNINGS_PER_WINDOW failure WARNINGs per WINDOW_S;
the failures past them go to DEBUG (with their txn=, as before), and one WARNING at the end of
the window counts them. The first failure with a participant is always a WARNING (with its
txn=), and when the participant answers again one INFO line says after how many failures.
A transaction stays traceable: its id is on every failure at DEBUG and on its "transaction
finished" line (with phase_two_retries), and dtm_phase_two_retries_total counts every retry.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

WINDOW_S = 1.0
WARNINGS_PER_WINDOW = 5


@dataclass
class _Window:
    """One participant's WARNINGs since its window opened, and the failures held back."""

    closes: asyncio.TimerHandle | None
    warned: int = 0
    held: int = 0
    given_up: int = 0  # of the held ones: Rollbacks the coordinator stopped retrying
    # The transactions of the first and the last failure held back: where to start grepping.
    first_txn: str | None = None
    last_txn: str | None = None


class PhaseTwoFailures:
    def __init__(
        self,
        log: Any,
        window_s: float = WINDOW_S,
        warnings_per_window: int = WARNINGS_PER_WINDOW,
    ) -> None:
        self._log = log
        self.window_s = window_s
        self.warnings_per_window = warnings_per_window
        self._windows: dict[str, _Window] = {}
        # Failed phase-2 calls since the participant last answered one, by participant.
        self._failing: dict[str, int] = {}

    def failed(
        self, event: str, participant: str, warn: bool, given_up: bool = False, **fields: Any
    ) -> None:
        """A failed call: a WARNING if `warn` and the participant's window has room, else
        DEBUG (counted for the window's summary if it was worth a WARNING)."""
        self._failing[participant] = self._failing.get(participant, 0) + 1
        if warn:
            window = self._windows.get(participant) or self._open(participant)
            if window.warned < self.warnings_per_window:
                window.warned += 1
                self._log.warning(event, participant=participant, **fields)
                return
            window.held += 1
            window.given_up += given_up
            window.first_txn = window.first_txn or fields.get("txn")
            window.last_txn = fields.get("txn")
        self._log.debug(event, participant=participant, **fields)

    def answered(self, participant: str) -> None:
        """A phase-2 call the participant answered: if it had failed some, say it recovered."""
        failures = self._failing.pop(participant, None)
        if failures is None:
            return
        self.summarize(participant)
        self._log.info(
            "participant answers phase-2 calls again", participant=participant, failures=failures
        )

    def summarize(self, participant: str) -> None:
        """Close the participant's window: one WARNING counts the failures it held back."""
        window = self._windows.pop(participant, None)
        if window is None:
            return
        if window.closes is not None:
            window.closes.cancel()
        if window.held:
            self._log.warning(
                "more phase-2 calls failed, logged at DEBUG only",
                participant=participant,
                failures=window.held,
                rollbacks_given_up=window.given_up or None,
                first_txn=window.first_txn,
                last_txn=window.last_txn,
            )

    def close(self) -> None:
        """Write the summaries of the windows still open (a stop)."""
        for participant in list(self._windows):
            self.summarize(participant)

    def _open(self, participant: str) -> _Window:
        closes = asyncio.get_running_loop().call_later(self.window_s, self.summarize, participant)
        window = self._windows[participant] = _Window(closes)
        return window
