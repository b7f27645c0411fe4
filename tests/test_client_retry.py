"""OrderClient.submit_until_known: the same Submit again while the outcome is open, never a
second execution, and never a retry of a final answer."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import limits
from dtm.orderflow import (
    BATCHED_REQUEST_BYTES_MAX,
    OrderClient,
    SubmitResult,
    order_request,
    transaction_id_for,
)
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2
from tests.harness import HeldPrepares, InProcessCluster, eventually, order_branches, until


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


def test_the_coordinators_limit_of_transactions_in_flight_is_waited_out(tmp_path: Path) -> None:
    """At that limit nothing ran and the answer is "retry shortly": before, the SDK took its
    RESOURCE_EXHAUSTED as final, and the second of two concurrent orders failed at once."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"in_flight_max": 1}
        ) as cluster:
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=100)
            async with OrderClient(cluster.coordinator_address) as client:
                results = await asyncio.gather(
                    *(
                        client.submit_until_known(
                            coordinator_pb2.SubmitRequest(
                                transaction_id=f"txn-o-{n}",
                                branches=order_branches(f"o-{n}", [("sku-apple", 1)]),
                            ),
                            backoff_s=(0.05, 0.1),
                        )
                        for n in range(2)
                    )
                )
            assert [True, True] == [result.committed for result in results]
            assert sum(result.attempts for result in results) > 2  # one was told to wait

    asyncio.run(scenario())


def test_a_closed_client_answers_cancelled_on_every_path() -> None:
    """Before, only a batching client's small requests got CANCELLED: the unary path (and a
    batching client's large requests) raised the channel's UsageError."""

    async def scenario() -> None:
        small = coordinator_pb2.SubmitRequest(transaction_id="txn-small")
        large = coordinator_pb2.SubmitRequest(
            transaction_id="txn-large",
            branches=order_branches("o-large", [(f"sku-{n:05}", 1) for n in range(100)]),
        )
        large.branches[1].operation.value = b"x" * (BATCHED_REQUEST_BYTES_MAX + 1)
        for batch_in_flight in (0, 1):
            client = OrderClient("127.0.0.1:1", batch_in_flight=batch_in_flight)
            await client.close()
            for request in (small, large):
                result = await client.submit(request)
                assert grpc.StatusCode.CANCELLED == result.code, (batch_in_flight, request)
                assert "closed" in result.message

    asyncio.run(scenario())


def test_a_request_without_an_id_is_named_before_it_is_sent_so_a_lost_answer_can_be_found() -> None:
    """A SubmitRequest without a transaction id let the coordinator pick one, which only its
    answer carried: a call that failed gave back an empty id, nothing to look the
    transaction up by or to submit again with (found by a helper: "" UNAVAILABLE)."""

    async def scenario() -> None:
        unnamed = coordinator_pb2.SubmitRequest(branches=order_branches("o-u", [("sku-a", 1)]))
        for batch_in_flight in (0, 1):
            async with OrderClient("127.0.0.1:1", batch_in_flight=batch_in_flight) as client:
                first = await client.submit(unnamed, timeout_s=1)
                second = await client.submit(unnamed, timeout_s=1)
            assert first.code is not None and first.code != grpc.StatusCode.OK
            assert first.transaction_id.startswith("txn-"), first
            assert second.transaction_id.startswith("txn-") and second != first
            assert "" == unnamed.transaction_id  # the caller's request is left as it was

    asyncio.run(scenario())


def test_a_channel_its_owner_closed_raises_usage_error_batched_or_not() -> None:
    """A caller-owned channel the caller closed: the unary path raised grpc's UsageError, the
    batched path answered UNKNOWN "SubmitBatch failed in the client" with `sent` True (the
    transaction may have run), though nothing had left."""

    async def scenario() -> None:
        for batch_in_flight in (0, 1):
            channel = grpc.aio.insecure_channel("127.0.0.1:1")
            await channel.close()
            async with OrderClient(channel, batch_in_flight=batch_in_flight) as client:
                request = coordinator_pb2.SubmitRequest(transaction_id="txn-o-1")
                with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
                    await client.submit(request, timeout_s=5)
                assert (batch_in_flight, batch_in_flight) == client.batches

    asyncio.run(scenario())


