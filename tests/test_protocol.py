"""Two-phase commit end to end over real gRPC: the coordinator and the four services in-process,
each on its own loopback port, with real logs on disk."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm.coordinator.server import CoordinatorServer, ServerConfig
from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
from participants.decided import DecidedWindow
from participants.services.orders import OrdersService
from participants.services.payment import PaymentService
from tests.harness import (
    ACCOUNTS,
    ASKS_LATER,
    HeldPrepares,
    InProcessCluster,
    commit_then_forget,
    eventually,
    late_retry_of_the_last_stock,
    order_branches,
    pack,
    settled,
)

COMMITTED = coordinator_pb2.OUTCOME_COMMITTED
ABORTED = coordinator_pb2.OUTCOME_ABORTED


async def assert_nothing_held(cluster: InProcessCluster) -> None:
    """No reservation, hold, pending order or staged message is left behind."""

    async def settled() -> bool:
        stock = await cluster.stock()
        accounts = await cluster.accounts()
        orders = await cluster.orders()
        sent = await cluster.sent()
        return (
            all(level.reserved == 0 for level in stock.values())
            and all(account.held_cents == 0 for account in accounts.accounts)
            and all(o.state != shop_pb2.ORDER_STATE_PENDING for o in orders.values())
            and sent.staged == 0
        )

    await eventually(settled)


def test_happy_path_commits_everywhere(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            response = await cluster.submit(
                order_branches("o-1", [("sku-apple", 2)], amount_cents=700), "txn-1"
            )
            assert COMMITTED == response.outcome, response.reason
            assert "txn-1" == response.transaction_id
            await assert_nothing_held(cluster)
            stock = await cluster.stock()
            assert 48 == stock["sku-apple"].available
            assert 2 == stock["sku-apple"].sold
            orders = await cluster.orders()
            assert shop_pb2.ORDER_STATE_CONFIRMED == orders["o-1"].state
            accounts = {a.account_id: a for a in (await cluster.accounts()).accounts}
            assert 100_000 - 700 == accounts["acct-alice"].balance_cents
            assert 700 == accounts["acct-alice"].captured_cents
            sent = await cluster.sent()
            assert ["o-1"] == [n.order_id for n in sent.sent]
            request = coordinator_pb2.GetTransactionRequest(transaction_id="txn-1")

            # The client hears COMMITTED once the decision is durable; phase 2 may still be
            # finishing (rule 15), so the status reaches COMMITTED a moment later.
            async def ended() -> bool:
                status = await cluster.client.GetTransaction(request)
                return bool(status.state == coordinator_pb2.TRANSACTION_STATE_COMMITTED)

            await eventually(ended)
            status = await cluster.client.GetTransaction(request)
            assert all(b.acknowledged for b in status.branches)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("lines", "account", "amount", "reason"),
    [
        ([("sku-scarce", 4)], "acct-alice", 100, "out of stock"),
        ([("sku-apple", 1)], "acct-blocked", 100, "declined"),
        ([("sku-apple", 1)], "acct-poor", 900, "insufficient funds"),
        ([("sku-nope", 1)], "acct-alice", 100, "unknown sku"),
    ],
)
def test_each_refusal_aborts_and_applies_nothing(
    tmp_path: Path, lines: list[tuple[str, int]], account: str, amount: int, reason: str
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            response = await cluster.submit(
                order_branches("o-r", lines, account=account, amount_cents=amount)
            )
            assert ABORTED == response.outcome
            assert reason in response.reason
            await assert_nothing_held(cluster)
            stock = await cluster.stock()
            assert all(level.sold == 0 for level in stock.values())
            assert [] == list((await cluster.accounts()).captures)
            assert [] == list((await cluster.sent()).sent)
            assert "o-r" not in {
                o.order_id
                for o in (await cluster.orders()).values()
                if o.state == shop_pb2.ORDER_STATE_CONFIRMED
            }

    asyncio.run(scenario())


def test_duplicate_order_id_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            first = await cluster.submit(order_branches("o-dup", [("sku-apple", 1)]))
            assert COMMITTED == first.outcome
            second = await cluster.submit(order_branches("o-dup", [("sku-apple", 1)]))
            assert ABORTED == second.outcome
            assert "duplicate order id" in second.reason
            await assert_nothing_held(cluster)
            assert 1 == (await cluster.stock())["sku-apple"].sold

    asyncio.run(scenario())


def test_unavailable_participant_aborts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_DOWN)
            response = await cluster.submit(order_branches("o-down", [("sku-apple", 1)]))
            assert ABORTED == response.outcome
            assert "notification" in response.reason and "unavailable" in response.reason
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_NONE)
            await assert_nothing_held(cluster)
            assert 0 == (await cluster.stock())["sku-apple"].sold

    asyncio.run(scenario())


def test_prepare_deadline_aborts_and_the_slow_participant_is_rolled_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deadline_ms = 300
    late = HeldPrepares(monkeypatch, "payment", late=True)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, prepare_timeout_ms=deadline_ms) as cluster:
            started = time.monotonic()
            response = await cluster.submit(order_branches("o-slow", [("sku-apple", 1)]))
            elapsed_ms = (time.monotonic() - started) * 1000
            assert ABORTED == response.outcome
            assert "deadline" in response.reason and "payment" in response.reason
            # It aborts at the deadline, not when the slow participant answers: payment's
            # prepare is still held.
            assert deadline_ms * 0.9 <= elapsed_ms
            assert not late.answered.is_set()

            # When the late prepare finally runs, the rollback that overtook it refuses it:
            # nothing stays held.
            async def payment_branch_rolled_back() -> bool:
                listing = await cluster.admin("payment").ListBranches(
                    participant_pb2.ListBranchesRequest()
                )
                states = {b.state for b in listing.branches}
                return states == {participant_pb2.BRANCH_STATE_ROLLED_BACK}

            await eventually(payment_branch_rolled_back)
            assert [coordinator_pb2.VOTE_REFUSED] == await late.run()
            await assert_nothing_held(cluster)
            accounts = {a.account_id: a for a in (await cluster.accounts()).accounts}
            assert 100_000 == accounts["acct-alice"].balance_cents

    asyncio.run(scenario())


def test_retried_submit_with_same_id_returns_same_outcome_and_applies_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            branches = order_branches("o-idem", [("sku-pear", 3)])
            responses = await asyncio.gather(
                *(cluster.submit(branches, "txn-idem") for _ in range(5))
            )
            assert {COMMITTED} == {r.outcome for r in responses}
            again = await cluster.submit(branches, "txn-idem")
            assert COMMITTED == again.outcome
            await assert_nothing_held(cluster)  # phase 2 runs after the answer (rule 15)
            assert 3 == (await cluster.stock())["sku-pear"].sold
            assert 1 == len((await cluster.sent()).sent)
            # Same id, different content: refused, not silently merged.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await cluster.submit(order_branches("o-other", [("sku-pear", 1)]), "txn-idem")
            assert grpc.StatusCode.ALREADY_EXISTS == raised.value.code()

    asyncio.run(scenario())


def test_a_retry_older_than_the_coordinators_memory_is_still_applied_once(
    tmp_path: Path,
) -> None:
    """The coordinator remembers a bounded number of finished transactions (finished_kept).
    A Submit retried after it forgot runs again under the same id, and the participants, which
    remember their decided branches far longer, answer it from what they recorded: the first
    outcome again, nothing applied twice."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            kept = order_branches("o-kept", [("sku-pear", 3)], amount_cents=300)
            refused = order_branches(
                "o-poor", [("sku-pear", 1)], account="acct-poor", amount_cents=900
            )
            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            assert ABORTED == (await cluster.submit(refused, "txn-poor")).outcome
            for number in range(3):  # newer transactions push both out of its memory
                branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=100)
                assert COMMITTED == (await cluster.submit(branches, f"txn-{number}")).outcome
            forgotten = coordinator_pb2.GetTransactionRequest(transaction_id="txn-kept")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await cluster.client.GetTransaction(forgotten)
            assert grpc.StatusCode.NOT_FOUND == raised.value.code()

            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            assert ABORTED == (await cluster.submit(refused, "txn-poor")).outcome
            await assert_nothing_held(cluster)
            assert 3 == (await cluster.stock())["sku-pear"].sold
            accounts = {a.account_id: a for a in (await cluster.accounts()).accounts}
            assert 600 == accounts["acct-alice"].captured_cents  # 300 + 3 x 100, once each
            assert 0 == accounts["acct-poor"].captured_cents
            assert 4 == len((await cluster.sent()).sent)

    asyncio.run(scenario())


