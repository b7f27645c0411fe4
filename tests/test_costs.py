"""The presumed-abort cost table of protocol.md, measured by counters on real servers:
messages between coordinator and participants, and forced log writes, per case."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dtmpb.v1 import coordinator_pb2
from tests.doubles import StockCheck
from tests.harness import InProcessCluster, eventually, order_branches, read_only_branch


def participant_forced_writes(cluster: InProcessCluster) -> dict[str, int]:
    return {name: s.engine.forced_writes for name, s in cluster.participants.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def test_presumed_abort_costs_match_the_table(tmp_path: Path) -> None:
    async def scenario() -> None:
        extra = [StockCheck("check-a"), StockCheck("check-b")]
        async with InProcessCluster(tmp_path, extra_services=extra) as cluster:
            counters = cluster.coordinator.engine.counters

            async def measure(
                branches: list[coordinator_pb2.BranchRequest],
                settle_requests: int,
                settle_messages: int,
            ) -> tuple[int, int, int, dict[str, int], int]:
                requests, replies = counters.requests, counters.replies
                forced = counters.forced_writes
                participants = participant_forced_writes(cluster)
                response = await cluster.submit(branches)

                async def all_sent() -> bool:
                    sent = counters.requests - requests
                    return sent >= settle_requests and (
                        sent + counters.replies - replies >= settle_messages
                    )

                # The table's messages, replies included (a loaded machine counted a commit's
                # last acks after a fixed wait); then a moment for any beyond the table.
                await eventually(all_sent)
                await asyncio.sleep(0.05)  # nothing further may arrive
                return (
                    counters.requests - requests + counters.replies - replies,
                    counters.forced_writes - forced,
                    response.outcome,
                    delta(participant_forced_writes(cluster), participants),
                    counters.requests - requests,
                )

            # commit, N = U = 4: 2N + 2U messages, 1 forced coordinator write, 2 per participant
            messages, forced, outcome, per_participant, _ = await measure(
                order_branches("o-c", [("sku-apple", 1)]), settle_requests=8, settle_messages=16
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == outcome
            assert 2 * 4 + 2 * 4 == messages
            assert 1 == forced
            assert {"inventory": 2, "orders": 2, "payment": 2, "notification": 2} == per_participant

            # abort after a refusal, N = 4, Y = 3: 2N + Y messages (no rollback acks needed),
            # no coordinator write, 1 forced write per YES voter
            messages, forced, outcome, per_participant, requests = await measure(
                order_branches("o-a", [("sku-apple", 1)], account="acct-blocked"),
                settle_requests=7,
                settle_messages=11,
            )
            assert coordinator_pb2.OUTCOME_ABORTED == outcome
            assert 2 * 4 + 3 == messages
            assert 7 == requests
            assert 0 == forced
            assert {"inventory": 1, "orders": 1, "notification": 1} == per_participant

            # all read-only: 2N messages, nothing forced anywhere
            messages, forced, outcome, per_participant, _ = await measure(
                [read_only_branch("check-a"), read_only_branch("check-b")],
                settle_requests=2,
                settle_messages=4,
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == outcome
            assert 2 * 2 == messages
            assert 0 == forced
            assert {} == per_participant

            # one participant: one-phase commit, 2 messages, no coordinator write, 1 forced
            messages, forced, outcome, per_participant, _ = await measure(
                order_branches("o-1", [("sku-apple", 1)])[:1],
                settle_requests=1,
                settle_messages=2,
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == outcome
            assert 2 == messages
            assert 0 == forced
            assert {"inventory": 1} == per_participant

    asyncio.run(scenario())
