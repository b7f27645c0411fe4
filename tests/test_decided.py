"""The participant's window of decided branches: bounded, oldest out first, and the bytes a
checkpoint writes for it always the entries' own, in order."""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Callable

import pytest
from google.protobuf import any_pb2

from dtm.core.branch import Branch, BranchState, BranchVote, ErrorKind
from dtm.records import RecordType
from dtm.wal import LogRecord, MemoryLog
from dtmpb.v1 import log_pb2, shop_pb2
from participants import decided
from participants.branches import BranchEngine, BranchError, BranchInfo
from participants.decided import DecidedWindow
from participants.locks import LockManager
from participants.services.inventory import InventoryService


def key(n: int) -> tuple[str, int]:
    return (f"txn-{n}", 1)


def engine_with(
    kept: int = 3, forced_kept: int = 10, clock_ms: Callable[[], int] = lambda: 0
) -> BranchEngine:
    return BranchEngine(
        InventoryService(),
        MemoryLog(),
        LockManager(wait_timeout_s=0.5),
        clock_ms=clock_ms,
        decided_kept=kept,
        forced_kept=forced_kept,
    )


def reserve(quantity: int = 1) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(
        shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=quantity)])
    )
    return packed


def known(engine: BranchEngine) -> list[tuple[str, int]]:
    """Every branch the engine knows, in `listed` order."""
    return [info.branch.key for info in engine.listed(set(), 1 << 20)]


def test_window_keeps_the_most_recent_in_order_across_chunks() -> None:
    window = DecidedWindow(kept=2 * decided.CHUNK + 5)
    evicted: list[tuple[str, int]] = []
    total = 5 * decided.CHUNK + 3
    for n in range(total):
        evicted += window.put(key(n), f"<{n}>".encode())
    assert len(window) == 2 * decided.CHUNK + 5
    assert evicted == [(key(n), f"<{n}>".encode()) for n in range(total - len(window))]
    newest_first = [key(n) for n in reversed(range(total - len(window), total))]
    assert [k for k, _ in window.newest_first()] == newest_first
    assert window.get(key(total - 1)) == f"<{total - 1}>".encode() and window.get(key(0)) is None
    expected = b"".join(f"<{n}>".encode() for n in range(total - len(window), total))
    assert b"".join(window.pieces(1 << 20)) == expected
    # Chunks larger than a record give their entries one by one.
    small = window.pieces(10)
    assert b"".join(small) == expected and max(map(len, small)) <= 10


def test_window_re_encodes_an_entry_in_place_even_in_a_joined_chunk() -> None:
    window = DecidedWindow(kept=10 * decided.CHUNK)
    for n in range(3 * decided.CHUNK):
        window.put(key(n), b"a")
    before = window.pieces(1 << 20)  # every chunk joined and cached
    assert [] == window.put(key(5), b"B")  # already there: no growth, no eviction
    assert len(window) == 3 * decided.CHUNK
    after = b"".join(window.pieces(1 << 20))
    assert after == b"a" * 5 + b"B" + b"a" * (3 * decided.CHUNK - 6)
    again = window.pieces(1 << 20)
    assert before[0] is not again[0]  # the changed chunk is joined again
    assert all(a is b for a, b in zip(before[1:], again[1:], strict=True))  # the rest reused


def test_window_matches_an_ordered_dict_under_random_use() -> None:
    rng = random.Random(7)
    kept = 3 * decided.CHUNK // 2
    window = DecidedWindow(kept)
    model: dict[tuple[str, int], bytes] = {}
    for step in range(8 * decided.CHUNK):
        k = key(rng.randrange(step + 1))
        entry = f"{step};".encode()
        evicted = window.put(k, entry)
        if k in model:
            model[k] = entry  # keeps its place
        else:
            model[k] = entry
            while len(model) > kept:
                oldest = next(iter(model))
                assert (oldest, model.pop(oldest)) == evicted.pop(0)
        assert evicted == []
        if step % 97 == 0:
            assert b"".join(window.pieces(1 << 20)) == b"".join(model.values())
    assert len(window) == len(model)