class _SilentCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """Answers no Submit: each call stays in flight, `arrived` set once one has."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()

    async def _hold(self) -> Any:
        self.arrived.set()
        await asyncio.Event().wait()  # until the server stops

    async def Submit(self, request: Any, context: Any) -> coordinator_pb2.SubmitResponse:
        return await self._hold()

    async def SubmitBatch(self, request: Any, context: Any) -> coordinator_pb2.SubmitBatchResponse:
        return await self._hold()


def test_a_channel_its_owner_closes_mid_call_answers_cancelled_batched_or_not() -> None:
    """The owner closed its channel while a Submit was in flight: the batched path answered
    CANCELLED (it may have run), the unary path raised CancelledError in a task nobody had
    cancelled, as if the caller's own task had been."""

    async def scenario() -> None:
        coordinator = _SilentCoordinator()
        server = grpc.aio.server()
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for batch_in_flight in (0, 1):
                coordinator.arrived.clear()
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                async with OrderClient(channel, batch_in_flight=batch_in_flight) as client:
                    request = coordinator_pb2.SubmitRequest(transaction_id="txn-o-1")
                    submitted = asyncio.ensure_future(client.submit(request, timeout_s=30))
                    await coordinator.arrived.wait()
                    await channel.close()
                    result = await submitted
                assert (grpc.StatusCode.CANCELLED, True) == (result.code, result.sent)
                assert "txn-o-1" == result.transaction_id
                if not batch_in_flight:
                    assert "the channel was closed while the call was in flight" in result.message
        finally:
            await server.stop(0)

    asyncio.run(scenario())


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.inf, math.nan])
def test_a_deadline_no_call_can_keep_is_refused_before_anything_is_sent(timeout_s: float) -> None:
    """Before, grpc answered each of these DEADLINE_EXCEEDED, `sent` said the transaction may
    have run (for -1 it never left; for 0 it left, and could commit), and submit_until_known
    retried it `attempts` times as an open outcome."""

    async def scenario() -> None:
        for batch_in_flight in (0, 1):
            client = OrderClient("127.0.0.1:1", batch_in_flight=batch_in_flight)
            request = coordinator_pb2.SubmitRequest(transaction_id="txn-o-1")
            try:
                with pytest.raises(ValueError, match="timeout_s must be a positive, finite"):
                    await client.submit(request, timeout_s=timeout_s)
                with pytest.raises(ValueError, match="timeout_s must be a positive, finite"):
                    await client.submit_until_known(request, timeout_s=timeout_s)
                assert (0, 0) == client.batches
            finally:
                await client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "backoff_s", [(math.inf, math.inf), (0.05, math.inf), (-1.0, 1.0), (math.nan, 1.0), (2.0, 1.0)]
)
def test_a_backoff_that_would_hang_or_hammer_is_refused(backoff_s: tuple[float, float]) -> None:
    """Before, an infinite wait between two Submits slept forever (on the first retry),
    a negative one retried at once, and a first wait over the largest ignored the cap once."""

    async def scenario() -> None:
        client = OrderClient("127.0.0.1:1")
        await client.close()  # answers at once: only the check is under test
        request = coordinator_pb2.SubmitRequest(transaction_id="txn-o-1")
        with pytest.raises(ValueError, match="backoff_s must be"):
            await client.submit_until_known(request, backoff_s=backoff_s)

    asyncio.run(scenario())


