"""`dtm trace TXN_ID`: one transaction across the coordinator, the participants and every
process's log. The log lines need real processes, each writing its own log file: the
transactions traced through them run on one real cluster (dtm.cluster, as `make up` starts
it, logging at DEBUG), started once for the module; the rest uses the in-process cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli, limits
from dtm.cluster import Cluster, Ports
from dtmpb.v1 import coordinator_pb2, participant_pb2
from tests.cli_runner import dtm, order_file
from tests.harness import InProcessCluster, eventually, order_branches, settled

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
#: Branch states a participant holds once its branch is decided.
DECIDED = {"committed", "rolled_back", "refused", "read_only"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The coordinator and the four services as real processes under DIR/.dtm-data, logging
    each step of a transaction (DEBUG) to DIR/.dtm-data/logs/NAME.log."""
    data = tmp_path_factory.mktemp("trace") / ".dtm-data"
    # Module-scoped, so it starts before no_dtm_environment runs for a test: the developer's
    # own DTM_* variables are cleared here too, or the servers would inherit them.
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("DTM_")]:
            patch.delenv(name)
        with Cluster(data, Ports.free(), extra_env={"DTM_LOG_LEVEL": "DEBUG"}) as running:
            yield running


def submitted(shop: Cluster, path: Path) -> int:
    status, _, _ = asyncio.run(dtm("--coordinator", shop.coordinator_address, "submit", str(path)))
    return status


def trace(shop: Cluster, *args: str) -> tuple[int, str, str]:
    return asyncio.run(dtm("--coordinator", shop.coordinator_address, "trace", *args))


def decided_everywhere(shop: Cluster, transaction_id: str) -> dict[str, Any]:
    """`dtm trace --json` once the coordinator has every acknowledgement it waits for and
    every participant's branch is decided (phase 2 is over: its log lines are written)."""
    found: dict[str, Any] = {}

    async def over() -> bool:
        at = ["--coordinator", shop.coordinator_address, "--json", "trace", transaction_id]
        _, out, _ = await dtm(*at, "--data-dir", str(shop.data_dir))
        found.update(json.loads(out))
        txn = found["coordinator"]["transaction"]
        branches = [b for p in found["participants"] for b in p["branches"]]
        return (
            txn is not None
            and txn["state"] in ("committed", "aborted")
            and all(b["acknowledged"] for b in txn["branches"] if b["vote"] == "prepared")
            and len(branches) == len(txn["branches"])
            and all(b["state"] in DECIDED for b in branches)
        )

    asyncio.run(eventually(over))
    return found


def log_section(out: str) -> list[tuple[str, str]]:
    """(process, line) of each log line `dtm trace` printed."""
    section = out.split("\n== log lines with txn=", 1)[1].splitlines()[1:]
    rows = [row.split(None, 1) for row in section]
    return [(row[0], row[1]) for row in rows if len(row) == 2 and STAMP.match(row[1])]


def event(line: str) -> str:
    """What a log line says happened: 'commit applied' of '... payment: commit applied txn=...'."""
    return line.split(": ", 1)[1].split(" txn=")[0]