def test_a_checkpoint_and_a_restart_forget_no_commit_the_window_still_holds(
    tmp_path: Path,
) -> None:
    """A checkpoint used to keep only the commits still in phase 2, so a restart forgot every
    commit before it, and a client's retry ran the transaction again. With a participant down
    at that moment, the new attempt aborted: the client was told ABORTED for an order that
    had committed, and every other branch's Rollback came back as a heuristic (found by a bug
    hunt). The checkpoint now keeps the window's commits, so the retry is answered from it."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"checkpoint_every_records": 6}
        ) as cluster:
            branches = order_branches("o-1", [("sku-apple", 1)])
            assert COMMITTED == (await cluster.submit(branches, "t1")).outcome
            engine = cluster.coordinator.engine

            async def checkpointed_after_it_ended() -> bool:
                return not engine.active and engine.checkpoints.count > 0

            await eventually(checkpointed_after_it_ended)
            for number in range(3):  # more checkpoints: each must carry it on
                newer = order_branches(f"o-n{number}", [("sku-pear", 1)])
                assert COMMITTED == (await cluster.submit(newer, f"t-n{number}")).outcome
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_DOWN)
            await cluster.restart_coordinator()
            assert COMMITTED == (await cluster.submit(branches, "t1")).outcome
            listed = await cluster.client.ListHeuristics(coordinator_pb2.ListHeuristicsRequest())
            assert [] == list(listed.heuristics)
            status = await cluster.client.GetTransaction(
                coordinator_pb2.GetTransactionRequest(transaction_id="t1")
            )
            assert coordinator_pb2.TRANSACTION_STATE_COMMITTED == status.state

    asyncio.run(scenario())


def test_a_refused_reuse_of_a_forgotten_id_does_not_hide_the_transaction_it_belongs_to(
    tmp_path: Path,
) -> None:
    """Before, the attempt the participants refused as a reuse was kept under the id: the
    owner's retry of the committed order, its content unchanged, was then told ALREADY_EXISTS
    ("choose a new id", which applies the order twice) and its status read ABORTED. Now the
    refused attempt is not kept, and a retry that arrives while it runs waits for it."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            kept = order_branches("o-kept", [("sku-pear", 3)], amount_cents=300)
            other = order_branches("o-other", [("sku-pear", 5)], amount_cents=500)

            async def forget(first: int) -> None:
                for number in range(first, first + 3):
                    branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=1)
                    assert COMMITTED == (await cluster.submit(branches, f"txn-{number}")).outcome

            async def reused() -> None:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await cluster.submit(other, "txn-kept")
                assert grpc.StatusCode.ALREADY_EXISTS == raised.value.code()

            async def committed() -> bool:
                """Its status reads committed (phase 2 may still be on its way)."""
                request = coordinator_pb2.GetTransactionRequest(transaction_id="txn-kept")
                state = (await cluster.client.GetTransaction(request)).state
                return state in (
                    coordinator_pb2.TRANSACTION_STATE_COMMITTING,
                    coordinator_pb2.TRANSACTION_STATE_COMMITTED,
                )

            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            await forget(0)
            await reused()
            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            assert await committed()

            # The owner's retry arrives while the reused attempt still waits for its votes.
            await forget(10)
            for name in ("inventory", "orders", "payment", "notification"):
                await cluster.set_fault(name, participant_pb2.FAULT_MODE_SLOW, delay_ms=300)
            attempt = asyncio.create_task(reused())

            async def running() -> bool:
                return "txn-kept" in cluster.coordinator.engine.active

            await eventually(running)
            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            await attempt
            assert await committed()
            orders = await cluster.orders()
            assert "o-kept" in orders and "o-other" not in orders
            assert 3 == (await cluster.stock())["sku-pear"].sold

    asyncio.run(scenario())