def test_engine_forgets_the_oldest_decided_branches_and_a_checkpoint_restores_the_rest() -> None:
    first = engine_with()
    for n in range(5):
        first.decide_now(f"txn-{n}", 1, commit=False)  # unknown: a tombstone, decided
    assert known(first) == [key(2), key(3), key(4)]

    async def checkpoint() -> None:
        await first.checkpoint()

    asyncio.run(checkpoint())
    assert isinstance(first.log, MemoryLog)
    second = engine_with()
    second.replay(first.log.records)
    assert known(second) == [key(2), key(3), key(4)]
    assert all(info.branch.state.value == "rolled_back" for info in second.listed(set(), 10))
    # Restored into a smaller window (the setting changed): the oldest go, the newest stay.
    third = engine_with(kept=2)
    third.replay(first.log.records)
    assert known(third) == [key(3), key(4)]


def test_a_forced_branch_outlives_the_window_until_its_coordinator_decides() -> None:
    """Rule 17: a Rollback arriving after the window forgot a forced commit would otherwise be
    acknowledged as a tombstone, and the heuristic outcome would go unreported."""

    async def scenario() -> None:
        first = engine_with()
        assert first.begin_prepare("forced", 1, reserve(), False) == (BranchVote.PREPARED, "")
        await first.force(("forced", 1), commit=True)
        for n in range(10):  # ten later decisions: the window (3) is long past it
            first.decide_now(f"txn-{n}", 1, commit=False)
        assert first.branch(("forced", 1)) and not first.branch(("txn-0", 1))

        # It survives a checkpoint and a restart, still unreported.
        await first.checkpoint()
        assert isinstance(first.log, MemoryLog)
        second = engine_with()
        second.replay(first.log.records)
        assert second.branch(("forced", 1))
        for n in range(10, 20):
            second.decide_now(f"txn-{n}", 1, commit=False)

        # The coordinator's Rollback hears the heuristic, not a tombstone's acknowledgement.
        with pytest.raises(BranchError) as error:
            second.decide_now("forced", 1, commit=False)
        assert error.value.kind is ErrorKind.HEURISTIC
        # Reported: from now on it is kept like any decided branch, and a retry still finds it.
        with pytest.raises(BranchError):
            second.decide_now("forced", 1, commit=False)
        for n in range(20, 23):
            second.decide_now(f"txn-{n}", 1, commit=False)
        assert not second.branch(("forced", 1))

    asyncio.run(scenario())


def test_a_forced_branch_is_reconciled_by_its_coordinators_answer() -> None:
    """The inquiry loop asks the coordinator about forced branches too (one with no record of
    the transaction never sends a decision): its answer ends the wait as the decision would,
    kept past the window or not, counted by whether it agreed with the forced outcome; the
    coordinator's own decision is counted the same way."""

    async def scenario() -> None:
        forced_at = iter(range(100, 10_000, 100))
        engine = engine_with(clock_ms=lambda: next(forced_at))
        keys = [("commit-agreed", 1), ("commit-contradicted", 1), ("rollback-decided", 1)]
        for (txn, index), commit in zip(keys, (True, True, False), strict=True):
            engine.begin_prepare(txn, index, reserve(), False)
            await engine.force((txn, index), commit=commit)
        for n in range(10):  # the window (3) pushes the first ones past it
            engine.decide_now(f"txn-{n}", 1, commit=False)
        assert [k for k, _ in engine.forced_awaiting()] == keys
        assert all(at > 0 for _, at in engine.forced_awaiting())  # when forced: asked after
        assert 3 == engine.forced_awaiting_count

        agreed = engine.reconcile_forced(keys[0], commit=True)
        assert agreed is not None and agreed.branch.heuristic == "heuristic commit"
        contradicted = engine.reconcile_forced(keys[1], commit=False)
        assert contradicted is not None and contradicted.branch.state is BranchState.COMMITTED
        assert engine.reconcile_forced(keys[1], commit=False) is None  # no longer awaiting
        # The coordinator's own Rollback, the same way: agreed.
        engine.decide_now(*keys[2], commit=False)
        assert (2, 1) == (engine.counters.forced_agreed, engine.counters.forced_contradicted)
        assert not engine.forced_awaiting() and 0 == engine.forced_awaiting_count
        for reconciled in keys:
            assert not engine.awaiting_coordinator(reconciled)
        # Back in the window as the newest: a late decision still hears the heuristic.
        with pytest.raises(BranchError) as late:
            engine.decide_now(*keys[1], commit=False)
        assert late.value.kind is ErrorKind.HEURISTIC
        assert (2, 1) == (engine.counters.forced_agreed, engine.counters.forced_contradicted)

    asyncio.run(scenario())


