"""The benchmark's own code: statistics, counters, results file, invariant wiring, and a tiny
real run. No assertion here is about speed: figures depend on the box; correctness does not."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import baselines, checks, footprint, hooks, measure, participant_micro, plot, report, run
from bench.baselines import BaselineResult, fsync_p50_ms, measure_naive, measure_unary
from bench.checks import ClientView
from bench.harness import CLIENTS_PER_CHANNEL, LoadSpec, channel_of, drive
from bench.measure import DtmResult
from bench.procs import PROJECT_ROOT
from bench.report import REQUIRED_KEYS, RunConfig
from bench.stats import LatencySummary, Outcome, Tally, percentile
from bench.workload import (
    DECLINING_ACCOUNT,
    EMPTY_SKU,
    Workload,
    aborts,
    initial_state,
    participants_for,
)
from dtm.cluster import PROCESSES, free_ports
from dtm.invariants import (
    CANCELLED,
    CONFIRMED,
    Account,
    Capture,
    InitialState,
    Notification,
    Order,
    Snapshot,
    StockLevel,
)
from dtmpb.v1 import participant_pb2, shop_pb2

# ---- latency statistics ----


def test_percentiles_of_one_to_a_hundred_are_nearest_rank() -> None:
    values = [float(value) for value in range(1, 101)]
    assert 1.0 == percentile(values, 0.0)
    assert 50.0 == percentile(values, 0.50)
    assert 95.0 == percentile(values, 0.95)
    assert 99.0 == percentile(values, 0.99)
    assert 100.0 == percentile(values, 1.0)


def test_percentile_rounds_the_rank_up_and_handles_one_sample() -> None:
    # 10 samples: p95 needs 9.5 of them at or below, so the 10th; p50 exactly the 5th.
    values = [float(value) for value in range(10, 110, 10)]
    assert 100.0 == percentile(values, 0.95)
    assert 50.0 == percentile(values, 0.50)
    assert 7.0 == percentile([7.0], 0.99)
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_latency_summary_is_in_milliseconds_and_ignores_order() -> None:
    seconds = [value / 1000 for value in range(100, 0, -1)]  # 1..100 ms, descending
    summary = LatencySummary.of(seconds)
    assert 100 == summary.count
    assert (50.0, 95.0, 99.0, 100.0) == (
        summary.p50_ms,
        summary.p95_ms,
        summary.p99_ms,
        summary.max_ms,
    )
    assert 50.5 == summary.mean_ms
    assert LatencySummary(0, None, None, None, None, None) == LatencySummary.of([])


# ---- counters ----


def test_tally_counts_only_calls_finishing_inside_the_window() -> None:
    tally = Tally(window_start=10.0, window_end=20.0)
    tally.record(Outcome.COMMITTED, 9.0, 9.5)  # warmup
    tally.record(Outcome.COMMITTED, 9.5, 10.5)  # started in warmup, finished inside: counts
    tally.record(Outcome.ABORTED, 12.0, 12.25)
    tally.record(Outcome.COMMITTED, 19.0, 20.0)  # the window's end is inside
    tally.record(Outcome.ERROR, 19.5, 21.0)  # drain
    assert 2 == tally.counts[Outcome.COMMITTED]
    assert 1 == tally.counts[Outcome.ABORTED]
    assert 0 == tally.counts[Outcome.ERROR]
    assert {Outcome.COMMITTED: 3, Outcome.ABORTED: 1, Outcome.UNKNOWN: 0, Outcome.ERROR: 1} == (
        tally.total
    )
    assert 0.2 == tally.rate(Outcome.COMMITTED)
    assert 0.1 == tally.rate(Outcome.ABORTED)
    assert [1.0, 1.0] == tally.latencies[Outcome.COMMITTED]
    with pytest.raises(ValueError):
        Tally(window_start=1.0, window_end=1.0)


def test_the_calls_in_flight_at_the_close_and_every_outcome_reach_the_all_calls_latency() -> None:
    tally = Tally(window_start=10.0, window_end=20.0)
    tally.record(Outcome.COMMITTED, 12.0, 12.5)
    tally.record(Outcome.ERROR, 11.0, 14.0)  # a failed call: not in the committed figures
    tally.record(Outcome.UNKNOWN, 15.0, 17.0)
    tally.record(Outcome.COMMITTED, 18.0, 33.0)  # in flight at the close: 2 s by then
    tally.record(Outcome.COMMITTED, 5.0, 25.0)  # in flight over the whole window: 15 s by then
    tally.record(Outcome.COMMITTED, 20.5, 21.0)  # drain only: not seen by the window
    assert [2.0, 15.0] == tally.open_at_close
    assert [15.0, 20.0] == tally.open_at_close_took
    assert 500.0 == tally.latency(Outcome.COMMITTED).max_ms
    every = tally.all_calls()
    assert 5 == every.count
    assert (2000.0, 15000.0) == (every.p50_ms, every.max_ms)


class FakeClock:
    """Time moves only when a fake call takes its 1/8 s (a binary fraction: exact sums)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_fake_run_gives_exact_counts_and_rates() -> None:
    clock = FakeClock()
    numbers: list[int] = []

    async def call(client: int, number: int) -> Outcome:
        numbers.append(number)
        clock.now += 0.125
        return Outcome.ABORTED if number % 3 == 2 else Outcome.COMMITTED

    spec = LoadSpec(clients=1, warmup_s=1.0, duration_s=4.0)
    tally = asyncio.run(drive(call, spec, clock=clock, progress=False))

    # Calls start at 0, 1/8, ... while the start is before 5.0: 40 calls, numbers 0..39. Those
    # finishing in [1.0, 5.0] are numbers 7..39: 33 calls, of which 8, 11, ..., 38 abort.
    assert list(range(40)) == numbers
    assert 22 == tally.counts[Outcome.COMMITTED]
    assert 11 == tally.counts[Outcome.ABORTED]
    assert 4.0 == tally.window_s
    assert 5.5 == tally.rate(Outcome.COMMITTED)
    assert 2.75 == tally.rate(Outcome.ABORTED)
    assert 27 == tally.total[Outcome.COMMITTED]
    assert 13 == tally.total[Outcome.ABORTED]
    assert 125.0 == tally.latency(Outcome.COMMITTED, Outcome.ABORTED).p99_ms


def test_clients_share_channels_a_few_at_a_time() -> None:
    per_channel = ["a", "b"]
    assert "a" == channel_of(per_channel, 0)
    assert "a" == channel_of(per_channel, CLIENTS_PER_CHANNEL - 1)
    assert "b" == channel_of(per_channel, CLIENTS_PER_CHANNEL)


# ---- workload ----


def test_participants_beyond_four_are_renamed_extra_instances() -> None:
    names = [participant.name for participant in participants_for(9)]
    assert [
        "inventory",
        "orders",
        "payment",
        "notification",
        "inventory-2",
        "orders-2",
        "payment-2",
        "notification-2",
        "inventory-3",
    ] == names
    assert ["inventory", "orders"] == [participant.kind for participant in participants_for(2)]
    with pytest.raises(ValueError):
        participants_for(0)


def test_abort_ratio_is_exact_over_any_prefix() -> None:
    for ratio in (0.0, 0.1, 0.25, 0.5, 1.0):
        for calls in (10, 40, 100):
            assert int(calls * ratio) == sum(aborts(number, ratio) for number in range(calls))


def test_orders_are_made_to_abort_by_payment_or_else_by_inventory() -> None:
    with_payment = Workload(participants_for(4), run_id="r1", abort_ratio=1.0)
    order = with_payment.order(client=3, number=0)
    assert order.abort_expected
    assert ["inventory", "orders", "payment", "notification"] == [
        branch.participant for branch in order.request.branches
    ]
    charge = shop_pb2.ChargePayment()
    assert order.request.branches[2].operation.Unpack(charge)
    assert DECLINING_ACCOUNT == charge.account_id
    assert "txn-r1-3-0" == order.request.transaction_id

    without_payment = Workload(participants_for(2), run_id="r1", abort_ratio=1.0)
    reserve = shop_pb2.ReserveStock()
    assert without_payment.order(0, 0).request.branches[0].operation.Unpack(reserve)
    assert EMPTY_SKU == reserve.lines[0].sku


