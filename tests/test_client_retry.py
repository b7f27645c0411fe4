"""OrderClient.submit_until_known: the same Submit again while the outcome is open, never a
second execution, and never a retry of a final answer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from dtm.orderflow import OrderClient
from dtmpb.v1 import coordinator_pb2
from tests.harness import InProcessCluster, eventually, order_branches


def test_a_submit_while_the_coordinator_is_down_is_retried_until_it_lands_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            # No id: the client names the transaction, or a retry could run it twice.
            request = coordinator_pb2.SubmitRequest(
                branches=order_branches("o-retried", [("sku-apple", 1)])
            )
            down = asyncio.Event()
            restart = asyncio.ensure_future(cluster.restart_coordinator(down_s=0.6, down=down))
            await down.wait()
            async with OrderClient(cluster.coordinator_address) as client:
                result = await client.submit_until_known(request, timeout_s=2)
            await restart
            assert result.committed, (result.code, result.message)
            assert result.attempts > 1  # the first Submits found nobody
            assert result.transaction_id.startswith("txn-")
            assert not request.transaction_id  # the caller's request is left as it was

            async def sold_once() -> bool:
                return 1 == (await cluster.stock())["sku-apple"].sold

            await eventually(sold_once)
            assert ["o-retried"] == list(await cluster.orders())

    asyncio.run(scenario())


def test_a_final_answer_is_never_retried(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, stock={"sku-apple": 0}) as cluster:
            async with OrderClient(cluster.coordinator_address) as client:
                refused = await client.submit_until_known(
                    coordinator_pb2.SubmitRequest(transaction_id="txn-empty")
                )
                aborted = await client.submit_until_known(
                    coordinator_pb2.SubmitRequest(
                        transaction_id="txn-o-none",
                        branches=order_branches("o-none", [("sku-apple", 1)]),
                    )
                )
            assert (grpc.StatusCode.INVALID_ARGUMENT, 1) == (refused.code, refused.attempts)
            assert aborted.aborted and 1 == aborted.attempts

    asyncio.run(scenario())


def test_retries_are_bounded_and_return_the_last_answer() -> None:
    async def scenario() -> None:
        async with OrderClient("127.0.0.1:1") as client:  # nothing listens there
            result = await client.submit_until_known(
                coordinator_pb2.SubmitRequest(transaction_id="txn-x"),
                attempts=3,
                timeout_s=1,
                backoff_s=(0.01, 0.02),
            )
        assert (grpc.StatusCode.UNAVAILABLE, 3) == (result.code, result.attempts)
        assert not result.known
        with pytest.raises(ValueError, match="attempts"):
            await client.submit_until_known(coordinator_pb2.SubmitRequest(), attempts=0)

    asyncio.run(scenario())