class SyncedOnWait(MemoryLog):
    """A MemoryLog whose records are durable only once a wait_durable syncs them (every one
    appended so far, as one fsync does): what a crash keeps is `durable()`."""

    def __init__(self) -> None:
        super().__init__()
        self.synced = 0

    @property
    def durable_lsn(self) -> int:
        return self.synced

    async def wait_durable(self, lsn: int) -> None:
        await super().wait_durable(lsn)
        if lsn > self.synced:  # as the real log: no fsync for what is durable already
            self.synced = self.appended_lsn

    def durable(self) -> list[LogRecord]:
        return [record for record in self.records if record.lsn <= self.synced]


def reconciled_lsns(log: MemoryLog) -> list[int]:
    return [r.lsn for r in log.records if r.record_type == RecordType.BRANCH_RECONCILED]


def test_a_forced_branch_is_reconciled_durably_before_the_coordinators_decision_is_answered() -> (
    None
):
    """The coordinator forgets a commit once every branch acknowledged it. Had the forced
    branch's acknowledgement left before the record that it was reconciled was durable, a
    crash would bring it back awaiting, asking about a commit its coordinator no longer knows,
    and hearing ABORTED (presumed abort): a wrong verdict. So when the decision's call returns
    (the unary one, and the batch's decide_now + wait_durable), the record is on disk, and a
    restart from what a crash keeps does not await the coordinator or count anything again."""

    async def scenario() -> None:
        log = SyncedOnWait()
        engine = BranchEngine(
            InventoryService(), log, LockManager(wait_timeout_s=0.5), clock_ms=lambda: 0
        )
        keys = [("agreed", 1), ("contradicted", 1), ("batched", 1)]
        for txn, index in keys:
            engine.begin_prepare(txn, index, reserve(), False)
            await engine.force((txn, index), commit=True)
        await engine.commit(*keys[0])  # agrees: acknowledged
        assert log.durable_lsn >= reconciled_lsns(log)[0]
        with pytest.raises(BranchError) as heuristic:  # contradicts: the heuristic answer
            await engine.rollback(*keys[1])
        assert heuristic.value.kind is ErrorKind.HEURISTIC
        assert log.durable_lsn >= reconciled_lsns(log)[1]
        engine.decide_now(*keys[2], commit=True)  # DecideBatch's way
        await engine.wait_durable([keys[2]])
        assert log.durable_lsn >= reconciled_lsns(log)[2]
        assert (2, 1) == (engine.counters.forced_agreed, engine.counters.forced_contradicted)

        crashed = BranchEngine(
            InventoryService(), MemoryLog(), LockManager(wait_timeout_s=0.5), clock_ms=lambda: 0
        )
        crashed.replay(log.durable())
        assert not crashed.forced_awaiting()
        assert (0, 0) == (crashed.counters.forced_agreed, crashed.counters.forced_contradicted)
        with pytest.raises(BranchError) as late:  # a retried decision hears the same
            crashed.decide_now(*keys[1], commit=False)
        assert late.value.kind is ErrorKind.HEURISTIC
        assert (0, 0) == (crashed.counters.forced_agreed, crashed.counters.forced_contradicted)

    asyncio.run(scenario())


