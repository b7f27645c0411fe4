"""Structured logging for every process: one line per event, `key=value` pairs, and every line
about a transaction carries `txn=<id>`, so `grep txn=<id>` over all the logs traces it.

structlog is used because its filtering bound logger makes a disabled level nearly free, which
matters on the hot path of a transaction (per-RPC lines are DEBUG).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

_configured = False
_level = logging.INFO


def _render(logger: Any, method_name: str, event: MutableMapping[str, Any]) -> str:
    """One key=value line. Hand-rolled because it runs for every line on the hot path: about
    three times cheaper than TimeStamper plus KeyValueRenderer."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    head = (
        f"{stamp}.{int(now % 1 * 1000):03d}Z {method_name.upper():<7} "
        f"{event.pop('component', '-')}: {event.pop('event', '')}"
    )
    transaction = event.pop("txn", None)
    if transaction is not None:
        head += f" txn={_value(transaction)}"
    # An exception to show with its traceback (a bug, on an error path): the one place where
    # an event takes more than one line.
    error = event.pop("exc_info", None)
    line = head + "".join(
        f" {key}={_value(value)}" for key, value in event.items() if value is not None
    )
    if isinstance(error, BaseException):
        line += "\n" + "".join(traceback.format_exception(error)).rstrip()
    return line


def _value(value: object) -> str:
    """A value as one greppable token. Text with a space, or with a newline or another control
    character, is quoted and escaped (repr): a value from a caller (an id, a name) must not be
    able to end the line and forge the next."""
    if isinstance(value, str) and (" " in value or not value.isprintable()):
        return repr(value)
    return str(value)


class _Stderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured: a
    process (or a test's capture) that replaces it later still gets the lines."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _StandardHandler(logging.Handler):
    """Renders what is logged through the standard library (dtm.wal's torn-tail and fatal
    fsync lines, asyncio's errors) as the structlog lines are, to the same stream: without
    it they came out bare through Python's last-resort handler, with no time, level or
    component, and `grep WARNING` missed them."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            event: dict[str, Any] = {
                "component": self.component,
                # One event, one line, even when a message carries a newline.
                "event": message if message.isprintable() else repr(message),
                "logger": record.name,
            }
            if record.exc_info is not None and record.exc_info[1] is not None:
                event["exc_info"] = record.exc_info[1]
            _Stderr().write(_render(None, record.levelname, event) + "\n")
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        sys.stderr.flush()


_standard_handler: _StandardHandler | None = None


def _configure_standard_logging(component: str, level: int) -> None:
    """Route the standard library's records through _StandardHandler (once: a second
    configure replaces the handler rather than adding one)."""
    global _standard_handler
    root = logging.getLogger()
    if _standard_handler is not None:
        root.removeHandler(_standard_handler)
    _standard_handler = _StandardHandler(component)
    root.addHandler(_standard_handler)
    # Our own modules follow DTM_LOG_LEVEL; other libraries keep the root's WARNING.
    logging.getLogger("dtm").setLevel(level)


def configure(component: str, level: str | None = None) -> None:
    """Configure once per process; DTM_LOG_LEVEL overrides the default INFO."""
    global _configured, _level
    name = (level or os.environ.get("DTM_LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelNamesMapping().get(name)
    if numeric is None:
        raise ValueError(f"unknown log level {name!r}: use DEBUG, INFO, WARNING or ERROR")
    structlog.configure(
        processors=[_render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=True,
    )
    _configure_standard_logging(component, numeric)
    _configured = True
    _level = numeric
    get(component)


def debug_enabled() -> bool:
    """Whether DEBUG lines are written: hot paths test this once instead of building the
    arguments of a line that would be dropped."""
    return _level <= logging.DEBUG


def retry_warns(attempt: int) -> bool:
    """Whether the failure of `attempt` (1, 2, ...) of something retried for as long as it
    fails is worth a WARNING: attempts 1, 2, 4, 8... are, the others are DEBUG. The lines grow
    with the log of an outage's length, not with its length: one a second for a day is 86,400
    lines, this is 17."""
    return attempt & (attempt - 1) == 0  # a power of two


def report_failure(task: asyncio.Task[Any], component: str, what: str) -> None:
    """For the done-callback of background work nobody awaits: its exception, if any, goes to
    the log with its traceback. Otherwise asyncio mentions it only when the task is collected,
    and outside these logs: a bug would pass unseen. (Cheap when there is none: it runs for
    every such task.)"""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        get(component).error(
            f"{what} failed", error=f"{type(error).__name__}: {error}", exc_info=error
        )


def get(component: str, **context: Any) -> Any:
    """A logger bound to a component name (coordinator, inventory, ...)."""
    if not _configured:
        configure(component)
    return structlog.get_logger().bind(component=component, **context)