# ---- invariant wiring ----


def consistent_snapshot() -> Snapshot:
    """o-1 confirmed (1 unit, 100 cents), o-2 cancelled: what a healthy 4-branch run leaves."""
    return Snapshot(
        stock=[StockLevel("sku-0", available=9, reserved=0, sold=1, received=10)],
        accounts=[Account("acct-0", 900, 0, 100, 1000)],
        captures=[Capture("o-1", "acct-0", 100, "txn-o-1")],
        orders=[
            Order("o-1", "c", (("sku-0", 1),), 100, CONFIRMED, "txn-o-1"),
            Order("o-2", "c", (("sku-0", 1),), 100, CANCELLED, "txn-o-2"),
        ],
        sent=[Notification("o-1", "c@bench", "ok", "txn-o-1")],
    )


VIEW = ClientView(committed={"o-1"}, aborted={"o-2"}, uncertain=0, units_per_order=1)
ALL_KINDS = {"inventory", "orders", "payment", "notification"}


def test_a_consistent_state_has_no_violations() -> None:
    result = checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS)
    assert 0 == result.violations
    assert "full" == result.scope
    assert 1 == result.views


def test_an_inconsistent_state_has_violations() -> None:
    broken = consistent_snapshot()
    # Charged twice: a second capture for the same order, and money that no longer adds up.
    broken = Snapshot(
        stock=broken.stock,
        accounts=[Account("acct-0", 800, 0, 200, 1000)],
        captures=[*broken.captures, Capture("o-1", "acct-0", 100, "txn-o-1")],
        orders=broken.orders,
        sent=broken.sent,
    )
    result = checks.check_all([consistent_snapshot(), broken], VIEW, ALL_KINDS)
    assert result.violations is not None and result.violations > 0
    assert 2 == result.views
    assert any("charged more than once" in line for line in result.samples)


def test_the_state_is_checked_against_the_initial_stock_and_accounts() -> None:
    initial = InitialState.of(
        {"stock": {"sku-0": 10, "sku-1": 10}, "accounts": {"acct-0": {"balance_cents": 1000}}}
    )
    assert 0 == checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS).violations
    result = checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS, initial=initial)
    assert 1 == result.violations
    assert "stock sku-1: started with 10 units" in result.samples[0]
    # The bench's own initial state is what its services list: the workload's SKUs and accounts.
    assert InitialState.of(initial_state()).declining == {DECLINING_ACCOUNT}


def test_a_violation_every_view_shares_is_counted_once() -> None:
    """With N > 4 each extra instance gets a view, and the other services are the same
    processes in every one: their violations must not count once per view."""
    inventory_2 = participants_for(5)[4]  # in place of inventory in the second view
    base = consistent_snapshot()
    # Payment captured the cancelled order o-2: payment and orders are in both views.
    charged = replace(
        base,
        accounts=[Account("acct-0", 800, 0, 200, 1000)],
        captures=[*base.captures, Capture("o-2", "acct-0", 100, "txn-o-2")],
    )
    alone = checks.check_all([charged], VIEW, ALL_KINDS)
    assert ["capture for order o-2 (100 cents): the order is CANCELLED, not CONFIRMED"] == (
        alone.samples
    )
    both = checks.check_all([charged, charged], VIEW, ALL_KINDS, swapped=[None, inventory_2])
    assert (1, alone.samples, 2) == (both.violations, both.samples, both.views)
    (shared,) = alone.samples
    twice_in_one_view = checks.combine([[shared, shared], [shared]], ALL_KINDS)
    assert 2 == twice_in_one_view.violations


def test_the_same_violation_in_two_instances_of_a_kind_counts_once_each() -> None:
    """The lines never name the instance: inventory and inventory-2 overselling alike give the
    same text, and are two violations."""
    inventory_2 = participants_for(5)[4]
    views = [None, inventory_2]
    base = consistent_snapshot()
    # A unit sold without a confirmed order (and more units sold than the clients were told).
    oversold = replace(
        base, stock=[StockLevel("sku-0", available=8, reserved=0, sold=2, received=10)]
    )
    first = checks.check_all([oversold, base], VIEW, ALL_KINDS, swapped=views)
    assert 2 == first.violations
    assert all(line.startswith("stock") for line in first.samples)
    second = checks.check_all([base, oversold], VIEW, ALL_KINDS, swapped=views)
    assert [f"[inventory-2] {line}" for line in first.samples] == second.samples
    both = checks.check_all([oversold, oversold], VIEW, ALL_KINDS, swapped=views)
    assert 4 == both.violations
    assert first.samples + second.samples == both.samples
    # A line about the other services' state, in inventory-2's view: theirs, not inventory-2's.
    assert {"orders", "payment"} == checks.concerns(
        "capture for order o-2 (100 cents): the order is CANCELLED, not CONFIRMED"
    )
    # A line of a shape the bench does not know is counted in every view, never merged away.
    assert 2 == checks.combine([["a new kind of line"]] * 2, ALL_KINDS, swapped=views).violations


def test_the_client_view_catches_a_lost_commit_and_a_reversed_abort() -> None:
    view = ClientView(committed={"o-1", "o-9"}, aborted={"o-1"}, uncertain=0, units_per_order=1)
    lines = checks.check_client_view(consistent_snapshot(), view, ALL_KINDS)
    assert any("o-9" in line and "missing" in line for line in lines)
    assert any("o-1" in line and "told ABORTED" in line for line in lines)
    # Two committed orders but one unit sold.
    assert any(line.startswith("stock:") for line in lines)


def test_fewer_branches_drop_only_the_lines_about_absent_kinds() -> None:
    # Inventory and orders only: confirmed orders have no payment and no notification.
    two = Snapshot(
        stock=[StockLevel("sku-0", available=9, reserved=0, sold=1, received=10)],
        orders=[Order("o-1", "c", (("sku-0", 1),), 100, CONFIRMED, "txn-o-1")],
    )
    kinds = {"inventory", "orders"}
    assert 0 == checks.check_all([two], VIEW, kinds).violations
    oversold = Snapshot(
        stock=[StockLevel("sku-0", available=9, reserved=0, sold=2, received=10)],
        orders=two.orders,
    )
    result = checks.check_all([oversold], VIEW, kinds)
    assert result.violations is not None and result.violations > 0
    assert "no payment or notification" in result.scope


# ---- results document ----


def fake_tally(committed: int, aborted: int, window_s: float = 2.0) -> Tally:
    tally = Tally(window_start=0.0, window_end=window_s)
    for number in range(committed):
        tally.record(Outcome.COMMITTED, 0.5, 0.5 + (number + 1) / 1000)
    for _ in range(aborted):
        tally.record(Outcome.ABORTED, 0.5, 0.502)
    return tally


def fake_results(
    *,
    baselines: bool,
    snapshot: Snapshot | None = None,
    samples: list[footprint.Sample] | None = None,
) -> dict[str, Any]:
    invariant = checks.check_all([snapshot or consistent_snapshot()], VIEW, ALL_KINDS)
    dtm = DtmResult(
        participants=participants_for(4),
        tally=fake_tally(100, 20),
        invariants=invariant,
        footprint=samples or [],
    )
    unary = BaselineResult("unary echo", 0, fake_tally(1000, 0)) if baselines else None
    naive = BaselineResult("naive 2PC", 4, fake_tally(50, 0)) if baselines else None
    config = RunConfig(4, 64, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick")
    return report.build_results(
        config, dtm, unary, naive, now=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), context={}
    )


def assert_required_keys(results: dict[str, Any]) -> None:
    for key, types in REQUIRED_KEYS.items():
        assert key in results, key
        assert isinstance(results[key], types), (key, results[key])
        assert not isinstance(results[key], bool), key