def test_an_inquirys_reconciliation_is_lazy_but_written_before_any_later_answer() -> None:
    """The coordinator does not wait on an inquiry's answer, so its record is not forced: a
    crash that loses it costs one more inquiry with the same answer. But a later Commit of the
    branch (whose acknowledgement lets the coordinator forget the commit) waits for it."""

    async def scenario() -> None:
        log = SyncedOnWait()
        engine = BranchEngine(
            InventoryService(), log, LockManager(wait_timeout_s=0.5), clock_ms=lambda: 0
        )
        forced = ("forced", 1)
        engine.begin_prepare(*forced, reserve(), False)
        await engine.force(forced, commit=True)
        synced = log.durable_lsn
        writes = engine.forced_writes
        assert engine.reconcile_forced(forced, commit=True) is not None
        [lsn] = reconciled_lsns(log)
        assert (synced, writes) == (log.durable_lsn, engine.forced_writes)  # lazy
        await engine.commit(*forced)  # the coordinator's Commit, after the inquiry
        assert log.durable_lsn >= lsn
        assert (1, 0) == (engine.counters.forced_agreed, engine.counters.forced_contradicted)

    asyncio.run(scenario())


def test_a_reconciled_forced_branch_is_not_awaiting_after_a_replay_or_a_checkpoint() -> None:
    """Reconciled forced branches, in the window or kept past it, stay reconciled across a
    restart from the log alone and from a checkpoint: not awaiting, not asked about, not
    counted again; the unreconciled one still awaits. A log from before the BranchReconciled
    record (none in it) brings every forced branch back awaiting, to be asked again."""

    async def scenario() -> None:
        first = engine_with(kept=4)
        keys = [("by-inquiry", 1), ("by-decision", 1), ("unreconciled", 1)]
        for txn, index in keys:
            first.begin_prepare(txn, index, reserve(), False)
            await first.force((txn, index), commit=True)
        for n in range(5):  # pushes the forced ones past the window (4)
            first.decide_now(f"txn-{n}", 1, commit=False)
        assert first.reconcile_forced(keys[0], commit=False) is not None  # contradicted
        first.decide_now("txn-5", 1, commit=False)
        first.decide_now(*keys[1], commit=True)  # agreed
        # Both back in the window, each the newest when reconciled; the other past it still.
        assert known(first) == [keys[2], ("txn-4", 1), keys[0], ("txn-5", 1), keys[1]]
        assert [keys[2]] == [k for k, _ in first.forced_awaiting()]
        assert isinstance(first.log, MemoryLog)

        from_log = engine_with(kept=4)
        from_log.replay(first.log.records)
        old_log = engine_with(kept=4)
        old_log.replay(
            [r for r in first.log.records if r.record_type != RecordType.BRANCH_RECONCILED]
        )
        await first.checkpoint()
        from_checkpoint = engine_with(kept=4)
        from_checkpoint.replay(first.log.records)
        for restarted in (from_log, from_checkpoint):
            assert [keys[2]] == [k for k, _ in restarted.forced_awaiting()]
            assert (0, 0) == (
                restarted.counters.forced_agreed,
                restarted.counters.forced_contradicted,
            )
            for reconciled in keys[:2]:
                info = restarted.branch(reconciled)
                assert info is not None and info.reconciled and info.branch.heuristic
                assert restarted.reconcile_forced(reconciled, commit=True) is None
        assert sorted(keys) == sorted(k for k, _ in old_log.forced_awaiting())

    asyncio.run(scenario())


