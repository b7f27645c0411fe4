"""A participant's inquiries (QueryOutcome): a forced branch is reconciled with its coordinator
even when the coordinator never sends a decision, and a coordinator that stays unreachable
costs one summary line per round, not one line per branch per attempt."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dtm import logs
from dtmpb.v1 import coordinator_pb2, participant_pb2
from participants.services.inventory import InventoryService
from tests.harness import (
    NEVER_MS,
    STOCK,
    InProcessCluster,
    eventually,
    forced_after_commit,
    forced_lines,
    heuristic_force,
    order_branches,
    reserve,
)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_forced_branch_the_coordinator_never_decides_is_reconciled_by_inquiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A coordinator with no record of a transaction (it crashed before deciding: presumed
    abort) sends no decision. Before, a branch forced to commit meanwhile stopped asking, and
    its contradiction was reported nowhere: no line, no count, `dtm heuristics` empty."""
    logs.configure("inventory", "INFO")

    async def scenario() -> None:
        overrides = {"in_doubt_after_ms": NEVER_MS, "metrics_listen": "127.0.0.1:0"}
        async with InProcessCluster(tmp_path, participant_overrides=overrides) as cluster:
            inventory = cluster.participant_stub("inventory")
            admin = cluster.admin("inventory")
            for txn, commit in (("t-fc", True), ("t-fr", False)):  # unknown to the coordinator
                await inventory.Prepare(
                    participant_pb2.PrepareRequest(
                        transaction_id=txn, branch=0, operation=reserve()
                    )
                )
                await admin.ForceOutcome(heuristic_force(txn, 0, commit=commit))
            server = cluster.participants["inventory"]
            assert server.metrics is not None

            async def samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
                return await asyncio.to_thread(scrape, server.metrics_port)

            def forced(result: str) -> float:
                return found[("dtm_forced_outcomes_total", frozenset({("result", result)}))]

            found = await samples()
            assert 2 == found[("dtm_forced_branches_awaiting", frozenset())]
            assert 0 == forced("agreed") == forced("contradicted")
            awaiting = participant_pb2.ListBranchesRequest(awaiting_coordinator=True)
            assert 2 == len((await admin.ListBranches(awaiting)).branches)

            capsys.readouterr()
            await server._ask_about_in_doubt(
                cluster.client, server.engine.monotonic_ms() + NEVER_MS + 1
            )

            # Both stop awaiting, as when the coordinator's decision arrives.
            assert [] == list((await admin.ListBranches(awaiting)).branches)
            listed = await admin.ListBranches(participant_pb2.ListBranchesRequest())
            shown = {b.transaction_id: b for b in listed.branches}
            assert "heuristic commit" == shown["t-fc"].heuristic
            assert participant_pb2.BRANCH_STATE_COMMITTED == shown["t-fc"].state
            assert not shown["t-fc"].awaiting_coordinator
            assert "heuristic rollback" == shown["t-fr"].heuristic
            found = await samples()
            assert 0 == found[("dtm_forced_branches_awaiting", frozenset())]
            assert (1, 1) == (forced("agreed"), forced("contradicted"))
            lines = capsys.readouterr().err.splitlines()
            [warning] = [line for line in lines if "WARNING" in line and "inventory:" in line]
            assert "forced branch contradicts its coordinator's outcome" in warning
            assert "txn=t-fc branch=0 forced=committed decided=aborted" in warning
            assert any("forced branch reconciled" in line and "txn=t-fr" in line for line in lines)

            # Asked about no more; a late Rollback still hears the heuristic outcome.
            await server._ask_about_in_doubt(
                cluster.client, server.engine.monotonic_ms() + 2 * NEVER_MS
            )
            found = await samples()
            assert (1, 1) == (forced("agreed"), forced("contradicted"))
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await inventory.Rollback(
                    participant_pb2.RollbackRequest(transaction_id="t-fc", branch=0)
                )
            assert ("dtm-heuristic", "heuristic commit") in tuple(
                late.value.trailing_metadata() or ()
            )

    asyncio.run(scenario())


async def idle(cluster: InProcessCluster) -> None:
    async def quiet() -> bool:
        return not cluster.coordinator.engine.active

    await eventually(quiet)


