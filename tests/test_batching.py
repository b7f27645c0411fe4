"""The batcher (dtm.batcher.Batcher) and the coordinator's per-participant port that uses it,
with a fake send whose calls the test completes by hand, on a real event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from dtm import logs
from dtm.batcher import Batcher, BatchPolicy
from dtm.coordinator.ports import (
    HEURISTIC_METADATA_KEY,
    PREPARE_SEND_MARGIN_S,
    DecideItem,
    DecideResult,
    ParticipantPort,
    PrepareItem,
    PrepareResult,
)
from dtm.coordinator.registry import Registry
from dtm.core.branch import HEURISTIC_COMMIT
from dtm.core.transaction import Vote
from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
from tests.harness import HeldPrepares, InProcessCluster, eventually, order_branches, pack


class FakeCalls:
    """Records each call's batch; a call returns when the test resolves its future."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.pending: list[asyncio.Future[None]] = []

    async def send(self, batch: list[str]) -> None:
        self.batches.append(batch)
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        await future

    def finish_all(self) -> None:
        for future in self.pending:
            if not future.done():
                future.set_result(None)


def batcher(calls: FakeCalls, **policy: float) -> Batcher[str]:
    tasks: set[asyncio.Task[None]] = set()
    return Batcher(
        calls.send, BatchPolicy(**policy), tasks, urgent=lambda item: item.startswith("prepare")
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_items_queued_during_a_call_leave_together_in_the_next() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0)
        queue.add("prepare 1")
        await settle()
        for index in range(2, 6):
            queue.add(f"prepare {index}")
        await settle()
        assert [["prepare 1"]] == calls.batches  # one call in flight at most
        calls.finish_all()
        await settle()
        assert [["prepare 1"], [f"prepare {i}" for i in range(2, 6)]] == calls.batches
        assert (2, 5) == (queue.calls, queue.items)
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_linger_only_after_a_big_batch() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=50, linger_after_items=3)
        queue.add("prepare 1")
        await settle()
        queue.add("prepare 2")
        calls.finish_all()  # a batch of one returned: no sign of load, no wait
        await settle()
        assert 2 == len(calls.batches)
        for index in range(3, 6):
            queue.add(f"prepare {index}")
        calls.finish_all()
        await settle()
        assert 3 == len(calls.batches)  # [3, 4, 5]: a batch of three is load
        queue.add("prepare 6")
        calls.finish_all()
        await settle()
        assert 3 == len(calls.batches)  # lingering for more
        queue.add("prepare 7")
        await asyncio.sleep(0.08)
        assert ["prepare 6", "prepare 7"] == calls.batches[-1]
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_a_prepare_does_not_queue_behind_a_call_of_decisions_only() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0, decision_linger_ms=0)
        queue.add("decide 1")
        await settle()
        queue.add("decide 2")
        await settle()
        assert [["decide 1"]] == calls.batches  # decisions wait for the call slot
        queue.add("prepare 3")
        await settle()
        # A second call, taking everything queued, the prepare first: a client waits for it.
        assert [["decide 1"], ["prepare 3", "decide 2"]] == calls.batches
        queue.add("prepare 4")
        await settle()
        assert 2 == len(calls.batches)  # a prepare is in flight: no third call
        calls.finish_all()
        await settle()
        assert ["prepare 4"] == calls.batches[-1]
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_a_dropped_item_never_leaves_and_no_longer_opens_the_urgent_slot() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0, decision_linger_ms=0)
        queue.add("decision 0")
        await settle()  # a call of decisions only is in flight
        prepare = "prepare 2"
        queue.add("decision 1")
        queue.add(prepare)  # would take the slot beyond the limit ...
        queue.drop([prepare])  # ... but is dropped before its flush runs
        assert 1 == queue.queued
        await settle()
        assert [["decision 0"]] == calls.batches
        calls.finish_all()
        await settle()
        assert [["decision 0"], ["decision 1"]] == calls.batches
        assert [] == queue.close()
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_a_closed_batcher_sends_nothing_more_even_from_a_pending_linger() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=20, linger_after_items=1)
        queue.add("prepare 1")
        await settle()
        queue.add("prepare 2")
        calls.finish_all()  # the linger timer for "prepare 2" is now pending
        await settle()
        queue.close()
        await asyncio.sleep(0.05)
        assert [["prepare 1"]] == calls.batches

    asyncio.run(run())


def test_decisions_wait_for_a_prepare_to_ride_with() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0, decision_linger_ms=1_000)
        queue.add("decide 1")
        queue.add("decide 2")
        await settle()
        assert [] == calls.batches  # no client waits for them: they linger
        queue.add("prepare 3")
        await settle()
        # The prepare cut the wait short and took them along, in one call.
        assert [["decide 1", "decide 2", "prepare 3"]] == calls.batches
        calls.finish_all()
        await settle()
        queue.add("decide 3")
        calls.finish_all()
        await settle()
        assert 1 == len(calls.batches)  # a lone decision lingers after a call returns too
        queue.add("prepare 4")
        await settle()
        assert ["decide 3", "prepare 4"] == calls.batches[-1]
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_decisions_leave_alone_when_no_prepare_comes() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0, decision_linger_ms=20)
        queue.add("decide 1")
        await settle()
        assert [] == calls.batches
        await asyncio.sleep(0.06)  # bounded: the wait ends by itself
        assert [["decide 1"]] == calls.batches
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_a_prepare_does_not_cut_short_a_linger_under_load() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=50, linger_after_items=2, decision_linger_ms=50)
        queue.add("prepare 1")
        queue.add("prepare 2")
        await settle()
        queue.add("decide 1")
        calls.finish_all()  # a batch of two returned: load, so the next call lingers
        await settle()
        queue.add("prepare 3")
        await settle()
        assert 1 == len(calls.batches)  # the linger holds: this is how batches grow
        await asyncio.sleep(0.1)
        assert ["decide 1", "prepare 3"] == calls.batches[-1]
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_decisions_linger_after_any_batch_when_the_load_linger_is_off() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0, linger_after_items=1, decision_linger_ms=1_000)
        queue.add("prepare 1")
        await settle()
        queue.add("decide 1")
        calls.finish_all()  # a "big" batch returned, but there is no load linger to apply
        await settle()
        assert 1 == len(calls.batches)  # the decision waits for a prepare
        queue.add("prepare 2")
        await settle()
        assert ["decide 1", "prepare 2"] == calls.batches[-1]
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_hurry_ends_every_linger_now_and_later() -> None:
    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=1_000, linger_after_items=2, decision_linger_ms=1_000)
        queue.add("decide 1")
        await settle()
        assert [] == calls.batches  # lingering for a prepare
        queue.hurry()  # a graceful stop: phase 2 now, not calls saved
        await settle()
        assert [["decide 1"]] == calls.batches
        queue.add("prepare 2")
        queue.add("prepare 3")
        calls.finish_all()
        await settle()
        queue.add("decide 2")
        calls.finish_all()  # a batch of two returned: under load this would linger a second
        await settle()
        assert ["decide 2"] == calls.batches[-1]
        calls.finish_all()
        await settle()

    asyncio.run(run())


