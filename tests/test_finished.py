"""The coordinator's window of finished transactions: bounded, newest first, kept as plain
tuples the garbage collector untracks, and up to date when a rollback is acknowledged after
the transaction finished."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from google.protobuf import any_pb2

from dtm.coordinator.engine import CoordinatorConfig, Engine
from dtm.coordinator.finished import HELD_BEYOND_KEPT_MIN, FinishedWindow, Record, pack
from dtm.records import RecordType
from dtm.wal import MemoryLog
from dtmpb.v1 import coordinator_pb2
from tests.doubles import AnsweringRegistry, HeldLog
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


def test_a_commit_whose_end_record_is_not_durable_holds_the_window_until_it_is() -> None:
    window = FinishedWindow(1)
    assert 0 == window.put(record("t0"), end_lsn=5, durable_lsn=4)
    # t0 is the oldest beyond the one kept, and its end record (LSN 5) is not on disk: kept,
    # and so is everything newer; the window answers which LSN must be synced.
    assert 5 == window.put(record("t1", ABORTED), durable_lsn=4)
    assert 5 == window.put(record("t2", ABORTED), durable_lsn=4)
    assert ["t2", "t1", "t0"] == [view.transaction_id for view in window.newest_first()]
    assert 0 == window.trim(durable_lsn=5)
    assert ["t2"] == [view.transaction_id for view in window.newest_first()]
    # An end record already durable when the commit finished holds nothing.
    assert 0 == window.put(record("t3"), end_lsn=6, durable_lsn=6)
    assert 0 == window.put(record("t4", ABORTED), durable_lsn=6)
    assert ["t4"] == [view.transaction_id for view in window.newest_first()]


def test_a_held_window_stays_bounded_while_the_sync_it_waits_for_does_not_come() -> None:
    """Held by a commit whose end record is not durable, the window kept everything newer,
    so while that sync did not come (a disk that hangs) every abort and one-phase commit that
    finished grew it without a bound (a limits hunt). Past `kept` + max(`kept`,
    HELD_BEYOND_KEPT_MIN), it forgets the oldest that nothing holds; the held commit stays,
    and so does the LSN it waits for."""
    kept, more = 2, HELD_BEYOND_KEPT_MIN
    window = FinishedWindow(kept)
    window.put(record("t-held"), end_lsn=5, durable_lsn=4)
    count = 3 * more
    waits_for = [window.put(record(f"t{n}", ABORTED), durable_lsn=4) for n in range(count)]
    assert {5} == set(waits_for[kept:])  # held from the third on
    assert kept + more == len(window)
    newest = [view.transaction_id for view in window.newest_first()]
    assert "t-held" == newest[-1] and f"t{count - 1}" == newest[0]
    assert f"t{count - (kept + more - 1)}" == newest[-2]  # the oldest unheld one kept
    assert 0 == window.trim(durable_lsn=5)
    assert [f"t{count - 1}", f"t{count - 2}"] == [v.transaction_id for v in window.newest_first()]


# ---- the engine's window against a log whose fsyncs can be held back ----


def held_engine(log: HeldLog, finished_kept: int) -> tuple[Engine, AnsweringRegistry]:
    registry = AnsweringRegistry()
    return Engine(log, registry, CoordinatorConfig(finished_kept=finished_kept)), registry


async def run(engine: Engine, transaction_id: str, *participants: str) -> int:
    branches = [(name, any_pb2.Any()) for name in participants]
    view = await engine.submit(transaction_id, branches, 5_000, transaction_id.encode())

    async def over() -> bool:  # its phase 2 too: a commit finishes on its last acknowledgement
        return transaction_id not in engine.active

    await eventually(over)
    return view.state


def test_the_engine_forgets_a_commit_only_once_its_end_record_is_durable() -> None:
    """A commit's end record is lazy. Forgotten before it is on disk, then lost in a crash, the
    commit was resumed from its decision record, while a late retry, not remembered, had run
    afresh in between (the simulator's seed 3389). Here nothing forced follows the commit,
    only aborts: the window holds it, asks for one fsync, and lets it go after that."""

    async def scenario() -> None:
        log = HeldLog()
        engine, registry = held_engine(log, finished_kept=1)
        assert COMMITTED == await run(engine, "t-commit", "yes-a", "yes-b")
        end_lsn = log.appended_lsn
        assert RecordType.TRANSACTION_ENDED == log.records[-1].record_type
        assert end_lsn > log.durable_lsn  # lazy: nobody waited for it
        log.hold()
        for number in range(3):
            assert ABORTED == await run(engine, f"t-abort-{number}", "yes-a", "no")
        # Kept beyond finished_kept, with what finished after it, and one fsync asked for.
        assert "t-commit" in engine.finished and 4 == len(engine.finished)
        assert 1 == log.waited.count(end_lsn)
        # A late retry is answered from the window: nothing runs afresh.
        sent = len(registry.sent)
        assert COMMITTED == await run(engine, "t-commit", "yes-a", "yes-b")
        assert sent == len(registry.sent)
        log.release()

        async def trimmed() -> bool:
            return 1 == len(engine.finished)

        await eventually(trimmed)
        assert end_lsn <= log.durable_lsn
        assert ["t-abort-2"] == [view.transaction_id for view in engine.finished.newest_first()]
        await engine.close()

    asyncio.run(scenario())


def test_a_commit_held_by_the_window_is_in_a_checkpoint_as_ended() -> None:
    """A checkpoint taken while the window holds a commit keeps it among the ended ones: a
    restart from it remembers the commit and resumes nothing."""

    async def scenario() -> None:
        log = HeldLog()
        engine, _ = held_engine(log, finished_kept=1)
        assert COMMITTED == await run(engine, "t-commit", "yes-a", "yes-b")
        log.hold()
        assert ABORTED == await run(engine, "t-abort", "yes-a", "no")
        assert "t-commit" in engine.finished
        checkpointed = MemoryLog()
        await engine.checkpoints.write(
            checkpointed, RecordType.COORDINATOR_CHECKPOINT, engine.checkpoint_records
        )
        restarted, _ = held_engine(HeldLog(), finished_kept=1)
        assert [] == restarted.replay(checkpointed.records)
        view = restarted.finished.get("t-commit")
        assert view is not None and COMMITTED == view.state
        log.release()
        await engine.close()

    asyncio.run(scenario())


def test_the_window_adds_no_fsync_when_a_later_one_covers_the_end_record() -> None:
    """The next commit's forced decision record carries the previous commit's end record to
    disk: the window then forgets it without asking for an fsync of its own."""

    async def scenario() -> None:
        log = HeldLog()
        engine, _ = held_engine(log, finished_kept=1)
        for number in range(4):
            assert COMMITTED == await run(engine, f"t-{number}", "yes-a", "yes-b")
        ends = [r.lsn for r in log.records if r.record_type == RecordType.TRANSACTION_ENDED]
        decisions = [r.lsn for r in log.records if r.record_type == RecordType.COMMIT_DECIDED]
        assert decisions == log.waited and 4 == len(ends)
        assert ["t-3"] == [view.transaction_id for view in engine.finished.newest_first()]
        await engine.close()

    asyncio.run(scenario())


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


def test_a_heuristic_marked_after_the_end_goes_to_the_branch_of_that_number() -> None:
    """A commit remembered from its decision record lists only its updating branches: here
    branch 1 alone, behind a read-only branch 0. Marking branch 1 marks that row; marking
    branch 0, which has no row, marks nothing."""
    window = FinishedWindow(2)
    head = ("t1", COMMITTED, 1, "", 10, 11, 5_000, b"fp", "", "", b"decision", "")
    window.put(pack(head, [(1, "inventory", coordinator_pb2.VOTE_PREPARED, "", False, 0, "", "")]))
    window.mark_heuristic("t1", 0, "heuristic rollback")
    window.mark_heuristic("t1", 1, "heuristic commit")
    view = window.get("t1")
    assert view is not None
    assert [(1, True, "heuristic commit")] == [
        (b.branch, b.acknowledged, b.heuristic) for b in view.branches
    ]
