"""The `dtm` command against an in-process cluster: every command, --json output, and error
paths that must end with a clear message and a non-zero status, never a traceback.

The CLI makes blocking gRPC calls; run on the event loop's thread they would stop the
in-process servers from answering, so every call runs on a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli, config, crashpoints, limits
from dtm.cli import transactions as cli_transactions
from dtmpb.v1 import coordinator_pb2, coordinator_pb2_grpc, participant_pb2
from participants.locks import LockMode
from tests.cli_runner import dtm, order_file
from tests.harness import (
    InProcessCluster,
    commit_then_forget,
    eventually,
    late_retry_of_the_last_stock,
    order_branches,
    settled,
)


def test_submit_and_inspect_transactions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]

            t1 = order_file(tmp_path / "t1.json", "t-1", "o-1")
            status, out, _ = await dtm(*at, "submit", str(t1))
            assert cli.EXIT_OK == status, out
            assert "transaction t-1: COMMITTED" in out
            assert "inventory" in out and "payment" in out

            scarce = order_file(tmp_path / "t2.json", "t-2", "o-2", quantity=10)
            status, out, _ = await dtm(*at, "submit", str(scarce), "--json")
            assert cli.EXIT_NO == status
            answer = json.loads(out)
            assert "aborted" == answer["outcome"]
            assert "t-2" == answer["transaction_id"]
            assert "inventory refused" in answer["reason"]
            # Votes that arrive after the refusal are not counted: only inventory's is certain.
            votes = {b["participant"]: b["vote"] for b in answer["branches"]}
            assert "refused" == votes["inventory"]

            async def t1_committed() -> bool:
                _, out, _ = await dtm(*at, "--json", "txn", "show", "t-1")
                return "committed" == json.loads(out)["state"]

            await eventually(t1_committed)

            status, out, _ = await dtm(*at, "txn", "list")
            assert cli.EXIT_OK == status
            header, *rows = out.splitlines()
            assert header.split()[:3] == ["ID", "STATE", "AGE"]
            by_id = {row.split()[0]: row for row in rows}
            assert {"t-1", "t-2"} == set(by_id)
            assert "3: 3 prepared, 3/3 acked" in by_id["t-1"]
            assert "aborted" in by_id["t-2"]

            status, out, _ = await dtm(*at, "txn", "list", "--json", "--state", "aborted")
            assert ["t-2"] == [txn["transaction_id"] for txn in json.loads(out)]
            status, out, _ = await dtm(*at, "txn", "list", "--in-doubt")
            assert "no transactions match" in out
            # --state repeated or comma-separated, in `dtm branches` as in `txn list` (which
            # alone took commas).
            for states in (
                ["--state", "refused,committed"],
                ["--state", "refused", "--state", "committed"],
            ):
                status, out, err = await dtm(
                    *at, "--json", "branches", "--participant", "inventory", *states
                )
                assert cli.EXIT_OK == status, err
                assert {"t-1", "t-2"} == {branch["transaction_id"] for branch in json.loads(out)}
            status, out, _ = await dtm(*at, "txn", "list", "--limit", "1", "--json")
            assert 1 == len(json.loads(out))

            status, out, _ = await dtm(*at, "txn", "show", "t-1")
            assert cli.EXIT_OK == status
            assert "state        committed" in out
            shown = json.loads((await dtm(*at, "txn", "show", "t-1", "--json"))[1])
            assert [True, True, True] == [b["acknowledged"] for b in shown["branches"]]
            assert ["prepared"] * 3 == [b["vote"] for b in shown["branches"]]
            assert 0 == shown["phase_two_attempts"]

            status, out, _ = await dtm(*at, "txn", "retry", "t-1")
            assert cli.EXIT_OK == status
            assert "is committed: nothing to retry" in out

            status, _, err = await dtm(*at, "txn", "show", "no-such-txn")
            assert cli.EXIT_ERROR == status
            assert "NOT_FOUND" in err and "no-such-txn" in err

    asyncio.run(scenario())


def test_participants_locks_branches_and_force(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]

            status, out, _ = await dtm(*at, "participants")
            assert cli.EXIT_OK == status
            assert "INCARNATION" == out.splitlines()[0].split()[3]
            rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
            assert set(config.SERVICES) == set(rows)
            assert all("SERVING" == row[2] for row in rows.values())
            # Each participant's incarnation, the id it keeps with its log.
            incarnations = {
                name: server.engine.incarnation for name, server in cluster.participants.items()
            }
            assert incarnations == {name: row[3] for name, row in rows.items()}
            status, out, _ = await dtm(*at, "participants", "--json")
            listed = {p["name"]: p for p in json.loads(out)}
            assert ["dtm.v1.ReserveStock"] == listed["inventory"]["operation_types"]
            assert listed["orders"]["one_phase"] and listed["orders"]["batch"]
            assert incarnations == {name: p["incarnation"] for name, p in listed.items()}

            status, out, _ = await dtm(*at, "locks")
            assert (cli.EXIT_OK, "no locks held\n") == (status, out)

            # Orders votes, then rejects the decision: its branch stays prepared, holding the
            # order id's lock, and the transaction stays committing.
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            response = await cluster.submit(order_branches("o-9", [("sku-apple", 1)]), "t-9")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome

            async def retried() -> bool:
                _, out, _ = await dtm(*at, "txn", "list", "--stuck", "--json")
                return ["t-9"] == [txn["transaction_id"] for txn in json.loads(out)]

            await eventually(retried)
            status, out, _ = await dtm(*at, "txn", "list", "--in-doubt")
            assert "t-9" in out and "committing" in out
            assert "orders: participant rejects decisions" in out  # the last error

            status, out, _ = await dtm(*at, "txn", "retry", "t-9")
            assert cli.EXIT_OK == status
            assert "phase 2 retried now for orders" in out

            status, out, _ = await dtm(*at, "locks", "--json")
            assert cli.EXIT_OK == status
            locks = json.loads(out)
            assert ["orders"] == [lock["participant"] for lock in locks]
            assert ["t-9/1"] == locks[0]["holders"]
            assert "exclusive" == locks[0]["mode"]
            status, out, _ = await dtm(*at, "locks", "--participant", "orders")
            assert "t-9/1" in out and "exclusive" in out

            status, out, _ = await dtm(*at, "branches", "--in-doubt", "--json")
            assert [("orders", "t-9", 1, "prepared")] == [
                (b["participant"], b["transaction_id"], b["branch"], b["state"])
                for b in json.loads(out)
            ]
            status, out, _ = await dtm(*at, "branches", "--participant", "inventory")
            assert "t-9" in out and "committed" in out
            address = cluster.address("orders")
            status, out, _ = await dtm("branches", "--address", address, "--in-doubt")
            assert "t-9" in out  # straight to the participant, no coordinator needed

            force = [*at, "force", "t-9", "1", "--participant", "orders"]
            status, _, err = await dtm(*force, "--commit")
            assert cli.EXIT_USAGE == status
            assert "--i-understand" in err and "atomic" in err
            # The coordinator decided commit: rolling back would break atomicity.
            status, _, err = await dtm(*force, "--rollback", "--i-understand")
            assert cli.EXIT_UNSAFE == status
            assert "decided commit" in err and "dtm txn retry t-9" in err
            status, out, _ = await dtm(*force, "--commit", "--i-understand", "--json")
            assert cli.EXIT_OK == status, out
            forced = json.loads(out)
            assert ("committed", "orders") == (forced["state"], forced["participant"])
            assert forced["heuristic"] and forced["awaiting_coordinator"]
            status, out, _ = await dtm(*at, "branches", "--participant", "orders")
            assert "heuristic commit (awaiting coordinator)" in out
            status, out, _ = await dtm(*at, "branches", "--awaiting", "--json")
            assert [("orders", "t-9")] == [
                (b["participant"], b["transaction_id"]) for b in json.loads(out)
            ]

            # Kept for its coordinator, which has yet to deliver its Commit: not forgotten.
            forget = [*at, "branches", "forget", "t-9", "1"]
            status, _, err = await dtm(*forget)
            assert cli.EXIT_USAGE == status and "--participant NAME or --address" in err
            status, _, err = await dtm(*forget[:-1], "0", "--participant", "inventory")
            assert cli.EXIT_ERROR == status and "not forced" in err
            status, _, err = await dtm(*forget, "--participant", "orders")
            assert cli.EXIT_UNSAFE == status, err
            assert "still runs t-9 (committing)" in err and "dtm txn retry t-9" in err, err

            # Delivered, the Commit reconciles the branch (the same outcome): it may go now.
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_NONE)
            status, _, _ = await dtm(*at, "txn", "retry", "t-9")

            async def committed() -> bool:
                _, out, _ = await dtm(*at, "txn", "show", "t-9", "--json")
                return "committed" == json.loads(out)["state"]

            await eventually(committed)
            status, out, _ = await dtm(*forget, "--participant", "orders", "--json")
            assert cli.EXIT_OK == status, out
            forgotten = json.loads(out)
            assert forgotten["forgotten"] and not forgotten["awaiting_coordinator"]
            # The target may also come before the subcommand.
            before = [*at, "branches", "--participant", "orders", "forget", "t-9", "1"]
            status, out, _ = await dtm(*before)
            assert cli.EXIT_OK == status and "forgot forced branch t-9/1" in out
            status, out, _ = await dtm(*at, "branches", "--participant", "orders")
            assert "heuristic commit (forgotten)" in out
            status, out, _ = await dtm(*at, "branches", "--awaiting")
            assert (cli.EXIT_OK, "no branches match\n") == (status, out)

    asyncio.run(scenario())


def test_locks_lists_the_longest_held_when_a_participant_holds_thousands(tmp_path: Path) -> None:
    """With many locks of long ids, ListLocks answered more than the message limit: the call
    failed (RESOURCE_EXHAUSTED: sent message larger than max) and `dtm locks` showed nothing,
    when an operator needs it most. It lists the longest-held LOCKS_LISTED_MAX now, and of
    each lock the first holders and waiters with their totals, and says what it left out."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            locks = cluster.participants["orders"].engine.locks
            count = 16_000  # at the shipped services' longest ids: 4.5 MB unbounded
            # Lock n held for n seconds: the highest n are the oldest. Seconds, not ms: each
            # lock's age is counted from the clock when it is taken, and a pause of the loop
            # longer than the step (1 in 4 runs under load, with ms) reordered the cut.
            for n in range(count):
                txn, order = f"{'t' * 120}{n:08d}", f"order:{'o' * 114}{n:08d}"
                locks.acquire_now(f"{txn}/0", order, LockMode.EXCLUSIVE, held_for_s=n)
            # The oldest of all: shared by 20 branches, and 10 exclusive requests queued.
            for n in range(20):
                locks.acquire_now(
                    f"r-{n:02d}/0", "order:hot", LockMode.SHARED, held_for_s=count + 60
                )
            # Waits that outlast the test (cancelled at its end), however slow the commands.
            waits = [
                asyncio.create_task(
                    locks.acquire(f"w-{n}/0", "order:hot", LockMode.EXCLUSIVE, timeout_s=3600)
                )
                for n in range(10)
            ]
            await asyncio.sleep(0)  # each task's first step queues its request, in order
            assert 10 == len(
                next(lock for lock in locks.snapshot() if lock.holders[0] == "r-00/0").waiters
            )
            at = ["--coordinator", cluster.coordinator_address]

            status, out, err = await dtm(*at, "locks", "--participant", "orders", "--json")
            assert cli.EXIT_OK == status, err
            listed = json.loads(out)
            oldest = [f"order:{'o' * 114}{n:08d}" for n in range(count - 999, count)]
            assert sorted(["order:hot", *oldest]) == [lock["resource"] for lock in listed]
            hot = next(lock for lock in listed if lock["resource"] == "order:hot")
            assert [f"r-{n:02d}/0" for n in range(8)] == hot["holders"]
            assert [f"w-{n}/0 (exclusive)" for n in range(8)] == hot["waiters"]
            assert (20, 10) == (hot["holders_total"], hot["waiters_total"])
            assert f"orders: the 1000 longest-held of {count + 1} locks listed" in err

            status, out, err = await dtm(*at, "locks", "--participant", "orders")
            assert cli.EXIT_OK == status, err
            assert 1 + limits.LOCKS_LISTED_MAX == len(out.splitlines())  # the header, the rows
            assert "r-07/0 (+12 more)" in out and "w-7/0 (exclusive) (+2 more)" in out
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    asyncio.run(scenario())