def test_a_hurried_registry_hurries_the_ports_it_makes_later_and_the_retired_ones() -> None:
    """A graceful stop hurries every port: those in use, those retired by a re-registration
    (calls in flight may still use them), and one made for a participant's first call during
    the stop. Each port here sends its decision at once instead of lingering for a minute."""

    async def run() -> None:
        registry = Registry(BatchPolicy(linger_ms=0, decision_linger_ms=60_000))

        def register(name: str, port: int) -> None:
            registry.put(
                coordinator_pb2.ParticipantInfo(
                    name=name,
                    address=f"127.0.0.1:{port}",  # nobody listens: the call fails at once
                    capabilities=coordinator_pb2.Capabilities(batch=True),
                )
            )

        register("old", 9)
        retired = registry.port("old")
        register("old", 10)  # a new address: the port for the old one is retired
        register("later", 9)
        answered: list[DecideResult] = []
        done = asyncio.get_running_loop().create_future()

        def on_done(result: DecideResult) -> None:
            answered.append(result)
            if len(answered) == 2:
                done.set_result(None)

        retired.decide(DecideItem("txn-1", 0, True, on_done))
        await settle()
        registry.hurry()
        registry.port("later").decide(DecideItem("txn-2", 0, True, on_done))
        await asyncio.wait_for(done, 10)  # the linger alone would take a minute
        assert [False, False] == [result.ok for result in answered]  # sent, and unanswered
        await registry.close()

    asyncio.run(run())


class FakeExchange:
    """A participant client whose Exchange votes PREPARED on every prepare, and records each
    call's prepares and deadline."""

    name = "fake"
    incarnation = ""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], float]] = []
        self.stub = self

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        timeout: float,  # noqa: ASYNC109 (the gRPC stub's signature)
    ) -> participant_pb2.ExchangeResponse:
        self.calls.append(([p.transaction_id for p in request.prepares], timeout))
        prepared = participant_pb2.PrepareResponse(vote=coordinator_pb2.VOTE_PREPARED)
        return participant_pb2.ExchangeResponse(
            votes=[prepared for _ in request.prepares],
            results=[participant_pb2.DecisionResult(ok=True) for _ in request.decisions],
        )


def test_a_prepare_out_of_time_fails_unsent_and_does_not_cut_its_batch_short() -> None:
    """A prepare that ran out of time while it waited fails at once, unsent: no answer could
    come in time, and the participant would spend a forced write on it."""

    async def run() -> None:
        client = FakeExchange()
        port = ParticipantPort(client, True, BatchPolicy(linger_ms=0))  # type: ignore[arg-type]
        results: dict[str, PrepareResult] = {}
        now = asyncio.get_running_loop().time()
        for name, left_s in [("t-late", 0.002), ("t-ok", 1.0)]:

            def done(result: PrepareResult, name: str = name) -> None:
                results[name] = result

            item = PrepareItem(name, 0, any_pb2.Any(), False, now + left_s, left_s, done)
            port.prepare(item)
        await settle()
        assert [(["t-ok"], pytest.approx(1.0, abs=0.1))] == client.calls
        assert results["t-ok"].vote is Vote.PREPARED
        assert results["t-late"].vote is None
        assert "deadline passed before its batched call left" in results["t-late"].reason
        await port.close()

    asyncio.run(run())


