"""`dtm check` against an in-process cluster: a clean shop passes, a broken one exits 3 naming
what is broken, and a service missing from the registry or not answering is named.

`dtm check` runs as a real process: it reads the services with grpc.aio (dtm.invariants) on an
event loop of its own, and one on a worker thread of the test, next to the loop that runs the
cluster, is two loops on gRPC's one completion queue, whose events for the closed one were
reported ("Event loop is closed") into the other."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dtm import cli, config, invariants
from dtm.cli import check as cli_check
from dtmpb.v1 import coordinator_pb2
from participants.services.inventory import InventoryService
from tests.cli_runner import dtm
from tests.harness import ACCOUNTS, STOCK, InProcessCluster, order_branches, settled

COMMITTED = coordinator_pb2.OUTCOME_COMMITTED
ABORTED = coordinator_pb2.OUTCOME_ABORTED
ROOT = Path(__file__).parent.parent


async def dtm_check(*args: str) -> tuple[int, str, str]:
    """`dtm ARGS...` in a process of its own (see the module's docstring); (exit status,
    stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dtm.cli",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("DTM_")},
    )
    out, err = (stream.decode() for stream in await process.communicate())
    assert process.returncode is not None
    # Nothing but the answer: no traceback, no "Exception in callback" of a loop at exit.
    assert "Traceback" not in err and "Exception" not in err, err
    return process.returncode, out, err