@pytest.mark.parametrize("commit", [True, False], ids=["agreeing", "contradicting"])
def test_a_forced_branch_reconciled_by_its_commit_is_not_asked_about_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], commit: bool
) -> None:
    """The coordinator's Commit reaches a forced branch, which is reconciled; the coordinator
    then forgets t1 (its window of finished transactions). Before, a restart put the branch
    back among those awaiting the coordinator, asked about t1, heard ABORTED (presumed abort:
    no record) and reported the agreeing forced commit as a contradiction, the contradicting
    forced rollback as agreement. Now the reconciliation is logged: nothing is asked, said or
    counted again."""
    logs.configure("inventory", "INFO")

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            participant_overrides={"in_doubt_after_ms": NEVER_MS},
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 20, "backoff_ms_max": 100},
        ) as cluster:
            await forced_after_commit(cluster, commit)
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)
            await idle(cluster)  # the coordinator's Commit reached the forced branch
            engine = cluster.participants["inventory"].engine
            assert not engine.awaiting_coordinator(("t1", 0))
            expected = (1, 0) if commit else (0, 1)
            assert expected == (engine.counters.forced_agreed, engine.counters.forced_contradicted)
            for number in range(3):  # the coordinator forgets t1 (finished_kept 2)
                newer = order_branches(f"o-n{number}", [("sku-apple", 1)], amount_cents=1)
                await cluster.submit(newer[:1], f"tn{number}")
            await idle(cluster)
            assert not cluster.coordinator.engine.knows("t1")

            server = await cluster.restart_participant("inventory", InventoryService(dict(STOCK)))
            assert [] == server.engine.forced_awaiting()
            capsys.readouterr()
            await server._ask_about_in_doubt(
                cluster.client, server.engine.monotonic_ms() + NEVER_MS + 1
            )
            assert [] == forced_lines(capsys.readouterr().err)
            counters = server.engine.counters
            assert (0, 0) == (counters.forced_agreed, counters.forced_contradicted)
            kept = server.engine.branch(("t1", 0))
            assert kept is not None and kept.branch.heuristic and kept.reconciled

    asyncio.run(scenario())


def test_a_contradiction_found_by_inquiry_is_not_counted_again_after_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An inquiry finds a forced rollback of a committed transaction: one WARNING, one count.
    Before, every restart (from the log, or from a checkpoint) put the branch back awaiting,
    asked again, warned and counted again."""
    logs.configure("inventory", "INFO")

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            participant_overrides={"in_doubt_after_ms": NEVER_MS},
            coordinator_overrides={"backoff_ms_min": 20, "backoff_ms_max": 100},
        ) as cluster:
            await forced_after_commit(cluster, commit=False)
            server = cluster.participants["inventory"]
            capsys.readouterr()
            await server._ask_about_in_doubt(
                cluster.client, server.engine.monotonic_ms() + NEVER_MS + 1
            )
            [warning] = forced_lines(capsys.readouterr().err)
            assert "contradicts" in warning and "txn=t1" in warning
            assert 1 == server.engine.counters.forced_contradicted
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)
            await idle(cluster)  # its Commit came after: answered with the heuristic
            heuristics = await cluster.client.ListHeuristics(
                coordinator_pb2.ListHeuristicsRequest()
            )
            assert [("t1", 0)] == [(h.transaction_id, h.branch) for h in heuristics.heuristics]
            for restart in ("from the log", "from a checkpoint"):
                if restart == "from a checkpoint":
                    await server.engine.checkpoint()
                server = await cluster.restart_participant(
                    "inventory", InventoryService(dict(STOCK))
                )
                assert [] == server.engine.forced_awaiting(), restart
                capsys.readouterr()
                await server._ask_about_in_doubt(
                    cluster.client, server.engine.monotonic_ms() + NEVER_MS + 1
                )
                assert [] == forced_lines(capsys.readouterr().err), restart
                counters = server.engine.counters
                assert (0, 0) == (counters.forced_agreed, counters.forced_contradicted), restart

    asyncio.run(scenario())


class Unreachable:
    """A coordinator stub whose every QueryOutcome fails, as with the coordinator down."""

    def __init__(self) -> None:
        self.asked = 0

    async def QueryOutcome(self, request: Any, timeout: float) -> Any:  # noqa: ASYNC109 (the stub's signature)
        self.asked += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "connection refused",
        )


def test_an_unreachable_coordinator_costs_one_summary_line_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, each participant wrote one INFO line per in-doubt branch per attempt (30
    branches: 250 lines in 20 s). Now one INFO line per round, naming the oldest and how many
    are unknown; the per-branch lines are DEBUG."""
    logs.configure("inventory", "INFO")

    async def scenario() -> None:
        overrides = {"in_doubt_after_ms": NEVER_MS, "inquiry_backoff_ms_max": 5_000}
        async with InProcessCluster(tmp_path, participant_overrides=overrides) as cluster:
            inventory = cluster.participant_stub("inventory")
            for n in range(30):
                await inventory.Prepare(
                    participant_pb2.PrepareRequest(
                        transaction_id=f"t-{n:02}", branch=0, operation=reserve()
                    )
                )
            server = cluster.participants["inventory"]
            coordinator = Unreachable()
            capsys.readouterr()
            start = server.engine.monotonic_ms() + NEVER_MS
            for tick in range(200):  # 20 s of 100 ms ticks
                await server._ask_about_in_doubt(coordinator, start + tick * 100)  # type: ignore[arg-type]
            lines = capsys.readouterr().err.splitlines()

            assert coordinator.asked > 150  # the inquiries themselves go on as before
            assert not [line for line in lines if "outcome unknown" in line]  # per branch: DEBUG
            summaries = [line for line in lines if "still unknown" in line]
            assert 4 <= len(summaries) <= 5, summaries  # one per 5 s round
            assert all(line.split()[1] == "INFO" for line in summaries)
            assert "txn=t-00 branch=0" in summaries[0] and "in_doubt=30 forced=0" in summaries[0]
            assert "UNAVAILABLE" in summaries[0]

    asyncio.run(scenario())
