"""The coordinator's window of finished transactions: bounded, newest first, kept as plain
tuples the garbage collector untracks, and up to date when a rollback is acknowledged after
the transaction finished."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from dtm.coordinator.finished import FinishedWindow, Record, pack
from dtmpb.v1 import coordinator_pb2
from tests.harness import InProcessCluster, eventually, order_branches

COMMITTED = coordinator_pb2.TRANSACTION_STATE_COMMITTED
ABORTED = coordinator_pb2.TRANSACTION_STATE_ABORTED


def record(transaction_id: str, state: int = COMMITTED, acknowledged: bool = True) -> Record:
    branch = (0, "inventory", coordinator_pb2.VOTE_PREPARED, "", acknowledged, 0, "", "")
    decision = b"decision-" + transaction_id.encode() if state == COMMITTED else b""
    head = (transaction_id, state, 1, "", 10, 11, 5_000, b"fp", "", "", decision, "")
    return pack(head, [branch])


def test_the_window_keeps_the_newest_and_lists_them_newest_first() -> None:
    window = FinishedWindow(3)
    for number in range(5):
        window.put(record(f"t{number}", ABORTED if number % 2 else COMMITTED))
    assert 3 == len(window)
    assert window.get("t1") is None
    assert ["t4", "t3", "t2"] == [view.transaction_id for view in window.newest_first()]
    assert ["t3"] == [view.transaction_id for view in window.newest_first({ABORTED})]
    view = window.get("t2")
    assert view is not None
    assert (COMMITTED, b"fp", 5_000) == (view.state, view.fingerprint, view.timeout_ms)
    assert "inventory" == view.branches[0].participant
    # What a checkpoint keeps: the commits' decision records, oldest first.
    assert [b"decision-t2", b"decision-t4"] == list(window.decisions())


def test_an_update_replaces_in_place_and_never_brings_back_a_forgotten_one() -> None:
    window = FinishedWindow(2)
    window.put(record("t0", acknowledged=False))
    window.put(record("t1"))
    window.update(record("t0", acknowledged=True))
    view = window.get("t0")
    assert view is not None and view.branches[0].acknowledged
    window.put(record("t2"))  # t0 is still the oldest: an update does not make it newer
    assert window.get("t0") is None
    window.update(record("t0"))
    assert window.get("t0") is None and 2 == len(window)


def test_finished_transactions_are_kept_as_tuples_the_collector_untracks(
    tmp_path: Path,
) -> None:
    """What the window holds must leave the young generation at the first collection: one
    tracked object per transaction (an enum, a Run) would be traversed again and again."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            for number in range(3):
                branches = order_branches(f"o-{number}", [("sku-apple", 1)], amount_cents=100)
                await cluster.submit(branches, f"txn-{number}")
            poor = order_branches("o-poor", [("sku-apple", 1)], account="acct-poor")
            await cluster.submit(poor, "txn-poor")
            window = cluster.coordinator.engine.finished

            async def all_finished() -> bool:
                return 4 == len(window)

            await eventually(all_finished)
            gc.collect()
            records = list(window._records.values())  # the stored form, not a view
            assert 4 == len(records)
            assert not [r[0] for r in records if gc.is_tracked(r)]
            views = [window.get(r[0]) for r in records]
            assert [4, 4, 4, 4] == [len(view.branches) for view in views if view]

    asyncio.run(scenario())


def test_a_rollback_acknowledged_after_the_abort_shows_in_the_transaction(
    tmp_path: Path,
) -> None:
    """An abort finishes the transaction at once (presumed abort); the rollbacks it sent are
    acknowledged later, and GetTransaction says so."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            poor = order_branches("o-poor", [("sku-apple", 1)], account="acct-poor")
            response = await cluster.submit(poor, "txn-poor")
            assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
            request = coordinator_pb2.GetTransactionRequest(transaction_id="txn-poor")

            async def rollbacks_acknowledged() -> bool:
                txn = await cluster.client.GetTransaction(request)
                # Every branch but payment's refusal was sent a Rollback (a vote that came
                # after the abort is not recorded).
                rolled = [b for b in txn.branches if b.vote != coordinator_pb2.VOTE_REFUSED]
                return 3 == len(rolled) and all(b.acknowledged for b in rolled)

            await eventually(rollbacks_acknowledged)
            txn = await cluster.client.GetTransaction(request)
            assert ABORTED == txn.state

    asyncio.run(scenario())