def test_force_against_an_abort_does_not_suggest_txn_retry(tmp_path: Path) -> None:
    """Forcing commit against a decided abort is refused; the refusal told the operator to
    "deliver the decision instead: `dtm txn retry ID`", which retries only a committing
    transaction's Commits and answers "nothing to retry" for an abort."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_REFUSE)
            response = await cluster.submit(order_branches("o-a", [("sku-apple", 1)]), "t-a")
            assert coordinator_pb2.OUTCOME_ABORTED == response.outcome
            force = [*at, "force", "t-a", "1", "--participant", "orders", "--i-understand"]
            status, _, err = await dtm(*force, "--commit")
            assert cli.EXIT_UNSAFE == status, err
            assert "decided abort for t-a" in err
            assert "txn retry" not in err and "asks the coordinator" in err, err
            status, out, _ = await dtm(*at, "txn", "retry", "t-a")
            assert "nothing to retry" in out  # what the old suggestion led to

    asyncio.run(scenario())


def test_force_is_refused_while_the_coordinator_is_still_deciding(tmp_path: Path) -> None:
    """A branch prepared while its coordinator still collects votes (or writes its decision):
    a forced outcome would race the decision, which comes within the transaction's timeout
    (found by a bug hunt: only a decision already made was refused)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, prepare_timeout_ms=10_000) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=2_000)
            order = order_branches("o-d", [("sku-apple", 1)])
            running = asyncio.ensure_future(cluster.submit(order, "t-d", timeout_ms=10_000))

            async def orders_prepared() -> bool:
                _, out, _ = await dtm(*at, "branches", "--participant", "orders", "--json")
                return any(b["transaction_id"] == "t-d" for b in json.loads(out or "[]"))

            await eventually(orders_prepared)
            force = [*at, "force", "t-d", "1", "--participant", "orders", "--i-understand"]
            status, _, err = await dtm(*force, "--rollback")
            assert cli.EXIT_UNSAFE == status, err
            assert "still deciding t-d (preparing)" in err
            assert coordinator_pb2.OUTCOME_COMMITTED == (await running).outcome

    asyncio.run(scenario())


def test_force_commit_is_refused_when_the_coordinator_has_no_record(tmp_path: Path) -> None:
    """A coordinator that crashed before deciding has no record of the transaction: presumed
    abort, and it answers ABORTED to the participants' QueryOutcome. A forced commit would
    contradict that (found by a bug hunt: GetTransaction's NOT_FOUND let the force through);
    a forced rollback agrees with it, and --coordinator-lost is the explicit way past."""

    async def scenario() -> None:
        overrides = {"in_doubt_after_ms": 600_000}  # the branches must not resolve themselves
        async with InProcessCluster(
            tmp_path, prepare_timeout_ms=10_000, participant_overrides=overrides
        ) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=3_000)
            order = order_branches("o-n", [("sku-apple", 1)])
            running = asyncio.ensure_future(cluster.submit(order, "t-n", timeout_ms=10_000))

            async def prepared() -> bool:
                _, out, _ = await dtm(*at, "branches", "--in-doubt", "--json")
                found = {b["participant"] for b in json.loads(out or "[]")}
                return {"inventory", "orders"} <= found

            await eventually(prepared)
            await cluster.restart_coordinator()  # before any decision: presumed abort
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
            status, _, err = await dtm(*at, "txn", "show", "t-n")
            assert cli.EXIT_ERROR == status and "NOT_FOUND" in err

            force = [*at, "force", "t-n", "1", "--participant", "orders", "--i-understand"]
            status, _, err = await dtm(*force, "--commit")
            assert cli.EXIT_UNSAFE == status, err
            assert "has no record of t-n" in err and "presumed abort" in err
            assert "--coordinator-lost" in err
            status, out, _ = await dtm(*at, "branches", "--participant", "orders", "--json")
            assert ["prepared"] == [b["state"] for b in json.loads(out) if b["branch"] == 1]
            # Rolling back agrees with presumed abort.
            status, out, err = await dtm(*force, "--rollback", "--json")
            assert cli.EXIT_OK == status, err
            assert "rolled_back" == json.loads(out)["state"]
            # An operator who knows the coordinator lost its log may still force a commit.
            lost = [*at, "force", "t-n", "0", "--participant", "inventory", "--i-understand"]
            status, out, err = await dtm(*lost, "--commit", "--coordinator-lost", "--json")
            assert cli.EXIT_OK == status, err
            assert "committed" == json.loads(out)["state"]

    asyncio.run(scenario())


def test_unhealthy_participant_is_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await cluster.participants["payment"].stop(0)
            status, out, err = await dtm(*at, "participants")
            assert cli.EXIT_NO == status
            row = next(line for line in out.splitlines() if line.startswith("payment"))
            assert "UNREACHABLE" in row
            status, _, err = await dtm(*at, "locks")
            assert cli.EXIT_ERROR == status
            assert "cannot reach participant payment" in err

    asyncio.run(scenario())