async def _a_refused_reuse_whose_rollbacks_fail(
    cluster: InProcessCluster,
) -> list[coordinator_pb2.BranchRequest]:
    """The owner's one-branch transaction txn-x commits and is forgotten; then other content
    under txn-x, which inventory refuses as a reuse and payment prepares, and payment rejects
    every Rollback. Returns the owner's branches."""
    owner = order_branches("o-a", [("sku-pear", 3)], amount_cents=300)[:1]
    assert COMMITTED == (await cluster.submit(owner, "txn-x")).outcome
    for number in range(3):  # push txn-x out of the coordinator's memory
        branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=1)
        assert COMMITTED == (await cluster.submit(branches, f"txn-{number}")).outcome

    async def idle() -> bool:
        return not cluster.coordinator.engine.active

    await eventually(idle)
    await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
    other = order_branches("o-b", [("sku-pear", 5)], amount_cents=500)
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # inventory: a reuse
        await cluster.submit([other[0], other[2]], "txn-x")
    assert grpc.StatusCode.ALREADY_EXISTS == raised.value.code()
    return owner


async def _rollbacks_given_up(capsys: pytest.CaptureFixture[str]) -> None:
    """Until the coordinator's log says it gave up a Rollback."""
    written: list[str] = []

    async def given_up() -> bool:
        written.append(capsys.readouterr().err)
        return "rollback failed; given up" in "".join(written)

    await eventually(given_up)


def test_a_branch_of_a_refused_reuse_never_takes_the_outcome_of_the_ids_transaction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reuse of a forgotten id that one participant refuses and another prepares, whose
    Rollbacks do not get through: its in-doubt branch asks the coordinator later, once the
    owner's retry of the transaction the id belongs to has committed. Before, the answer was
    COMMITTED, and payment charged 500 cents for an order that does not exist; and the reuse's
    late rollback failures replaced the committed transaction's record in the window."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2},
            participant_overrides={"in_doubt_after_ms": 3_000, "inquiry_backoff_ms_max": 300},
        ) as cluster:
            owner = await _a_refused_reuse_whose_rollbacks_fail(cluster)
            await _rollbacks_given_up(capsys)
            assert COMMITTED == (await cluster.submit(owner, "txn-x")).outcome
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_NONE)
            payment = cluster.participants["payment"].engine

            async def resolved() -> bool:  # by its inquiry, once in doubt for 3 s
                return not payment.in_doubt()

            await eventually(resolved)
            accounts = await cluster.accounts()
            assert [] == [c.order_id for c in accounts.captures if c.transaction_id == "txn-x"]
            assert COMMITTED == (await cluster.submit(owner, "txn-x")).outcome
            request = coordinator_pb2.GetTransactionRequest(transaction_id="txn-x")
            status = await cluster.client.GetTransaction(request)
            assert coordinator_pb2.TRANSACTION_STATE_COMMITTED == status.state

    asyncio.run(scenario())


def test_a_refused_reuses_late_rollback_failures_leave_the_ids_transaction_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The owner retries while the refused reuse's Rollbacks still fail. Before, the retry
    committed at once and each later failure wrote the reuse's record over the committed
    transaction's in the window: its status read ABORTED and the owner's next retry got
    ALREADY_EXISTS. Two things now hold it: the retry waits for those Rollbacks to end
    (Engine._settling), and a refused reuse's phase-2 answers never touch the window."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            owner = await _a_refused_reuse_whose_rollbacks_fail(cluster)
            assert COMMITTED == (await cluster.submit(owner, "txn-x")).outcome
            await _rollbacks_given_up(capsys)
            request = coordinator_pb2.GetTransactionRequest(transaction_id="txn-x")
            status = await cluster.client.GetTransaction(request)
            assert coordinator_pb2.TRANSACTION_STATE_COMMITTED == status.state
            assert COMMITTED == (await cluster.submit(owner, "txn-x")).outcome

    asyncio.run(scenario())