class FakeDecisions(FakeExchange):
    """Also a plain unary participant: records each Commit's and Rollback's deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.unary: list[tuple[str, float]] = []

    async def commit(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        self.unary.append(("commit", timeout_s))

    async def rollback(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        self.unary.append(("rollback", timeout_s))


@pytest.mark.parametrize("batch", [True, False])
def test_a_decision_call_has_the_configured_phase_two_deadline(batch: bool) -> None:
    async def run() -> None:
        client = FakeDecisions()
        policy = BatchPolicy(decision_linger_ms=0, phase_two_timeout_ms=250)
        port = ParticipantPort(client, batch, policy)  # type: ignore[arg-type]
        answered: list[DecideResult] = []
        port.decide(DecideItem("t-1", 0, True, answered.append))
        port.decide(DecideItem("t-2", 0, False, answered.append))
        await settle()
        assert [True, True] == [result.ok for result in answered]
        if batch:
            assert [([], 0.25)] == client.calls
        else:
            assert [("commit", 0.25), ("rollback", 0.25)] == client.unary
        await port.close()

    asyncio.run(run())


# ---- found by a bug hunt: batches that failed items they should not have ----


def test_a_batch_closes_before_its_size_passes_the_limit() -> None:
    """Counting items only, 100 prepares of 60 KB each queued behind a slow call left in one
    Exchange of 6 MB, over the 4 MiB message limit: the channel refused it and every one of
    them aborted. A batch now also closes on its estimated size; a larger item leaves alone."""

    async def run() -> None:
        calls = FakeCalls()
        tasks: set[asyncio.Task[None]] = set()
        policy = BatchPolicy(linger_ms=0, decision_linger_ms=0, bytes_max=100)
        queue: Batcher[str] = Batcher(calls.send, policy, tasks, size=lambda item: len(item) * 10)
        queue.add("first")
        await settle()
        for item in ("aaaa", "bbbb", "cc", "dddddddddddd", "e"):  # 40, 40, 20, 120, 10 bytes
            queue.add(item)
        for _ in range(4):
            calls.finish_all()
            await settle()
        assert [["first"], ["aaaa", "bbbb", "cc"], ["dddddddddddd"], ["e"]] == calls.batches

    asyncio.run(run())


def test_the_call_beyond_the_limit_carries_the_prepare_it_was_opened_for() -> None:
    """That extra call exists so a prepare never waits behind decisions; it took the queue's
    front, decisions only, and left the prepare behind."""

    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, linger_ms=0, decision_linger_ms=0, items_max=2)
        queue.add("decide 1")
        await settle()
        for index in range(2, 5):
            queue.add(f"decide {index}")
        queue.add("prepare 5")
        await settle()
        assert [["decide 1"], ["prepare 5", "decide 2"]] == calls.batches
        for _ in range(3):
            calls.finish_all()
            await settle()
        assert [["decide 3", "decide 4"]] == calls.batches[2:]

    asyncio.run(run())


def _notify_and_order(order_id: str) -> list[coordinator_pb2.BranchRequest]:
    notify = shop_pb2.SendNotification(order_id=order_id, recipient="a@b.test", body="x")
    order = shop_pb2.CreateOrder(
        order_id=order_id,
        customer_id="c",
        amount_cents=1,
        lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)],
    )
    return [
        coordinator_pb2.BranchRequest(participant="notification", operation=pack(notify)),
        coordinator_pb2.BranchRequest(participant="orders", operation=pack(order)),
    ]


def test_a_neighbour_with_a_short_deadline_does_not_abort_a_patient_transaction(
    tmp_path: Path,
) -> None:
    """A call's deadline was its earliest prepare's: a transaction with 5 s left, batched with
    one that had 100 ms, was aborted after 100 ms. Now the call waits for the most patient
    item, and each prepare still fails at its own deadline."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_SLOW, delay_ms=150)
            both = coordinator_pb2.SubmitBatchRequest(
                transactions=[
                    coordinator_pb2.SubmitRequest(
                        transaction_id="t-long", branches=_notify_and_order("o-l"), timeout_ms=5_000
                    ),
                    coordinator_pb2.SubmitRequest(
                        transaction_id="t-short", branches=_notify_and_order("o-s"), timeout_ms=100
                    ),
                ]
            )
            started = time.perf_counter()
            answers = (await cluster.client.SubmitBatch(both, timeout=30)).results
            patient, hurried = (answer.response for answer in answers)
            assert coordinator_pb2.OUTCOME_COMMITTED == patient.outcome, patient.reason
            assert coordinator_pb2.OUTCOME_ABORTED == hurried.outcome
            # Its own deadline (99 or 100 ms left when it was sent), or the transaction's.
            assert "ms deadline" in hurried.reason or "timeout" in hurried.reason, hurried.reason
            assert time.perf_counter() - started < 5  # not held to the patient one's deadline

    asyncio.run(scenario())


def test_a_prepare_fails_at_its_own_deadline_inside_a_slower_call() -> None:
    """The call waits for its latest deadline; the earlier ones fail on time, once, and the
    answer that comes later is not given to them again."""
    from dtm.coordinator.ports import _Expiry

    async def run() -> None:
        loop = asyncio.get_running_loop()
        answers: dict[str, list[PrepareResult]] = {"early": [], "later": [], "last": []}

        def item(name: str, in_s: float) -> PrepareItem:
            return PrepareItem(
                name, 0, any_pb2.Any(), False, loop.time() + in_s, in_s, answers[name].append
            )

        prepares = [item("last", 2.0), item("early", 0.02), item("later", 0.3)]
        expiry = _Expiry.start(loop, prepares, loop.time() + 2.0)
        await asyncio.sleep(0.15)
        assert (1, 0) == (len(answers["early"]), len(answers["later"]))
        assert "no answer within the 20 ms deadline" == answers["early"][0].reason
        await asyncio.sleep(0.3)
        assert 1 == len(answers["later"]) and [] == answers["last"]  # the call's own deadline
        expiry.stop()
        assert 2 == len(expiry.failed)

    asyncio.run(run())


def test_a_deadline_between_clock_ticks_does_not_spin_the_loop() -> None:
    """uvloop's timers and clock go by milliseconds: a timer firing just before a deadline
    between two ticks was re-armed for less than a millisecond, again and again, until the
    clock ticked (1,336 rounds to fail 3 prepares, found by a review)."""
    import uvloop

    from dtm.coordinator.ports import _Expiry

    rounds = 0
    real_expire = _Expiry._expire

    def counted(self: _Expiry) -> None:
        nonlocal rounds
        rounds += 1
        real_expire(self)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        answers: list[PrepareResult] = []
        items = [
            PrepareItem(f"t{n}", 0, any_pb2.Any(), False, loop.time() + s, s, answers.append)
            for n, s in enumerate((0.0004, 0.0104, 0.0304, 0.5))
        ]
        expiry = _Expiry.start(loop, items, items[-1].deadline)
        await asyncio.sleep(0.1)
        expiry.stop()
        assert 3 == len(answers)

    _Expiry._expire = counted  # type: ignore[method-assign]
    try:
        uvloop.run(run())
    finally:
        _Expiry._expire = real_expire  # type: ignore[method-assign]
    assert rounds <= 6


