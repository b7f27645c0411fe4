"""Structured logging for every process: key=value lines, each about a transaction carrying
`txn=<id>`, so that `grep txn=<id>` over all the processes' logs traces one transaction.

structlog is used because its filtering bound logger makes a disabled level nearly free, which
matters on the hot path of a transaction (per-RPC lines are DEBUG).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(component: str, level: str | None = None) -> None:
    """Configure once per process; DTM_LOG_LEVEL overrides the default INFO."""
    global _configured
    name = (level or os.environ.get("DTM_LOG_LEVEL", "INFO")).upper()
    numeric = logging.getLevelNamesMapping().get(name)
    if numeric is None:
        raise ValueError(f"unknown log level {name!r}: use DEBUG, INFO, WARNING or ERROR")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(
                key_order=["timestamp", "level", "component", "event", "txn"],
                drop_missing=True,
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    _configured = True
    get(component)


def get(component: str, **context: Any) -> Any:
    """A logger bound to a component name (coordinator, inventory, ...)."""
    if not _configured:
        configure(component)
    return structlog.get_logger().bind(component=component, **context)