def test_a_new_attempt_waits_for_the_rollbacks_of_an_earlier_one_no_longer_kept(
    tmp_path: Path,
) -> None:
    """An aborted transaction leaves the window while its Rollbacks still wait to be retried
    (presumed abort answers the client first), and the client's retry runs it afresh. Before,
    the earlier attempt's retried Rollback rolled back the new attempt's prepared branch: the
    client was told COMMITTED, heuristics were recorded, nothing was charged. Now the retry
    waits for those Rollbacks; the tombstones they leave refuse it: ABORTED, as the first."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={
                "finished_kept": 2,
                "backoff_ms_min": 300,
                "backoff_ms_max": 400,
            },
        ) as cluster:
            order = order_branches("o-t", [("sku-pear", 2)], amount_cents=200)
            branches = [order[1], order[2]]  # orders, payment
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_DOWN)
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_DOWN)
            first = await cluster.submit(branches, "txn-t")
            assert coordinator_pb2.OUTCOME_ABORTED == first.outcome
            for number in range(3):  # newer ones push it out of the window
                newer = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=1)
                assert COMMITTED == (await cluster.submit(newer[:1], f"txn-{number}")).outcome
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_NONE)
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_SLOW, delay_ms=600)
            retried = await cluster.submit(branches, "txn-t")
            assert coordinator_pb2.OUTCOME_ABORTED == retried.outcome, retried.reason
            assert "rolled back before prepare" in retried.reason
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_NONE)

            async def settled() -> bool:
                return not cluster.coordinator.engine.active

            await eventually(settled)
            heuristics = await cluster.client.ListHeuristics(
                coordinator_pb2.ListHeuristicsRequest()
            )
            assert [] == list(heuristics.heuristics)
            accounts = await cluster.accounts()
            assert [] == [c for c in accounts.captures if c.transaction_id == "txn-t"]
            order_t = (await cluster.orders()).get("o-t")
            assert order_t is None or shop_pb2.ORDER_STATE_CONFIRMED != order_t.state

    asyncio.run(scenario())


def test_a_reused_id_beyond_the_coordinators_memory_is_refused_and_nothing_applied(
    tmp_path: Path,
) -> None:
    """A participant keeps, with each branch, the fingerprint of the transaction it belongs to.
    Before, a Submit with other content under an id the coordinator had forgotten was answered
    from the participants' records: COMMITTED, and its own content never applied. Now every
    participant that remembers the id refuses it, also after a restart, and the client hears
    ALREADY_EXISTS; the same content is still answered from the records."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            newer = iter(range(100))

            async def forget() -> None:
                """Newer transactions push txn-kept out of the coordinator's memory."""
                for number in itertools.islice(newer, 3):
                    branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=1)
                    assert COMMITTED == (await cluster.submit(branches, f"txn-{number}")).outcome

            kept = order_branches("o-kept", [("sku-pear", 3)], amount_cents=300)
            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            await forget()
            other = order_branches("o-other", [("sku-pear", 5)], amount_cents=500)
            # Two branches as before and two new ones: answering the first two from their
            # records would have left the abort's Rollback to a committed branch.
            mixed = [*kept[:2], *other[2:]]

            async def refused(branches: list[coordinator_pb2.BranchRequest]) -> None:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await cluster.submit(branches, "txn-kept")
                assert grpc.StatusCode.ALREADY_EXISTS == raised.value.code()
                details = raised.value.details() or ""
                assert "'txn-kept' was already used for a different transaction" in details
                assert "nothing was applied: choose a new transaction id" in details

            await refused(other)
            await forget()
            await refused(mixed)
            await forget()
            assert COMMITTED == (await cluster.submit(kept, "txn-kept")).outcome
            await forget()
            # From the log alone (orders) and from a checkpoint (payment), after a restart.
            await cluster.participants["payment"].engine.checkpoint()
            await cluster.restart_participant("orders", OrdersService())
            await cluster.restart_participant("payment", PaymentService(dict(ACCOUNTS)))
            await refused(other)

            async def settled() -> bool:
                return not cluster.coordinator.engine.active  # no phase 2 left to retry

            await eventually(settled)
            await assert_nothing_held(cluster)
            assert 3 == (await cluster.stock())["sku-pear"].sold
            accounts = {a.account_id: a for a in (await cluster.accounts()).accounts}
            assert 312 == accounts["acct-alice"].captured_cents  # 300 + 12 x 1, once each
            assert "o-other" not in await cluster.orders()
            assert 13 == len((await cluster.sent()).sent)

    asyncio.run(scenario())


def test_a_participant_checks_the_fingerprint_of_a_repeated_prepare(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            inventory = cluster.participant_stub("inventory")
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=2)])
            )

            def prepare(fingerprint: bytes) -> participant_pb2.PrepareRequest:
                return participant_pb2.PrepareRequest(
                    transaction_id="t-fp",
                    branch=0,
                    operation=operation,
                    transaction_fingerprint=fingerprint,
                )

            first = await inventory.Prepare(prepare(b"A" * 16))
            assert (coordinator_pb2.VOTE_PREPARED, "") == (first.vote, first.id_reused)
            other = await inventory.Prepare(prepare(b"B" * 16))
            assert coordinator_pb2.VOTE_REFUSED == other.vote
            assert "branch 0 is prepared here" in other.id_reused
            # The same fingerprint, or none (a coordinator that does not send it): not a reused
            # id, but a later attempt of the same transaction, which cannot use the vote.
            for fingerprint in (b"A" * 16, b""):
                again = await inventory.Prepare(prepare(fingerprint))
                assert (coordinator_pb2.VOTE_REFUSED, "") == (again.vote, again.id_reused)
                assert "earlier attempt" in again.reason
            assert 2 == (await cluster.stock())["sku-apple"].reserved  # reserved once
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await inventory.Prepare(prepare(b"C" * 65))
            assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
            assert "transaction_fingerprint is 65 bytes; at most 64" in (
                raised.value.details() or ""
            )

    asyncio.run(scenario())