def test_the_size_estimate_covers_what_an_item_adds_to_an_exchange() -> None:
    from dtm.coordinator.ports import _exchange_request, _item_bytes

    operation = pack(shop_pb2.SendNotification(order_id="o", recipient="r", body="x" * 60_000))
    # A caller's type URL may be long and not ASCII: counted in characters it let a batch
    # pass the message limit (found by a review).
    odd = any_pb2.Any(type_url="type.googleapis.com/" + "é" * 30_000 + "/x", value=b"v")
    decision = DecideItem("t" * 128, 31, True, lambda result: None)
    for packed in (operation, odd):
        prepare = PrepareItem("t" * 128, 31, packed, True, 0.0, 1.0, lambda r: None, b"f" * 32)
        for many in (1, 1_024):
            size = _exchange_request([prepare] * many, []).ByteSize()
            assert size <= many * _item_bytes(prepare)
    for many in (1, 1_024):
        assert _exchange_request([], [decision] * many).ByteSize() <= many * _item_bytes(decision)


class HungParticipant(FakeDecisions):
    """Takes calls and never answers them (until they are cancelled)."""

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        timeout: float,  # noqa: ASYNC109 (the gRPC stub's signature)
    ) -> participant_pb2.ExchangeResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def rollback(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        await asyncio.Event().wait()


@pytest.mark.parametrize("batch", [True, False])
def test_decisions_waiting_for_a_hung_participant_are_bounded(
    batch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollbacks of aborted transactions are not held back by the transactions in flight: with
    a participant that hangs while aborts go on, they queued (or spawned calls) without end.
    Beyond the bound a decision fails at once, to be retried later (found by a bug hunt)."""
    from dtm import limits

    monkeypatch.setattr(limits, "DECISIONS_WAITING_MAX", 5)

    async def run() -> None:
        policy = BatchPolicy(decision_linger_ms=0, items_max=2)
        port = ParticipantPort(HungParticipant(), batch, policy)  # type: ignore[arg-type]
        answered: list[DecideResult] = []
        for number in range(12):
            port.decide(DecideItem(f"t-{number}", 0, False, answered.append))
            await settle()
        waiting = port._batcher.queued if batch else len(port._tasks)
        assert waiting <= 5
        assert answered and not any(result.ok for result in answered)
        assert "(prepares and decisions) already wait for fake" in answered[0].error
        await port.close()

    asyncio.run(run())


class HungUnaryPrepares(HungParticipant):
    """Its unary Prepares hang too."""

    async def prepare(self, *args: object, **kwargs: object) -> tuple[Vote, str, str, bool]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_decision_refused_behind_prepares_says_calls_wait_not_decisions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bound counts every call a port holds for its participant, prepares too (one queue,
    or one task each when unary). A decision refused while only prepares were waiting was
    told that decisions waited (found by a bug hunt)."""
    from dtm import limits

    monkeypatch.setattr(limits, "DECISIONS_WAITING_MAX", 3)

    async def run() -> None:
        port = ParticipantPort(HungUnaryPrepares(), False, BatchPolicy())  # type: ignore[arg-type]
        deadline = asyncio.get_running_loop().time() + 60
        for number in range(3):
            item = PrepareItem(f"t-p{number}", 0, any_pb2.Any(), False, deadline, 60, print)
            port.prepare(item)
        await settle()
        answered: list[DecideResult] = []
        port.decide(DecideItem("t-d", 0, False, answered.append))
        await settle()
        [refused] = answered
        assert not refused.ok
        assert "3 calls (prepares and decisions) already wait for fake" in refused.error
        await port.close()

    asyncio.run(run())


def test_prepares_expiring_behind_a_hung_participant_do_not_each_scan_its_queue() -> None:
    """Behind a participant that hangs, queued prepares come due one after another, each
    alone, while up to DECISIONS_WAITING_MAX decisions wait with them. Each expiry scanned the
    whole queue (twice): at a few hundred prepares a second that took most of the event loop
    and failed prepares late (found by a bug hunt). The queue is scanned once per call now,
    and each expiry costs O(log queue): counted here, never timed."""
    backlog, prepares = 2_000, 100

    async def run() -> None:
        loop = asyncio.get_running_loop()
        port = ParticipantPort(HungParticipant(), True, BatchPolicy(decision_linger_ms=0))  # type: ignore[arg-type]
        port.prepare(PrepareItem("t-hung", 0, any_pb2.Any(), False, loop.time() + 60, 60, print))
        await settle()  # its call hangs: everything after it queues
        for number in range(backlog):
            port.decide(DecideItem(f"t-{number}", 0, False, lambda result: None))
        scanned = 0
        queued_items = port._batcher.queued_items

        def counted() -> list[PrepareItem | DecideItem]:
            nonlocal scanned
            items = queued_items()
            scanned += len(items)
            return items

        port._batcher.queued_items = counted  # type: ignore[method-assign]
        reasons: list[str] = []
        all_failed = asyncio.Event()

        def failed(result: PrepareResult) -> None:
            reasons.append(result.reason)
            if len(reasons) == prepares:
                all_failed.set()

        first_due = loop.time() + 0.05 + PREPARE_SEND_MARGIN_S
        for number in range(prepares):  # each comes due alone, 2 ms after the one before
            deadline = first_due + number * 0.002
            port.prepare(PrepareItem(f"t-p{number}", 0, any_pb2.Any(), False, deadline, 1, failed))
        await all_failed.wait()
        assert ["its prepare deadline passed before its batched call left"] * prepares == reasons
        assert backlog == port._batcher.queued  # the decisions still wait, the prepares left
        assert scanned <= 2 * (backlog + prepares)  # was about `prepares` times that
        await port.close()

    asyncio.run(run())


class HungExchange:
    """A participant that never answers an Exchange: each call ends at its deadline."""

    name = "hung"
    incarnation = ""

    def __init__(self) -> None:
        self.stub = self
        self.calls_ended = 0

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        timeout: float,  # noqa: ASYNC109 (the gRPC stub's signature)
    ) -> participant_pb2.ExchangeResponse:
        await asyncio.sleep(timeout)
        self.calls_ended += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata()
        )