def test_an_operator_forgets_a_forced_branch_durably() -> None:
    """A coordinator that never logged the transaction never sends a decision: once reconciled,
    the operator forgets the forced branch, and it then leaves with the window, across
    restarts from the log alone and from a checkpoint."""

    async def scenario() -> None:
        first = engine_with()
        assert isinstance(first.log, MemoryLog)
        forced = ("forced", 1)
        first.begin_prepare("forced", 1, reserve(), False)
        first.begin_prepare("open", 1, reserve(), False)
        first.decide_now("plain", 1, commit=False)
        for unfit, kind in [
            (("ghost", 1), ErrorKind.NOT_FOUND),
            (("open", 1), ErrorKind.FAILED_PRECONDITION),  # in doubt
            (forced, ErrorKind.FAILED_PRECONDITION),  # in doubt too, not yet forced
            (("plain", 1), ErrorKind.FAILED_PRECONDITION),  # decided by its coordinator
        ]:
            records = len(first.log.records)
            with pytest.raises(BranchError) as refused:
                await first.forget(unfit)
            assert (kind, records) == (refused.value.kind, len(first.log.records))
        await first.force(forced, commit=True)
        for n in range(10):
            first.decide_now(f"txn-{n}", 1, commit=False)
        assert first.awaiting_coordinator(forced) and forced not in known(first)[-3:]
        # Listed apart: the newest-first listing of everything would reach it last.
        assert [forced] == [info.branch.key for info in first.awaiting(set(), 10)]
        assert [] == first.awaiting({BranchState.ROLLED_BACK}, 10)

        info = await first.forget(forced)
        assert info.forgotten and info.branch.heuristic == "heuristic commit"
        assert not first.awaiting_coordinator(forced) and not first.awaiting(set(), 10)
        assert known(first)[-2:] == [forced, ("open", 1)]  # back in the window, the newest
        records = len(first.log.records)
        again = await first.forget(forced)  # answers the same, writes nothing more
        assert again.forgotten and len(first.log.records) == records
        # A late decision still hears the heuristic outcome while the window keeps it.
        with pytest.raises(BranchError) as late:
            first.decide_now("forced", 1, commit=False)
        assert late.value.kind is ErrorKind.HEURISTIC

        # Restarted from the log alone (no checkpoint yet), then from a checkpoint.
        from_log = engine_with()
        from_log.replay(first.log.records)
        await first.checkpoint()
        from_checkpoint = engine_with()
        from_checkpoint.replay(first.log.records)
        for restarted in (from_log, from_checkpoint):
            kept = restarted.branch(forced)
            assert kept is not None and kept.forgotten
            assert not restarted.awaiting_coordinator(forced)
            for n in range(10, 13):
                restarted.decide_now(f"txn-{n}", 1, commit=False)
            assert restarted.branch(forced) is None  # gone with the window

    asyncio.run(scenario())


def test_forced_branches_past_the_window_are_bounded() -> None:
    engine = engine_with(kept=2, forced_kept=3)

    async def scenario() -> None:
        for n in range(6):
            engine.begin_prepare(f"forced-{n}", 1, reserve(), False)
            await engine.force((f"forced-{n}", 1), commit=n % 2 == 0)
        for n in range(5):
            engine.decide_now(f"txn-{n}", 1, commit=False)

    asyncio.run(scenario())
    # The three newest forced ones outlive the window of 2; the rest went with it.
    assert sorted(k for k in known(engine) if k[0].startswith("forced")) == [
        ("forced-3", 1),
        ("forced-4", 1),
        ("forced-5", 1),
    ]


def test_decided_branches_are_kept_as_bytes_not_objects_and_listed_newest_last() -> None:
    """A decided branch is its checkpoint entry only: 100,000 of them as objects kept the
    participants' middle-generation collections busy. Read back, it answers as before."""
    clock = [1_000]
    engine = engine_with(kept=50, clock_ms=lambda: clock[0])

    gc.collect()
    objects_before = sum(type(o) in (Branch, BranchInfo) for o in gc.get_objects())
    for n in range(40):
        clock[0] += 1
        vote = engine.begin_prepare(f"txn-{n}", 1, reserve(1 if n % 4 else 1_000_000), False)
        if vote == (BranchVote.PREPARED, ""):
            engine.decide_now(f"txn-{n}", 1, commit=n % 3 != 0)
    engine.begin_prepare("open", 1, reserve(), False)  # stays prepared
    gc.collect()
    objects_after = sum(type(o) in (Branch, BranchInfo) for o in gc.get_objects())
    assert objects_after - objects_before == 2  # the open branch's, and nothing else

    assert len(known(engine)) == 41
    listed = engine.listed(set(), 5)
    assert [i.branch.key for i in listed] == [*[key(n) for n in range(36, 40)], ("open", 1)]
    refused = engine.listed({BranchState.REFUSED}, 100)
    assert [i.branch.key for i in refused] == [key(n) for n in range(0, 40, 4)]
    assert all(i.branch.reason.startswith("out of stock") for i in refused)
    committed = engine.branch(key(1))
    assert committed is not None and committed.branch.state is BranchState.COMMITTED
    assert committed.updated_at_ms == 1_002  # when it was decided

    # Read back, a decided branch answers every duplicate as it did when it was decided.
    clock[0] += 1000
    assert engine.begin_prepare("txn-4", 1, reserve(1_000_000), False)[0] is BranchVote.REFUSED
    rolled_back = (BranchVote.REFUSED, "rolled back by the coordinator")
    assert engine.begin_prepare("txn-3", 1, reserve(), False) == rolled_back
    engine.decide_now("txn-1", 1, commit=True)  # a duplicate Commit: acknowledged
    with pytest.raises(BranchError) as error:
        engine.decide_now("txn-1", 1, commit=False)
    assert error.value.kind is ErrorKind.FAILED_PRECONDITION
    again = engine.branch(key(1))
    assert again is not None and again.updated_at_ms == 1_002  # answering changed nothing


