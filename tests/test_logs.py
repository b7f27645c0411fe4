"""The log line renderer: one event, one line, whatever a caller put in its values."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from dtm import logs
from dtmpb.v1 import coordinator_pb2
from tests.harness import InProcessCluster, eventually, order_branches

COMMITTED = coordinator_pb2.OUTCOME_COMMITTED
ABORTED = coordinator_pb2.OUTCOME_ABORTED


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


def test_a_transaction_is_traced_into_every_participant_on_the_batched_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At DEBUG, each participant says what it voted and applied for each branch. Before, the
    lines existed on the unary path only: the coordinator's batched calls (every service's)
    left the participants' logs silent about every transaction."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            committed = order_branches("o-t", [("sku-apple", 1)])
            assert COMMITTED == (await cluster.submit(committed, "txn-traced")).outcome
            declined = order_branches("o-d", [("sku-apple", 1)], account="acct-blocked")
            assert ABORTED == (await cluster.submit(declined, "txn-declined")).outcome

            async def settled() -> bool:
                return not cluster.coordinator.engine.active

            await eventually(settled)

    logs.configure("coordinator", "DEBUG")
    try:
        asyncio.run(scenario())
    finally:
        logs.configure("coordinator", "INFO")
    lines = capsys.readouterr().err.splitlines()
    for service, branch in (("inventory", 0), ("orders", 1), ("payment", 2), ("notification", 3)):
        traced = [line for line in lines if f"{service}: " in line and "txn=txn-traced" in line]
        assert any(
            f"prepare answered txn=txn-traced branch={branch} vote=prepared" in line
            for line in traced
        ), (service, traced)
        assert any("commit applied txn=txn-traced" in line for line in traced), (service, traced)
    payment = [line for line in lines if "payment: " in line and "txn=txn-declined" in line]
    assert any("vote=refused" in line for line in payment), payment