def test_a_prepare_riding_with_decisions_fails_at_its_own_deadline() -> None:
    """A call that carries decisions lasts at least the phase-2 timeout (2 s). Its prepares'
    timer left the latest out, as if the call's deadline were that prepare's own: a prepare
    with 200 ms to live, riding with a lingering Commit, was answered after 2 s (a bug hunt)."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        policy = BatchPolicy(phase_two_timeout_ms=2_000)
        hung = HungExchange()
        port = ParticipantPort(hung, True, policy)  # type: ignore[arg-type]
        answered: list[float] = []
        failed = asyncio.Event()
        started = loop.time()
        port.decide(DecideItem("t-prev", 0, True, lambda result: None))  # it lingers
        port.prepare(
            PrepareItem(
                "t-next",
                0,
                any_pb2.Any(),
                True,
                started + 0.2,
                0.2,
                lambda result: (answered.append(loop.time() - started), failed.set()),
            )
        )
        await asyncio.wait_for(failed.wait(), 10)
        # At its own deadline, while the call it rode with (2 s) is still in flight.
        assert 0 == hung.calls_ended and 1 == len(answered), answered
        await port.close()

    asyncio.run(run())


def test_a_one_phase_prepare_queued_behind_a_slow_call_fails_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prepare waiting for its participant's call slot was only checked when its batch left,
    after the call in flight (up to its latest prepare's deadline), and a one-phase transaction
    has no timer of its own: a Submit of 300 ms was answered after 3.9 s (a bug hunt)."""
    # Notification's prepares wait for the test: its call stays in flight, with no fixed
    # delay to outlast, until the lone Submit is answered.
    held = HeldPrepares(monkeypatch, "notification")

    async def scenario() -> None:
        cluster = InProcessCluster(
            tmp_path, prepare_timeout_ms=8_000, transaction_timeout_ms=10_000
        )
        async with cluster:
            port = cluster.coordinator.engine.registry.port("notification")
            slow = asyncio.create_task(
                cluster.submit(_notify_and_order("o-1"), "t-slow", timeout_ms=6_000)
            )

            async def in_notifications_call() -> bool:
                return port._batcher.calls == 1

            await eventually(in_notifications_call)
            lone = await cluster.submit(_notify_and_order("o-2")[:1], "t-lone", timeout_ms=300)
            assert coordinator_pb2.OUTCOME_COMMITTED != lone.outcome
            # Answered at its own deadline, while the call it queued behind is still held.
            assert not held.ended.is_set(), lone.reason
            assert "deadline passed before its batched call left" in lone.reason
            await held.run()
            assert coordinator_pb2.OUTCOME_COMMITTED == (await slow).outcome

    asyncio.run(scenario())


@pytest.mark.parametrize("early_ms", [0, 2])
def test_a_transaction_timer_that_fires_early_still_ends_it_on_time(
    tmp_path: Path, early_ms: int
) -> None:
    """uvloop rounds timers to milliseconds, so the transaction's timer may fire just before
    the deadline by the clock it counts down (1 in 200-400 did). The core ignored it and
    nothing armed it again: a transaction whose votes did not come never ended (a bug hunt).
    Here a prepare vanishes on its way, so the timer is the only bound."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, transaction_timeout_ms=10_000) as cluster:
            engine = cluster.coordinator.engine
            fire, clock = engine._on_timer, engine.monotonic_s

            def fired_early(run: Any) -> None:
                engine.monotonic_s = lambda: clock() - early_ms / 1000
                try:
                    fire(run)
                finally:
                    engine.monotonic_s = clock

            engine._on_timer = fired_early  # type: ignore[method-assign]
            port = engine.registry.port("notification")
            port.prepare = lambda item: None  # type: ignore[method-assign]
            # Answered at all (the bug: never), by the transaction's timer: no other bound.
            short = await asyncio.wait_for(
                cluster.submit(_notify_and_order("o-2"), "t-short", timeout_ms=300), 5
            )
            assert coordinator_pb2.OUTCOME_ABORTED == short.outcome
            assert "transaction timeout" in short.reason

    asyncio.run(scenario())


def test_an_abort_answer_waiting_for_a_prepare_ends_at_the_deadline_however_early_the_timer(
    tmp_path: Path,
) -> None:
    """An abort's answer that waits for a Prepare still out is bounded by the transaction's
    timer, which must be armed again when it fires early in ABORTED too (a review found the
    Submit never answered)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, transaction_timeout_ms=10_000) as cluster:
            engine = cluster.coordinator.engine
            fire, clock = engine._on_timer, engine.monotonic_s

            def fired_early(run: Any) -> None:
                engine.monotonic_s = lambda: clock() - 0.002
                try:
                    fire(run)
                finally:
                    engine.monotonic_s = clock

            engine._on_timer = fired_early  # type: ignore[method-assign]
            # notification's prepare vanishes on its way (the timer is the only bound), and
            # orders is down: its prepare fails at once, and the abort's answer waits.
            engine.registry.port("notification").prepare = lambda item: None  # type: ignore[method-assign]
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_DOWN)
            # Answered at all (the bug: never): the transaction's timer is the only bound.
            answer = await asyncio.wait_for(
                cluster.submit(_notify_and_order("o-9"), "t-pending", timeout_ms=300), 5
            )
            assert coordinator_pb2.OUTCOME_ABORTED == answer.outcome
            assert "orders failed to prepare" in answer.reason, answer.reason

    asyncio.run(scenario())