def test_an_inquiry_answer_resolves_only_a_branch_still_in_doubt() -> None:
    engine = engine_with()
    assert engine.begin_prepare("t-q", 1, reserve(), False) == (BranchVote.PREPARED, "")
    assert engine.learn_outcome(("t-q", 1), commit=True)
    info = engine.branch(("t-q", 1))
    assert info is not None and info.branch.state is BranchState.COMMITTED
    # A second answer (or one after the Commit itself) finds it decided: nothing to learn.
    assert not engine.learn_outcome(("t-q", 1), commit=True)
    assert not engine.learn_outcome(("t-never", 1), commit=False)


def test_an_inquiry_answer_about_a_forgotten_branch_prepared_again_changes_nothing() -> None:
    """The branch is decided, pushed out of the window of decided branches, and prepared
    again (a stale or retried Prepare, here waiting for a lock) before the answer of an
    inquiry made while it was in doubt arrives. learn_outcome raised BranchProtocolError
    (PREPARING, OutcomeLearned). Now the answer is ignored: no record, no lease renewal, and
    the prepare goes on to its own vote."""

    async def scenario() -> None:
        clock = [1_000]
        engine = BranchEngine(
            InventoryService(lock_skus=True),
            MemoryLog(),
            LockManager(wait_timeout_s=0.5),
            clock_ms=lambda: clock[0],
            monotonic_ms=lambda: clock[0],
            decided_kept=1,
        )
        key = ("t-q", 1)
        assert engine.begin_prepare(*key, reserve(), False) == (BranchVote.PREPARED, "")
        engine.decide_now(*key, commit=False)  # its Rollback, while an inquiry is in flight
        engine.decide_now("t-other", 1, commit=False)  # pushes it out of the window
        assert engine.branch(key) is None
        assert engine.begin_prepare("t-holder", 1, reserve(), False)[0] is BranchVote.PREPARED
        again = engine.begin_prepare(*key, reserve(), False, lock_wait_s=5)
        assert not isinstance(again, tuple)  # waits for t-holder's lock
        appended = engine.log.appended_lsn
        clock[0] = 2_000
        for commit in (True, False):
            assert not engine.learn_outcome(key, commit=commit)
        info = engine.branch(key)
        assert info is not None and BranchState.PREPARING is info.branch.state
        assert (appended, 1_000, 1_000) == (
            engine.log.appended_lsn,
            info.updated_at_ms,
            info.updated_monotonic_ms,  # what the lease counts from
        )
        engine.decide_now("t-holder", 1, commit=False)
        assert (BranchVote.PREPARED, "") == await again

    asyncio.run(scenario())


def test_a_duplicate_prepare_does_not_renew_the_lease_of_a_branch_waiting_for_locks() -> None:
    async def scenario() -> None:
        clock = [1_000]
        engine = BranchEngine(
            InventoryService(lock_skus=True),  # the waiter waits for the holder's SKU lock
            MemoryLog(),
            LockManager(wait_timeout_s=0.5),
            clock_ms=lambda: clock[0],
        )
        assert engine.begin_prepare("t-holder", 1, reserve(), False) == (BranchVote.PREPARED, "")
        waiting = engine.begin_prepare("t-waiter", 1, reserve(), False, lock_wait_s=5)
        assert [("t-waiter", 1)] == [info.branch.key for info in engine.preparing()]
        clock[0] = 4_000
        again = engine.begin_prepare("t-waiter", 1, reserve(), False, lock_wait_s=5)
        info = engine.branch(("t-waiter", 1))
        assert info is not None and 1_000 == info.updated_at_ms  # the lease still counts from 1,000
        engine.expire_lease(("t-waiter", 1))  # it ran out: the branch is refused
        for pending in (waiting, again):
            assert not isinstance(pending, tuple)
            assert (await pending)[0] is BranchVote.REFUSED

    asyncio.run(scenario())