def test_submit_file_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            cases: list[tuple[Any, str]] = [
                ({"branches": [], "priority": 1}, "unknown key 'priority'"),
                ({"branches": []}, "branches must be a non-empty list"),
                (
                    {"branches": [{"participant": "inventory", "type": "dtm.v1.Nope"}]},
                    "unknown message type 'dtm.v1.Nope' (inventory takes dtm.v1.ReserveStock",
                ),
                (
                    {
                        "branches": [
                            {
                                "participant": "inventory",
                                "type": "dtm.v1.ReserveStock",
                                "operation": {"lines": [{"skew": "x"}]},
                            }
                        ]
                    },
                    "not a valid dtm.v1.ReserveStock",
                ),
                (
                    {
                        "branches": [
                            {
                                "participant": "ghost",
                                "type": "dtm.v1.ReserveStock",
                                "operation": {"lines": [{"sku": "sku-apple", "quantity": 1}]},
                            }
                        ]
                    },
                    "participant 'ghost' is not registered",
                ),
                ([1, 2], "expected a JSON object"),
                (
                    {
                        "branches": [
                            {
                                "participant": "inventory",
                                "type": "dtm.v1.ReserveStock",
                                "operation": None,
                            }
                        ]
                    },
                    "operation must be an object of dtm.v1.ReserveStock's fields",
                ),
                # A present id is the caller's retry key: never replaced by a made-up one.
                ({"transaction_id": False, "branches": []}, "transaction_id must be a string"),
                ({"transaction_id": 0, "branches": []}, "transaction_id must be a string"),
            ]
            for document, expected in cases:
                path = tmp_path / "bad.json"
                path.write_text(json.dumps(document), encoding="utf-8")
                status, _, err = await dtm(*at, "submit", str(path))
                assert cli.EXIT_ERROR == status, document
                assert expected in err, err
            (tmp_path / "broken.json").write_text("{", encoding="utf-8")
            status, _, err = await dtm(*at, "submit", str(tmp_path / "broken.json"))
            assert (cli.EXIT_ERROR, True) == (status, "not valid JSON" in err)
            (tmp_path / "deep.json").write_text("[" * 100_000, encoding="utf-8")
            status, _, err = await dtm(*at, "submit", str(tmp_path / "deep.json"))
            assert (cli.EXIT_ERROR, True) == (status, "nested too deeply" in err)
            status, _, err = await dtm(*at, "submit", str(tmp_path / "missing.json"))
            assert (cli.EXIT_ERROR, True) == (status, "cannot read" in err)

    asyncio.run(scenario())


def test_submit_over_the_message_limit_is_not_blamed_on_the_coordinator(tmp_path: Path) -> None:
    """gRPC's channel refuses to send a request over 4 MiB; dtm reported that as "the
    coordinator at ... answered RESOURCE_EXHAUSTED: CLIENT: Sent message larger than max"."""
    body = "x" * (limits.MESSAGE_BYTES_MAX + 1)
    operation = {"order_id": "o-big", "recipient": "a@example.com", "body": body}
    branch = {"participant": "notification", "type": "dtm.v1.SendNotification"}
    document = {"transaction_id": "t-big", "branches": [{**branch, "operation": operation}]}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(document), encoding="utf-8")

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            status, _, err = await dtm(*at, "submit", str(path))
            assert cli.EXIT_ERROR == status, err
            assert "answered" not in err and "nothing was sent" in err, err
            assert "t-big is 4,194,4" in err and "4,194,304-byte message limit" in err, err

    asyncio.run(scenario())


def test_the_sample_order_is_a_valid_submission() -> None:
    """examples/order.json, which README points at, parses as the order it shows."""
    path = Path(__file__).parent.parent / "examples" / "order.json"
    session = cli.Session(cli.build_parser().parse_args(["submit", str(path)]), io.StringIO())
    request = cli.load_submission(path, session)
    assert "txn-example-1" == request.transaction_id
    names = ["inventory", "orders", "payment", "notification"]
    assert names == [branch.participant for branch in request.branches]


def test_forgetting_an_unknown_heuristic_points_at_the_command(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            status, out, err = await dtm(*at, "heuristics", "forget", "t-none", "0")
            assert (cli.EXIT_ERROR, "") == (status, out)
            assert "no heuristic outcome for t-none/0: never recorded, or already" in err, err
            assert "(`dtm heuristics` lists them)" in err and "ListHeuristics" not in err, err

    asyncio.run(scenario())


def test_log_dump_crashpoints_and_config(tmp_path: Path) -> None:
    async def scenario() -> None:
        data = tmp_path / "data"
        async with InProcessCluster(data) as cluster:
            response = await cluster.submit(order_branches("o-1", [("sku-apple", 1)]), "t-1")
            assert coordinator_pb2.OUTCOME_COMMITTED == response.outcome

        status, out, _ = await dtm("log", "dump", str(data / "coordinator" / "wal"))
        assert cli.EXIT_OK == status
        assert "COMMIT_DECIDED" in out and "t-1" in out
        status, out, _ = await dtm("log", "dump", str(data / "inventory"), "--json")
        assert cli.EXIT_OK == status
        dumped = json.loads(out)
        assert not dumped["corrupted"]
        assert any("BRANCH_PREPARED" in line for line in dumped["lines"])
        status, _, err = await dtm("log", "dump", str(data))
        assert cli.EXIT_ERROR == status
        assert str(data / "coordinator" / "wal") in err  # says where the logs are
        status, _, err = await dtm("log", "dump", str(tmp_path / "nowhere"))
        assert (cli.EXIT_ERROR, True) == (status, "does not exist" in err)

    asyncio.run(scenario())

    status, out, _ = asyncio.run(dtm("crashpoints", "--json"))
    assert (cli.EXIT_OK, crashpoints.POINTS) == (status, json.loads(out))
    status, out, _ = asyncio.run(dtm("crashpoints"))
    assert "wal.before_fsync" in out and "DTM_CRASH_AT" in out

    status, out, _ = asyncio.run(dtm("--json", "config"))
    assert (cli.EXIT_OK, config.load(environ={}).as_dict()) == (status, json.loads(out))
    path = tmp_path / "dtm.toml"
    path.write_text("[orders]\nlock_wait_ms = 9\n", encoding="utf-8")
    status, out, _ = asyncio.run(dtm("--config", str(path), "config"))
    assert str(path) in out and "lock_wait_ms = 9" in out
    path.write_text("[orders]\nlock_wait = 9\n", encoding="utf-8")
    status, _, err = asyncio.run(dtm("--config", str(path), "config"))
    # A configuration refused, as the servers exit on it (it was 1).
    assert (cli.EXIT_USAGE, True) == (status, "unknown key 'lock_wait'" in err)


def test_config_shows_the_services_of_ones_own_and_their_sections(tmp_path: Path) -> None:
    """`dtm config` left out [services] and each declared section ([loyalty]): the file's
    shared configuration showed no trace of them. They are shown as written, and said to be
    checked by the service they name (the CLI does not know its settings)."""
    path = tmp_path / "dtm.toml"
    path.write_text(
        '[services]\ncustom = ["loyalty"]\n[loyalty]\nmax_points = 5\nsince = 2024-01-31\n',
        encoding="utf-8",
    )
    status, out, _ = asyncio.run(dtm("--config", str(path), "config"))
    assert cli.EXIT_OK == status
    assert '[services]\ncustom = ["loyalty"]' in out, out
    loyalty = out.split("[loyalty]\n", 1)[1].splitlines()
    assert loyalty[0].startswith("# as written in the file: participant keys override"), out
    assert loyalty[0].endswith("checked by the loyalty service"), out
    assert "max_points = 5" == loyalty[1], out
    status, out, _ = asyncio.run(dtm("--config", str(path), "--json", "config"))
    document = json.loads(out)
    assert {"custom": ["loyalty"]} == document["services"]
    # A TOML date (no JSON has one) made both a TypeError traceback: its ISO text.
    assert {"max_points": 5, "since": "2024-01-31"} == document["loyalty"]


def test_config_says_when_dtm_tls_variables_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CA", "CERT", "KEY"):
        monkeypatch.delenv(f"DTM_TLS_{name}", raising=False)
    status, out, _ = asyncio.run(dtm("config"))
    assert (cli.EXIT_OK, False) == (status, "overrides tls_*" in out)
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("not read by `dtm config`\n", encoding="utf-8")
        monkeypatch.setenv(f"DTM_TLS_{name.upper()}", str(path))
    status, out, _ = asyncio.run(dtm("config"))
    assert cli.EXIT_OK == status
    assert "DTM_TLS_CA, DTM_TLS_CERT, DTM_TLS_KEY set: overrides tls_*" in out


def test_unreachable_coordinator_is_a_clear_error(unreachable: Callable[[], str]) -> None:
    address = unreachable()
    for command in (["txn", "list"], ["participants"], ["locks"], ["txn", "retry", "t-1"]):
        status, out, err = asyncio.run(dtm("--coordinator", address, *command))
        assert cli.EXIT_ERROR == status, command
        assert "" == out
        assert f"cannot reach the coordinator at {address}: is it running? try `make up`" in err


def test_participant_lookups_without_the_coordinator_point_at_address(
    unreachable: Callable[[], str],
) -> None:
    """With the coordinator gone (when `dtm branches --in-doubt` and `dtm force` matter most),
    a command that looks participants up in its registry says how to do without it."""
    address = unreachable()
    at = ["--coordinator", address]
    hint = "without the coordinator, give the participant's --address HOST:PORT"
    for command in (
        ["locks"],
        ["branches", "--in-doubt"],
        ["branches", "--participant", "payment"],
        ["branches", "forget", "t-1", "0", "--participant", "payment"],
        ["force", "t-1", "0", "--participant", "payment", "--rollback", "--i-understand"],
    ):
        status, out, err = asyncio.run(dtm(*at, *command))
        assert (cli.EXIT_ERROR, "") == (status, out), command
        assert f"cannot reach the coordinator at {address}" in err, (command, err)
        assert hint in err and err.count("--address") == 1, (command, err)
    # Commands about the coordinator itself have no participant to ask instead.
    status, _, err = asyncio.run(dtm(*at, "txn", "list"))
    assert (cli.EXIT_ERROR, False) == (status, "--address" in err), err


def test_coordinator_address_comes_from_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]
) -> None:
    address = unreachable()
    monkeypatch.setenv("DTM_PARTICIPANT_COORDINATOR", address)
    status, _, err = asyncio.run(dtm("txn", "list"))
    assert cli.EXIT_ERROR == status
    assert f"cannot reach the coordinator at {address}" in err
    monkeypatch.setenv("DTM_PARTICIPANT_COORDINATOR", "nonsense")
    status, _, err = asyncio.run(dtm("txn", "list"))
    assert cli.EXIT_USAGE == status  # a configuration refused, as a server exits on it
    assert "DTM_PARTICIPANT_COORDINATOR='nonsense'" in err and "--coordinator" in err