def test_a_wall_clock_step_back_does_not_postpone_a_transaction_timeout(tmp_path: Path) -> None:
    """The timer runs on the monotonic clock, but it compared the wall clock with the
    transaction's deadline and armed itself again for the difference: a step back of an hour
    (NTP, an operator) held a 300 ms transaction whose vote did not come, and its
    participants' locks, for an hour (found by a bug hunt)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, transaction_timeout_ms=10_000) as cluster:
            engine = cluster.coordinator.engine
            wall = engine.clock_ms
            sent = asyncio.Event()
            port = engine.registry.port("notification")
            port.prepare = lambda item: sent.set()  # type: ignore[method-assign]  # vanishes
            submitted = asyncio.ensure_future(
                cluster.submit(_notify_and_order("o-step"), "t-step", timeout_ms=300)
            )
            await sent.wait()  # the transaction's timer is armed
            engine.clock_ms = lambda: wall() - 3_600_000
            answer = await asyncio.wait_for(submitted, 5)
            assert coordinator_pb2.OUTCOME_ABORTED == answer.outcome
            assert "transaction timeout" in answer.reason

    asyncio.run(scenario())


class InvalidOperation(FakeExchange):
    """Answers every batched prepare as the SDK does an operation it finds invalid."""

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        timeout: float,  # noqa: ASYNC109 (the gRPC stub's signature)
    ) -> participant_pb2.ExchangeResponse:
        invalid = participant_pb2.PrepareResponse(
            vote=coordinator_pb2.VOTE_REFUSED,
            reason="invalid: quantity must be positive",
            invalid_argument="quantity must be positive",
        )
        return participant_pb2.ExchangeResponse(votes=[invalid for _ in request.prepares])


def test_a_batched_answer_that_the_operation_is_invalid_fails_the_prepare_as_invalid() -> None:
    """Mutation: the port read a batched answer's invalid_argument as its REFUSED vote
    (ports.py, _send_exchange). The client then got a plain ABORTED instead of
    INVALID_ARGUMENT naming the problem, as the unary path answers."""

    async def run() -> None:
        port = ParticipantPort(InvalidOperation(), True, BatchPolicy())  # type: ignore[arg-type]
        results: list[PrepareResult] = []
        deadline = asyncio.get_running_loop().time() + 1.0
        port.prepare(PrepareItem("t-1", 0, any_pb2.Any(), False, deadline, 1.0, results.append))
        await settle()
        [result] = results
        assert result.vote is None
        assert "quantity must be positive" == result.invalid_argument
        await port.close()

    asyncio.run(run())


class NoVote(FakeExchange):
    """Answers every batched prepare with no vote (proto3's VOTE_UNSPECIFIED)."""

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        timeout: float,  # noqa: ASYNC109 (the gRPC stub's signature)
    ) -> participant_pb2.ExchangeResponse:
        return participant_pb2.ExchangeResponse(
            votes=[participant_pb2.PrepareResponse() for _ in request.prepares]
        )


def test_a_batched_answer_with_no_vote_fails_the_prepare_naming_the_protocol_error() -> None:
    """As the unary path (tests/test_plain_participant.py): before, the prepare failed with
    the participant's reason, empty, and nothing said why."""

    async def run() -> None:
        port = ParticipantPort(NoVote(), True, BatchPolicy())  # type: ignore[arg-type]
        results: list[PrepareResult] = []
        deadline = asyncio.get_running_loop().time() + 1.0
        port.prepare(PrepareItem("t-1", 0, any_pb2.Any(), False, deadline, 1.0, results.append))
        await settle()
        [result] = results
        assert result.vote is None
        assert result.reason.startswith("protocol error: fake answered Prepare with no vote")
        await port.close()

    asyncio.run(run())


class NoExchange(FakeDecisions):
    """A participant that registered the batch capability and serves no Exchange (one that
    followed Capabilities.batch's old comment, which named PrepareBatch and DecideBatch), but
    the plain unary contract: its Exchange is answered UNIMPLEMENTED once the test releases
    it, and it records each unary Prepare (id, deadline)."""

    address = "127.0.0.1:1"

    def __init__(self) -> None:
        super().__init__()
        self.release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.prepares: list[tuple[str, float]] = []

    async def Exchange(
        self,
        request: participant_pb2.ExchangeRequest,
        timeout: float,  # noqa: ASYNC109 (the gRPC stub's signature)
    ) -> participant_pb2.ExchangeResponse:
        self.calls.append(([p.transaction_id for p in request.prepares], timeout))
        await self.release
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNIMPLEMENTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "Method not found!",
        )

    async def prepare(
        self,
        transaction_id: str,
        branch: int,
        operation: any_pb2.Any,
        one_phase: bool,
        timeout_s: float,
        fingerprint: bytes = b"",
    ) -> tuple[Vote, str, str, bool]:
        self.prepares.append((transaction_id, timeout_s))
        return Vote.PREPARED, "", "", False


class LogLines:
    """Stands in for logs.get: records each line's level and event."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, component: str, **context: Any) -> LogLines:
        return self

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event))

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append(("error", event))


def test_an_exchange_answered_unimplemented_falls_back_to_unary_calls_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, every prepare and decision of such a participant failed on the UNIMPLEMENTED
    Exchange, for ever (each transaction aborted, each decision retried in vain). Now the
    port turns unary: the failed call's items and those queued behind it go again once each
    over Prepare, Commit and Rollback, with one WARNING. A prepare its call's own timer already
    failed is not sent again (answered twice, it would count twice)."""
    log = LogLines()
    monkeypatch.setattr(logs, "get", log)

    async def run() -> None:
        client = NoExchange()
        policy = BatchPolicy(decision_linger_ms=0)
        port = ParticipantPort(client, True, policy)  # type: ignore[arg-type]
        answers: dict[str, list[PrepareResult | DecideResult]] = {}
        short_failed = asyncio.get_running_loop().create_future()

        def answer(name: str) -> Callable[[Any], None]:
            def done(result: PrepareResult | DecideResult) -> None:
                answers.setdefault(name, []).append(result)
                if name == "t-short" and not short_failed.done():
                    short_failed.set_result(None)

            return done

        def prepare(name: str, timeout_s: float) -> None:
            deadline = asyncio.get_running_loop().time() + timeout_s
            item = PrepareItem(name, 0, any_pb2.Any(), False, deadline, timeout_s, answer(name))
            port.prepare(item)

        prepare("t-short", 0.05)
        prepare("t-long", 30.0)
        await settle()
        assert [["t-short", "t-long"]] == [ids for ids, _ in client.calls]
        # Queued behind the call in flight (one call slot, taken by prepares).
        prepare("t-queued", 30.0)
        port.decide(DecideItem("t-commit", 0, True, answer("t-commit")))
        port.decide(DecideItem("t-rollback", 0, False, answer("t-rollback")))
        await short_failed  # failed at its own deadline, inside the call
        client.release.set_result(None)
        await settle()
        assert ["t-long", "t-queued"] == [name for name, _ in client.prepares]
        assert all(timeout_s <= 30.0 for _, timeout_s in client.prepares)
        assert ["commit", "rollback"] == [call for call, _ in client.unary]
        names = ["t-short", "t-long", "t-queued", "t-commit", "t-rollback"]
        assert {name: 1 for name in names} == {name: len(answers[name]) for name in answers}
        assert (
            [None, Vote.PREPARED, Vote.PREPARED]
            == [
                answers[name][0].vote  # type: ignore[union-attr]
                for name in names[:3]
            ]
        )
        assert [True, True] == [answers[name][0].ok for name in names[3:]]  # type: ignore[union-attr]
        # From now on unary at once: no other Exchange, no other WARNING.
        prepare("t-after", 30.0)
        await settle()
        assert 1 == len(client.calls)
        assert "t-after" == client.prepares[-1][0]
        [(level, event)] = log.lines
        assert "warning" == level
        assert "registered the batch capability but does not serve Exchange" in event, event
        assert "register it with batch false, or implement Exchange" in event
        await port.close()

    asyncio.run(run())


