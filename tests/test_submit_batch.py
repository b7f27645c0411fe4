"""SubmitBatch: many independent transactions in one call, each answered as its own Submit would
be; and OrderClient's batching, which sends concurrent submits together."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from dtm import limits
from dtm.coordinator.server import fitted
from dtm.orderflow import OrderClient, SubmitResult
from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
from tests.harness import HeldPrepares, InProcessCluster, eventually, order_branches, pack, until

Code = grpc.StatusCode


def order(order_id: str, sku: str = "sku-apple", **fields: object) -> coordinator_pb2.SubmitRequest:
    return coordinator_pb2.SubmitRequest(
        transaction_id=f"txn-{order_id}",
        branches=order_branches(order_id, [(sku, 1)]),
        **fields,  # type: ignore[arg-type]
    )


def in_flight(client: OrderClient) -> Callable[[], Awaitable[bool]]:
    """For eventually(): the client's first SubmitBatch call has left."""

    async def first_call_sent() -> bool:
        return client.batches[0] >= 1

    return first_call_sent


def unknown_participant(order_id: str) -> coordinator_pb2.SubmitRequest:
    branch = coordinator_pb2.BranchRequest(
        participant="warehouse", operation=pack(shop_pb2.ReserveStock())
    )
    return coordinator_pb2.SubmitRequest(transaction_id=f"txn-{order_id}", branches=[branch])