def test_every_configuration_the_cli_refuses_exits_2_as_the_servers_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]
) -> None:
    """TLS files that cannot work (no PEM in them) exited 1, and so did a configuration file
    refused, where a TLS file that cannot be read exited 2, and the servers exit 2 for all
    of them: every configuration refused is status 2, before any call."""
    for name in ("CA", "CERT", "KEY"):
        monkeypatch.delenv(f"DTM_TLS_{name}", raising=False)
    monkeypatch.delenv("DTM_CONFIG", raising=False)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")
    tls = ["--tls-ca", str(junk), "--tls-cert", str(junk), "--tls-key", str(junk)]
    refused = tmp_path / "refused.toml"
    refused.write_text("[participant]\ncoordinator = 'nonsense'\n", encoding="utf-8")
    at = ["--coordinator", unreachable()]
    cases = [
        ([*at, *tls, "txn", "list"], "holds no PEM"),  # it was 1
        ([*at, *tls[:4], "--tls-key", str(tmp_path / "none.pem"), "txn", "list"], "none.pem"),
        (["--config", str(refused), "txn", "list"], "coordinator"),  # it was 1
        (["--config", str(refused), "config"], "coordinator"),  # it was 1
        (
            [*at, "--config", str(tmp_path / "none.toml"), "--tls-ca", str(junk), "txn", "list"],
            "none.toml",
        ),  # it was 1
    ]
    for args, expected in cases:
        status, out, err = asyncio.run(dtm(*args))
        assert (cli.EXIT_USAGE, "") == (status, out), (args, err)
        assert expected in err and "cannot reach" not in err, (args, err)


def test_a_configuration_refused_suggests_a_flag_only_for_the_value_it_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]
) -> None:
    """Any problem of --config's file (here a bad [coordinator] listen) was reported with
    "(or pass --coordinator HOST:PORT)", and passing it met the file again with "(or pass
    --tls-ca, --tls-cert and --tls-key)" (found by an operator hunt). The hint is for the
    value the flag stands in for, [participant] coordinator, alone."""
    for name in ("CA", "CERT", "KEY"):
        monkeypatch.delenv(f"DTM_TLS_{name}", raising=False)
    monkeypatch.delenv("DTM_CONFIG", raising=False)
    bad = tmp_path / "bad.toml"
    bad.write_text("[coordinator]\nlisten = 'nonsense'\n", encoding="utf-8")
    for at in ([], ["--coordinator", unreachable()]):
        status, out, err = asyncio.run(dtm("--config", str(bad), *at, "txn", "list"))
        assert (cli.EXIT_USAGE, "") == (status, out), (at, err)
        assert "listen" in err and "(or pass" not in err, (at, err)
    bad.write_text("[participant]\ncoordinator = 'nonsense'\n", encoding="utf-8")
    status, _, err = asyncio.run(dtm("--config", str(bad), "txn", "list"))
    assert (cli.EXIT_USAGE, True) == (status, "(or pass --coordinator HOST:PORT)" in err), err


def test_usage_errors() -> None:
    assert cli.EXIT_USAGE == asyncio.run(dtm())[0]  # no command
    status, _, err = asyncio.run(dtm("txn", "list", "--limit", "0"))
    assert cli.EXIT_USAGE == status
    assert "out of range 1..1000" in err
    status, _, err = asyncio.run(dtm("txn", "list", "--state", "done"))
    assert (cli.EXIT_USAGE, True) == (status, "expected one of preparing" in err)
    status, _, err = asyncio.run(dtm("force", "t-1", "0", "--i-understand"))
    assert cli.EXIT_USAGE == status  # neither --commit nor --rollback
    for bad in ("inf", "nan", "0", "-1", "soon"):
        status, _, err = asyncio.run(dtm("--timeout", bad, "txn", "list"))
        assert (cli.EXIT_USAGE, True) == (status, "--timeout" in err), (bad, err)
    status, _, err = asyncio.run(dtm("txn", "list", "--stuck", "--stuck-after", "nan"))
    assert (cli.EXIT_USAGE, True) == (status, "positive, finite" in err)
    status, out, _ = asyncio.run(dtm("--help"))
    assert cli.EXIT_OK == status and "txn" in out and "crashpoints" in out
    status, out, _ = asyncio.run(dtm("coordinator", "--help"))
    assert cli.EXIT_OK == status and "--metrics-listen" in out and "--config" in out
    status, out, _ = asyncio.run(dtm("service", "inventory", "--help"))
    assert cli.EXIT_OK == status and "--lock-wait-ms" in out and "127.0.0.1:50051" in out
    assert "--initial PATH" in out and "accounts (payment) as JSON" in " ".join(out.split())
    status, _, err = asyncio.run(dtm("service"))
    assert (cli.EXIT_USAGE, True) == (status, "which service?" in err)


def test_service_help_without_a_name_lists_the_services() -> None:
    """`dtm --help` and a bad NAME's usage error send the user to `dtm service --help`,
    which printed only "which service?" and exited 2."""
    for flag in ("--help", "-h"):
        status, out, err = asyncio.run(dtm("service", flag))
        assert (cli.EXIT_OK, "") == (status, err), flag
        assert "usage: dtm service NAME" in out
        assert "inventory, orders, payment, notification" in out
        assert "dtm service NAME --help" in out


def test_a_branch_beyond_a_transactions_last_is_a_usage_error_before_any_call(
    unreachable: Callable[[], str],
) -> None:
    """Branches are numbered 0..31. `dtm force T 40 --commit` asked the coordinator first and
    answered with presumed abort ("no record of T ... forcing commit would break atomicity"),
    exit 1; the forget commands asked a server to learn the number was wrong."""
    nothing_listening = ["--coordinator", unreachable()]
    target = ["--address", unreachable()]
    for command in (
        ["force", "t-1", "32", "--commit", "--i-understand", *target],
        ["force", "t-1", "40", "--rollback", "--i-understand", *target],
        ["branches", "forget", "t-1", "32", *target],
        ["heuristics", "forget", "t-1", "32"],
    ):
        status, out, err = asyncio.run(dtm(*nothing_listening, *command))
        assert (cli.EXIT_USAGE, "") == (status, out), (command, err)
        assert "out of range 0..31" in err and "cannot reach" not in err, (command, err)


