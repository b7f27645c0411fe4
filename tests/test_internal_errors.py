"""A bug in background work must not pass in silence, nor stop what keeps the protocol live.

Each test injects an exception where only a bug could raise one, and checks that it reaches
the log with its traceback and that the work goes on: the transaction gets an answer, the
participant's housekeeping keeps ticking.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dtm import logs
from dtmpb.v1 import coordinator_pb2
from tests.harness import InProcessCluster, eventually, order_branches


def test_a_failed_background_task_is_logged_with_its_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def broken() -> None:
        raise RuntimeError("injected")

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(broken())
        await asyncio.wait([task])
        logs.report_failure(task, "test", "background work")

    asyncio.run(run())
    err = capsys.readouterr().err
    assert "ERROR   test: background work failed error='RuntimeError: injected'" in err
    assert "Traceback (most recent call last)" in err and "in broken" in err


def test_an_exchange_that_fails_inside_the_coordinator_aborts_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """Before, the batched call's task died with the exception and its items were never
    answered: the transaction waited for its timeout, and a commit would have waited forever."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, transaction_timeout_ms=30_000) as cluster:
            stub: Any = cluster.coordinator.engine.registry.port("inventory").client.stub
            real = stub.Exchange
            calls: list[int] = []

            def fails_once(request: Any, **kwargs: Any) -> Any:
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("injected")
                return real(request, **kwargs)

            stub.Exchange = fails_once
            first = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "t-1")
            assert coordinator_pb2.OUTCOME_ABORTED == first.outcome
            assert "internal error: RuntimeError: injected" in first.reason
            second = await cluster.submit(order_branches("o-2", [("sku-apple", 1)]), "t-2")
            assert coordinator_pb2.OUTCOME_COMMITTED == second.outcome, second.reason

    asyncio.run(scenario())


def test_a_housekeeping_tick_that_raises_is_logged_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ticks: list[int] = []

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides={"tick_ms": 20}) as cluster:
            server = cluster.participants["payment"]
            real = server._housekeeping_tick

            async def first_raises(stub: Any) -> None:
                ticks.append(1)
                if len(ticks) == 1:
                    raise RuntimeError("injected")
                await real(stub)

            monkeypatch.setattr(server, "_housekeeping_tick", first_raises)

            async def ticked_again() -> bool:
                return len(ticks) >= 3

            await eventually(ticked_again)

    asyncio.run(scenario())
    err = capsys.readouterr().err
    assert "housekeeping failed; it goes on at the next tick" in err
    assert "RuntimeError: injected" in err
