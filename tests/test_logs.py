"""The log line renderer: one event, one line, whatever a caller put in its values."""

from __future__ import annotations

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