def test_force_or_forget_by_address_asks_the_participant_not_the_default_coordinator(
    unreachable: Callable[[], str],
) -> None:
    """`dtm force`/`branches forget --address X` without --coordinator asked the CLI's default
    coordinator (127.0.0.1:50050) for its safety check, not the one the participant at X uses,
    and a refusal named that address (found by an operator hunt). It asks the participant
    which coordinator it uses: one that cannot be reached is named, the default never."""
    address = unreachable()
    for command in (
        ["force", "t-1", "0", "--commit", "--i-understand", "--address", address],
        ["branches", "forget", "t-1", "0", "--address", address],
    ):
        status, out, err = asyncio.run(dtm("--timeout", "1", *command))
        assert (cli.EXIT_ERROR, "") == (status, out), (command, err)
        assert f"cannot reach the participant at {address}" in err, (command, err)
        assert "127.0.0.1:50050" not in err, (command, err)


def test_a_malformed_id_or_participant_name_is_a_usage_error_before_any_call(
    unreachable: Callable[[], str],
) -> None:
    """`dtm trace ""` was a usage error, exit 2; `dtm txn show ""`, `txn retry`, `force`,
    `branches forget`, `heuristics forget` and `participants remove` sent it to a server and
    exited 1 on its INVALID_ARGUMENT (`force` saying "refusing to force  without knowing the
    coordinator's decision"), and an empty --participant listed every participant, as if
    none had been given (an operator's hunt)."""
    nothing_listening = ["--coordinator", unreachable()]
    target = ["--address", unreachable()]
    for command in (
        ["txn", "show", ""],
        ["txn", "retry", "t\u00fc"],
        ["force", "", "0", "--rollback", "--i-understand", *target],
        ["branches", "forget", "a b", "0", *target],
        ["heuristics", "forget", "x" * 129, "0"],
        ["trace", ""],
    ):
        status, out, err = asyncio.run(dtm(*nothing_listening, *command))
        assert (cli.EXIT_USAGE, "") == (status, out), (command, err)
        assert "is malformed: 1..128 characters" in err and "cannot reach" not in err, err
    for command in (
        ["participants", "remove", ""],
        ["locks", "--participant", ""],
        ["branches", "--participant", "Payment"],
        ["force", "t-1", "0", "--rollback", "--i-understand", "--participant", "pay ment"],
    ):
        status, out, err = asyncio.run(dtm(*nothing_listening, *command))
        assert (cli.EXIT_USAGE, "") == (status, out), (command, err)
        assert "participant name" in err and "cannot reach" not in err, (command, err)


def test_transactions_cut_by_the_limit_say_so(tmp_path: Path) -> None:
    """`dtm txn list --limit N` kept the newest N without a word, and `--stuck` looked among
    the 1,000 newest in doubt only, silently: the oldest in doubt, the likeliest stuck, went
    unseen once more than 1,000 were."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            for number in range(3):
                branches = order_branches(f"o-{number}", [("sku-apple", 1)])
                await cluster.submit(branches, f"t-{number}")
            at = ["--coordinator", cluster.coordinator_address, "--json", "txn", "list"]
            status, out, err = await dtm(*at, "--limit", "2")
            assert cli.EXIT_OK == status, err
            assert ["t-2", "t-1"] == [txn["transaction_id"] for txn in json.loads(out)]
            assert "the newest 2 matching transactions listed; more match: --limit" in err, err
            status, out, err = await dtm(*at, "--limit", "3")
            assert 3 == len(json.loads(out)) and "newest" not in err, err

    asyncio.run(scenario())


def test_stuck_transactions_looked_for_among_the_newest_in_doubt_say_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    listed = limits.LIST_TRANSACTIONS_LIMIT_MAX
    response = coordinator_pb2.ListTransactionsResponse(
        transactions=[coordinator_pb2.Transaction()] * listed, more_match=True
    )
    cli_transactions._note_list_cut(response, True, listed)
    assert (
        f"dtm: note: more than {listed} transactions are in doubt: only the newest {listed} "
        "were looked at for stuck ones"
    ) in capsys.readouterr().err


def test_branches_cut_by_the_limit_says_so(tmp_path: Path) -> None:
    """`dtm branches --limit N` (100 by default) kept each participant's newest N without a
    word: an operator reconciling the forced branches of `--awaiting` never learned of the
    rest. The participant lists N (ListBranchesRequest.limit) and says it keeps more."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            for number in range(3):
                branches = order_branches(f"o-{number}", [("sku-apple", 1)])
                await cluster.submit(branches, f"t-{number}")
            at = ["--coordinator", cluster.coordinator_address, "--json"]
            command = ["branches", "--participant", "inventory"]
            status, out, err = await dtm(*at, *command, "--limit", "1")
            assert cli.EXIT_OK == status, err
            assert ["t-2"] == [branch["transaction_id"] for branch in json.loads(out)]
            assert "inventory: the newest 1 of more than 1 branches listed: --limit" in err, err
            status, out, err = await dtm(*at, *command)
            assert 3 == len(json.loads(out)) and "newest" not in err, err

    asyncio.run(scenario())


def test_force_and_forget_help_name_the_branch_holder() -> None:
    """`force` and `branches forget` act on one branch at one participant: their help said
    "--participant NAME  only this participant" (the listing commands' filter), and gave
    --commit and --rollback no help at all."""
    for command in (["force"], ["branches", "forget"]):
        status, out, _ = asyncio.run(dtm(*command, "--help"))
        text = " ".join(out.split())
        assert cli.EXIT_OK == status
        assert "only this participant" not in text, command
        assert "the participant holding the branch" in text and "is required" in text, command
    _, out, _ = asyncio.run(dtm("force", "--help"))
    text = " ".join(out.split())
    assert "--commit commit the branch" in text and "--rollback roll the branch back" in text
    _, out, _ = asyncio.run(dtm("locks", "--help"))
    assert "only this participant" in out  # a filter there, as before


def test_server_help_gives_the_authorization_defaults() -> None:
    """--authz-clients did not say that its default admits "operator" as a client too (so an
    operator certificate may Submit unless the list is narrowed)."""
    for command in (["coordinator"], ["service", "payment"]):
        _, out, _ = asyncio.run(dtm(*command, "--help"))
        text = " ".join(out.split())
        assert "(DTM_AUTHZ_CLIENTS; default: client,operator)" in text, command
        assert "(DTM_AUTHZ_OPERATORS; default: operator)" in text, command
        assert "(DTM_AUTHZ_COORDINATOR; default: coordinator)" in text, command


def test_a_service_refusing_its_configuration_says_why(tmp_path: Path) -> None:
    """The services end with SystemExit("message") for a bad --config or --initial; dtm
    caught it and returned 1 without printing anything. A configuration refused is a usage
    error, status 2, for every server (inventory and payment said 1, the others 2), an
    --initial file that cannot be used too (it said 1: a setting to fix, as any other)."""
    negative = tmp_path / "neg.toml"
    negative.write_text("[inventory]\nlock_wait_ms = -1\n", encoding="utf-8")
    broken = tmp_path / "initial.json"
    broken.write_text("{bad", encoding="utf-8")
    common = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    cases = [
        (["--config", str(negative), "service", "inventory"], "lock_wait_ms = -1", cli.EXIT_USAGE),
        (["--config", str(negative), "service", "orders"], "lock_wait_ms = -1", cli.EXIT_USAGE),
        (
            ["--config", str(tmp_path / "none.toml"), "service", "payment"],
            "none.toml",
            cli.EXIT_USAGE,
        ),
        (["service", "inventory", "--initial", str(broken)], "--initial", cli.EXIT_USAGE),
    ]
    for args, expected, code in cases:
        status, out, err = asyncio.run(dtm(*args, *common))
        assert (code, "") == (status, out), args
        # One line saying why (after the usage, where the parser itself refused it).
        assert expected in err.strip().splitlines()[-1] and "Traceback" not in err, (args, err)


def test_locks_and_branches_print_nothing_when_no_participant_answers(
    unreachable: Callable[[], str],
) -> None:
    address = unreachable()
    for command in (["locks"], ["branches"], ["branches", "--in-doubt"]):
        for output in ([], ["--json"]):
            status, out, err = asyncio.run(dtm(*command, "--address", address, *output))
            assert (cli.EXIT_ERROR, "") == (status, out), (command, output, out)
            assert f"cannot reach the participant at {address}" in err, err


def test_an_empty_address_is_a_usage_error() -> None:
    for args in (["--coordinator", "", "txn", "list"], ["--coordinator=", "participants"]):
        status, out, err = asyncio.run(dtm(*args))
        assert (cli.EXIT_USAGE, "") == (status, out), args
        assert "--coordinator: empty; expected HOST:PORT" in err, err
    status, _, err = asyncio.run(dtm("locks", "--address", " "))
    assert (cli.EXIT_USAGE, True) == (status, "--address: empty" in err), err