def test_another_attempt_of_an_id_waits_for_the_first_attempt_s_locks(tmp_path: Path) -> None:
    """Orders prepared branch 0 of t-fp's first attempt, order o-1, and it is in doubt (its
    coordinator forgot the attempt). Another attempt under the id creates o-1 in its branch
    1: a different transaction (fingerprint), so it waits for the first one's decision, and
    prepares once that is a rollback. The participant process names the lock table's
    transactions by attempt: by the id alone, it was refused at once as held by "branch
    t-fp/0 of this transaction"."""

    async def scenario() -> None:
        overrides = {**ASKS_LATER, "lock_wait_ms": 60_000}
        async with InProcessCluster(tmp_path, participant_overrides=overrides) as cluster:
            orders = cluster.participant_stub("orders")
            create = pack(
                shop_pb2.CreateOrder(
                    order_id="o-1",
                    customer_id="cust-1",
                    lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)],
                    amount_cents=100,
                )
            )

            def prepare(branch: int, fingerprint: bytes) -> participant_pb2.PrepareRequest:
                return participant_pb2.PrepareRequest(
                    transaction_id="t-fp",
                    branch=branch,
                    operation=create,
                    transaction_fingerprint=fingerprint,
                )

            first = await orders.Prepare(prepare(0, b"A" * 16))
            assert (coordinator_pb2.VOTE_PREPARED, "") == (first.vote, first.reason)
            other = asyncio.ensure_future(orders.Prepare(prepare(1, b"B" * 16)))
            locks = cluster.participants["orders"].locks

            async def waits() -> bool:
                return other.done() or any(lock.waiters for lock in locks.snapshot())

            await eventually(waits)
            assert not other.done(), other.result()
            await orders.Rollback(
                participant_pb2.RollbackRequest(
                    transaction_id="t-fp", branch=0, transaction_fingerprint=b"A" * 16
                )
            )
            answer = await other
            assert (coordinator_pb2.VOTE_PREPARED, "") == (answer.vote, answer.reason)
            await orders.Rollback(
                participant_pb2.RollbackRequest(
                    transaction_id="t-fp", branch=1, transaction_fingerprint=b"B" * 16
                )
            )
            assert [] == locks.snapshot()

    asyncio.run(scenario())


def test_a_decision_carrying_another_fingerprint_leaves_the_branch_alone(tmp_path: Path) -> None:
    """A Commit or Rollback carries its transaction's fingerprint. One for another
    transaction under the id (a reuse) changes nothing: a Rollback is acknowledged (that
    transaction never prepared here), a Commit is refused; unary and batched alike."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            inventory = cluster.participant_stub("inventory")
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=2)])
            )
            first = await inventory.Prepare(
                participant_pb2.PrepareRequest(
                    transaction_id="t-fp",
                    branch=0,
                    operation=operation,
                    one_phase=True,
                    transaction_fingerprint=b"A" * 16,
                )
            )
            assert coordinator_pb2.VOTE_COMMITTED == first.vote
            other = {"transaction_id": "t-fp", "branch": 0, "transaction_fingerprint": b"B" * 16}
            await inventory.Rollback(participant_pb2.RollbackRequest(**other))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await inventory.Commit(participant_pb2.CommitRequest(**other))
            assert grpc.StatusCode.FAILED_PRECONDITION == raised.value.code()
            assert "belongs to a different transaction here" in (raised.value.details() or "")
            decisions = [participant_pb2.Decision(commit=c, **other) for c in (False, True)]
            exchange = await inventory.Exchange(
                participant_pb2.ExchangeRequest(decisions=decisions)
            )
            code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert [(True, 0), (False, code)] == [(r.ok, r.code) for r in exchange.results]
            # Its own transaction's Rollback, or one that does not say, hears the commit.
            for fingerprint in (b"A" * 16, b""):
                request = participant_pb2.RollbackRequest(
                    transaction_id="t-fp", branch=0, transaction_fingerprint=fingerprint
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await inventory.Rollback(request)
                assert grpc.StatusCode.FAILED_PRECONDITION == raised.value.code()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await inventory.Rollback(
                    participant_pb2.RollbackRequest(
                        transaction_id="t-fp", branch=0, transaction_fingerprint=b"C" * 65
                    )
                )
            assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
            assert "transaction_fingerprint is 65 bytes" in (raised.value.details() or "")
            level = (await cluster.stock())["sku-apple"]
            assert (2, 0) == (level.sold, level.reserved)
            listed = await cluster.admin("inventory").ListBranches(
                participant_pb2.ListBranchesRequest()
            )
            states = [b.state for b in listed.branches if b.transaction_id == "t-fp"]
            assert [participant_pb2.BRANCH_STATE_COMMITTED] == states

    asyncio.run(scenario())


def test_the_rollback_of_a_reuse_is_not_recorded_as_a_heuristic_commit(tmp_path: Path) -> None:
    """A reuse of a forgotten id aborts before the participant that remembers the id could
    refuse it (down). Before, that participant answered the reuse's Rollback from the id's
    committed branch, and the coordinator recorded a heuristic commit that never happened."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 50, "backoff_ms_max": 100},
        ) as cluster:
            owner = order_branches("o-a", [("sku-pear", 3)], amount_cents=300)[:1]
            await commit_then_forget(cluster, owner, "txn-x")
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_DOWN)
            other = order_branches("o-b", [("sku-pear", 5)], amount_cents=500)
            reuse = await cluster.submit([other[0], other[2]], "txn-x")
            assert coordinator_pb2.OUTCOME_ABORTED == reuse.outcome
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

            await settled(cluster)  # its Rollbacks acknowledged
            heuristics = await cluster.client.ListHeuristics(
                coordinator_pb2.ListHeuristicsRequest()
            )
            assert [] == list(heuristics.heuristics)
            assert 3 == (await cluster.stock())["sku-pear"].sold
            accounts = await cluster.accounts()
            assert [] == [c for c in accounts.captures if c.transaction_id == "txn-x"]

    asyncio.run(scenario())


