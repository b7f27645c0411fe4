"""The log line renderer: one event, one line, whatever a caller put in its values."""

from __future__ import annotations

import logging
import re

import pytest

from dtm import logs


def render(**event: object) -> str:
    return str(logs._render(None, "info", {"component": "coordinator", **event}))


def test_a_value_cannot_end_the_line_and_forge_the_next() -> None:
    forged = "x\n2026-11-29T00:00:00.000Z ERROR   coordinator: commit decision lost txn=t-42"
    line = render(event="outcome asked", txn=forged, participant="a\rb")
    assert "\n" not in line and "\r" not in line
    assert "txn='x\\n2026" in line and "participant='a\\rb'" in line


def test_plain_values_stay_bare_and_spaced_ones_are_quoted() -> None:
    line = render(
        event="transaction finished", txn="t-1", outcome="committed", reason="out of stock"
    )
    assert line.endswith(
        "coordinator: transaction finished txn=t-1 outcome=committed reason='out of stock'"
    )


def test_standard_library_records_get_the_same_line_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("inventory", "INFO")
    logs.configure("inventory", "INFO")  # again: still one line per record
    wal_logger = logging.getLogger("dtm.wal")
    wal_logger.warning("write-ahead log %s: torn write at byte offset %d", "/d/wal/1.wal", 96)
    wal_logger.info("recovered")
    wal_logger.debug("not at INFO")
    lines = capsys.readouterr().err.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert 2 == len(lines), lines
    assert re.fullmatch(
        stamp + r" WARNING inventory: write-ahead log /d/wal/1\.wal: torn write at byte "
        r"offset 96 logger=dtm\.wal",
        lines[0],
    ), lines[0]
    assert re.fullmatch(stamp + r" INFO    inventory: recovered logger=dtm\.wal", lines[1])