def test_a_registration_again_makes_a_port_that_fell_back_batch_again() -> None:
    async def run() -> None:
        registry = Registry(BatchPolicy())
        capabilities = coordinator_pb2.Capabilities(batch=True)
        registry.put(
            coordinator_pb2.ParticipantInfo(
                name="p", address="127.0.0.1:1", capabilities=capabilities
            )
        )
        first = registry.port("p")
        registry.renew("p", 1)  # nothing to reset: the same port
        assert first is registry.port("p")
        first.batch, first.fell_back = False, True  # as _fall_back_to_unary leaves it
        registry.renew("p", 2)
        again = registry.port("p")
        assert again is not first
        assert again.batch
        await registry.close()

    asyncio.run(run())


class UnavailableWithHeuristic(FakeDecisions):
    """A unary participant whose Commit fails UNAVAILABLE with a heuristic in its metadata
    (from whatever answered: a proxy, another process at the address)."""

    async def commit(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        trailing = grpc.aio.Metadata((HEURISTIC_METADATA_KEY, HEURISTIC_COMMIT))
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), trailing, "not reached"
        )


def test_an_unavailable_decision_reports_no_heuristic_whatever_its_metadata() -> None:
    """Mutation: the unary port read the heuristic metadata of an UNAVAILABLE Commit
    (ports.py, _unary_decide). The participant was not reached: the Commit is retried, not
    recorded as a heuristic outcome that stops phase 2 of a branch still prepared."""

    async def run() -> None:
        port = ParticipantPort(UnavailableWithHeuristic(), False, BatchPolicy())  # type: ignore[arg-type]
        results: list[DecideResult] = []
        port.decide(DecideItem("t-1", 0, True, results.append))
        await settle()
        [result] = results
        assert not result.ok and "" == result.heuristic
        await port.close()

    asyncio.run(run())


def test_a_prepare_taken_out_unsent_opens_no_call_beyond_the_limit() -> None:
    """Mutation: Batcher.take_out (now drop) no longer counted the urgent items it removed.
    A prepare that expired in the queue then still counted as waiting, so the extra call
    slot kept for prepares opened for decisions alone: calls in flight beyond
    in_flight_max, the bound that keeps a participant's batches large."""

    async def run() -> None:
        calls = FakeCalls()
        queue = batcher(calls, in_flight_max=1)
        queue.hurry()  # no lingering timers: every step below runs at once
        queue.add("decision-0")
        await settle()
        queue.add("prepare-1")  # takes the extra slot: only decisions are in flight
        await settle()
        assert [["decision-0"], ["prepare-1"]] == calls.batches
        late = "prepare-2"
        queue.add(late)  # no slot left: queued
        queue.drop([late])  # out of time before a slot freed: never sent
        assert 0 == queue.queued
        calls.pending[1].set_result(None)  # the prepare's call ends
        await settle()
        queue.add("decision-3")  # the decisions' call is still in flight: it waits
        await settle()
        assert [["decision-0"], ["prepare-1"]] == calls.batches
        calls.finish_all()
        await settle()
        assert ["decision-3"] == calls.batches[-1]

    asyncio.run(run())


# ---- a participant that does not batch: the unary calls in flight to it are bounded ----


