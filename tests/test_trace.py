"""`dtm trace TXN_ID`: one transaction across the coordinator, the participants and every
process's log; and ListBranches of one transaction, which it asks each participant."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from dtm import limits
from dtmpb.v1 import coordinator_pb2, participant_pb2
from tests.harness import InProcessCluster, order_branches, settled


async def two_orders_one_listed(cluster: InProcessCluster) -> None:
    """t-old-1 then t-old-2 committed at inventory, which lists only its newest branch
    (LIST_TRANSACTIONS_LIMIT_MAX patched to 1, as if 1,000 newer ones were kept)."""
    for number in (1, 2):
        order = order_branches(f"o-old-{number}", [("sku-apple", 1)])[:1]
        response = await cluster.submit(order, f"t-old-{number}")
        assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
    await settled(cluster)
    listed = await cluster.admin("inventory").ListBranches(participant_pb2.ListBranchesRequest())
    assert ["t-old-2"] == [b.transaction_id for b in listed.branches]


def test_list_branches_of_one_transaction_finds_one_older_than_the_newest_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListBranches with a transaction_id looks its branches up by key: a participant lists at
    most its newest LIST_TRANSACTIONS_LIMIT_MAX branches (of up to 100,000 kept), so a
    filter applied to that list would miss an older transaction's."""
    monkeypatch.setattr(limits, "LIST_TRANSACTIONS_LIMIT_MAX", 1)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            await two_orders_one_listed(cluster)
            admin = cluster.admin("inventory")
            one = participant_pb2.ListBranchesRequest(transaction_id="t-old-1")
            found = (await admin.ListBranches(one)).branches
            assert [("t-old-1", 0, participant_pb2.BRANCH_STATE_COMMITTED)] == [
                (b.transaction_id, b.branch, b.state) for b in found
            ]
            # With the other filters: none of its branches is prepared, or awaiting.
            one.states.append(participant_pb2.BRANCH_STATE_PREPARED)
            assert [] == list((await admin.ListBranches(one)).branches)
            awaiting = participant_pb2.ListBranchesRequest(
                transaction_id="t-old-1", awaiting_coordinator=True
            )
            assert [] == list((await admin.ListBranches(awaiting)).branches)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.ListBranches(participant_pb2.ListBranchesRequest(transaction_id="a b"))
            assert grpc.StatusCode.INVALID_ARGUMENT == refused.value.code()
            assert "transaction_id 'a b' is malformed" in (refused.value.details() or "")

    asyncio.run(scenario())
