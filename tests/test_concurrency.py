"""Many transactions in flight at once, contending for a few SKUs and accounts, some failing:
no oversell, no overdraft, every invariant of reliability.md holds afterwards."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest

import participants.services as services
from dtm import invariants
from dtmpb.v1 import coordinator_pb2, participant_pb2
from participants.services.catalog import AccountSpec
from tests.harness import InProcessCluster, order_branches

ORDERS = 240
SEED = 20261127


def test_concurrent_orders_with_contention_keep_every_invariant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pages, so the invariant check below must follow next_page_token to see everything.
    monkeypatch.setattr(services, "PAGE_SIZE_DEFAULT", 7)
    rng = random.Random(SEED)
    stock = {"sku-hot": 40, "sku-warm": 80, "sku-cold": 1_000}
    accounts = {
        "acct-a": AccountSpec(30_000),
        "acct-b": AccountSpec(20_000),
        "acct-c": AccountSpec(1_000_000),
        "acct-blocked": AccountSpec(1_000_000, declines=True),
    }

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, stock=stock, accounts=accounts, prepare_timeout_ms=2_000
        ) as cluster:
            # A slow service for part of the run: some orders also abort on deadlines.
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_SLOW, 50)
            requests = []
            for i in range(ORDERS):
                skus = rng.sample(list(stock), 2 if rng.random() < 0.3 else 1)
                lines = [(sku, rng.randint(1, 3)) for sku in skus]
                account = rng.choices(list(accounts), weights=[4, 4, 2, 1])[0]
                amount = rng.randint(100, 3_000)
                requests.append(order_branches(f"o-{i}", lines, account, amount))
            # Each request keeps its own id; a tenth are duplicated to race with themselves.
            submits = [cluster.submit(r, f"txn-{i}") for i, r in enumerate(requests)]
            submits += [cluster.submit(requests[i], f"txn-{i}") for i in range(0, ORDERS, 10)]
            responses = await asyncio.gather(*submits)
            await cluster.set_fault("notification", participant_pb2.FAULT_MODE_NONE)

            outcomes = Counter(coordinator_pb2.Outcome.Name(r.outcome) for r in responses)
            by_id: dict[str, set[int]] = {}
            for response in responses:
                by_id.setdefault(response.transaction_id, set()).add(response.outcome)
            # A retried Submit never disagrees with the first.
            assert all(len(seen) == 1 for seen in by_id.values())
            assert outcomes["OUTCOME_COMMITTED"] > 0
            assert outcomes["OUTCOME_ABORTED"] > 0

            targets = {name: cluster.address(name) for name in invariants.SERVICES}
            snapshot = await invariants.wait_until_settled(targets)
            report = invariants.report(snapshot)
            assert [] == report.violations
            committed = {
                r.transaction_id
                for r in responses
                if r.outcome == coordinator_pb2.OUTCOME_COMMITTED
            }
            assert len(committed) == report.confirmed_orders
            hot = next(s for s in snapshot.stock if s.sku == "sku-hot")
            assert hot.available >= 0 and hot.sold <= 40

    asyncio.run(scenario())
