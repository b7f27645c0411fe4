"""The participant's window of decided branches: bounded, oldest out first, and the bytes a
checkpoint writes for it always the entries' own, in order."""

from __future__ import annotations

import asyncio
import random

import pytest
from google.protobuf import any_pb2

from dtm.core.branch import BranchVote, ErrorKind
from dtm.wal import MemoryLog
from dtmpb.v1 import shop_pb2
from participants import decided
from participants.branches import BranchEngine, BranchError
from participants.decided import DecidedWindow
from participants.locks import LockManager
from participants.services.inventory import InventoryService


def key(n: int) -> tuple[str, int]:
    return (f"txn-{n}", 1)


def test_window_keeps_the_most_recent_in_order_across_chunks() -> None:
    window = DecidedWindow(kept=2 * decided.CHUNK + 5)
    evicted: list[tuple[str, int]] = []
    total = 5 * decided.CHUNK + 3
    for n in range(total):
        evicted += window.put(key(n), f"<{n}>".encode())
    assert len(window) == 2 * decided.CHUNK + 5
    assert evicted == [key(n) for n in range(total - len(window))]
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
                del model[oldest]
                assert oldest == evicted.pop(0)
        assert evicted == []
        if step % 97 == 0:
            assert b"".join(window.pieces(1 << 20)) == b"".join(model.values())
    assert len(window) == len(model)


def test_engine_forgets_the_oldest_decided_branches_and_a_checkpoint_restores_the_rest() -> None:
    def engine(kept: int = 3) -> BranchEngine:
        return BranchEngine(
            InventoryService(),
            MemoryLog(),
            LockManager(wait_timeout_s=0.5),
            clock_ms=lambda: 0,
            decided_kept=kept,
        )

    first = engine()
    for n in range(5):
        first.decide_now(f"txn-{n}", 1, commit=False)  # unknown: a tombstone, decided
    assert [k for k in first.branches] == [key(2), key(3), key(4)]

    async def checkpoint() -> None:
        await first.checkpoint()

    asyncio.run(checkpoint())
    assert isinstance(first.log, MemoryLog)
    second = engine()
    second.replay(first.log.records)
    assert [k for k in second.branches] == [key(2), key(3), key(4)]
    assert all(info.branch.state.value == "rolled_back" for info in second.branches.values())
    # Restored into a smaller window (the setting changed): the oldest go, the newest stay.
    third = engine(kept=2)
    third.replay(first.log.records)
    assert [k for k in third.branches] == [key(3), key(4)]


def test_a_forced_branch_outlives_the_window_until_its_coordinator_decides() -> None:
    """Rule 17: a Rollback arriving after the window forgot a forced commit would otherwise be
    acknowledged as a tombstone, and the heuristic outcome would go unreported."""

    def engine(kept: int = 3) -> BranchEngine:
        return BranchEngine(
            InventoryService(),
            MemoryLog(),
            LockManager(wait_timeout_s=0.5),
            clock_ms=lambda: 0,
            decided_kept=kept,
        )

    def operation() -> any_pb2.Any:
        packed = any_pb2.Any()
        packed.Pack(shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)]))
        return packed

    async def scenario() -> None:
        first = engine()
        assert first.begin_prepare("forced", 1, operation(), False) == (BranchVote.PREPARED, "")
        await first.force(("forced", 1), commit=True)
        for n in range(10):  # ten later decisions: the window (3) is long past it
            first.decide_now(f"txn-{n}", 1, commit=False)
        assert ("forced", 1) in first.branches and ("txn-0", 1) not in first.branches

        # It survives a checkpoint and a restart, still unreported.
        await first.checkpoint()
        assert isinstance(first.log, MemoryLog)
        second = engine()
        second.replay(first.log.records)
        assert ("forced", 1) in second.branches
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
        assert ("forced", 1) not in second.branches

    asyncio.run(scenario())


def test_forced_branches_past_the_window_are_bounded() -> None:
    engine = BranchEngine(
        InventoryService(),
        MemoryLog(),
        LockManager(wait_timeout_s=0.5),
        clock_ms=lambda: 0,
        decided_kept=2,
        forced_kept=3,
    )

    async def scenario() -> None:
        for n in range(6):
            packed = any_pb2.Any()
            packed.Pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            )
            engine.begin_prepare(f"forced-{n}", 1, packed, False)
            await engine.force((f"forced-{n}", 1), commit=n % 2 == 0)
        for n in range(5):
            engine.decide_now(f"txn-{n}", 1, commit=False)

    asyncio.run(scenario())
    # The three newest forced ones outlive the window of 2; the rest went with it.
    assert sorted(k for k in engine.branches if k[0].startswith("forced")) == [
        ("forced-3", 1),
        ("forced-4", 1),
        ("forced-5", 1),
    ]