def test_an_ipv6_address_without_brackets_is_a_usage_error() -> None:
    """The CLI took `::1:50050` as given, while the servers' settings refuse it: gRPC guesses
    where the host ends. It names the right form, as the settings do."""
    for args in (["--coordinator", "::1:50050", "txn", "list"], ["locks", "--address", "::1:7"]):
        status, out, err = asyncio.run(dtm(*args))
        assert (cli.EXIT_USAGE, "") == (status, out), args
        assert "an IPv6 address goes in brackets: [::1]:" in err, err


def test_an_address_without_a_port_is_a_usage_error() -> None:
    """`dtm --coordinator localhost` dialed localhost:443 (gRPC's default port) and reported
    "cannot reach the coordinator at localhost", while the servers' settings refuse an
    address without a port. Refused before any call, naming the form expected."""
    for args in (
        ["--coordinator", "localhost", "txn", "list"],
        ["--coordinator", "[::1]", "participants"],
        ["--coordinator", "dns:///coordinator.example", "txn", "list"],
        ["--coordinator", ":50050", "txn", "list"],
        ["locks", "--address", "127.0.0.1"],
        ["branches", "--address", "127.0.0.1:"],
    ):
        status, out, err = asyncio.run(dtm(*args))
        assert (cli.EXIT_USAGE, "") == (status, out), args
        assert "expected host:port with port 1..65535" in err, err
        assert "no port after the brackets" in err or "[" not in args[1], err


def test_the_address_flags_refuse_what_the_coordinator_setting_refuses() -> None:
    """--coordinator and --address accepted `localhost :50050` (a space), a port of six
    digits or an address of 300 characters, which [participant] coordinator (the setting
    --coordinator stands in for) refuses: gRPC then failed on it, or dialed another port.
    Checked by the settings' own check now, with its message."""
    for address in ("localhost :50050", "127.0.0.1:000050", "h\t:5", "a" * 300 + ":5"):
        with pytest.raises(config.ConfigError) as refused:
            config.load(environ={"DTM_PARTICIPANT_COORDINATOR": address})
        says = str(refused.value).rpartition(": ")[2]  # after "...COORDINATOR='...': "
        for args in (["--coordinator", address, "txn", "list"], ["locks", "--address", address]):
            status, out, err = asyncio.run(dtm(*args))
            assert (cli.EXIT_USAGE, "") == (status, out), args
            assert says in err.strip().splitlines()[-1], (args, err)


def test_python_m_dtm_wal_dump_is_dtm_log_dump(tmp_path: Path) -> None:
    """`python -m dtm.wal dump PATH`, which a server names when it refuses a log and
    architecture.md section 7 shows, is `dtm log dump PATH`: a missing path ended in a
    FileNotFoundError traceback, and an empty file printed nothing."""
    (tmp_path / "empty.wal").write_bytes(b"")
    cases = [
        (tmp_path / "none", cli.EXIT_ERROR, "", "does not exist; a log is a directory"),
        (tmp_path / "empty.wal", cli.EXIT_OK, "empty, no records", ""),
    ]
    for path, expected, out, err in cases:
        completed = subprocess.run(
            [sys.executable, "-m", "dtm.wal", "dump", str(path)],
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert expected == completed.returncode, completed
        assert out in completed.stdout and err in completed.stderr, completed
        assert "Traceback" not in completed.stderr, completed.stderr


def test_log_dump_of_a_directory_without_a_log_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "data" / "orders" / "wal").mkdir(parents=True)
    for path in (tmp_path / "empty", tmp_path / "data" / "orders"):
        status, out, err = asyncio.run(dtm("log", "dump", str(path)))
        assert (cli.EXIT_ERROR, "") == (status, out), path
        assert "holds no log segments (*.wal files)" in err and str(path) in err, err


def test_log_dump_of_a_file_that_is_no_log_is_an_error(tmp_path: Path) -> None:
    """It printed "TORN TAIL ... at byte offset 0 ... truncates these N bytes", exit 0."""
    text = tmp_path / "services"
    text.write_bytes(b"# Network services, Internet style\n" * 20)
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal" / "00000000000000000001.wal").write_bytes(text.read_bytes())
    for path, verdict in [
        (text, "not a dtm write-ahead log segment"),
        (tmp_path / "wal", "segment 1 of 1 is not a log segment"),
    ]:
        for output in ([], ["--json"]):
            status, out, err = asyncio.run(dtm("log", "dump", str(path), *output))
            assert (cli.EXIT_ERROR, "") == (status, out), (path, output)
            assert verdict in err and "TORN" not in err, err
            assert 1 == len(err.strip().splitlines()), err


def test_log_dump_prints_the_records_before_a_segment_that_is_no_log(tmp_path: Path) -> None:
    """Every valid record of a directory was hidden behind one error line when its last
    segment was not a log; an empty file printed nothing, exit 0 (found by a bug hunt)."""
    from dtm.wal import WriteAheadLog

    log, _ = WriteAheadLog.open(tmp_path / "wal")
    log.append(1, b"")
    log.sync()
    log.close()
    garbage = tmp_path / "wal" / "00000000000000000002.wal"
    garbage.write_bytes(b"# not a log\n" * 20)
    status, out, err = asyncio.run(dtm("log", "dump", str(tmp_path / "wal")))
    assert (cli.EXIT_ERROR, 2) == (status, len(out.splitlines())), (out, err)
    assert out.startswith(
        "file=00000000000000000001.wal frame_format=1 header=24\nlsn=1 00000000000000000001.wal@24 "
    ), out
    assert f"{garbage}: segment 2 of 2 is not a log segment" in err, err
    status, out, err = asyncio.run(dtm("log", "dump", str(tmp_path / "wal"), "--json"))
    dumped = json.loads(out)
    assert (cli.EXIT_ERROR, 2, True) == (status, len(dumped["lines"]), dumped["corrupted"])
    assert "segment 2 of 2 is not a log segment" in dumped["not_a_log"] and garbage.name in err

    empty = tmp_path / "empty.wal"
    empty.write_bytes(b"")
    status, out, err = asyncio.run(dtm("log", "dump", str(empty)))
    assert (cli.EXIT_OK, f"{empty}: empty, no records\n", "") == (status, out, err)


def test_log_dump_of_a_new_log_before_a_segment_that_is_no_log_says_no_empty(
    tmp_path: Path,
) -> None:
    """A new log's segment holds its file header alone, which dump prints as a line: a
    segment after it that is no log printed "empty, no records" too, above the error that
    says it is not (found in review)."""
    from dtm.wal import WriteAheadLog

    log, _ = WriteAheadLog.open(tmp_path / "wal")
    log.close()
    garbage = tmp_path / "wal" / "00000000000000000002.wal"
    garbage.write_bytes(b"# not a log\n" * 20)
    status, out, err = asyncio.run(dtm("log", "dump", str(tmp_path / "wal")))
    assert (cli.EXIT_ERROR, "file=00000000000000000001.wal frame_format=1 header=24\n") == (
        status,
        out,
    ), err
    assert f"{garbage}: segment 2 of 2 is not a log segment" in err, err