class HeldUnary(FakeDecisions):
    """A plain unary participant whose calls wait until the test releases them all; counts
    the calls in flight, and records each Prepare's transaction and deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.released = asyncio.Event()
        self.prepares: list[tuple[str, float]] = []
        self.in_flight = 0
        self.in_flight_most = 0

    async def _held(self) -> None:
        self.in_flight += 1
        self.in_flight_most = max(self.in_flight_most, self.in_flight)
        try:
            await self.released.wait()
        finally:
            self.in_flight -= 1

    async def prepare(
        self,
        transaction_id: str,
        branch: int,
        operation: any_pb2.Any,
        one_phase: bool,
        timeout_s: float,
        fingerprint: bytes = b"",
    ) -> tuple[Vote, str, str, bool]:
        self.prepares.append((transaction_id, timeout_s))
        await self._held()
        return Vote.PREPARED, "", "", False

    async def commit(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        await self._held()

    async def rollback(
        self, transaction_id: str, branch: int, timeout_s: float, fingerprint: bytes = b""
    ) -> None:
        await self._held()


def test_unary_calls_beyond_the_bound_wait_for_a_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Prepare, Commit and Rollback to a participant that does not batch was its own call
    at once, unbounded: a burst overran the participant's gRPC queue, which cancelled the rest
    (tests/test_scale.py). Beyond UNARY_CALLS_IN_FLIGHT_MAX, they wait for a call to end."""
    from dtm import limits

    monkeypatch.setattr(limits, "UNARY_CALLS_IN_FLIGHT_MAX", 3)

    async def run() -> None:
        client = HeldUnary()
        port = ParticipantPort(client, False, BatchPolicy())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        votes: list[PrepareResult] = []
        decided: list[DecideResult] = []
        for number in range(4):
            item = PrepareItem(
                f"t-{number}", 0, any_pb2.Any(), False, loop.time() + 60, 60, votes.append
            )
            port.prepare(item)
        for number in range(4):
            port.decide(DecideItem(f"t-d{number}", 0, number % 2 == 0, decided.append))
        await settle()
        assert 3 == client.in_flight
        assert not votes and not decided
        client.released.set()
        await port.drain()
        assert 3 == client.in_flight_most
        assert [Vote.PREPARED] * 4 == [result.vote for result in votes]
        assert [True] * 4 == [result.ok for result in decided]
        waited, timeout_s = client.prepares[-1]
        assert "t-3" == waited and timeout_s < 60  # sent with the time it had left
        await port.close()

    asyncio.run(run())


def test_a_prepare_waiting_for_a_slot_fails_unsent_at_its_own_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prepare's deadline holds while it waits for a slot, as its call's would: a one-phase
    transaction has no timer of its own. It then fails as a timeout, unsent (not reached: a
    one-phase transaction aborts without a probe)."""
    from dtm import limits

    monkeypatch.setattr(limits, "UNARY_CALLS_IN_FLIGHT_MAX", 1)

    async def run() -> None:
        client = HeldUnary()
        port = ParticipantPort(client, False, BatchPolicy())  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        port.prepare(PrepareItem("t-slow", 0, any_pb2.Any(), False, loop.time() + 60, 60, print))
        answered: asyncio.Future[PrepareResult] = loop.create_future()
        hurried = PrepareItem(
            "t-hurried", 0, any_pb2.Any(), True, loop.time() + 0.05, 0.05, answered.set_result
        )
        port.prepare(hurried)
        result = await asyncio.wait_for(answered, 10)  # at its deadline: the slot is taken
        assert result.vote is None and result.not_reached
        assert "no answer within the 50 ms deadline: never sent" in result.reason
        assert ["t-slow"] == [name for name, _ in client.prepares]
        client.released.set()
        await port.drain()
        await port.close()

    asyncio.run(run())


def test_a_participant_set_not_to_batch_registers_without_it_and_gets_unary_calls(
    tmp_path: Path,
) -> None:
    """`batch = false` (the SDK's --no-batch; bench --unary-participants) leaves the batch
    capability out of the registration: the coordinator then speaks the plain contract to the
    shipped services, one unary Prepare, Commit or Rollback each, and no Exchange."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides={"batch": False}) as cluster:
            listed = await cluster.client.ListParticipants(
                coordinator_pb2.ListParticipantsRequest(), timeout=10
            )
            assert len(listed.participants) == 4
            assert not any(info.capabilities.batch for info in listed.participants)
            answer = await cluster.submit(order_branches("o-unary", [("sku-apple", 1)]))
            assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason
            ports = cluster.coordinator.engine.registry.ports()
            assert {False} == {port.batch for port in ports.values()}
            assert {0} == {port.calls for port in ports.values()}  # no Exchange was sent
            assert "o-unary" in await cluster.orders()

    asyncio.run(scenario())


UNARY_BURST = 32


def test_concurrent_unary_prepares_share_fsyncs_at_a_participant_not_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With batch = false the coordinator sends one unary Prepare per branch, and gRPC's asyncio
    server hands the event loop one call at a time: fsyncing on the loop (as batched
    participants do), each fsync covered the one or two prepares that had reached it, and an
    fsync stops the loop taking the next (32 concurrent prepares: 28 fsyncs). Such a
    participant's log fsyncs on a sync thread by default (wal_sync = "auto"), while the loop
    takes the next calls: here the first fsync is held until every prepare has appended its
    record, so the burst needs that fsync and one more. Nothing is answered before its fsync."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides={"batch": False}) as cluster:
            wal = cluster.participants["notification"].wal.wal
            every_record_appended = threading.Event()
            first_record = wal.records_appended + 1
            append, sync = wal.append, wal._perform_sync

            def counted_append(record_type: int, payload: bytes) -> int:
                lsn = append(record_type, payload)
                if wal.records_appended >= first_record + UNARY_BURST - 1:
                    every_record_appended.set()
                return lsn

            held: list[bool] = []

            def held_sync(ticket: Any) -> None:
                # Only the burst's first fsync waits (and at most 10 s: fsyncing on the loop,
                # nothing can be appended while it waits, so it would wait for ever).
                if not held:
                    held.append(True)
                    every_record_appended.wait(10)
                sync(ticket)

            monkeypatch.setattr(wal, "append", counted_append)
            monkeypatch.setattr(wal, "_perform_sync", held_sync)
            fsyncs = wal.fsync_count
            stub = cluster.participant_stub("notification")
            operation = pack(
                shop_pb2.SendNotification(order_id="o", recipient="c@example.test", body="hi")
            )
            votes = await asyncio.gather(
                *(
                    stub.Prepare(
                        participant_pb2.PrepareRequest(
                            transaction_id=f"t-{n}", branch=0, operation=operation
                        ),
                        timeout=30,
                    )
                    for n in range(UNARY_BURST)
                )
            )
            assert {coordinator_pb2.VOTE_PREPARED} == {vote.vote for vote in votes}
            assert 2 == wal.fsync_count - fsyncs, f"{UNARY_BURST} prepares"
            assert wal.records_appended == first_record + UNARY_BURST - 1  # one each
            assert wal.durable_lsn == wal.appended_lsn

    asyncio.run(scenario())