def test_results_have_every_required_key_with_sane_values() -> None:
    results = fake_results(baselines=True)
    assert_required_keys(results)
    assert 50.0 == results["txn_per_s"]
    assert 10.0 == results["aborted_per_s"]
    assert 500.0 == results["unary_rpc_per_s"]
    assert 25.0 == results["naive_txn_per_s"]
    assert 0.1 == results["ratio_vs_unary"]
    assert 2.0 == results["ratio_vs_naive"]
    assert (50.0, 95.0, 99.0, 100.0) == (
        results["p50_ms"],
        results["p95_ms"],
        results["p99_ms"],
        results["max_ms"],
    )
    assert 0 == results["violations"]
    # No server exports its counters yet: say so rather than make a figure up.
    assert results["fsyncs_per_txn"] is None
    assert results["messages_per_txn"] is None
    assert results["targets"]["ratio_vs_naive"]["met"] is False
    assert not results["targets"]["throughput"]["met"]
    text = report.format_table(results)
    assert "unary echo" in text and "0 violations" in text


def test_results_without_baselines_have_null_ratios() -> None:
    results = fake_results(baselines=False)
    assert_required_keys(results)
    assert results["ratio_vs_unary"] is None
    assert results["unary_rpc_per_s"] is None
    assert "n/a" in report.format_table(results)


def test_an_inconsistent_final_state_reaches_the_results_as_violations() -> None:
    broken = Snapshot(
        stock=[StockLevel("sku-0", available=9, reserved=0, sold=1, received=10)],
        accounts=[Account("acct-0", 900, 0, 100, 1000)],
        captures=[],  # confirmed but never charged
        orders=consistent_snapshot().orders,
        sent=consistent_snapshot().sent,
    )
    results = fake_results(baselines=False, snapshot=broken)
    assert results["violations"] > 0
    assert results["violation_samples"]
    assert "no payment was captured" in report.format_table(results)