def test_a_coordinator_address_that_is_another_server_is_named_as_such() -> None:
    """--coordinator at a participant's port answered "UNIMPLEMENTED: Method not found!",
    with no hint at the address (found by a bug hunt)."""

    async def scenario() -> None:
        server = grpc.aio.server()  # serves nothing, as a participant serves no Coordinator
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            at = ["--coordinator", f"127.0.0.1:{port}"]
            for command in (["txn", "list"], ["participants"]):
                status, out, err = await dtm(*at, *command)
                assert (cli.EXIT_ERROR, "") == (status, out), command
                assert "is that address a dtm coordinator?" in err, err
            status, _, err = await dtm("locks", "--address", f"127.0.0.1:{port}")
            assert cli.EXIT_ERROR == status and "or this is another kind of server" in err, err
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_an_http_server_at_the_address_is_named_as_such() -> None:
    """--coordinator at a /metrics port (`make up`'s 9100 for 50050) said "cannot reach the
    coordinator ...: is it running? try `make up`", though something runs there: gRPC's own
    "Failed parsing HTTP/2" was the only clue."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    at = f"127.0.0.1:{server.server_address[1]}"
    try:
        for command in (["--coordinator", at, "txn", "list"], ["locks", "--address", at]):
            status, out, err = asyncio.run(dtm(*command))
            assert (cli.EXIT_ERROR, "") == (status, out), command
            assert "answers there, but not in gRPC" in err and "/metrics" in err, err
            assert "is it running?" not in err, err
    finally:
        server.shutdown()
        server.server_close()


def _order_without_id(path: Path) -> Path:
    document = json.loads(order_file(path, "", "o-1").read_text(encoding="utf-8"))
    del document["transaction_id"]
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _named_transaction(err: str) -> str:
    return err.split("transaction ", 1)[1].split()[0]


def test_submit_cut_off_by_a_coordinator_crash_is_unknown_and_names_the_id(
    tmp_path: Path,
) -> None:
    """The coordinator dies while the Submit waits for a vote: the transaction may commit
    (its participants prepared), so exit 4, naming the id made up for it, to look up or
    retry with."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_SLOW, delay_ms=2000)
            path = _order_without_id(tmp_path / "t.json")
            submitting = asyncio.create_task(dtm(*at, "submit", str(path)))

            async def orders_prepared() -> bool:  # so the Submit waits for inventory's vote
                # Not through `dtm`: its output redirection would catch the Submit's too.
                listing = await cluster.admin("orders").ListBranches(
                    participant_pb2.ListBranchesRequest()
                )
                return bool(listing.branches)

            await eventually(orders_prepared)
            await cluster.restart_coordinator()
            status, out, err = await submitting
            assert (cli.EXIT_UNKNOWN, "") == (status, out), err
            assert "outcome unknown: transaction txn-" in err, err
            named = _named_transaction(err)
            assert f"`dtm txn show {named}`" in err, err
            assert f'"transaction_id": "{named}" added to the file' in err, err
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

            # The id named is the one the participants prepared under.
            status, out, _ = await dtm(*at, "--json", "branches", "--participant", "orders")
            assert named in [branch["transaction_id"] for branch in json.loads(out)]

    asyncio.run(scenario())


class _LostSubmits(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator whose Submit fails the way a lost answer does."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNAVAILABLE
        self.received: list[str] = []

    def Submit(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.received.append(request.transaction_id)
        if self.code is grpc.StatusCode.DEADLINE_EXCEEDED:
            time.sleep(1.0)  # past the caller's deadline
            context.abort(grpc.StatusCode.INTERNAL, "too late")
        context.abort(self.code, "lost")


def test_submit_whose_answer_is_lost_is_unknown() -> None:
    """UNAVAILABLE, CANCELLED or no answer by the deadline, once the Submit was sent: exit 4
    with the file's own id, never the plain failure of exit 1."""
    servicer = _LostSubmits()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = order_file(Path(directory) / "t.json", "t-lost", "o-1")
            document = json.loads(path.read_text(encoding="utf-8"))
            document["timeout_ms"] = 100
            path.write_text(json.dumps(document), encoding="utf-8")
            at = ["--coordinator", f"127.0.0.1:{port}", "--timeout", "0.3"]
            for code in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                servicer.code = code
                status, out, err = asyncio.run(dtm(*at, "submit", str(path)))
                assert (cli.EXIT_UNKNOWN, "") == (status, out), (code, err)
                assert "outcome unknown: transaction t-lost may have reached" in err, err
                assert "`dtm txn show t-lost`" in err and "submit the same file again" in err
            assert ["t-lost"] * 3 == servicer.received
    finally:
        server.stop(0)


class _ManyInDoubt(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator with 5 fresh in-doubt transactions, newest first, then a stuck one."""

    def ListTransactions(self, request: Any, context: grpc.ServicerContext) -> Any:
        now_ms = int(time.time() * 1000)
        fresh = [
            coordinator_pb2.Transaction(
                transaction_id=f"t-new-{i}",
                state=coordinator_pb2.TRANSACTION_STATE_COMMITTING,
                created_at_unix_ms=now_ms,
                branches=[coordinator_pb2.BranchStatus(participant="orders")],
            )
            for i in range(5)
        ]
        stuck = coordinator_pb2.Transaction(
            transaction_id="t-stuck",
            state=coordinator_pb2.TRANSACTION_STATE_COMMITTING,
            created_at_unix_ms=now_ms,
            branches=[coordinator_pb2.BranchStatus(participant="orders", phase_two_attempts=7)],
        )
        listed = [*fresh, stuck][: request.limit or 100]
        return coordinator_pb2.ListTransactionsResponse(transactions=listed)


def test_txn_list_stuck_finds_one_behind_newer_in_doubt_ones() -> None:
    """--stuck filtered after the coordinator had cut the list to --limit in-doubt
    transactions: with that many newer ones on their first try, a stuck one was missed."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_ManyInDoubt(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        at = ["--coordinator", f"127.0.0.1:{port}"]
        status, out, err = asyncio.run(dtm(*at, "txn", "list", "--stuck", "--limit", "3", "--json"))
        assert cli.EXIT_OK == status, err
        assert ["t-stuck"] == [txn["transaction_id"] for txn in json.loads(out)]
        status, out, _ = asyncio.run(dtm(*at, "txn", "list", "--in-doubt", "--limit", "3"))
        assert "t-new-2" in out and "t-new-3" not in out  # --limit still bounds the rest
    finally:
        server.stop(0)


def test_a_participant_reached_by_address_is_named_once() -> None:
    """Reached by --address alone, a participant's name is its address: errors said
    "participant 127.0.0.1:P at 127.0.0.1:P answered ..."."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(_ManyInDoubt(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        status, _, err = asyncio.run(dtm("locks", "--address", address))
        assert cli.EXIT_ERROR == status, err
        assert f"the participant at {address} answered UNIMPLEMENTED" in err, err
        assert f"participant {address}" not in err, err
    finally:
        server.stop(0)


def test_submit_to_nothing_listening_is_not_sent(unreachable: Callable[[], str]) -> None:
    """Nothing listens: the CLI's connection check fails, so the Submit is never sent and the
    failure is certain: exit 1, "is it running?"."""
    address = unreachable()
    with tempfile.TemporaryDirectory() as directory:
        path = _order_without_id(Path(directory) / "t.json")
        status, out, err = asyncio.run(dtm("--coordinator", address, "submit", str(path)))
    assert (cli.EXIT_ERROR, "") == (status, out), err
    assert f"cannot reach the coordinator at {address}: is it running?" in err, err
    assert "transaction txn-" in err and "was not sent" in err, err


def test_submit_interrupted_by_ctrl_c_names_the_transaction_it_may_have_run(
    tmp_path: Path,
) -> None:
    """Ctrl-C while the Submit waits for a vote: `dtm submit` exited 130 without a word, and
    the id it had made up for the transaction, which may still commit, was lost with it (an
    operator's hunt). A real process, as a terminal's Ctrl-C reaches it (SIGINT)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "data") as cluster:
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_SLOW, delay_ms=5000)
            path = _order_without_id(tmp_path / "t.json")
            command = [sys.executable, "-m", "dtm.cli", "--coordinator"]
            submitting = await asyncio.create_subprocess_exec(
                *command,
                cluster.coordinator_address,
                "submit",
                str(path),
                cwd=Path(__file__).parent.parent,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # A shell's background job ignores SIGINT; a terminal's foreground one does not.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            engine = cluster.coordinator.engine

            async def submitted() -> bool:
                return bool(engine.active)

            await eventually(submitted, timeout_s=60.0)
            submitting.send_signal(signal.SIGINT)
            out, err = (stream.decode() for stream in await submitting.communicate())
            assert (130, "") == (submitting.returncode, out), err
            named = _named_transaction(err)
            assert [named] == list(engine.active), err
            assert f"outcome unknown: transaction {named} may have reached" in err, err
            assert "(interrupted)" in err and "Traceback" not in err, err
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)

    asyncio.run(scenario())


@pytest.mark.parametrize("command", [["config"], ["crashpoints"], ["--json", "config"]])
def test_a_closed_pipe_ends_quietly(command: list[str]) -> None:
    """`dtm config | head -1`: the reader goes away; dtm stops with 141 (as if killed by
    SIGPIPE), without a BrokenPipeError traceback or an "Exception ignored" at exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "dtm.cli", *command],
            cwd=Path(__file__).parent.parent,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("DTM_")},
        )
    finally:
        os.close(write_end)
    assert (cli.EXIT_BROKEN_PIPE, "") == (completed.returncode, completed.stderr)


# ---- operators and late retries (a bug hunt of what consumes the late-retry semantics) ----


async def _late_retry_with_inventory_in_doubt(cluster: InProcessCluster) -> list[str]:
    """A late retry of a committed order that inventory had forgotten: it prepares its branch
    again and misses the Rollback, so that branch is in doubt. The coordinator's decision for
    this attempt is abort, though its status reads COMMITTED (committed by an earlier one).
    Returns the `dtm force` arguments for inventory's branch."""
    order = order_branches("o-again", [("sku-pear", 2)], amount_cents=200)
    await commit_then_forget(cluster, order, "txn-again", forgetting=["inventory"])
    await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
    retried = await cluster.submit(order, "txn-again")
    assert coordinator_pb2.OUTCOME_COMMITTED == retried.outcome, retried.reason
    engine = cluster.coordinator.engine

    await settled(cluster)
    await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_NONE)
    assert coordinator_pb2.OUTCOME_ABORTED == engine.query_outcome("txn-again")
    at = ["--coordinator", cluster.coordinator_address]
    return [*at, "force", "txn-again", "0", "--participant", "inventory", "--i-understand"]


@pytest.mark.parametrize("commit", [True, False])
def test_force_follows_a_late_retrys_own_abort_not_its_earlier_commit(
    tmp_path: Path, commit: bool
) -> None:
    """GetTransaction read COMMITTED and `dtm force` took it for the decision: `--commit`
    went through (the stock taken twice) and `--rollback`, the coordinator's own answer to
    that branch, was refused. `Transaction.committed_earlier` now tells the two apart."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 10, "backoff_ms_max": 20},
            participant_overrides={"in_doubt_after_ms": 600_000},  # it must not resolve itself
        ) as cluster:
            force = await _late_retry_with_inventory_in_doubt(cluster)
            status, out, err = await dtm(*force, "--commit" if commit else "--rollback")
            if commit:
                assert cli.EXIT_UNSAFE == status, out
                assert "decided abort" in err
            else:
                assert cli.EXIT_OK == status, err
            assert 2 == (await cluster.stock())["sku-pear"].sold  # taken once

    asyncio.run(scenario())


def test_txn_show_and_list_say_that_an_earlier_attempt_committed_it(tmp_path: Path) -> None:
    """A late retry: its status reads COMMITTED (an earlier attempt committed the transaction)
    while this attempt decided abort, which its branches are told (inventory's, in doubt, is
    rolled back). `Transaction.committed_earlier` says so; `dtm txn show` and `txn list`, in
    JSON and in text, left it out: "committed" was all an operator or a script saw."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            coordinator_overrides={"finished_kept": 2, "backoff_ms_min": 10, "backoff_ms_max": 20},
            participant_overrides={"in_doubt_after_ms": 600_000},
        ) as cluster:
            await _late_retry_with_inventory_in_doubt(cluster)
            at = ["--coordinator", cluster.coordinator_address]
            status, out, err = await dtm(*at, "txn", "show", "txn-again", "--json")
            assert cli.EXIT_OK == status, err
            shown = json.loads(out)
            assert "committed" == shown["state"]
            showed_it = shown["committed_earlier"]
            assert showed_it in ("orders", "payment", "notification"), shown
            status, out, _ = await dtm(*at, "txn", "list", "--json")
            [listed] = [t for t in json.loads(out) if t["transaction_id"] == "txn-again"]
            assert showed_it == listed["committed_earlier"]
            status, out, _ = await dtm(*at, "txn", "show", "txn-again")
            assert f"by an earlier attempt ({showed_it}); this attempt decided abort" in out, out
            # An ordinary commit says nothing of it.
            status, out, _ = await dtm(*at, "txn", "list", "--json")
            others = [t for t in json.loads(out) if t["transaction_id"] != "txn-again"]
            assert others and all("" == t["committed_earlier"] for t in others), others

    asyncio.run(scenario())


