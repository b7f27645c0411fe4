"""Checkpoints keep the logs bounded, and a restart from a checkpointed log loses nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dtm import invariants
from dtm.wal import dump
from dtmpb.v1 import coordinator_pb2
from participants.services.inventory import InventoryService
from participants.services.notification import NotificationService
from participants.services.orders import OrdersService
from participants.services.payment import PaymentService
from tests.harness import ACCOUNTS, InProcessCluster, eventually, order_branches

ORDERS = 240


def records_in_logs(data_dir: Path) -> dict[str, int]:
    """Records each process would replay now (read-only: dump never repairs)."""
    return {
        wal_dir.parent.name: sum(1 for line in dump(wal_dir) if "lsn=" in line)
        for wal_dir in sorted(data_dir.glob("*/wal"))
    }


def test_logs_stay_bounded_and_restart_recovers_everything(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            stock={"sku-apple": 10_000},
            coordinator_overrides={"checkpoint_every_records": 40},
            participant_overrides={"checkpoint_every_records": 40, "tick_ms": 20},
        ) as cluster:
            replayed = []
            for wave in range(4):
                responses = await asyncio.gather(
                    *(
                        cluster.submit(
                            order_branches(f"o-{wave}-{i}", [("sku-apple", 1)], amount_cents=5),
                            f"t-{wave}-{i}",
                        )
                        for i in range(ORDERS // 4)
                    )
                )
                assert all(r.outcome == coordinator_pb2.OUTCOME_COMMITTED for r in responses)

                async def checkpointed() -> bool:
                    # Each housekeeping loop has taken the checkpoint this wave made due, and
                    # it is durable: the old segments are deleted by the sync that covers it.
                    engines = [cluster.coordinator.engine] + [
                        server.engine for server in cluster.participants.values()
                    ]
                    return all(
                        engine.records_since_checkpoint < 40
                        and engine.log.durable_lsn == engine.log.appended_lsn
                        for engine in engines
                    )

                await eventually(checkpointed)
                replayed.append(records_in_logs(tmp_path))
            # Bounded: each log holds its last checkpoint plus the records since, not every
            # record ever written (each wave writes ~60-120 records per process).
            for counts in replayed[1:]:
                assert all(count <= 40 + 60 for count in counts.values()), replayed

            targets = {name: cluster.address(name) for name in invariants.SERVICES}
            before = await invariants.wait_until_settled(targets)

            # Restart every participant from its (checkpointed) log, and the coordinator.
            fresh = {
                "inventory": InventoryService({"sku-apple": 10_000}),
                "orders": OrdersService(),
                "payment": PaymentService(dict(ACCOUNTS)),
                "notification": NotificationService(),
            }
            for name, service in fresh.items():
                await cluster.restart_participant(name, service)
            await cluster.restart_coordinator()
            targets = {name: cluster.address(name) for name in invariants.SERVICES}
            after = await invariants.wait_until_settled(targets)
            assert before == after
            assert [] == invariants.report(after).violations
            assert ORDERS == invariants.report(after).confirmed_orders

            # A late duplicate of the very last transaction is answered, not applied again.
            again = await cluster.submit(
                order_branches(f"o-3-{ORDERS // 4 - 1}", [("sku-apple", 1)], amount_cents=5),
                f"t-3-{ORDERS // 4 - 1}",
            )
            assert coordinator_pb2.OUTCOME_COMMITTED == again.outcome
            final = await invariants.wait_until_settled(targets)
            assert ORDERS == invariants.report(final).confirmed_orders

    asyncio.run(scenario())


def test_a_decided_entry_encodes_as_the_checkpoint_field_would() -> None:
    from dtm.core.branch import Branch, BranchState, BranchVote
    from dtmpb.v1 import log_pb2
    from participants.branches import _decided_entry

    branch = Branch("t-1", 2, BranchState.REFUSED, BranchVote.REFUSED)
    branch.reason = "out of stock: " + "x" * 300  # a length that needs a two-byte varint
    decoded = log_pb2.ParticipantCheckpoint.FromString(_decided_entry(branch) * 2)
    assert 2 == len(decoded.decided)
    assert ("t-1", 2, branch.reason) == (
        decoded.decided[0].transaction_id,
        decoded.decided[0].branch,
        decoded.decided[0].reason,
    )
    assert log_pb2.ParticipantCheckpoint(decided=[decoded.decided[0]]).SerializeToString() == (
        _decided_entry(branch)
    )
