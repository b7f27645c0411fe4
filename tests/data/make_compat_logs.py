"""Make the upgrade-compatibility fixture: the data directory of a coordinator and of the four
shop services as a released dtm leaves it when it stops with transactions in doubt.

    python tests/data/make_compat_logs.py [--commit 69c5909] [--out tests/data/compat-69c5909]

The commit's tree is extracted (`git archive`) into a temporary directory and this script runs
again under it (PYTHONPATH=<tree>:<tree>/generated), so every byte of the logs is written by
that release's code: its tests.harness.InProcessCluster, real gRPC between the five servers,
real log files. Today's code only reads the result (tests/test_upgrade.py). The bytes differ
from run to run (ports, clocks); the transactions and their states do not:

    t-done    an order committed and finished, before the checkpoints
    t-forced  inventory's branch of a transaction the coordinator never decided (presumed
              abort), forced to commit by an operator and reported by its inquiry
              (HeuristicRecorded found_by_inquiry; BranchReconciled), before the checkpoints
    -- every process writes a checkpoint; the records below follow it --
    t-one     a one-branch transaction (inventory, sku-pear x2): a one-phase commit
    t-heur    an order committed while inventory refused decisions, its inventory branch
              forced to roll back: the coordinator hears the heuristic in phase 2
    t-phase2  an order committed while payment refuses decisions: payment still holds it
              prepared; the coordinator's log has the decision and no end
    t-doubt   an order prepared at inventory, orders and payment while notification is slow:
              no decision (the coordinator had none when it stopped: presumed abort)

Then the coordinator stops abruptly (as in a crash: no phase 2 finished), then the services.
The LOCK files (the holder's pid) are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_COMMIT = "69c5909"
HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent
# Generous: an upgrade happens while the coordinator still waits for a slow vote.
WAIT_MS = 600_000
WAIT_S = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default=DEFAULT_COMMIT, help="the release that writes")
    parser.add_argument("--out", type=Path, help="default tests/data/compat-COMMIT")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    out = (options.out or HERE / f"compat-{options.commit}").resolve()
    if options.inside:  # running under the release's tree
        asyncio.run(generate(out))
        return 0
    if out.exists():
        parser.error(f"{out} exists: remove it first")
    with tempfile.TemporaryDirectory(prefix="dtm-compat-") as scratch:
        tree = Path(scratch) / "tree"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPOSITORY), "archive", options.commit],
            check=True,
            capture_output=True,
        ).stdout
        archive_path = Path(scratch) / "tree.tar"
        archive_path.write_bytes(archive)
        with tarfile.open(archive_path) as tar:
            tar.extractall(tree, filter="data")
        environment = dict(os.environ, PYTHONPATH=f"{tree}:{tree / 'generated'}")
        command = [sys.executable, str(Path(__file__).resolve()), "--inside", "--out", str(out)]
        subprocess.run(command, check=True, cwd=tree, env=environment)
    for lock in out.rglob("LOCK"):
        lock.unlink()
    (out / "COMMIT").write_text(f"{options.commit}\n")
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"wrote {out} ({size} bytes) from {options.commit}")
    return 0


async def generate(out: Path) -> None:
    # Imported here: from the release's tree, which only the inner run has on its path.
    from dtmpb.v1 import coordinator_pb2, participant_pb2, shop_pb2
    from tests.harness import (
        ASKS_LATER,
        InProcessCluster,
        ask,
        eventually,
        forced_unknown,
        listed,
        order_branches,
        pack,
    )

    committed = coordinator_pb2.OUTCOME_COMMITTED
    cluster = InProcessCluster(
        out,
        prepare_timeout_ms=WAIT_MS,
        transaction_timeout_ms=WAIT_MS,
        participant_overrides=ASKS_LATER,
    )
    async with cluster:

        async def prepared_at(name: str) -> set[str]:
            response: Any = await cluster.participant_stub(name).Recover(
                participant_pb2.RecoverRequest()
            )
            return {branch.transaction_id for branch in response.branches}

        async def until_prepared(txn: str, names: tuple[str, ...], held: bool) -> None:
            async def check() -> bool:
                found = [txn in await prepared_at(name) for name in names]
                return found == [held] * len(names)

            await eventually(check, WAIT_S)

        done = order_branches("o-done", [("sku-apple", 1)])
        assert committed == (await cluster.submit(done, "t-done")).outcome
        await until_prepared("t-done", ("inventory", "orders", "payment", "notification"), False)

        await forced_unknown(cluster, "t-forced", commit=True)
        await ask(cluster.participants["inventory"], cluster)
        assert ["t-forced"] == [kept.transaction_id for kept in await listed(cluster)]

        engine = cluster.coordinator.engine
        engine.records_since_checkpoint = engine.config.checkpoint_every_records
        assert await engine.checkpoint_if_due()
        for server in cluster.participants.values():
            await server.engine.checkpoint()

        one = coordinator_pb2.BranchRequest(
            participant="inventory",
            operation=pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-pear", quantity=2)])
            ),
        )
        assert committed == (await cluster.submit([one], "t-one")).outcome

        await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
        heuristic = order_branches("o-heur", [("sku-apple", 1)])
        assert committed == (await cluster.submit(heuristic, "t-heur")).outcome
        await cluster.admin("inventory").ForceOutcome(
            participant_pb2.ForceOutcomeRequest(
                transaction_id="t-heur", branch=0, commit=False, i_understand_this_is_heuristic=True
            )
        )
        await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

        async def heard() -> bool:
            return "t-heur" in {kept.transaction_id for kept in await listed(cluster)}

        await eventually(heard, WAIT_S)

        await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
        phase2 = order_branches("o-phase2", [("sku-apple", 1)])
        assert committed == (await cluster.submit(phase2, "t-phase2")).outcome
        await until_prepared("t-phase2", ("inventory", "orders", "notification"), False)
        await until_prepared("t-phase2", ("payment",), True)

        await cluster.set_fault("notification", participant_pb2.FAULT_MODE_SLOW, WAIT_MS)
        doubt = order_branches("o-doubt", [("sku-apple", 1)])
        submitting = asyncio.ensure_future(cluster.submit(doubt, "t-doubt"))
        await until_prepared("t-doubt", ("inventory", "orders", "payment"), True)

        logs = [engine.log, *(server.engine.log for server in cluster.participants.values())]
        for log in logs:  # lazy records too (a transaction's end), as a later write would
            await log.wait_durable(log.appended_lsn)
        await cluster.coordinator.stop(0)  # abrupt: nothing decided, no phase 2 finished
        submitting.cancel()
        await asyncio.gather(submitting, return_exceptions=True)
    shutil.rmtree(out / "logs", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