def test_results_split_the_latency_and_relate_every_cpu_to_the_load_generator() -> None:
    costs = hooks.Costs(
        cpu_ms_by_process={"coordinator": 0.75, "orders": 0.125, hooks.LOAD_GENERATOR: 0.25},
        submit_handling_ms_mean=20.0,
        checkpoints={
            "orders": {
                "count": 3,
                "ms_total": 1234.5,
                "ms_longest": 600.0,
                "ms_longest_building": 42.0,
            }
        },
        gc_pauses={"coordinator": {"count": 4, "ms_total": 180.0, "ms_longest": 150.0}},
    )
    dtm = DtmResult(
        participants=participants_for(4),
        tally=fake_tally(100, 20),
        invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        costs=costs,
    )
    config = RunConfig(4, 64, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick")
    results = report.build_results(
        config, dtm, None, None, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
    )
    assert {"coordinator": 3.0, "orders": 0.5} == results["cpu_vs_load_generator"]
    # fake_tally: committed calls took 1..100 ms (mean 50.5), the 20 aborted ones 2 ms.
    assert (100 * 50.5 + 20 * 2) / 120 == pytest.approx(results["answered_mean_ms"], abs=0.01)
    assert results["answered_mean_ms"] - 20.0 == pytest.approx(
        results["before_handler_ms_mean"], abs=0.01
    )
    text = report.format_table(results)
    assert "coordinator 3, orders 0.5" in text
    assert "20.00 in the coordinator's Submit handler" in text
    assert "orders 3 (1,234 ms in all, the longest 600, building held its loop 42)" in text
    assert "coordinator 4 (180 ms in all, the longest 150)" in text
    # Without the servers' counters there is nothing to split or relate: no figure is made up.
    bare = fake_results(baselines=False)
    assert bare["before_handler_ms_mean"] is None and bare["cpu_vs_load_generator"] is None
    assert "latency split" not in report.format_table(bare)


def test_batched_submits_share_the_client_messages_and_are_not_judged_by_the_targets() -> None:
    dtm = DtmResult(
        participants=participants_for(4),
        tally=fake_tally(2000, 0),
        invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        # 8 coordinator messages per transaction, and the client's 2 per call.
        costs=hooks.Costs(messages_per_txn=8 + hooks.CLIENT_MESSAGES_PER_TXN),
        submit_batches=(250, 2000),
    )
    config = RunConfig(4, 64, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick", submit_batch=2)
    unary = BaselineResult("unary echo", 0, fake_tally(1000, 0))
    results = report.build_results(
        config, dtm, unary, None, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
    )
    assert 2 == results["submit_batch"]
    assert 8.0 == results["submit_batch_items_per_call"]
    assert 0.25 == results["client_messages_per_txn"]
    assert 8.25 == results["messages_per_txn"]
    # Each figure is reported, but the targets describe one client call per transaction.
    assert results["txn_per_s"] == results["targets"]["throughput"]["value"]
    assert {"throughput", "p99", "ratio_vs_unary"} == set(results["targets"])
    assert {None} == {target["met"] for target in results["targets"].values()}
    text = report.format_table(results)
    assert "8.00 transactions per call" in text
    assert "not judged" in text and "NOT met" not in text


def test_unary_participants_reach_the_run_and_the_results_say_which_path_was_used(
    tmp_path: Path,
) -> None:
    """--unary-participants: the services register without the batch capability. The results
    say how the coordinator reached them, as it lists their registrations (measure.py)."""
    results_dir = ["--results-dir", str(tmp_path)]
    assert run.run_config(run.parse_args([*results_dir, "--unary-participants"])).unary_participants
    assert not run.run_config(run.parse_args(results_dir)).unary_participants
    dtm = DtmResult(
        participants=participants_for(4),
        tally=fake_tally(100, 0),
        invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        participant_path="unary",
    )
    config = RunConfig(4, 64, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick", unary_participants=True)
    results = report.build_results(
        config, dtm, None, None, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
    )
    assert "unary" == results["participant_path"]
    (line,) = [x for x in report.format_table(results).splitlines() if "participant calls" in x]
    assert "unary (one Prepare, Commit or Rollback each" in line
    # A results document that never read the registrations says nothing about them.
    unread = fake_results(baselines=False)
    assert unread["participant_path"] is None
    assert "participant calls" not in report.format_table(unread)


def test_a_call_still_in_flight_when_the_window_closes_is_counted_until_then() -> None:
    clock = FakeClock()

    async def call(client: int, number: int) -> Outcome:
        # Call 10 hangs until its deadline, 15 s, long after the 4 s window.
        clock.now += 15.0 if number == 10 else 0.125
        return Outcome.ERROR if number == 10 else Outcome.COMMITTED

    spec = LoadSpec(clients=1, warmup_s=1.0, duration_s=4.0)
    tally = asyncio.run(drive(call, spec, clock=clock, progress=False))
    # Call 10 started at 1.25 s: 3.75 s old when the window closed at 5 s, done at 16.25 s.
    assert [3.75] == tally.open_at_close
    assert [15.0] == tally.open_at_close_took
    assert 125.0 == tally.latency(Outcome.COMMITTED).max_ms
    assert 3750.0 == tally.all_calls().max_ms


def tally_with_troubles() -> Tally:
    """2 s window: 1,000 commits at 20 ms, 30 unknown after 10 s, 20 failed after 3 s, and
    one call in flight at the close (15 s in the end)."""
    tally = Tally(window_start=0.0, window_end=2.0)
    for _ in range(1000):
        tally.record(Outcome.COMMITTED, 0.5, 0.52)
    for _ in range(30):
        tally.record(Outcome.UNKNOWN, -9.0, 1.0)
    for _ in range(20):
        tally.record(Outcome.ERROR, -1.0, 2.0)
    tally.record(Outcome.COMMITTED, 1.5, 16.5)
    return tally


def test_unknown_failed_and_unfinished_calls_reach_the_results_and_void_the_targets() -> None:
    dtm = DtmResult(
        participants=participants_for(4),
        tally=tally_with_troubles(),
        invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        unexpected=50,
    )
    config = RunConfig(4, 64, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick")
    unary = BaselineResult("unary echo", 0, fake_tally(1000, 0))
    results = report.build_results(
        config, dtm, unary, None, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
    )
    assert_required_keys(results)
    # The committed figures keep their meaning...
    assert (500.0, 20.0, 20.0) == (results["txn_per_s"], results["p99_ms"], results["max_ms"])
    # ...and the rest of the window is reported beside them.
    assert (10000.0, 10000.0) == (results["any_outcome_p99_ms"], results["any_outcome_max_ms"])
    assert 1051 == results["all_calls"]
    assert 1 == results["in_flight_at_close"]
    assert 15000.0 == results["in_flight_at_close_took_max_ms"]
    assert 10000.0 == results["all_calls_max_ms"]
    # 500 txn/s and 20 ms would meet nothing here anyway, but none of it is judged.
    assert {"throughput", "p99", "ratio_vs_unary"} == set(results["targets"])
    for target in results["targets"].values():
        assert target["met"] is None
        assert "30 unknown outcomes in the window" in target["note"]
        assert "20 failed calls in the window" in target["note"]
    text = report.format_table(results)
    assert "all calls max (ms)" in text and "10,000.00" in text
    assert "1 still in flight when it closed" in text
    assert "NOT met" not in text and "not judged: 20 failed calls" in text


def test_a_final_state_with_violations_or_never_checked_voids_the_targets() -> None:
    """1,200 txn/s at 20 ms, 0.6 x unary, 6 x naive: every target met, unless the final state
    broke the invariants or could not be read."""
    tally = Tally(window_start=0.0, window_end=2.0)
    for _ in range(2400):
        tally.record(Outcome.COMMITTED, 0.5, 0.52)
    lost = Snapshot(
        stock=consistent_snapshot().stock,
        accounts=consistent_snapshot().accounts,
        captures=consistent_snapshot().captures,
        # The client was told o-1 COMMITTED; the order is CANCELLED.
        orders=[
            Order("o-1", "c", (("sku-0", 1),), 100, CANCELLED, "txn-o-1"),
            consistent_snapshot().orders[1],
        ],
        sent=consistent_snapshot().sent,
    )
    unchecked = checks.InvariantResult(None, [], "full", "final state unreadable: UNAVAILABLE")
    cases = (
        (checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS), None),
        (checks.check_all([lost], VIEW, ALL_KINDS), "invariant violations"),
        (unchecked, "final state not checked"),
    )
    for invariant, trouble in cases:
        dtm = DtmResult(participants=participants_for(4), tally=tally, invariants=invariant)
        unary = BaselineResult("unary echo", 0, fake_tally(4000, 0))
        naive = BaselineResult("naive 2PC", 4, fake_tally(400, 0))
        config = RunConfig(4, 64, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick")
        results = report.build_results(
            config, dtm, unary, naive, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
        )
        found = results["targets"]
        assert {"throughput", "p99", "ratio_vs_unary", "ratio_vs_naive"} == set(found)
        if trouble is None:
            assert {True} == {target["met"] for target in found.values()}
            continue
        for target in found.values():
            assert target["met"] is None
            assert trouble in target["note"]
        text = report.format_table(results)
        assert " met" not in text.replace("NOT met", "")
        assert "not judged: " in text and trouble in text


def test_the_p99_target_counts_the_calls_left_in_flight() -> None:
    tally = Tally(window_start=0.0, window_end=1.0)
    for _ in range(2000):
        tally.record(Outcome.COMMITTED, 0.5, 0.52)
    for _ in range(64):  # every client stuck at the close
        tally.record(Outcome.COMMITTED, 0.2, 9.0)
    dtm = DtmResult(
        participants=participants_for(4),
        tally=tally,
        invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
    )
    config = RunConfig(4, 64, 1.0, 1.0, 2.0, 1.0, 0.0, False, "quick")
    results = report.build_results(
        config, dtm, None, None, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
    )
    assert 20.0 == results["p99_ms"]
    assert 800.0 == results["all_calls_p99_ms"]
    assert results["targets"]["throughput"]["met"] is True
    assert results["targets"]["p99"]["met"] is False
    # The row shows the committed p99 (20 ms): the verdict names the figure that missed.
    assert "NOT met: the p99 of all calls is 800.0 ms" in report.format_table(results)


def test_the_ratio_and_one_client_targets_are_judged_only_where_they_are_stated() -> None:
    def results_for(participants: int, clients: int, abort_ratio: float, hot: bool) -> Any:
        dtm = DtmResult(
            participants=participants_for(participants),
            tally=fake_tally(1000, 0),
            invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        )
        unary = BaselineResult("unary echo", 0, fake_tally(2000, 0))
        naive = BaselineResult("naive 2PC", participants, fake_tally(200, 0))
        config = RunConfig(participants, clients, 2.0, 1.0, 2.0, 1.0, abort_ratio, hot, "quick")
        return report.build_results(
            config, dtm, unary, naive, now=datetime(2030, 1, 2, tzinfo=UTC), context={}
        )

    # 0.5 x unary, 5 x naive: met, where the targets are stated.
    judged = results_for(4, 64, 0.0, False)["targets"]
    assert (True, True) == (judged["ratio_vs_unary"]["met"], judged["ratio_vs_naive"]["met"])
    assert "p50_one_client" not in judged
    assert judged["throughput"]["met"] is False
    assert results_for(4, 1, 0.0, False)["targets"]["p50_one_client"]["met"] is True
    # Anywhere else, each figure is reported but not judged.
    for participants, clients, abort_ratio, hot in (
        (1, 1, 0.5, True),
        (1, 64, 0.0, False),
        (8, 1, 0.0, False),
        (4, 1, 0.5, False),
        (4, 64, 0.0, True),
        (4, 16, 0.0, False),
    ):
        found = results_for(participants, clients, abort_ratio, hot)["targets"]
        names = {"ratio_vs_unary", "ratio_vs_naive"} | (
            {"p50_one_client"} if clients == 1 else set()
        )
        assert names == set(found), (participants, clients, abort_ratio, hot)
        for name in names:
            assert found[name]["met"] is None, (participants, clients, abort_ratio, hot, name)
            assert found[name]["note"].startswith("not judged: the target is for 4 participants")


def baseline_tally(ok: int, failed: int = 0, stuck: int = 0, open_ok: int = 0) -> Tally:
    """2 s window: `ok` calls at 10 ms and `failed` failed ones in it; `stuck` calls from 0.2 s
    until their deadline (10.2 s, failed) and `open_ok` calls answered 5 ms after the close."""
    tally = Tally(window_start=0.0, window_end=2.0)
    for _ in range(ok):
        tally.record(Outcome.COMMITTED, 0.5, 0.51)
    for _ in range(failed):
        tally.record(Outcome.ERROR, 0.5, 0.6)
    for _ in range(stuck):
        tally.record(Outcome.ERROR, 0.2, 10.2)
    for _ in range(open_ok):
        tally.record(Outcome.COMMITTED, 1.999, 2.004)
    return tally


def test_a_baseline_with_failed_or_stuck_calls_voids_the_verdicts_against_it() -> None:
    """A baseline's rate counts its successes only: failed calls, in its window or stuck past
    it, make dtm's ratio to it look better than it is."""

    def results_for(clients: int, unary: Tally, naive: Tally) -> dict[str, Any]:
        dtm = DtmResult(
            participants=participants_for(4),
            tally=fake_tally(1000, 0),
            invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        )
        config = RunConfig(4, clients, 2.0, 1.0, 2.0, 1.0, 0.0, False, "quick")
        return report.build_results(
            config,
            dtm,
            BaselineResult("unary echo", 0, unary),
            BaselineResult("naive 2PC", 4, naive),
            now=datetime(2030, 1, 2, tzinfo=UTC),
            context={},
        )

    def met(results: dict[str, Any]) -> dict[str, bool | None]:
        return {name: target["met"] for name, target in results["targets"].items()}

    # 0.5 x unary and 5 x naive, each with a call per client open at the close (the closed
    # loop's normal state) that succeeded: judged.
    healthy = results_for(64, baseline_tally(2000, open_ok=64), baseline_tally(200, open_ok=64))
    assert (64, 0, 64, 0) == (
        healthy["unary_in_flight_at_close"],
        healthy["unary_failed_after_close"],
        healthy["naive_in_flight_at_close"],
        healthy["naive_failed_after_close"],
    )
    assert {"ratio_vs_unary": True, "ratio_vs_naive": True} == {
        name: verdict for name, verdict in met(healthy).items() if name.startswith("ratio")
    }
    # The echo failed 6,000 calls in its window: the ratio to it is void, the other judged.
    unary_failed = results_for(64, baseline_tally(2000, failed=6000), baseline_tally(200))
    assert 6000 == unary_failed["unary_errors"]
    assert (None, True) == (
        met(unary_failed)["ratio_vs_unary"],
        met(unary_failed)["ratio_vs_naive"],
    )
    note = unary_failed["targets"]["ratio_vs_unary"]["note"]
    assert "6,000 failed calls in the unary echo baseline's window" in note
    assert met(unary_failed)["throughput"] is False  # dtm's own figures are still judged
    # 48 of the naive baseline's clients stuck from 0.2 s until their deadline, after the
    # window: no error in it, but the ratio to it is void.
    naive_stuck = results_for(64, baseline_tally(2000), baseline_tally(200, stuck=48))
    assert (0, 48, 48) == (
        naive_stuck["naive_errors"],
        naive_stuck["naive_in_flight_at_close"],
        naive_stuck["naive_failed_after_close"],
    )
    assert (True, None) == (
        met(naive_stuck)["ratio_vs_unary"],
        met(naive_stuck)["ratio_vs_naive"],
    )
    note = naive_stuck["targets"]["ratio_vs_naive"]["note"]
    assert "48 calls of the naive 2PC baseline stuck past its window" in note
    # With one client, the p50 target is measured against the echo's p50.
    one = results_for(1, baseline_tally(2000, stuck=1), baseline_tally(200))
    assert met(one)["p50_one_client"] is None
    # (Without the stuck call it is judged: dtm's 500 ms p50 misses it.)
    assert met(results_for(1, baseline_tally(2000), baseline_tally(200)))["p50_one_client"] is False
    # The table shows each column's failed calls and those left in flight at the close.
    text = report.format_table(naive_stuck)
    assert any(
        line.split() == ["in", "flight", "at", "close", "0", "48", "(48", "failed)", "0"]
        for line in text.splitlines()
    ), text
    failed_row = report.format_table(unary_failed).splitlines()
    assert any(line.split() == ["failed", "calls", "0", "0", "6,000"] for line in failed_row)


def test_the_one_client_floor_is_two_round_trips_and_two_forced_writes() -> None:
    assert {"one_client_floor_ms": 2.2, "one_client_floor_vs_unary_p50": 2.75} == (
        report.one_client_floor(1, 0.8, 0.3)
    )
    # Only one client in flight has this floor; without both baselines there is none.
    for clients, unary_p50, fsync in ((64, 0.8, 0.3), (1, None, 0.3), (1, 0.8, None)):
        floor = report.one_client_floor(clients, unary_p50, fsync)
        assert {"one_client_floor_ms": None, "one_client_floor_vs_unary_p50": None} == floor


def test_the_fsync_baseline_times_real_forced_appends(tmp_path: Path) -> None:
    assert fsync_p50_ms(tmp_path, samples=5) > 0
    assert [] == list(tmp_path.iterdir())  # its scratch file is gone
    with pytest.raises(ValueError, match="samples"):
        fsync_p50_ms(tmp_path, samples=0)


def test_results_are_written_as_latest_and_a_timestamped_copy(tmp_path: Path) -> None:
    results = fake_results(baselines=True)
    latest, copy = report.write_results(results, tmp_path)
    assert tmp_path / "latest.json" == latest
    assert "20300102T030405Z.json" == copy.name
    assert results == json.loads(latest.read_text()) == json.loads(copy.read_text())
    _, second = report.write_results(results, tmp_path)
    assert "20300102T030405Z-2.json" == second.name
    assert [] == list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--duration", "0"], "argument --duration: must be at least 0.001 s, got 0"),
        # A window the clock cannot tell from none: it passed, then the run failed.
        (["--duration", "1e-13"], "argument --duration: must be at least 0.001 s, got 1e-13"),
        # Consistently, whether the baselines run or not.
        (["--baseline-duration", "0", "--no-baselines"], "--baseline-duration: must be at least"),
        (["--baseline-duration", "1e-9"], "--baseline-duration: must be at least 0.001 s"),
        (["--duration", "inf"], "--duration: must be within"),
        (["--data-dir", "{file}"], "--data-dir: {file} is not a directory"),
        (["--data-dir", "{file}/data"], "--data-dir: cannot write in {file}/data"),
        (["--results-dir", "{file}"], "--results-dir: {file} is not a directory"),
        (["--results-dir", "{file}/results"], "--results-dir: cannot write in {file}/results"),
    ],
)
def test_a_bad_option_of_the_bench_exits_2_before_anything_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """Exit status 1 means violations; an option error is argparse's 2, with a message, and
    comes before the run (a results directory found unwritable after it loses the run)."""
    file = tmp_path / "a-file"
    file.write_text("")

    async def measure(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured despite a bad option")

    monkeypatch.setattr(run, "measure", measure)
    argv = [arg.format(file=file) for arg in argv]
    results = [] if "--results-dir" in argv else ["--results-dir", str(tmp_path / "results")]
    with pytest.raises(SystemExit) as exited:
        run.main([*argv, *results, "--no-progress"])
    assert 2 == exited.value.code
    assert message.format(file=file) in capsys.readouterr().err


def test_the_results_directory_is_made_before_the_run(tmp_path: Path) -> None:
    options = run.parse_args(["--results-dir", str(tmp_path / "new" / "results")])
    assert [] == list(options.results_dir.iterdir())  # made, and the probe is gone
    options = run.parse_args(["--results-dir", str(tmp_path), "--data-dir", str(tmp_path / "d")])
    assert [] == list(options.data_dir.iterdir())


def test_no_directory_is_made_when_another_is_unusable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--data-dir was created before --results-dir was found unusable (found by a bug
    hunt): both are checked, then made."""
    file = tmp_path / "a-file"
    file.write_text("")
    for results in (file, file / "results"):
        with pytest.raises(SystemExit):
            run.parse_args(
                ["--data-dir", str(tmp_path / "new" / "d"), "--results-dir", str(results)]
            )
        assert "--results-dir: " in capsys.readouterr().err
        assert not (tmp_path / "new").exists(), results
    assert 0.0 == run.parse_args(["--warmup", "0", "--results-dir", str(tmp_path / "r")]).warmup


EXPOSITION = """# HELP dtm_wal_fsyncs_total File fsyncs
# TYPE dtm_wal_fsyncs_total counter
dtm_wal_fsyncs_total {fsyncs}
# TYPE dtm_wal_batch_records summary
dtm_wal_batch_records_count {fsyncs}
dtm_wal_batch_records_sum {records}
# TYPE dtm_protocol_messages_total counter
dtm_protocol_messages_total{{kind="requests"}} {requests}
dtm_protocol_messages_total{{kind="replies"}} {requests}
# TYPE dtm_participant_batch_calls_total counter
dtm_participant_batch_calls_total{{participant="inventory"}} {requests}
# TYPE dtm_participant_batch_items_total counter
dtm_participant_batch_items_total{{participant="inventory"}} {fsyncs}
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
# TYPE dtm_submit_handling_seconds histogram
dtm_submit_handling_seconds_count {requests}
dtm_submit_handling_seconds_sum {cpu}
# TYPE dtm_checkpoint_seconds summary
dtm_checkpoint_seconds_count {checkpoints}
dtm_checkpoint_seconds_sum {checkpoint_s}
# TYPE dtm_checkpoint_seconds_max gauge
dtm_checkpoint_seconds_max {checkpoint_max_s}
# TYPE dtm_checkpoint_building_seconds_max gauge
dtm_checkpoint_building_seconds_max {checkpoint_building_max_s}
"""


def exposition(
    fsyncs: int,
    records: int,
    requests: int,
    cpu: float = 0.0,
    checkpoints: tuple[int, float, float, float] = (0, 0.0, 0.0, 0.0),
    gc: tuple[int, float, float, float] | None = None,
) -> str:
    count, seconds, longest, building = checkpoints
    gc_block = ""
    if gc is not None:  # young collections: count, seconds, longest; the oldest's longest
        gc_count, gc_seconds, gc_longest, gc_oldest = gc
        gc_block = f"""# TYPE dtm_gc_pause_seconds summary
dtm_gc_pause_seconds_count{{generation="0"}} {gc_count}
dtm_gc_pause_seconds_sum{{generation="0"}} {gc_seconds}
dtm_gc_pause_seconds_count{{generation="2"}} {1 if gc_oldest else 0}
dtm_gc_pause_seconds_sum{{generation="2"}} {gc_oldest}
# TYPE dtm_gc_pause_seconds_max gauge
dtm_gc_pause_seconds_max{{generation="0"}} {gc_longest}
dtm_gc_pause_seconds_max{{generation="2"}} {gc_oldest}
"""
    return gc_block + EXPOSITION.format(
        fsyncs=fsyncs,
        records=records,
        requests=requests,
        cpu=cpu,
        checkpoints=count,
        checkpoint_s=seconds,
        checkpoint_max_s=longest,
        checkpoint_building_max_s=building,
    )


def test_server_counters_are_parsed_and_divided_by_the_window_transactions() -> None:
    parsed = hooks.parse(exposition(10, 30, 7))
    assert 10.0 == hooks.total(parsed, hooks.FSYNCS)
    assert 14.0 == hooks.total(parsed, hooks.MESSAGES)
    first = hooks.Sample(
        transactions=100,
        counters={
            "coordinator": hooks.parse(exposition(10, 30, 0, cpu=1.0, gc=(3, 0.03, 0.02, 0.0))),
            "inventory": hooks.parse(exposition(5, 5, 0, cpu=2.0)),
        },
        load_cpu_s=10.0,
    )
    last = hooks.Sample(
        transactions=300,
        counters={
            "coordinator": hooks.parse(
                exposition(
                    210,
                    830,
                    400,
                    cpu=1.3,
                    checkpoints=(2, 0.25, 0.2, 0.03),
                    gc=(8, 0.13, 0.05, 0.4),
                )
            ),
            "inventory": hooks.parse(exposition(105, 405, 0, cpu=2.1)),
        },
        load_cpu_s=10.05,
    )
    costs = hooks.costs(first, last)
    # 200 + 100 fsyncs over 200 transactions; 800 coordinator messages + the client's 2 each.
    assert 1.5 == costs.fsyncs_per_txn
    assert {"coordinator": 1.0, "inventory": 0.5} == costs.fsyncs_by_process
    assert {"coordinator": 4.0, "inventory": 4.0} == costs.wal_batch_mean
    assert 6.0 == costs.messages_per_txn
    assert {"replies": 2.0, "requests": 2.0} == costs.messages_by_kind
    # 0.3 s, 0.1 s and 0.05 s of CPU over 200 transactions.
    assert {"coordinator": 1.5, "inventory": 0.5, hooks.LOAD_GENERATOR: 0.25} == (
        costs.cpu_ms_by_process
    )
    assert 2.25 == costs.cpu_ms_per_txn
    assert 0.5 == costs.items_per_call  # 200 items in 400 calls (the coordinator's counters)
    # The coordinator answered 400 Submits in the window, in 0.3 s of handler time in all.
    assert 0.75 == costs.submit_handling_ms_mean
    # Two checkpoints in the window, and none at the inventory (left out, not reported as 0).
    assert {
        "coordinator": {
            "count": 2.0,
            "ms_total": 250.0,
            "ms_longest": 200.0,
            "ms_longest_building": 30.0,
        }
    } == (costs.checkpoints)
    # Six collections in the window (five young, one full), 0.5 s in all; the longest is the
    # full one. The inventory exports no GC pauses (an older server): left out, not 0.
    assert {"coordinator": {"count": 6.0, "ms_total": 500.0, "ms_longest": 400.0}} == (
        costs.gc_pauses
    )
    assert hooks.costs(last, last).fsyncs_per_txn is None


# ---- plots ----


def test_latency_samples_keep_the_extremes_and_stay_small() -> None:
    tally = fake_tally(5_000, 0, window_s=10.0)
    sample = plot.latency_sample_ms(tally)
    assert plot.CDF_POINTS_MAX == len(sample)
    assert (1.0, 5000.0) == (sample[0], sample[-1])
    assert sample == sorted(sample)


def test_a_sweep_document_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    def point(clients: int, participants: int, txn: float) -> dict[str, Any]:
        baseline = {"per_s": txn * 3, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
        return {
            "clients": clients,
            "participants": participants,
            "txn_per_s": txn,
            "p50_ms": 10.0,
            "p99_ms": 20.0,
            "violations": 0,
            "latencies_ms": [5.0, 10.0, 20.0],
            "unary": {**baseline, "latencies_ms": [1.0, 2.0]},
            "naive": {**baseline, "latencies_ms": [3.0, 4.0]},
        }

    points = [point(1, 4, 50.0), point(8, 4, 200.0), point(8, 2, 250.0)]
    document = {
        "timestamp": "2030-01-02T03:04:05+00:00",
        "duration_s": 1.0,
        "participants_sweep_clients": 8,
        "points": points,
    }
    assert 0.8 == plot.scaling(points, 8)
    written = plot.draw(document, tmp_path)
    assert 3 == len(written)
    for path in written:
        assert path.read_bytes().startswith(b"\x89PNG")


def test_each_sweep_point_records_what_its_verdicts_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """sweep.json kept each baseline's rate, p50, p99 and errors, but not its calls stuck
    past its window, nor dtm's unknown outcomes or the calls its window left open: a point
    whose ratio to the naive baseline latest.json would void read as judged."""
    measured: list[tuple[str, int, int]] = []

    async def unary(spec: LoadSpec, payload: bytes) -> BaselineResult:
        measured.append(("unary", spec.clients, 0))
        return BaselineResult("unary echo", 0, baseline_tally(2000, open_ok=spec.clients))

    async def naive(participants: int, spec: LoadSpec, payload: bytes) -> BaselineResult:
        measured.append(("naive", spec.clients, participants))
        # 48 of its clients stuck from 0.2 s until their deadline, past the window.
        return BaselineResult("naive 2PC", participants, baseline_tally(200, stuck=48))

    async def dtm(members: list[Any], spec: LoadSpec, workload: Workload) -> DtmResult:
        measured.append(("dtm", spec.clients, len(members)))
        return DtmResult(
            participants=members,
            tally=tally_with_troubles(),
            invariants=checks.check_all([consistent_snapshot()], VIEW, ALL_KINDS),
        )

    monkeypatch.setattr(plot, "measure_unary", unary)
    monkeypatch.setattr(plot, "measure_naive", naive)
    monkeypatch.setattr(plot, "measure_dtm", dtm)
    monkeypatch.setattr(plot, "fsync_p50_ms", lambda: 0.25)
    monkeypatch.setattr(plot, "draw", lambda document, directory: [])
    monkeypatch.setattr(plot.grpc_edge, "use_fast_event_loop", lambda: None)
    argv = ["--clients", "1,64", "--participants", "2,4", "--participants-clients", "64"]
    argv += ["--duration", "2", "--warmup", "0", "--results-dir", str(tmp_path)]
    assert 0 == plot.main(argv)
    # (64, 4) is in both sweeps: measured once.
    assert [
        ("unary", 1, 0),
        ("naive", 1, 4),
        ("dtm", 1, 4),
        ("unary", 64, 0),
        ("naive", 64, 4),
        ("dtm", 64, 4),
        ("naive", 64, 2),
        ("dtm", 64, 2),
    ] == measured
    document = json.loads((tmp_path / "sweep.json").read_text())
    points = {(point["clients"], point["participants"]): point for point in document["points"]}
    target_load = points[(64, 4)]
    # Every key of a results file, as bench.run writes it for this point alone.
    assert_required_keys(target_load)
    assert (0, 48, 48, 0, 64) == (
        target_load["naive_errors"],
        target_load["naive_in_flight_at_close"],
        target_load["naive_failed_after_close"],
        target_load["unary_failed_after_close"],
        target_load["unary_in_flight_at_close"],
    )
    assert (30, 20, 1, 10000.0) == (
        target_load["unknown"],
        target_load["errors"],
        target_load["in_flight_at_close"],
        target_load["all_calls_p99_ms"],
    )
    # The verdicts are those of latest.json: void where the point's own calls say so.
    ratio = target_load["targets"]["ratio_vs_naive"]
    assert ratio["met"] is None
    assert "48 calls of the naive 2PC baseline stuck past its window" in ratio["note"]
    assert "30 unknown outcomes in the window" in target_load["targets"]["throughput"]["note"]
    one_client = points[(1, 4)]
    assert 0.25 == one_client["fsync_p50_ms"]
    assert one_client["one_client_floor_ms"] is not None
    assert "p50_one_client" in one_client["targets"]
    # The echo is measured in the clients sweep only; the drawing's inputs are still there.
    assert points[(64, 2)]["unary"] is None and points[(64, 2)]["unary_rpc_per_s"] is None
    naive_point = target_load["naive"]
    assert (48, 48) == (naive_point["in_flight_at_close"], naive_point["failed_after_close"])
    assert naive_point["latencies_ms"] and target_load["latencies_ms"]
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "clients   64  participants  4" in line)
    assert "48 calls of the naive 2PC baseline stuck past its window" in line, line
    assert "20 failed calls in the window, 30 unknown outcomes in the window" in line, line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # A participants count out of range used to crash after the whole clients sweep.
        (["--participants", "2,4,99"], "argument --participants: give integers 1..32"),
        (["--clients", "1,20000"], "argument --clients: give integers 1..10000"),
        (["--participants-clients", "0"], "--participants-clients must be 1..10000"),
        (["--participants-clients", "10001"], "--participants-clients must be 1..10000"),
        (["--duration", "nan"], "argument --duration: must be within"),
        (["--duration", "inf"], "argument --duration: must be within"),
        (["--duration", "0"], "argument --duration: must be at least 0.001 s"),
        (["--duration", "1e-13"], "argument --duration: must be at least 0.001 s"),
        (["--warmup", "nan"], "argument --warmup: must be within"),
        (["--results-dir", "{file}"], "--results-dir: {file} is not a directory"),
        (["--from-json", "{file}.missing"], "--from-json: no such file"),
        # Not JSON, or JSON of another shape (bench.run's latest.json is one run): a traceback
        # (JSONDecodeError, KeyError 'points') after the options were taken.
        (["--from-json", "{file}"], "--from-json: {file}: cannot read it as JSON"),
        (["--from-json", "{file}.run"], "--from-json: {file}.run: not a sweep of bench.plot"),
    ],
)
def test_a_bad_option_of_the_sweep_exits_2_before_any_point_is_measured(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    (tmp_path / "a-file.run").write_text('{"dtm": {"per_s": 900.0}}')

    async def measure(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured despite a bad option")

    for name in ("measure_unary", "measure_naive", "measure_dtm"):
        monkeypatch.setattr(plot, name, measure)
    argv = [arg.format(file=file) for arg in argv]
    results = [] if "--results-dir" in argv else ["--results-dir", str(tmp_path / "results")]
    with pytest.raises(SystemExit) as exited:
        plot.main([*argv, *results])
    assert 2 == exited.value.code
    assert message.format(file=file) in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_window_that_would_never_close_is_refused(bad: float) -> None:
    """drive() closes its window at warmup + duration: with NaN or infinity, never."""
    with pytest.raises(ValueError, match="finite"):
        LoadSpec(clients=1, warmup_s=0.0, duration_s=bad)
    with pytest.raises(ValueError, match="finite"):
        LoadSpec(clients=1, warmup_s=bad, duration_s=1.0)
    with pytest.raises(ValueError, match="finite"):
        Tally(window_start=0.0, window_end=bad)
    with pytest.raises(ValueError, match="finite"):
        Tally(window_start=bad, window_end=1.0)


class RecordingChannel:
    """A participant's channel to the naive coordinator that records its calls, in `log`."""

    def __init__(self, log: list[tuple[int, str, bytes]], index: int) -> None:
        self.log = log
        self.index = index

    def unary_unary(self, method: str, *raw: Any) -> Any:
        async def call(request: bytes, **options: Any) -> bytes:
            self.log.append((self.index, method, request))
            return request

        return call


def test_the_naive_coordinator_sends_each_participant_its_branch_then_only_the_id() -> None:
    """dtm's coordinator sends each participant its own branch, then a decision naming the
    transaction: the naive baseline does the same, one unary call per participant per phase
    (not the client's whole N-branch request to each, twice)."""
    request = Workload(participants_for(4), run_id="r1").order(0, 0).request
    log: list[tuple[int, str, bytes]] = []
    handler = baselines.naive_handler([RecordingChannel(log, index) for index in range(4)])
    submit = handler.service(SimpleNamespace(method=baselines.SUBMIT)).unary_unary
    assert b"committed" == asyncio.run(submit(request.SerializeToString(), None))
    # Every prepare, then every commit.
    assert [baselines.PREPARE] * 4 + [baselines.COMMIT] * 4 == [method for _, method, _ in log]
    prepares = {index: sent for index, method, sent in log if method == baselines.PREPARE}
    commits = {index: sent for index, method, sent in log if method == baselines.COMMIT}
    for index, branch in enumerate(request.branches):
        prepare = participant_pb2.PrepareRequest.FromString(prepares[index])
        assert (request.transaction_id, index, branch.operation) == (
            prepare.transaction_id,
            prepare.branch,
            prepare.operation,
        )
        assert len(prepares[index]) < len(request.SerializeToString()) / 2
        assert (
            participant_pb2.CommitRequest(
                transaction_id=request.transaction_id, branch=index
            ).SerializeToString()
            == commits[index]
        )


# ---- real runs, tiny ----


@pytest.mark.slow
def test_baselines_run_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """On ports their servers bind themselves: ports the bench chose with free_ports (as it
    did) are taken here as soon as chosen, which failed the baselines ("exited with code
    1"), whereas port 0 cannot be taken from a server."""
    thieves: list[socket.socket] = []

    def then_take_them(count: int, host: str = "127.0.0.1") -> list[int]:
        ports = free_ports(count, host)
        for port in ports:
            thieves.append(socket.socket())
            thieves[-1].bind((host, port))
            thieves[-1].listen()
        return ports

    monkeypatch.setattr(baselines, "free_ports", then_take_them, raising=False)
    spec = LoadSpec(clients=2, warmup_s=0.0, duration_s=0.5)

    # The naive coordinator reads the transaction it is given, as dtm's does.
    payload = Workload(participants_for(2), run_id="r1").order(0, 0).request.SerializeToString()

    async def both() -> tuple[BaselineResult, BaselineResult]:
        unary = await measure_unary(spec, payload, progress=False)
        naive = await measure_naive(2, spec, payload, progress=False)
        return unary, naive

    try:
        unary, naive = asyncio.run(both())
    finally:
        for thief in thieves:
            thief.close()
    for result in (unary, naive):
        assert result.tally.counts[Outcome.COMMITTED] > 0
        assert 0 == result.errors


@pytest.mark.slow
def test_ports_taken_after_the_bench_chose_them_do_not_fail_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bench chose every port of a run with free_ports, and another program may bind one
    before its server does. Here the sixth and the last it chose are taken as soon as chosen:
    the coordinator's and the notification's /metrics ports, which their start moves
    (FreePorts), as it does gRPC ports; before, the extra instance's gRPC and /metrics
    ports, which it now binds itself (port 0). The run commits and scrapes every process."""
    choose = measure.free_ports
    thieves: list[socket.socket] = []

    def then_take_two(count: int, host: str = "127.0.0.1") -> list[int]:
        ports = choose(count, host)
        for port in (ports[len(PROCESSES)], ports[-1]):
            thieves.append(socket.socket())
            thieves[-1].bind((host, port))
            thieves[-1].listen()
        return ports

    monkeypatch.setattr(measure, "free_ports", then_take_two)
    spec = LoadSpec(clients=2, warmup_s=0.0, duration_s=0.5)
    participants = participants_for(5)  # the four services and inventory-2
    try:
        result = asyncio.run(
            measure.measure_dtm(
                participants,
                spec,
                Workload(participants, run_id="r1"),
                data_dir=tmp_path,
                progress=False,
            )
        )
    finally:
        for thief in thieves:
            thief.close()
    assert 2 == len(thieves)
    assert result.tally.counts[Outcome.COMMITTED] > 0
    assert result.costs.fsyncs_by_process is not None, result.costs.note
    assert {*PROCESSES, "inventory-2"} == set(result.costs.fsyncs_by_process)


@pytest.mark.slow
@pytest.mark.parametrize(("submit_batch", "unary"), [(0, False), (2, False), (0, True)])
def test_a_tiny_real_run_writes_its_results_and_finds_no_violation(
    tmp_path: Path, submit_batch: int, unary: bool
) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            *("--clients", "4", "--duration", "1", "--warmup", "0.2"),
            *("--submit-batch", str(submit_batch)),
            *(["--unary-participants"] if unary else []),
            "--no-baselines",
            "--no-progress",
            *("--results-dir", str(tmp_path)),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == completed.returncode, completed.stdout + completed.stderr
    results = json.loads((tmp_path / "latest.json").read_text())
    assert_required_keys(results)
    assert 0 == results["violations"]
    assert results["committed"] > 0
    assert 0 == results["unexpected_outcomes"]
    assert "0 violations" in completed.stdout
    assert "custom" == results["mode"]  # its windows are not the quick preset's
    # The coordinator was sampled from outside while the load ran, to the window's end.
    assert results["coordinator_rss_mb_last"] > 10
    assert len(results["footprint_samples"]) >= 2
    assert results["footprint_samples"][-1]["at_s"] >= 1.0
    assert "coordinator footprint" in completed.stdout
    assert submit_batch == results["submit_batch"]
    # The servers' counters were scraped as the window opened and as it closed: every process
    # forced its log in the window (a prepare record at each service, a decision at the
    # coordinator)...
    assert results["fsyncs_per_txn"] is not None, results["server_counters"]
    assert results["fsyncs_per_txn"] > 0
    by_process = results["fsyncs_per_txn_by_process"]
    assert set(PROCESSES) == set(by_process), by_process
    assert all(fsyncs > 0 for fsyncs in by_process.values()), by_process
    # ...and the coordinator sent each participant a Prepare and a Commit per transaction,
    # each answered (batched calls carry them, but each counts as a message), besides the
    # client's own messages: 2 + 4 N unbatched. Not exactly: the transactions in flight at
    # each scrape are counted at its midpoint.
    branches = results["participants"]
    client_messages = results.get("client_messages_per_txn", hooks.CLIENT_MESSAGES_PER_TXN)
    by_kind = results["coordinator_messages_per_txn_by_kind"]
    assert by_kind["requests"] == pytest.approx(2 * branches, rel=0.25), by_kind
    assert by_kind["replies"] == pytest.approx(2 * branches, rel=0.25), by_kind
    assert results["messages_per_txn"] >= 2 * branches + client_messages
    assert results["messages_per_txn"] == pytest.approx(client_messages + 4 * branches, rel=0.25)
    if submit_batch:  # the clients' calls carried their transactions, each counted once
        assert 1 <= results["submit_batch_items_per_call"] <= 4
        assert "submit batching" in completed.stdout
    # The path the coordinator took, as the participants registered: with unary participants
    # not one Exchange was sent (the messages above were each a call of its own).
    assert ("unary" if unary else "batched") == results["participant_path"]
    if unary:
        assert results["batch_items_per_call"] is None
        assert "unary (one Prepare" in completed.stdout
    else:
        assert results["batch_items_per_call"] >= 1


# ---- the coordinator's footprint (make bench-soak) ----


def test_footprint_reads_memory_and_log_size_from_outside_the_process(tmp_path: Path) -> None:
    assert (footprint.rss_bytes(os.getpid()) or 0) > 1_000_000  # this Python: some MB
    assert footprint.rss_bytes(2**22 + 7) is None  # above pid_max's default: no such process
    (tmp_path / "wal" / "old").mkdir(parents=True)
    (tmp_path / "wal" / "00000001.seg").write_bytes(b"x" * 1_000)
    (tmp_path / "wal" / "old" / "00000000.seg").write_bytes(b"y" * 234)
    assert 1_234 == footprint.directory_bytes(tmp_path / "wal")
    assert 0 == footprint.directory_bytes(tmp_path / "missing")


def test_footprint_samples_until_the_window_closes(tmp_path: Path) -> None:
    async def run() -> list[footprint.Sample]:
        start = time.perf_counter()
        tally = Tally(window_start=start + 0.05, window_end=start + 0.25)
        samples: list[footprint.Sample] = []
        sample = footprint.sampler(os.getpid, tmp_path, samples, every_s=0.05)
        tally.record(Outcome.COMMITTED, start, start)
        await sample(tally)
        return samples

    samples = asyncio.run(run())
    # One every 50 ms over 250 ms, plus the closing one; fewer when sleeps overshoot.
    assert 2 <= len(samples) <= 8
    assert samples[0].at_s < 0 <= samples[-1].at_s  # from the warmup to the window's end
    assert all(sample.transactions == 1 and sample.rss_bytes for sample in samples)


def test_footprint_summary_measures_growth_over_the_second_half() -> None:
    samples = [
        footprint.Sample(at_s=t, transactions=n, rss_bytes=rss, log_bytes=log)
        for t, n, rss, log in [
            (0.0, 0, 50_000_000, 0),
            (1.0, 40_000, 90_000_000, 1_700_000),
            (2.0, 55_000, 94_000_000, 300_000),  # nearest to half of 100,000
            (3.0, 100_000, 95_000_000, 900_000),
        ]
    ]
    summary = footprint.summary(samples)
    assert (50.0, 94.0, 95.0, 95.0) == (
        summary["coordinator_rss_mb_first"],
        summary["coordinator_rss_mb_middle"],
        summary["coordinator_rss_mb_last"],
        summary["coordinator_rss_mb_max"],
    )
    assert 1.0 == summary["coordinator_rss_growth_mb_second_half"]
    assert (0.9, 1.7, 0.6) == (
        summary["coordinator_log_mb_last"],
        summary["coordinator_log_mb_max"],
        summary["coordinator_log_growth_mb_second_half"],
    )
    assert 4 == len(summary["footprint_samples"])
    assert {"footprint_samples": []} == footprint.summary([])
    text = report.format_table(fake_results(baselines=False, samples=samples))
    assert "RSS 50.0 MB at the first sample, 94.0 at half" in text
    assert "coordinator footprint" not in report.format_table(fake_results(baselines=False))


def test_participant_micro_runs_every_service_with_every_prepare_voted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """make bench-participant: each service's calls (two, the second carrying the first's
    commits) are answered PREPARED (the harness asserts it) and a figure is printed."""
    small = ["--rounds", "1", "--warmup", "0", "--calls", "2", "--batch", "3"]
    participant_micro.main([*small, "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert ["inventory", "orders", "payment", "notification"] == [
        line.split(":")[0] for line in lines
    ]
    assert all("us of CPU per branch" in line for line in lines), lines