class _HangingCoordinator:
    """A stub whose SubmitBatch calls never answer until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0
        self.carried: list[list[str]] = []  # the transaction ids of each call

    async def SubmitBatch(
        self, request: coordinator_pb2.SubmitBatchRequest, **call_options: object
    ) -> coordinator_pb2.SubmitBatchResponse:
        self.calls += 1
        self.carried.append([txn.transaction_id for txn in request.transactions])
        await self.release.wait()
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "late"
        )


def test_a_retry_that_never_left_does_not_say_nothing_ran_after_one_that_did() -> None:
    """The first Submit was sent and got no answer (it may have run); the retry queued behind
    that call still in flight and gave up unsent. submit_until_known returned the retry's
    answer as the last: "not sent: ... nothing ran", of a transaction that may have run."""

    async def scenario() -> None:
        client = OrderClient("127.0.0.1:1", batch_in_flight=1)
        coordinator = _HangingCoordinator()
        client.stub = coordinator  # type: ignore[assignment]
        request = coordinator_pb2.SubmitRequest(transaction_id="txn-o-1")
        try:
            result = await client.submit_until_known(
                request, attempts=2, timeout_s=0.05, backoff_s=(0.001, 0.001)
            )
        finally:
            coordinator.release.set()
            await client.close()
        assert 1 == coordinator.calls  # the retry never left
        assert (grpc.StatusCode.DEADLINE_EXCEEDED, 2) == (result.code, result.attempts)
        assert not result.known
        assert "an earlier attempt under this id was sent and may have run" in result.message
        assert "outcome is unknown" in result.message, result.message
        # Alone, an unsent attempt still says nothing ran.
        client = OrderClient("127.0.0.1:1", batch_in_flight=1)
        await client.close()
        alone = await client.submit_until_known(request, attempts=2)
        assert "nothing was sent" in alone.message and "earlier" not in alone.message

    asyncio.run(scenario())


def test_a_batching_client_queues_at_most_its_limit_and_says_the_rest_was_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While its SubmitBatch calls are in flight, a batching client queues the next
    transactions; nothing bounded that queue but the callers and their timeouts (behind a
    coordinator that hangs, every caller's request held for its whole timeout). Beyond
    CLIENT_SUBMITS_QUEUED_MAX a submit is answered at once: RESOURCE_EXHAUSTED, unsent."""
    monkeypatch.setattr(limits, "CLIENT_SUBMITS_QUEUED_MAX", 2)

    async def scenario() -> None:
        client = OrderClient("127.0.0.1:1", batch_in_flight=1)
        coordinator = _HangingCoordinator()
        client.stub = coordinator  # type: ignore[assignment]

        def submit(n: int) -> asyncio.Task[SubmitResult]:
            request = coordinator_pb2.SubmitRequest(transaction_id=f"txn-q-{n}")
            return asyncio.ensure_future(client.submit(request, timeout_s=5.0))

        try:
            in_flight = submit(0)
            await until(lambda: coordinator.calls == 1)  # its call holds the one slot
            queued = [submit(1), submit(2)]
            batcher = client._batcher
            assert batcher is not None
            await until(lambda: batcher.queued == 2)
            refused = await client.submit(
                coordinator_pb2.SubmitRequest(transaction_id="txn-q-3"), timeout_s=5.0
            )
        finally:
            coordinator.release.set()
        assert (grpc.StatusCode.RESOURCE_EXHAUSTED, False) == (refused.code, refused.sent)
        assert "not sent: 2 transactions already queue" in refused.message, refused.message
        assert "nothing ran" in refused.message
        for task in (in_flight, *queued):  # the others were sent and answered as before
            assert (await task).sent
        assert 2 == coordinator.calls
        await client.close()

    asyncio.run(scenario())


def test_submits_that_gave_up_while_queued_do_not_hold_the_queue_against_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A submit that gave up while queued (its deadline, or its task cancelled) stayed in the
    queue, counted against CLIENT_SUBMITS_QUEUED_MAX, until the call in flight returned:
    behind a slow call, callers who gave up filled it, and the next submit was refused
    RESOURCE_EXHAUSTED, "2 transactions already queue", with none waiting."""
    monkeypatch.setattr(limits, "CLIENT_SUBMITS_QUEUED_MAX", 2)

    async def scenario() -> None:
        client = OrderClient("127.0.0.1:1", batch_in_flight=1)
        coordinator = _HangingCoordinator()
        client.stub = coordinator  # type: ignore[assignment]

        def submit(name: str, timeout_s: float) -> asyncio.Task[SubmitResult]:
            request = coordinator_pb2.SubmitRequest(transaction_id=f"txn-{name}")
            return asyncio.ensure_future(client.submit(request, timeout_s=timeout_s))

        try:
            in_flight = submit("first", 5.0)
            await until(lambda: coordinator.calls == 1)  # its call holds the one slot
            hasty = await submit("hasty", 0.01)
            cancelled = submit("cancelled", 5.0)
            batcher = client._batcher
            assert batcher is not None
            await until(lambda: batcher.queued == 2)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            patient = submit("patient", 5.0)
            await until(lambda: patient.done() or batcher.queued == 1)
        finally:
            coordinator.release.set()
        assert (grpc.StatusCode.DEADLINE_EXCEEDED, False) == (hasty.code, hasty.sent)
        assert (await patient).sent, (await patient).message
        await in_flight
        assert [["txn-first"], ["txn-patient"]] == coordinator.carried
        await client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("method", ["submit", "submit_until_known"])
def test_closing_the_client_under_a_unary_submit_answers_cancelled_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Closing the channel cancels its calls, and grpc.aio then raises CancelledError in the
    caller's task, which nobody cancelled: the caller lost the answer as an exception (in a
    gather, its own cancellation) while the transaction committed (a bug hunt)."""

    async def scenario() -> None:
        # Payment's vote waits for the test: the Submit is in flight until it is released.
        payment = HeldPrepares(monkeypatch, "payment")
        async with InProcessCluster(
            tmp_path, prepare_timeout_ms=60_000, transaction_timeout_ms=60_000
        ) as cluster:
            client = OrderClient(cluster.coordinator_address)  # unary
            request = coordinator_pb2.SubmitRequest(
                transaction_id="txn-o-1",
                branches=order_branches("o-1", [("sku-apple", 1)], amount_cents=1),
            )
            caller = asyncio.ensure_future(getattr(client, method)(request))

            async def in_flight() -> bool:
                return "txn-o-1" in cluster.coordinator.engine.active

            await eventually(in_flight)
            await client.close()
            result = await caller
            assert grpc.StatusCode.CANCELLED == result.code
            assert "may have run" in result.message
            await payment.run()
            async with OrderClient(cluster.coordinator_address) as again:  # and it did
                assert (await again.submit_until_known(request)).committed

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("order_id", "readable"),
    [("o-1", True), ("alice@shop-1", False), ("p" * 124, True), ("p" * 125, False)],
)
def test_an_orders_default_transaction_id_is_always_valid_and_deterministic(
    order_id: str, readable: bool
) -> None:
    """An order id may hold "@" and 128 characters; `txn-` and such an id was refused as a
    malformed transaction id the caller never set."""
    request = order_request(order_id, "alice", "acct-alice", [("sku-apple", 1)], 100, "alice")
    assert limits.TRANSACTION_ID_PATTERN.fullmatch(request.transaction_id)
    assert (request.transaction_id == f"txn-{order_id}") is readable
    assert request.transaction_id == transaction_id_for(order_id)
    assert transaction_id_for(order_id) != transaction_id_for(order_id + "x")