def test_an_aborting_transaction_refuses_a_forced_commit_and_explains_an_unregister(
    tmp_path: Path,
) -> None:
    """ABORTING: the abort is decided (Rollbacks sent), the client's answer waits for a
    Prepare still out. `dtm force --commit` went through (the check knew no ABORTING), and
    an unregister refused for it pointed at `txn list --stuck`, which does not show it."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            prepare_timeout_ms=10_000,
            participant_overrides={"in_doubt_after_ms": 600_000},
        ) as cluster:
            at = ["--coordinator", cluster.coordinator_address]
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=2_000)
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REFUSE)
            await cluster.set_fault("inventory", participant_pb2.FAULT_MODE_REJECT_DECISIONS)
            order = order_branches("o-ab", [("sku-apple", 1)])
            running = asyncio.ensure_future(cluster.submit(order, "t-ab", timeout_ms=10_000))

            async def aborting() -> bool:
                _, out, _ = await dtm(*at, "txn", "show", "t-ab", "--json")
                return bool(out) and json.loads(out)["state"] == "aborting"

            await eventually(aborting)
            force = [*at, "force", "t-ab", "0", "--participant", "inventory", "--i-understand"]
            status, out, err = await dtm(*force, "--commit")
            assert cli.EXIT_UNSAFE == status, out
            status, _, err = await dtm(*at, "participants", "remove", "notification")
            assert cli.EXIT_OK != status and "--state aborting" in err, err
            assert coordinator_pb2.OUTCOME_ABORTED == (await running).outcome

    asyncio.run(scenario())


def test_a_graceful_stop_answers_an_abort_that_waits_for_a_prepare(tmp_path: Path) -> None:
    """Its client got UNAVAILABLE, the run was counted as left to recovery (nothing of it is
    in the log), and its timer fired on the stopped engine seconds later (a bug hunt)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, prepare_timeout_ms=10_000) as cluster:
            await cluster.set_fault("payment", participant_pb2.FAULT_MODE_SLOW, delay_ms=3_000)
            await cluster.set_fault("orders", participant_pb2.FAULT_MODE_REFUSE)
            order = order_branches("o-stop", [("sku-apple", 1)])
            running = asyncio.ensure_future(cluster.submit(order, "t-stop", timeout_ms=10_000))
            engine = cluster.coordinator.engine

            async def aborting() -> bool:
                run = engine.active.get("t-stop")
                return run is not None and run.txn.answer_pending

            await eventually(aborting)
            await cluster.coordinator.stop(0.2)
            assert coordinator_pb2.OUTCOME_ABORTED == (await running).outcome
            assert {} == engine.active

    asyncio.run(scenario())


def test_a_graceful_stop_does_not_answer_aborted_a_late_retry_whose_commit_vote_comes_in_grace(
    tmp_path: Path,
) -> None:
    """Late retry: inventory forgot the commit and refuses (the earlier attempt took the last
    stock); the others remember it, slowly (400 ms). A graceful stop with 3 s of grace comes
    while the answer waits: the COMMITTED-earlier vote arrives well within the grace, but
    stop_waiting answered ABORTED at once, for a transaction that is committed (a review).
    The waiting aborts are answered as the grace runs out."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, coordinator_overrides={"finished_kept": 2}
        ) as cluster:
            order = await late_retry_of_the_last_stock(cluster, slow_ms=400)
            engine = cluster.coordinator.engine
            running = asyncio.ensure_future(cluster.submit(order, "txn-scarce"))

            async def aborting() -> bool:
                run = engine.active.get("txn-scarce")
                return run is not None and run.txn.answer_pending

            await eventually(aborting, interval_s=0.005)
            await cluster.coordinator.stop(3.0)
            answer = await running
            assert coordinator_pb2.OUTCOME_COMMITTED == answer.outcome, answer.reason

    asyncio.run(scenario())


def test_log_dump_of_an_empty_path_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dtm log dump ""` read the working directory (Path("") is "."), where the other
    commands now refuse an empty --data-dir (found by a bug hunt): a usage error."""
    monkeypatch.chdir(tmp_path)
    status, out, err = asyncio.run(dtm("log", "dump", ""))
    assert (cli.EXIT_USAGE, "") == (status, out), err
    assert "argument PATH: '': expected a path, got an empty string" in err, err


def test_submit_of_a_type_not_compiled_in_says_the_coordinator_was_not_reached(
    tmp_path: Path,
) -> None:
    """A type not compiled into dtm is looked up in the coordinator's registry (then asked of
    its participant by reflection). With the coordinator unreachable, the file was refused as
    an "unknown message type": the type was blamed, not the coordinator."""
    submission = tmp_path / "award.json"
    # A type no test compiles (test_loyalty_example loads loyalty.v1.AwardPoints into this
    # process's descriptor pool, and a later run of this test would then find it).
    branch = {"participant": "loyalty", "type": "nowhere.v1.AwardPoints", "operation": {}}
    submission.write_text(json.dumps({"branches": [branch]}), encoding="utf-8")
    with socket.socket() as bound:  # bound, not listening: every connection refused
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
        status, out, err = asyncio.run(
            dtm("--coordinator", address, "--timeout", "5", "submit", str(submission))
        )
    assert (cli.EXIT_ERROR, "") == (status, out), err
    assert "unknown message type" not in err, err
    assert "nowhere.v1.AwardPoints" in err and f"cannot reach the coordinator at {address}" in err