def test_a_lost_one_phase_answer_of_a_reuse_is_not_resolved_from_the_ids_branch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-phase reuse of a forgotten id whose answer does not come in time: the probe's
    Rollback asks the participant, which holds the id's committed branch. Before, that
    answer resolved the reuse COMMITTED, its own content never run."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            owner = order_branches("o-a", [("sku-pear", 3)], amount_cents=300)[:1]
            await commit_then_forget(cluster, owner, "txn-x")
            late = HeldPrepares(monkeypatch, "inventory", late=True)
            other = order_branches("o-b", [("sku-pear", 5)], amount_cents=500)
            reuse = await cluster.submit(other[:1], "txn-x")
            assert coordinator_pb2.OUTCOME_ABORTED == reuse.outcome, reuse.reason
            # The late prepare is answered: refused as a reuse.
            assert [coordinator_pb2.VOTE_REFUSED] == await late.run()
            assert 3 == (await cluster.stock())["sku-pear"].sold

    asyncio.run(scenario())


def test_a_late_retry_with_a_participant_down_is_answered_committed(tmp_path: Path) -> None:
    """The coordinator has forgotten a committed order (20,000 newer transactions; 2 here)
    and its client retries while payment is down. Before, the retry aborted: the client was
    told ABORTED for an order placed and paid, and each Rollback to a committed branch was
    recorded as a heuristic commit. Now the participants that remember answer that their
    branches are committed already: COMMITTED, nothing applied twice, no heuristic."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 50, "backoff_ms_max": 100},
        ) as cluster:
            order = order_branches("o-late", [("sku-pear", 2)], amount_cents=200)
            await commit_then_forget(cluster, order, "txn-late")
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_DOWN)
            retried = await cluster.submit(order, "txn-late")
            assert COMMITTED == retried.outcome, retried.reason
            assert "committed by an earlier attempt" in retried.reason
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_NONE)

            await settled(cluster)  # payment's Rollback got through
            heuristics = await cluster.client.ListHeuristics(
                coordinator_pb2.ListHeuristicsRequest()
            )
            assert [] == list(heuristics.heuristics)
            assert COMMITTED == (await cluster.submit(order, "txn-late")).outcome
            assert 2 == (await cluster.stock())["sku-pear"].sold
            accounts = await cluster.accounts()
            assert 1 == len([c for c in accounts.captures if c.transaction_id == "txn-late"])
            sent = (await cluster.sent()).sent
            assert 1 == len([m for m in sent if m.order_id == "o-late"])
            await assert_nothing_held(cluster)

    asyncio.run(scenario())


def test_a_late_retry_rolls_back_a_branch_a_participant_forgot_and_ran_again(
    tmp_path: Path,
) -> None:
    """The same late retry with every participant up, but inventory no longer remembers its
    branch (it keeps its last 100,000 decided ones; none here): it runs the branch again.
    Before, the retry committed, and the stock was taken twice. Now the others' answer
    (committed already) makes the retry roll back what it prepared: taken once."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            order = order_branches("o-again", [("sku-pear", 2)], amount_cents=200)
            await commit_then_forget(cluster, order, "txn-again", forgetting=["inventory"])
            retried = await cluster.submit(order, "txn-again")
            assert COMMITTED == retried.outcome, retried.reason
            await settled(cluster)
            level = (await cluster.stock())["sku-pear"]
            assert (2, 0) == (level.sold, level.reserved)
            accounts = await cluster.accounts()
            assert 1 == len([c for c in accounts.captures if c.transaction_id == "txn-again"])
            await assert_nothing_held(cluster)

    asyncio.run(scenario())


def test_a_late_retry_refused_by_a_participant_that_forgot_is_answered_committed(
    tmp_path: Path,
) -> None:
    """Inventory no longer remembers its branch and refuses the retry: the earlier attempt
    took the last stock. The others, slower, remember the commit. Before, the refusal was
    answered at once, ABORTED; and the first review of this change found the status and a
    second retry then turned COMMITTED. The answer now waits for the votes still out."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            order = await late_retry_of_the_last_stock(cluster, slow_ms=300)
            first = await cluster.submit(order, "txn-scarce")
            assert COMMITTED == first.outcome, first.reason
            for name in ("orders", "payment", "notification"):
                await cluster.set_fault(name, participant_pb2.FAULT_MODE_NONE)
            again = await cluster.submit(order, "txn-scarce")
            assert (COMMITTED, first.reason) == (again.outcome, again.reason)
            status = await cluster.client.GetTransaction(
                coordinator_pb2.GetTransactionRequest(transaction_id="txn-scarce")
            )
            assert coordinator_pb2.TRANSACTION_STATE_COMMITTED == status.state

    asyncio.run(scenario())


def test_a_late_retry_over_unary_calls_records_no_false_heuristic(tmp_path: Path) -> None:
    """The same late retry over unary calls (a participant without the batch capability):
    the abort's Rollbacks go at once, also to branches whose Prepare is still out, and a
    participant that remembers the commit answers "already committed" before its vote comes.
    A review found each such answer recorded as a heuristic commit; now it is held until the
    vote says it is the earlier commit."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 50, "backoff_ms_max": 100},
        ) as cluster:
            order = order_branches("o-unary", [("sku-pear", 2)], amount_cents=200)
            await commit_then_forget(cluster, order, "txn-unary")
            engine = cluster.coordinator.engine
            for name in ("inventory", "orders", "payment", "notification"):
                engine.registry.port(name).batch = False  # as for a participant not batching
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_DOWN)
            for name in ("orders", "payment", "notification"):
                await cluster.set_fault(name, participant_pb2.FAULT_MODE_SLOW, delay_ms=300)
            retried = await cluster.submit(order, "txn-unary")
            assert COMMITTED == retried.outcome, retried.reason
            heuristics = await cluster.client.ListHeuristics(
                coordinator_pb2.ListHeuristicsRequest()
            )
            assert [] == list(heuristics.heuristics)

    asyncio.run(scenario())