def test_a_branch_rolled_back_while_preparing_answers_the_same_after_a_restart() -> None:
    """Its rollback record keeps the reason and the transaction's fingerprint, as memory did:
    before, a restart made it a plain tombstone, so a Prepare of other content under the same
    id was refused as ABORTED instead of ALREADY_EXISTS (found by a bug hunt)."""
    from dtmpb.v1 import shop_pb2 as shop
    from participants.branches import IdReused
    from participants.services.orders import OrdersService

    def order(order_id: str) -> any_pb2.Any:
        packed = any_pb2.Any()
        line = shop.StockLine(sku="s", quantity=1)
        packed.Pack(shop.CreateOrder(order_id=order_id, customer_id="c", lines=[line]))
        return packed

    def engine(log: MemoryLog) -> BranchEngine:
        return BranchEngine(
            OrdersService(), log, LockManager(wait_timeout_s=10), clock_ms=lambda: 0
        )

    async def answers(branches: BranchEngine) -> tuple[str, str]:
        try:
            await branches.prepare("T", 0, order("Z"), False, b"fp-other")
        except IdReused:
            reused = "id reused"
        else:
            reused = "not refused as reused"
        vote, reason = await branches.prepare("T", 0, order("X"), False, b"fp-t")
        return reused, f"{vote.value}: {reason}"

    async def scenario() -> None:
        log = MemoryLog()
        live = engine(log)
        await live.prepare("A", 0, order("X"), False, b"fp-a")  # holds the order's lock
        waiting = asyncio.ensure_future(live.prepare("T", 0, order("X"), False, b"fp-t"))
        await asyncio.sleep(0.01)
        await live.rollback("T", 0)  # the coordinator aborts T while it waits for the lock
        await waiting
        before = await answers(live)
        assert "id reused" == before[0]
        restarted = engine(MemoryLog())
        restarted.replay(log.records)
        assert before == await answers(restarted)

    asyncio.run(scenario())


def test_a_branch_replayed_from_the_log_keeps_the_time_it_was_decided() -> None:
    """Before, the records carried no time: after a restart, ListBranches showed each decided
    branch as decided at the restart (only a checkpoint kept the time)."""

    async def scenario() -> None:
        now = [1_000]
        first = engine_with(kept=10, clock_ms=lambda: now[0])
        assert BranchVote.PREPARED is (await first.prepare(*key(1), reserve(), False))[0]
        assert BranchVote.PREPARED is (await first.prepare(*key(2), reserve(), False))[0]
        now[0] = 2_000
        await first.commit(*key(1))
        await first.rollback(*key(2))
        await first.rollback(*key(3))  # never prepared: a tombstone
        assert BranchVote.COMMITTED is (await first.prepare(*key(4), reserve(), True))[0]
        log = first.log
        assert isinstance(log, MemoryLog)

        now[0] = 9_000
        restarted = engine_with(kept=10, clock_ms=lambda: now[0])
        restarted.log = log
        restarted.replay(log.records)
        for n in (1, 2, 3, 4):
            info = restarted.branch(key(n))
            assert info is not None and 2_000 == info.updated_at_ms, (n, info)

    asyncio.run(scenario())