def test_an_order_with_an_empty_transaction_id_is_refused_before_anything_is_built() -> None:
    """`transaction_id=""` went through: the coordinator named each Submit of the request
    anew, so a plain `submit` retry of an order whose answer was lost placed it twice."""
    with pytest.raises(ValueError, match=r"transaction_id is empty.*'txn-o-1'"):
        order_request(
            "o-1", "alice", "acct-alice", [("sku-apple", 1)], 100, "alice", transaction_id=""
        )
    chosen = order_request(
        "o-1", "alice", "acct-alice", [("sku-apple", 1)], 100, "alice", transaction_id="txn-a"
    )
    assert "txn-a" == chosen.transaction_id


def test_an_order_id_that_spells_anothers_digest_gets_its_own_transaction_id() -> None:
    """The digest form of a default id ("alice@shop-1" cannot be read into one) was `txn-`
    and 32 hex digits, which is also the readable form of the order id made of those digits
    (a uuid4().hex, say): the second order was refused, ALREADY_EXISTS, "choose a new id", by
    a client that chose none."""
    hashed = "alice@shop-1"
    spelled = transaction_id_for(hashed)[len("txn-") :]
    assert limits.RESOURCE_ID_PATTERN.fullmatch(spelled)
    assert transaction_id_for(spelled) != transaction_id_for(hashed)


def test_submits_waiting_for_one_transaction_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries of a transaction that is still running join it and wait for its answer. They
    are not transactions in flight, and nothing bounded them: a client could hold any number
    of calls, each with its request, on one transaction (found by a bug hunt)."""
    monkeypatch.setattr(limits, "SUBMITS_WAITING_PER_TRANSACTION_MAX", 2)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            engine = cluster.coordinator.engine
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=600)
            order = order_branches("o-j", [("sku-apple", 1)])
            first = asyncio.create_task(cluster.submit(order, "t-j"))

            async def running() -> bool:
                return "t-j" in engine.active

            await eventually(running)
            run = engine.active["t-j"]
            joined = [asyncio.create_task(cluster.submit(order, "t-j")) for _ in range(2)]

            async def both_wait() -> bool:
                return run.waiting == 2

            await eventually(both_wait)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await cluster.submit(order, "t-j")
            assert grpc.StatusCode.RESOURCE_EXHAUSTED == refused.value.code()
            assert (refused.value.details() or "").startswith(
                "2 Submits under transaction id 't-j' already wait for it (the limit): nothing "
                "was run for this one"
            ), refused.value.details()
            answers = await asyncio.gather(first, *joined)
            assert 1 == len({answer.outcome for answer in answers})  # one transaction's answer
            assert 0 == run.waiting

    asyncio.run(scenario())