def initial_file(path: Path, **stock_changes: int) -> Path:
    """The harness's initial stock and accounts as an --initial file (`stock_changes`: SKUs
    whose units the file gives otherwise)."""
    document = {
        "stock": {**STOCK, **stock_changes},
        "accounts": {
            name: {"balance_cents": spec.balance_cents, "declines": spec.declines}
            for name, spec in ACCOUNTS.items()
        },
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


async def shop_with_orders(cluster: InProcessCluster) -> None:
    """A committed order and a declined one, every decision delivered."""
    committed = order_branches("o-1", [("sku-apple", 2)], amount_cents=300)
    declined = order_branches("o-2", [("sku-pear", 1)], account="acct-blocked")
    assert COMMITTED == (await cluster.submit(committed, "t-1")).outcome
    assert ABORTED == (await cluster.submit(declined, "t-2")).outcome
    await settled(cluster)


def test_check_of_a_clean_shop_passes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            await shop_with_orders(cluster)
            at = ["--coordinator", cluster.coordinator_address]
            initial = str(initial_file(tmp_path / "initial.json"))

            status, out, err = await dtm_check(*at, "check", "--initial", initial)
            assert cli.EXIT_OK == status, err
            assert "checked live" in out
            assert "1 orders confirmed, 1 cancelled, 0 pending; 2 units sold" in out
            assert f"inventory at {cluster.address('inventory')}" in out
            assert "ok: every invariant holds" == out.splitlines()[-1]

            status, out, err = await dtm_check(*at, "check", "--settle", "--json")
            assert cli.EXIT_OK == status, err
            answer = json.loads(out)
            assert answer["ok"] and answer["settled"]
            assert ([], []) == (answer["violations"], answer["suspects"])
            assert 300 == answer["captured_cents"]
            assert cluster.address("payment") == answer["services"]["payment"]

            # Every address given: the coordinator is not asked (here: not running anywhere).
            given = [f"--service={name}={cluster.address(name)}" for name in cluster.participants]
            status, out, err = await dtm_check("--coordinator", "127.0.0.1:1", "check", *given)
            assert cli.EXIT_OK == status, err

    asyncio.run(scenario())


def test_check_reports_a_violation_and_exits_3(tmp_path: Path) -> None:
    """A unit lost from inventory's state, in memory as a bug would leave it: every read
    shows it, so the live check counts it; so does an --initial that disagrees."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            await shop_with_orders(cluster)
            at = ["--coordinator", cluster.coordinator_address]
            inventory = cluster.services[0]
            assert isinstance(inventory, InventoryService)
            inventory.items["sku-apple"].available -= 1

            status, out, err = await dtm_check(*at, "check")
            assert cli.EXIT_NO == status, err
            assert "violations (1):" in out
            assert "  stock sku-apple: " in out and "units lost by 1" in out
            assert "VIOLATED: 1 violation(s)" == out.splitlines()[-1]

            status, out, _ = await dtm_check(*at, "check", "--settle", "1", "--json")
            assert cli.EXIT_NO == status
            answer = json.loads(out)
            assert not answer["ok"]
            assert ["stock sku-apple"] == [invariants.subject(v) for v in answer["violations"]]

            inventory.items["sku-apple"].available += 1
            assert cli.EXIT_OK == (await dtm_check(*at, "check"))[0]
            disagreeing = str(initial_file(tmp_path / "initial.json", **{"sku-pear": 21}))
            status, out, _ = await dtm_check(*at, "check", "--initial", disagreeing)
            assert cli.EXIT_NO == status
            assert "stock sku-pear: 20 units received, but it started with 21" in out

    asyncio.run(scenario())


def test_check_names_a_service_not_registered_or_not_answering(
    tmp_path: Path, unreachable: Callable[[], str]
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            nowhere = unreachable()
            status, out, err = await dtm_check(*at, "check", "--service", f"inventory={nowhere}")
            assert (cli.EXIT_ERROR, "") == (status, out)
            assert f"cannot reach participant inventory at {nowhere}: is it running?" in err

            notification = cluster.address("notification")
            await cluster.participants.pop("notification").stop(0)
            status, out, err = await dtm_check(*at, "check")
            assert (cli.EXIT_ERROR, "") == (status, out)
            assert f"cannot reach participant notification at {notification}" in err

            status, _, err = await dtm(*at, "participants", "remove", "payment")
            assert cli.EXIT_OK == status, err
            status, out, err = await dtm_check(*at, "check")
            assert (cli.EXIT_ERROR, "") == (status, out)
            assert "payment is not registered with the coordinator" in err
            assert "(registered: inventory, notification, orders)" in err

    asyncio.run(scenario())


def test_check_usage_errors_exit_2_before_any_call(
    tmp_path: Path, unreachable: Callable[[], str]
) -> None:
    async def scenario() -> None:
        at = ["--coordinator", unreachable()]
        bad = tmp_path / "bad.json"
        bad.write_text('{"stock": {}}', encoding="utf-8")
        for args, fragment in (
            (["--service", "shipping=127.0.0.1:1"], "'shipping' is not a service of the shop"),
            (["--service", "inventory"], "expected NAME=HOST:PORT"),
            (["--service", "orders=1:2", "--service", "orders=1:3"], "--service orders= given"),
            (["--initial", str(tmp_path / "none.json")], "--initial: cannot read"),
            (["--initial", str(bad)], "missing key 'accounts'"),
            (["--settle", "0"], "expected a positive, finite number of seconds"),
        ):
            status, _, err = await dtm(*at, "check", *args)
            assert cli.EXIT_USAGE == status, (args, err)
            assert fragment in err, (args, err)

    asyncio.run(scenario())


def test_check_that_does_not_settle_in_time_exits_4(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    unreachable: Callable[[], str],
) -> None:
    """In this process, with no other event loop (nothing is called: settling is replaced)."""

    async def busy(*args: object, **kwargs: object) -> invariants.Snapshot:
        raise TimeoutError("not settled after 1 s: still 2 units reserved")

    monkeypatch.setattr(invariants, "wait_until_settled", busy)
    services = [f"--service={name}={unreachable()}" for name in config.SERVICES]
    status = cli.main(["check", "--settle", "1", *services])
    out, err = capsys.readouterr()
    assert (cli.EXIT_UNKNOWN, "") == (status, out)
    assert "not settled after 1 s: still 2 units reserved; nothing checked" in err


def test_suspects_alone_pass_and_are_said() -> None:
    report = invariants.Report(violations=[], live=True, reads=3, suspects=["order o-4: x"])
    assert cli_check._verdict(report).startswith("ok: no violation, but 1 suspect(s)")
    assert report.ok