async def unary_answer(
    cluster: InProcessCluster, request: coordinator_pb2.SubmitRequest
) -> tuple[int, str]:
    """(code, status message) of the unary Submit of `request`: what a batch must repeat."""
    try:
        await cluster.client.Submit(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code().value[0], error.details() or ""
    return 0, ""


def test_each_transaction_of_a_batch_is_answered_as_its_own_submit_would_be(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, stock={"sku-apple": 10, "sku-pear": 0}) as cluster:
            refused = [
                unknown_participant("o-nowhere"),
                coordinator_pb2.SubmitRequest(transaction_id="bad id!", branches=[]),
                coordinator_pb2.SubmitRequest(transaction_id="txn-empty"),
                order("o-too-long", timeout_ms=limits.TRANSACTION_TIMEOUT_MS_MAX + 1),
            ]
            batch = [order("o-1"), order("o-2"), order("o-pear", sku="sku-pear"), *refused]
            # The same transaction twice in one call: it runs once, both get its outcome.
            batch.append(order("o-1"))
            response = await cluster.client.SubmitBatch(
                coordinator_pb2.SubmitBatchRequest(transactions=batch), timeout=30
            )
            results = list(response.results)
            assert len(batch) == len(results)
            first, second, pear, *bad, again = results
            for result, order_id in ((first, "o-1"), (second, "o-2"), (again, "o-1")):
                assert 0 == result.code, result.message
                assert f"txn-{order_id}" == result.response.transaction_id
                assert coordinator_pb2.OUTCOME_COMMITTED == result.response.outcome
            assert 0 == pear.code
            assert coordinator_pb2.OUTCOME_ABORTED == pear.response.outcome
            assert "sku-pear" in pear.response.reason
            # Bad input: the code and message the unary Submit gives, with nothing run.
            codes = [Code.NOT_FOUND, *[Code.INVALID_ARGUMENT] * 3]
            for request, result, code in zip(refused, bad, codes, strict=True):
                assert code.value[0] == result.code, result.message
                assert not result.HasField("response")
                assert (result.code, result.message) == await unary_answer(cluster, request)

            # Phase 2 reaches the services after the answer: wait for it.
            async def applied_once() -> bool:
                apple = (await cluster.stock())["sku-apple"]
                confirmed = {
                    order_id
                    for order_id, placed in (await cluster.orders()).items()
                    if placed.state == shop_pb2.ORDER_STATE_CONFIRMED
                }
                return (apple.available, apple.sold, confirmed) == (8, 2, {"o-1", "o-2"})

            await eventually(applied_once)

    asyncio.run(scenario())


@pytest.mark.parametrize("count", [0, limits.SUBMIT_BATCH_MAX + 1])
def test_a_batch_outside_its_bounds_is_refused_whole_and_runs_nothing(
    tmp_path: Path, count: int
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            batch = [order(f"o-{index}") for index in range(count)]
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await cluster.client.SubmitBatch(
                    coordinator_pb2.SubmitBatchRequest(transactions=batch), timeout=30
                )
            assert Code.INVALID_ARGUMENT == raised.value.code()
            assert f"1..{limits.SUBMIT_BATCH_MAX}" in (raised.value.details() or "")
            assert "nothing was run" in (raised.value.details() or "")
            assert not await cluster.orders()
            assert not cluster.coordinator.engine.counters.committed

    asyncio.run(scenario())


def test_a_batching_client_sends_concurrent_submits_in_one_call(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            client = OrderClient(cluster.coordinator_address, batch_in_flight=1)
            async with client:
                requests = [order(f"o-{index}") for index in range(20)]
                requests.append(unknown_participant("o-nowhere"))
                results = await asyncio.gather(*map(client.submit, requests))
                # Submitted in one event-loop iteration: they left together.
                assert (1, 21) == client.batches
            *committed, refused = results
            assert all(result.committed for result in committed), [r.reason for r in results]
            assert [f"txn-o-{index}" for index in range(20)] == [
                result.transaction_id for result in committed
            ]
            assert Code.NOT_FOUND == refused.code
            assert refused.response is None
            assert (Code.NOT_FOUND.value[0], refused.message) == await unary_answer(
                cluster, requests[-1]
            )

            async def all_sold() -> bool:
                return 20 == (await cluster.stock())["sku-apple"].sold

            await eventually(all_sold)

    asyncio.run(scenario())


def test_a_large_transaction_leaves_alone_so_a_batch_always_fits_one_message(
    tmp_path: Path,
) -> None:
    """80 transactions of 60 KB each fit a Submit alone, not one SubmitBatch (4 MiB): batched
    together, all got a final RESOURCE_EXHAUSTED from the client's own gRPC layer."""

    def large(index: int) -> coordinator_pb2.SubmitRequest:
        request = order(f"o-large-{index}")
        # An unknown field of 60,000 bytes (number 99): parsed and ignored by the service.
        request.branches[0].operation.value += b"\x9a\x06\xe0\xd4\x03" + b"x" * 60_000
        return request

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, stock={"sku-apple": 1_000}) as cluster:
            client = OrderClient(cluster.coordinator_address, batch_in_flight=1)
            async with client:
                results = await asyncio.gather(*(client.submit(large(i)) for i in range(80)))
                small = await asyncio.gather(*(client.submit(order(f"o-{i}")) for i in range(3)))
                assert (1, 3) == client.batches  # only the small ones were batched
            assert all(result.committed for result in results + small), {
                result.message for result in results
            }

    asyncio.run(scenario())


def test_submits_queue_behind_the_calls_in_flight_and_leave_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Payment's votes wait for the test: the first call stays in flight while it looks.
    payment = HeldPrepares(monkeypatch, "payment")

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            async with OrderClient(cluster.coordinator_address, batch_in_flight=1) as client:
                first = asyncio.ensure_future(client.submit(order("o-first")))
                await eventually(in_flight(client))
                later = [asyncio.ensure_future(client.submit(order(f"o-{i}"))) for i in range(5)]
                batcher = client._batcher
                assert batcher is not None
                await until(lambda: 5 == batcher.queued)  # each task has queued its Submit
                # One call in flight at most: the five wait, unsent, for the first to return.
                assert (1, 1) == client.batches
                assert not any(submit.done() for submit in (first, *later))
                await payment.run()
                results: list[SubmitResult] = await asyncio.gather(first, *later)
                assert (2, 6) == client.batches
            assert all(result.committed for result in results)

    asyncio.run(scenario())


def test_closing_a_batching_client_answers_what_it_never_sent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            client = OrderClient(cluster.coordinator_address, batch_in_flight=1)
            first = asyncio.ensure_future(client.submit(order("o-sent")))
            await eventually(in_flight(client))
            queued = asyncio.ensure_future(client.submit(order("o-never")))
            await asyncio.sleep(0)  # queued behind it
            await client.close()  # waits for the call in flight, answers the queued one
            assert (await first).committed
            never = await queued
            assert Code.CANCELLED == never.code
            assert "o-never" not in await cluster.orders()

    asyncio.run(scenario())


def test_a_batching_client_reports_a_failed_call_for_every_transaction_in_it() -> None:
    async def scenario() -> None:
        # Nothing listens there: the call fails, and each transaction gets its status.
        async with OrderClient("127.0.0.1:1", batch_in_flight=2) as client:
            results = await asyncio.gather(
                *(client.submit(order(f"o-{index}"), timeout_s=2) for index in range(3))
            )
        assert {Code.UNAVAILABLE} == {result.code for result in results}
        assert ["txn-o-0", "txn-o-1", "txn-o-2"] == [r.transaction_id for r in results]

    asyncio.run(scenario())


def test_a_negative_number_of_calls_in_flight_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_in_flight"):
        OrderClient("127.0.0.1:1", batch_in_flight=-1)


class _BrokenStub:
    """A SubmitBatch that fails in the client, outside gRPC's statuses."""

    async def SubmitBatch(self, request: object, **call_options: object) -> None:
        raise RuntimeError("broken")


def test_a_batch_that_fails_outside_grpc_still_answers_each_transaction() -> None:
    # (A channel its owner closed, which this test used, raises UsageError now, as the unary
    # path does: see test_client_retry.)
    async def scenario() -> None:
        client = OrderClient("127.0.0.1:1", batch_in_flight=1)
        client.stub = _BrokenStub()  # type: ignore[assignment]
        result = await asyncio.wait_for(client.submit(order("o-1")), timeout=5)
        assert grpc.StatusCode.UNKNOWN == result.code
        assert "SubmitBatch failed in the client: RuntimeError: broken" in result.message
        await client.close()

    asyncio.run(scenario())


def test_a_closed_batching_client_answers_at_once_and_sends_nothing() -> None:
    async def scenario() -> None:
        client = OrderClient("127.0.0.1:1", batch_in_flight=1)
        await client.close()
        result = await asyncio.wait_for(client.submit(order("o-late")), timeout=5)
        assert grpc.StatusCode.CANCELLED == result.code
        assert (0, 0) == client.batches

    asyncio.run(scenario())


def test_each_batched_submit_keeps_its_own_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Payment's votes wait for the test: the call cannot end before the hasty one's deadline.
    payment = HeldPrepares(monkeypatch, "payment")

    async def scenario() -> None:
        async with (
            InProcessCluster(
                tmp_path, prepare_timeout_ms=30_000, transaction_timeout_ms=30_000
            ) as cluster,
            OrderClient(cluster.coordinator_address, batch_in_flight=1) as client,
        ):
            patient = asyncio.ensure_future(client.submit(order("o-patient"), timeout_s=30))
            hasty = await client.submit(order("o-hasty"), timeout_s=0.3)
            # Both travelled in one call, which lasts as long as the patient one allows:
            # the hasty one was answered at its own deadline, while the call was held.
            assert (1, 2) == client.batches
            assert grpc.StatusCode.DEADLINE_EXCEEDED == hasty.code
            assert not payment.ended.is_set()
            await payment.run()
            assert (await patient).committed

    asyncio.run(scenario())


def test_an_answer_too_large_for_one_message_keeps_every_outcome() -> None:
    long_reason = "x" * 2_000
    results = [
        coordinator_pb2.SubmitResult(
            response=coordinator_pb2.SubmitResponse(
                transaction_id=f"txn-{index}",
                outcome=coordinator_pb2.OUTCOME_ABORTED,
                reason=long_reason,
                branches=[
                    coordinator_pb2.BranchStatus(branch=b, reason=long_reason, last_error="e")
                    for b in range(limits.BRANCHES_PER_TRANSACTION_MAX)
                ],
            )
        )
        for index in range(limits.SUBMIT_BATCH_MAX)
    ]
    results.append(coordinator_pb2.SubmitResult(code=3, message=long_reason))
    big = coordinator_pb2.SubmitBatchResponse(results=results)
    assert big.ByteSize() > limits.MESSAGE_BYTES_MAX
    answer = fitted(big)
    assert answer.ByteSize() < limits.MESSAGE_BYTES_MAX
    assert [r.response.outcome for r in answer.results[:-1]] == [
        coordinator_pb2.OUTCOME_ABORTED
    ] * limits.SUBMIT_BATCH_MAX
    assert answer.results[0].response.reason.startswith("xxx")
    assert (3, False) == (answer.results[-1].code, answer.results[-1].HasField("response"))
    small = coordinator_pb2.SubmitBatchResponse(results=results[:2])
    assert small == fitted(coordinator_pb2.SubmitBatchResponse(results=results[:2]))


def test_a_submit_that_gives_up_while_queued_is_neither_sent_nor_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=500)
            async with OrderClient(cluster.coordinator_address, batch_in_flight=1) as client:
                slow = asyncio.ensure_future(client.submit(order("o-slow")))
                await eventually(in_flight(client))
                hasty = await client.submit(order("o-hasty"), timeout_s=0.1)  # queued behind
                assert (await slow).committed
                assert (1, 1) == client.batches  # the one call that was made
            assert grpc.StatusCode.DEADLINE_EXCEEDED == hasty.code
            assert "not sent" in hasty.message and "nothing ran" in hasty.message
            assert "o-hasty" not in await cluster.orders()

    asyncio.run(scenario())