def test_a_late_retry_answered_committed_is_kept_though_a_participant_refused_it_as_a_reuse(
    tmp_path: Path,
) -> None:
    """orders forgot the commit of T (content c1) and then saw another content c2 under T's id
    (a reuse the others refused). A late retry of c1: orders refuses it as a reuse at once,
    the others, slower, say COMMITTED (earlier): the client is told COMMITTED. But the run,
    carrying id_reused, is left out of the finished window (_finish), so a retried Submit runs
    yet another attempt; with the remembering participants down, it is answered ALREADY_EXISTS
    (aborted), not COMMITTED: the answer changed (rule 14; a review)."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 10, "backoff_ms_max": 20},
        ) as cluster:
            orders = cluster.participants["orders"].engine
            c1 = order_branches("o-c1", [("sku-pear", 2)], amount_cents=200)
            orders._decided = DecidedWindow(0)  # forgets c1 once decided
            await commit_then_forget(cluster, c1, "txn-r")
            orders._decided = DecidedWindow(1000)  # remembers from now on
            c2 = order_branches("o-c2", [("sku-apple", 1)], amount_cents=7)
            try:
                await cluster.submit(c2, "txn-r")
            except grpc.aio.AioRpcError as error:
                assert grpc.StatusCode.ALREADY_EXISTS == error.code(), error

            await settled(cluster)
            for name in ("inventory", "payment", "notification"):
                await cluster.set_fault(name, participant_pb2.FAULT_MODE_SLOW, delay_ms=300)
            late = await cluster.submit(c1, "txn-r")
            assert COMMITTED == late.outcome, late.reason
            await settled(cluster)
            for name in ("inventory", "payment", "notification"):
                await cluster.set_fault(name, participant_pb2.FAULT_MODE_DOWN)
            try:
                again = await cluster.submit(c1, "txn-r")
                outcome = coordinator_pb2.Outcome.Name(again.outcome)
            except grpc.aio.AioRpcError as error:
                outcome = f"{error.code()}: {error.details()}"
            assert "OUTCOME_COMMITTED" == outcome

    asyncio.run(scenario())


def test_a_rerun_after_presumed_abort_cannot_commit_on_a_branch_answered_aborted(
    tmp_path: Path,
) -> None:
    """The coordinator crashes before deciding T, with inventory PREPARED. Restarted, it
    answers inventory's inquiry ABORTED (no record), and that answer is slow to arrive. The
    client retries T under the same id: the coordinator knows nothing of T and runs it again.
    Inventory's PREPARED vote must not be reused, or the retry commits while the ABORTED
    answer on its way rolls inventory back (found by a bug hunt)."""
    txn = "txn-rerun"

    def branches() -> list[coordinator_pb2.BranchRequest]:
        return [
            coordinator_pb2.BranchRequest(
                participant="inventory",
                operation=pack(
                    shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
                ),
            ),
            coordinator_pb2.BranchRequest(
                participant="payment",
                operation=pack(
                    shop_pb2.ChargePayment(account_id="acct-alice", amount_cents=7, order_id="o-r")
                ),
            ),
        ]

    async def states(cluster: InProcessCluster, name: str) -> list[str]:
        listed = await cluster.admin(name).ListBranches(participant_pb2.ListBranchesRequest())
        return [
            participant_pb2.BranchState.Name(b.state)
            for b in listed.branches
            if b.transaction_id == txn
        ]

    async def scenario() -> None:
        overrides = {"in_doubt_after_ms": 300, "tick_ms": 20}
        # The first attempt must still be undecided when the coordinator goes down, however
        # loaded the machine: a prepare timeout far beyond the time that takes. (Two branches
        # only: a third that resolves its own inquiry would refuse the retry by itself.)
        async with InProcessCluster(
            tmp_path, prepare_timeout_ms=10_000, participant_overrides=overrides
        ) as cluster:
            inventory = cluster.participants["inventory"]
            answered, deliver = asyncio.Event(), asyncio.Event()
            real_ask = inventory._ask

            async def slow_answer(stub: Any, key: tuple[str, int], now: int) -> None:
                class Network:
                    async def QueryOutcome(self, request: Any, timeout: float) -> Any:  # noqa: ASYNC109 (the stub's signature)
                        answer = await stub.QueryOutcome(request, timeout=timeout)
                        if answer.outcome == coordinator_pb2.OUTCOME_ABORTED:
                            answered.set()
                            await deliver.wait()
                        return answer

                await real_ask(Network(), key, now)

            inventory._ask = slow_answer  # type: ignore[method-assign]
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, 12_000)
            first = asyncio.ensure_future(cluster.submit(branches(), txn))

            async def inventory_prepared() -> bool:
                return ["BRANCH_STATE_PREPARED"] == await states(cluster, "inventory")

            await eventually(inventory_prepared)
            await cluster.restart_coordinator()  # nothing decided: presumed abort
            with pytest.raises(grpc.aio.AioRpcError):
                await first
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_NONE)
            await asyncio.wait_for(answered.wait(), 10)  # ABORTED, on its way

            retry = await cluster.submit(branches(), txn)
            assert coordinator_pb2.OUTCOME_ABORTED == retry.outcome
            assert "earlier attempt" in retry.reason
            deliver.set()

            async def settled() -> bool:
                return ["BRANCH_STATE_ROLLED_BACK"] == await states(cluster, "inventory")

            await eventually(settled)
            assert "BRANCH_STATE_COMMITTED" not in await states(cluster, "payment")

    asyncio.run(scenario())


def test_aborted_submit_retried_stays_aborted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            branches = order_branches("o-x", [("sku-scarce", 10)])
            first = await cluster.submit(branches, "txn-ab")
            second = await cluster.submit(branches, "txn-ab")
            assert ABORTED == first.outcome == second.outcome
            assert first.reason == second.reason

    asyncio.run(scenario())


def test_participant_calls_are_idempotent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            inventory = cluster.participant_stub("inventory")
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=5)])
            )
            prepare = participant_pb2.PrepareRequest(
                transaction_id="t-dup", branch=0, operation=operation
            )
            votes = await asyncio.gather(*(inventory.Prepare(prepare) for _ in range(3)))
            # The first prepares; the others, as from a later attempt, are refused (see
            # dtm.core.branch.EARLIER_ATTEMPT); the coordinator would count the first only.
            assert [coordinator_pb2.VOTE_PREPARED] + [coordinator_pb2.VOTE_REFUSED] * 2 == sorted(
                (v.vote for v in votes), key=lambda vote: vote != coordinator_pb2.VOTE_PREPARED
            )
            assert 5 == (await cluster.stock())["sku-apple"].reserved  # reserved once
            commit = participant_pb2.CommitRequest(transaction_id="t-dup", branch=0)
            await inventory.Commit(commit)
            await inventory.Commit(commit)
            assert 5 == (await cluster.stock())["sku-apple"].sold  # deducted once
            again = await inventory.Prepare(prepare)
            # Committed now: a later attempt hears that an earlier one committed it.
            assert coordinator_pb2.VOTE_COMMITTED == again.vote
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await inventory.Rollback(
                    participant_pb2.RollbackRequest(transaction_id="t-dup", branch=0)
                )
            assert grpc.StatusCode.FAILED_PRECONDITION == raised.value.code()

            rollback = participant_pb2.RollbackRequest(transaction_id="t-rb", branch=0)
            await inventory.Rollback(rollback)
            await inventory.Rollback(rollback)
            assert 5 == (await cluster.stock())["sku-apple"].sold

    asyncio.run(scenario())


def test_rollback_before_prepare_leaves_a_tombstone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            inventory = cluster.participant_stub("inventory")
            await inventory.Rollback(
                participant_pb2.RollbackRequest(transaction_id="t-late", branch=0)
            )
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            )
            late = await inventory.Prepare(
                participant_pb2.PrepareRequest(
                    transaction_id="t-late", branch=0, operation=operation
                )
            )
            assert coordinator_pb2.VOTE_REFUSED == late.vote
            assert "rolled back" in late.reason
            assert 0 == (await cluster.stock())["sku-apple"].reserved

    asyncio.run(scenario())


def test_single_branch_uses_one_phase_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            engine = cluster.coordinator.engine
            forced_before = engine.counters.forced_writes
            requests_before = engine.counters.requests
            branch = order_branches("o-1p", [("sku-apple", 1)])[0]
            response = await cluster.submit([branch])
            assert COMMITTED == response.outcome
            assert coordinator_pb2.VOTE_COMMITTED == response.branches[0].vote
            assert forced_before == engine.counters.forced_writes  # no coordinator log write
            assert requests_before + 1 == engine.counters.requests  # one call, no phase 2
            assert 1 == (await cluster.stock())["sku-apple"].sold

    asyncio.run(scenario())


def test_one_phase_unknown_is_resolved_and_a_retry_hears_the_real_outcome(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            branch = order_branches("o-unk", [("sku-apple", 1)])[:1]
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_DOWN)
            first = await cluster.submit(branch, "txn-unk")
            # Neither the prepare nor the probe got through: the client is told UNKNOWN.
            assert coordinator_pb2.OUTCOME_UNKNOWN == first.outcome
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)
            request = coordinator_pb2.GetTransactionRequest(transaction_id="txn-unk")

            async def resolved() -> bool:
                status = await cluster.client.GetTransaction(request)
                return bool(status.state == coordinator_pb2.TRANSACTION_STATE_ABORTED)

            await eventually(resolved)
            retried = await cluster.submit(branch, "txn-unk")
            assert ABORTED == retried.outcome
            assert 0 == (await cluster.stock())["sku-apple"].sold

    asyncio.run(scenario())


def test_a_graceful_stop_finishes_phase_two_before_it_exits(tmp_path: Path) -> None:
    """Stopping the coordinator (SIGTERM, or stop() here) first lets phase 2 finish, lingering
    decisions included, so that no participant is left in doubt and the next start has no
    commit to resume."""

    async def scenario() -> None:
        cluster = InProcessCluster(tmp_path)
        # Commits wait this long for a prepare to ride with: far longer than the test runs.
        cluster.coordinator_config.batch_decision_linger_ms = 60_000
        async with cluster:
            response = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "txn-1")
            assert COMMITTED == response.outcome, response.reason
            participants = cluster.participants.values()
            assert all(p.engine.in_doubt() for p in participants)  # the commits linger
            await cluster.coordinator.stop(5.0)
            assert not any(p.engine.in_doubt() for p in participants)
            orders = await cluster.orders()
            assert shop_pb2.ORDER_STATE_CONFIRMED == orders["o-1"].state
            # Its log says the transaction ended: a restart has nothing to resume.
            restarted = CoordinatorServer(
                ServerConfig(data_dir=cluster.coordinator_config.data_dir, listen="127.0.0.1:0")
            )
            cluster.coordinator = restarted  # stopped by the cluster at the end
            await restarted.start()
            assert {} == restarted.engine.active

    asyncio.run(scenario())
