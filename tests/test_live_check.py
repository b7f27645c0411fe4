"""The invariant checker on a live cluster: its reads of the four services are not one
consistent cut, so an order committed between them looks like a violation. A live check
(`check_services(settled=False)`) reads again what it found broken and reports only what
every read shows; the rest are suspects, listed apart, never dropped.

The torn read is made deterministic with client interceptors: the read of orders is held
until an order has committed, after the reads of the other three services were answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from dtm import invariants
from dtm.invariants import CONFIRMED, Order, Report, Snapshot, confirm_live
from dtmpb.v1 import coordinator_pb2
from participants.services.inventory import InventoryService
from tests.harness import InProcessCluster, order_branches, settled
from tests.test_invariants import consistent

COMMITTED = coordinator_pb2.OUTCOME_COMMITTED
#: The read held back: orders, read after the commit while the others were read before it.
LATE = "orders"


class Gate(grpc.aio.UnaryUnaryClientInterceptor):
    """Holds a channel's first call until `opened` (if `hold`), and says when that call was
    answered; later calls go through."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.calls = 0
        self.opened = asyncio.Event()
        self.answered = asyncio.Event()

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        self.calls += 1
        first = self.calls == 1
        if first and self.hold:
            await self.opened.wait()
        call = await continuation(details, request)
        await call
        if first:
            self.answered.set()
        return call


@asynccontextmanager
async def torn_reads(
    cluster: InProcessCluster,
) -> AsyncIterator[tuple[dict[str, grpc.aio.Channel], dict[str, Gate]]]:
    """Channels to the four services whose first read of orders waits for its gate."""
    gates = {name: Gate(hold=name == LATE) for name in invariants.SERVICES}
    channels = {
        name: grpc.aio.insecure_channel(cluster.address(name), interceptors=[gates[name]])
        for name in invariants.SERVICES
    }
    try:
        yield channels, gates
    finally:
        for channel in channels.values():
            await channel.close(None)


async def across_a_commit(
    cluster: InProcessCluster, gates: dict[str, Gate], reading: Awaitable[Any]
) -> Any:
    """Run `reading` (which reads through the gated channels) with an order committed, and
    settled everywhere, after three services were read and before orders is."""
    task = asyncio.ensure_future(reading)
    for name in invariants.SERVICES:
        if name != LATE:
            await gates[name].answered.wait()
    order = order_branches("o-live", [("sku-apple", 2)], amount_cents=300)
    assert COMMITTED == (await cluster.submit(order, "t-live")).outcome
    await settled(cluster)
    gates[LATE].opened.set()
    return await task


def targets(cluster: InProcessCluster) -> dict[str, str]:
    return {name: cluster.address(name) for name in invariants.SERVICES}