def test_a_refused_branch_reads_the_same_live_after_a_replay_and_after_a_checkpoint() -> None:
    """A refused Prepare is logged as a BranchRolledBack, which did not say it was a refusal:
    replayed from the log, the branch read ROLLED_BACK, with no vote and one_phase False,
    while live and after a checkpoint it read REFUSED (ListBranches and `dtm branches`
    showed one or the other depending on whether a checkpoint ran before the restart).
    Every answer was and is the same; a record written before the fields still replays as
    the rolled-back branch it was read as."""

    def seen(engine: BranchEngine, n: int) -> tuple[object, ...]:
        info = engine.branch(key(n))
        assert info is not None
        branch = info.branch
        return (branch.state, branch.vote, branch.reason, branch.one_phase, info.updated_at_ms)

    async def answers(engine: BranchEngine, n: int) -> tuple[object, ...]:
        duplicate = await engine.prepare(*key(n), reserve(10**6), n == 2)
        with pytest.raises(BranchError) as commit:
            engine.decide_now(*key(n), commit=True)
        engine.decide_now(*key(n), commit=False)  # acknowledged
        return duplicate, commit.value.kind, str(commit.value)

    async def scenario() -> None:
        first = engine_with(kept=10, clock_ms=lambda: 1_000)
        for n, one_phase in ((1, False), (2, True)):  # its record lazy, then forced
            assert (
                BranchVote.REFUSED is (await first.prepare(*key(n), reserve(10**6), one_phase))[0]
            )
        live = {n: seen(first, n) for n in (1, 2)}
        assert (BranchState.REFUSED, BranchVote.REFUSED) == live[1][:2] and live[2][3]
        records = first.log.records
        assert isinstance(first.log, MemoryLog)

        from_log = engine_with(kept=10, clock_ms=lambda: 9_000)
        from_log.replay(records)
        await first.checkpoint()
        from_checkpoint = engine_with(kept=10, clock_ms=lambda: 9_000)
        from_checkpoint.replay(first.log.records)
        for restarted in (from_log, from_checkpoint):
            assert live == {n: seen(restarted, n) for n in (1, 2)}

        older = log_pb2.BranchRolledBack.FromString(records[0].payload)
        assert older.refused and not older.one_phase
        older.ClearField("refused")
        from_older = engine_with(kept=10, clock_ms=lambda: 9_000)
        from_older.replay([LogRecord(1, records[0].record_type, older.SerializeToString())])
        rolled_back = (BranchState.ROLLED_BACK, None, *live[1][2:])
        assert rolled_back == seen(from_older, 1)
        assert await answers(first, 1) == await answers(from_older, 1)
        for n in (1, 2):
            assert await answers(first, n) == await answers(from_log, n)

    asyncio.run(scenario())


def test_a_one_phase_branch_rolled_back_while_preparing_stays_one_phase_after_a_replay() -> None:
    """Its tombstone read one_phase True live and after a checkpoint, False when replayed
    from the log: the rollback record did not carry it."""
    from participants.services.orders import OrdersService

    def order() -> any_pb2.Any:
        packed = any_pb2.Any()
        line = shop_pb2.StockLine(sku="s", quantity=1)
        packed.Pack(shop_pb2.CreateOrder(order_id="X", customer_id="c", lines=[line]))
        return packed

    def engine(log: MemoryLog) -> BranchEngine:
        return BranchEngine(
            OrdersService(), log, LockManager(wait_timeout_s=10), clock_ms=lambda: 0
        )

    def seen(branches: BranchEngine) -> tuple[object, ...]:
        info = branches.branch(("T", 0))
        assert info is not None
        branch = info.branch
        return (branch.state, branch.vote, branch.reason, branch.one_phase)

    async def scenario() -> None:
        log = MemoryLog()
        live = engine(log)
        await live.prepare("A", 0, order(), False)  # holds the order's lock
        waiting = asyncio.ensure_future(live.prepare("T", 0, order(), True))
        await asyncio.sleep(0)  # T runs up to its lock wait
        assert BranchState.PREPARING is seen(live)[0]
        await live.rollback("T", 0)
        assert BranchVote.REFUSED is (await waiting)[0]
        tombstone = (BranchState.ROLLED_BACK, None, "rolled back while preparing", True)
        assert tombstone == seen(live)
        from_log = engine(MemoryLog())
        from_log.replay(log.records)
        await live.checkpoint()
        from_checkpoint = engine(MemoryLog())
        from_checkpoint.replay(log.records)
        assert [tombstone, tombstone] == [seen(from_log), seen(from_checkpoint)]

    asyncio.run(scenario())