def test_trace_follows_a_committed_transaction_across_every_process(
    shop: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another transaction whose id begins with this one's: its lines must not be traced.
    assert cli.EXIT_OK == submitted(shop, order_file(tmp_path / "b.json", "t-c-10", "o-c-10"))
    assert cli.EXIT_OK == submitted(shop, order_file(tmp_path / "a.json", "t-c-1", "o-c-1"))
    document = decided_everywhere(shop, "t-c-1")

    # With no --logs or --data-dir, the logs of the cluster in ./.dtm-data (`make up`'s).
    monkeypatch.chdir(shop.data_dir.parent)
    status, out, err = trace(shop, "t-c-1")
    assert (cli.EXIT_OK, "") == (status, err)
    coordinator, rest = out.split("\n== participants\n")
    assert f"== coordinator at {shop.coordinator_address}" in coordinator
    assert "state        committed" in coordinator
    branch_rows = [row.split() for row in coordinator.splitlines() if row[:1].isdigit()]
    assert [["0", "inventory"], ["1", "orders"], ["2", "payment"]] == [r[:2] for r in branch_rows]
    assert all(["prepared", "-", "yes"] == row[2:5] for row in branch_rows)

    participants = rest.split("\n== log lines")[0].splitlines()
    headers = ["PARTICIPANT", "BRANCH", "STATE", "AGE", "REASON", "HEURISTIC"]
    assert headers == participants[0].split()
    states = {row.split()[0]: row.split()[1:3] for row in participants[1:4]}
    assert {
        "inventory": ["0", "committed"],
        "orders": ["1", "committed"],
        "payment": ["2", "committed"],
    } == states
    assert "notification: no branch of this transaction" in participants

    lines = log_section(out)
    stamps = [line[:24] for _, line in lines]
    assert stamps == sorted(stamps), "not merged in time order"
    assert all(" txn=t-c-1 " in line or line.endswith(" txn=t-c-1") for _, line in lines)
    said = [(process, event(line)) for process, line in lines]
    assert ("coordinator", "transaction started") == said[0]
    for name in ("inventory", "orders", "payment"):
        assert said.index((name, "prepare answered")) < said.index((name, "commit applied"))
    # Each line is its own process's: the prefix names the log file it came from.
    assert all(f" {process}: " in line for process, line in lines)
    assert ("coordinator", "transaction finished") in said
    assert "notification" not in {process for process, _ in lines}

    assert document["known"] and document["coordinator"]["error"] is None
    assert "committed" == document["coordinator"]["transaction"]["state"]
    by_name = {p["participant"]: p for p in document["participants"]}
    assert [] == by_name["notification"]["branches"]
    assert ["committed"] == [b["state"] for b in by_name["payment"]["branches"]]
    assert {"coordinator", "inventory", "orders", "payment"} == {
        line["process"] for line in document["logs"]["lines"]
    }
    assert not document["logs"]["cut"]


def test_trace_of_an_aborted_transaction_shows_the_refusal_everywhere(
    shop: Cluster, tmp_path: Path
) -> None:
    scarce = order_file(tmp_path / "scarce.json", "t-a-1", "o-a-1", quantity=10)
    assert cli.EXIT_NO == submitted(shop, scarce)
    decided_everywhere(shop, "t-a-1")

    status, out, _ = trace(shop, "t-a-1", "--data-dir", str(shop.data_dir))
    assert cli.EXIT_OK == status
    assert "state        aborted" in out
    assert "reason       inventory refused" in out
    participants = out.split("\n== participants\n")[1].split("\n== log lines")[0]
    rows = {row.split()[0]: row.split()[2] for row in participants.splitlines()[1:4]}
    assert "refused" == rows.pop("inventory")
    assert {"orders": "rolled_back", "payment": "rolled_back"} == rows
    lines = log_section(out)
    assert any(
        p == "inventory" and "prepare answered" in line and "vote=refused" in line
        for p, line in lines
    )
    assert any(p == "coordinator" and "outcome=aborted" in line for p, line in lines)
    assert {"orders", "payment"} <= {p for p, line in lines if "rollback applied" in line}


def test_trace_cut_by_the_limit_says_so(shop: Cluster, tmp_path: Path) -> None:
    assert cli.EXIT_OK == submitted(shop, order_file(tmp_path / "l.json", "t-l-1", "o-l-1"))
    everything = decided_everywhere(shop, "t-l-1")["logs"]
    assert everything["matched"] > 3

    status, out, _ = trace(shop, "t-l-1", "--data-dir", str(shop.data_dir), "--limit", "3")
    assert cli.EXIT_OK == status
    # The first three in time order, and a note saying how many there are.
    first = [(line["process"], line["line"]) for line in everything["lines"][:3]]
    assert first == log_section(out)
    assert f"(the first 3 of {everything['matched']}: --limit for more)" in out

    args = ["t-l-1", "--data-dir", str(shop.data_dir), "--limit", "3", "--json"]
    status, out, err = trace(shop, *args)
    document = json.loads(out)
    assert 3 == len(document["logs"]["lines"]) and document["logs"]["cut"]
    assert f"the first 3 of {everything['matched']} log lines listed" in err


def test_trace_of_an_id_known_nowhere_says_so(shop: Cluster) -> None:
    status, out, err = trace(shop, "t-never-1", "--data-dir", str(shop.data_dir))
    assert cli.EXIT_NO == status, err
    assert "no record of t-never-1" in out
    assert "inventory: no branch of this transaction" in out
    assert "no line names it in the logs read (coordinator, inventory, orders" in out
    assert "transaction t-never-1 is known nowhere" in out

    status, out, _ = trace(shop, "t-never-1", "--data-dir", str(shop.data_dir), "--json")
    document = json.loads(out)
    assert cli.EXIT_NO == status
    assert not document["known"] and not document["coordinator"]["found"]
    assert 0 == document["logs"]["matched"] and 5 == len(document["logs"]["files"])


def test_trace_reports_a_participant_that_is_down_and_shows_the_rest(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            branches = order_branches("o-d-1", [("sku-apple", 1)])
            response = await cluster.submit(branches, "t-d-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome
            await settled(cluster)
            payment = cluster.address("payment")
            await cluster.participants.pop("payment").stop(0)

            status, out, err = await dtm(*at, "trace", "t-d-1", "--data-dir", str(tmp_path))
            assert cli.EXIT_ERROR == status
            assert "state        committed" in out
            rows = [row.split()[:3] for row in out.splitlines()]
            for name, index in (("inventory", "0"), ("orders", "1"), ("notification", "3")):
                assert [name, index, "committed"] in rows
            assert f"payment: no answer: cannot reach participant payment at {payment}" in out
            assert f"no logs at {tmp_path / 'logs'}" in out
            assert "the trace is incomplete: no answer from participant payment" in err

            args = ["--json", "trace", "t-d-1", "--data-dir", str(tmp_path)]
            status, out, _ = await dtm(*at, *args)
            by_name = {p["participant"]: p for p in json.loads(out)["participants"]}
            assert cli.EXIT_ERROR == status
            assert "cannot reach participant payment" in by_name["payment"]["error"]
            assert ["committed"] == [b["state"] for b in by_name["orders"]["branches"]]
            assert by_name["orders"]["error"] is None

    asyncio.run(scenario())


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


def test_trace_finds_branches_older_than_the_newest_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "LIST_TRANSACTIONS_LIMIT_MAX", 1)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            await two_orders_one_listed(cluster)
            at = ["--coordinator", cluster.coordinator_address, "--json", "trace", "t-old-1"]
            status, out, _ = await dtm(*at, "--data-dir", str(tmp_path))
            by_name = {p["participant"]: p for p in json.loads(out)["participants"]}
            assert cli.EXIT_OK == status
            assert [("t-old-1", 0, "committed")] == [
                (b["transaction_id"], b["branch"], b["state"])
                for b in by_name["inventory"]["branches"]
            ]

    asyncio.run(scenario())


@pytest.mark.parametrize("transaction_id", ["bad id", "t/1", "x" * 129, ""])
def test_a_malformed_id_is_a_usage_error_before_any_call(transaction_id: str) -> None:
    # Nothing listens at port 1: a call would end in "cannot reach", status 1.
    status, out, err = asyncio.run(dtm("--coordinator", "127.0.0.1:1", "trace", transaction_id))
    assert (cli.EXIT_USAGE, "") == (status, out)
    assert "transaction_id" in err and "is malformed: 1..128 characters of" in err
    assert "cannot reach" not in err


def test_a_log_path_that_does_not_exist_is_a_usage_error_before_any_call(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.log"
    args = ["--coordinator", "127.0.0.1:1", "trace", "t-1", "--logs", str(missing)]
    status, out, err = asyncio.run(dtm(*args))
    assert (cli.EXIT_USAGE, "") == (status, out)
    assert f"{missing}: no such file or directory" in err and "cannot reach" not in err