def test_one_read_across_a_commit_shows_violations_that_are_not_there(tmp_path: Path) -> None:
    """The hazard itself: one read shows o-live CONFIRMED with nothing captured, sold or
    sent, while the cluster, read again once quiet, holds every invariant."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster, torn_reads(cluster) as (channels, gates):
            torn = await across_a_commit(cluster, gates, invariants.read_snapshot(channels))
            assert [(o.order_id, o.state) for o in torn.orders] == [("o-live", CONFIRMED)]
            found = invariants.check(torn, settled=False)
            assert any(v.startswith("order o-live: CONFIRMED but no payment") for v in found)
            assert any(v.startswith("stock sku-apple: confirmed orders contain 2") for v in found)
            assert [] == (await invariants.check_services(targets(cluster))).violations

    asyncio.run(scenario())


def test_a_live_check_across_a_commit_reports_suspects_not_violations(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster, torn_reads(cluster) as (channels, gates):
            live = await across_a_commit(
                cluster, gates, invariants.check_services(channels, settled=False)
            )
            assert [] == live.violations, live.violations
            assert live.live and live.reads == 2
            assert any(
                s.startswith("order o-live: CONFIRMED but no payment") for s in live.suspects
            )
            assert "checked live" in live.summary() and "suspect(s)" in live.summary()
            # The report's figures are the last read's, which saw the order everywhere.
            assert (live.confirmed_orders, live.captured_cents) == (1, 300)

    asyncio.run(scenario())


def test_a_live_check_across_a_commit_still_reports_a_lasting_violation(tmp_path: Path) -> None:
    """A unit lost (inventory's books broken) is shown by every read: reported, with the
    commit's suspects apart."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster, torn_reads(cluster) as (channels, gates):
            inventory = cluster.services[0]
            assert isinstance(inventory, InventoryService)
            inventory.items["sku-pear"].available -= 1
            live = await across_a_commit(
                cluster, gates, invariants.check_services(channels, settled=False)
            )
            assert [v for v in live.violations if "units lost by 1" in v] == live.violations
            assert [invariants.subject(v) for v in live.violations] == ["stock sku-pear"]
            assert live.reads == 1 + invariants.LIVE_RECHECKS
            assert live.suspects

    asyncio.run(scenario())


def test_waiting_until_settled_does_not_take_a_read_across_a_commit(tmp_path: Path) -> None:
    """The read across the commit shows nothing reserved, held, pending or staged (the three
    early reads came before the prepare, orders after the commit): it looks settled, and is
    not what the services hold."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster, torn_reads(cluster) as (channels, gates):
            snapshot = await across_a_commit(
                cluster, gates, invariants.wait_until_settled(channels)
            )
            assert [] == invariants.check(snapshot)
            assert 2 == sum(level.sold for level in snapshot.stock)

    asyncio.run(scenario())


# ---- confirm_live over scripted reads ----


def reads(*reports: Report) -> tuple[Callable[[], Awaitable[Report]], Iterator[Report]]:
    """A read_again that answers `reports` in turn (and fails the test past them)."""
    queue = iter(reports)

    async def read_again() -> Report:
        return next(queue)

    return read_again, queue


def broken() -> Snapshot:
    """The consistent snapshot with o-2 confirmed and never charged, nor its units sold."""
    return replace(
        consistent(),
        captures=[c for c in consistent().captures if c.order_id != "o-2"],
        orders=[
            *consistent().orders,
            Order("o-9", "carol", (("sku-b", 1),), 70, CONFIRMED, "txn-o-9"),
        ],
    )


def test_a_quiesced_cluster_gets_the_report_one_read_gives() -> None:
    single = invariants.report(broken(), settled=False)
    assert single.violations
    read_again, _ = reads(
        invariants.report(broken(), settled=False), invariants.report(broken(), settled=False)
    )
    live = asyncio.run(confirm_live(invariants.report(broken(), settled=False), read_again, 2))
    assert single.violations == live.violations
    assert [] == live.suspects and 3 == live.reads


def test_nothing_broken_is_read_once() -> None:
    read_again, _ = reads()
    live = asyncio.run(confirm_live(invariants.report(consistent(), settled=False), read_again, 2))
    assert ([], [], 1, True) == (live.violations, live.suspects, live.reads, live.live)


def test_what_a_later_read_does_not_show_is_a_suspect_and_reading_stops() -> None:
    read_again, rest = reads(invariants.report(consistent(), settled=False))
    live = asyncio.run(confirm_live(invariants.report(broken(), settled=False), read_again, 2))
    assert [] == live.violations
    assert sorted(live.suspects) == sorted(invariants.report(broken(), settled=False).violations)
    assert 2 == live.reads and [] == list(rest)


def test_a_subject_broken_in_every_read_is_reported_with_its_last_text() -> None:
    """Figures move between reads; the subject (order o-9) is what must stay broken. What
    only a later read shows is a suspect too."""
    first = Report(violations=["order o-9: CONFIRMED but no notification (nor 1 staged)"])
    second = Report(
        violations=[
            "order o-9: CONFIRMED but no notification (nor 0 staged)",
            "stock sku-b: oversold",
        ]
    )
    third = Report(violations=["order o-9: CONFIRMED but no notification (nor 2 staged)"])
    read_again, _ = reads(second, third)
    live = asyncio.run(confirm_live(first, read_again, 2))
    assert ["order o-9: CONFIRMED but no notification (nor 2 staged)"] == live.violations
    assert ["stock sku-b: oversold"] == live.suspects
    assert 3 == live.reads


# ---- wait_until_settled over scripted reads ----


def test_a_cluster_that_settles_as_the_wait_runs_out_is_taken_not_refused(
    monkeypatch: Any,
) -> None:
    """The first read that shows nothing in flight needs a second to confirm it. Made after
    the deadline (here at once: timeout 0), that first quiet read was refused as "still
    changing between two reads" without the second read being taken: a cluster that settled
    in the wait's last poll failed the wait, which one read used to pass."""
    answered: list[Snapshot] = []

    async def quiet_read(targets: Any, **_: Any) -> Snapshot:
        answered.append(consistent())
        return answered[-1]

    monkeypatch.setattr(invariants, "read_snapshot", quiet_read)
    snapshot = asyncio.run(invariants.wait_until_settled({}, timeout_s=0.0))
    assert consistent() == snapshot
    assert 2 == len(answered)


def test_a_cluster_still_changing_at_the_deadline_is_refused(monkeypatch: Any) -> None:
    """Each read quiet but different from the one before (a transaction between every two):
    refused at the deadline once a quiet read failed to confirm the one before it."""
    count = 0

    async def changing_read(targets: Any, **_: Any) -> Snapshot:
        nonlocal count
        count += 1
        return replace(consistent(), staged=0, captures=consistent().captures[:count])

    monkeypatch.setattr(invariants, "read_snapshot", changing_read)
    try:
        asyncio.run(invariants.wait_until_settled({}, timeout_s=0.0))
    except TimeoutError as error:
        assert "changing between two reads" in str(error), error
    else:
        raise AssertionError("a cluster changing between every two reads was taken as settled")
    assert 2 == count
