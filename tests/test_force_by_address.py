"""`dtm force` and `dtm branches forget` by --address: the participant says which coordinator
it uses (ParticipantAdmin.Describe), and the check before the call asks that one. Before,
--address needed --coordinator (a usage error without it), and a --coordinator other than the
participant's own was asked, whose "no record" or "unreachable" says nothing of the branch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from dtm import cli
from dtm.coordinator.server import CoordinatorServer, ServerConfig
from dtm.core.branch import BranchState
from dtmpb.v1 import participant_pb2
from participants.server.admin import AdminServicer
from tests.cli_runner import dtm
from tests.harness import (
    ASKS_LATER,
    Code,
    InProcessCluster,
    describe_coordinator_as,
    expect_status,
    forced_unknown,
    reserve,
)


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch, unreachable: Callable[[], str]) -> str:
    """The CLI's own coordinator (DTM_PARTICIPANT_COORDINATOR), which is not the one the
    participants use, and cannot be reached."""
    address = unreachable()
    monkeypatch.setenv("DTM_PARTICIPANT_COORDINATOR", address)
    return address


async def prepared_unknown(cluster: InProcessCluster, txn: str) -> None:
    """Inventory prepares branch 0 of `txn`, which the coordinator has no record of."""
    await cluster.participant_stub("inventory").Prepare(
        participant_pb2.PrepareRequest(transaction_id=txn, branch=0, operation=reserve())
    )


def inventory_state(cluster: InProcessCluster, txn: str) -> BranchState:
    info = cluster.participants["inventory"].engine.branch((txn, 0))
    assert info is not None
    return info.branch.state


def awaiting(cluster: InProcessCluster) -> list[tuple[str, int]]:
    return [key for key, _ in cluster.participants["inventory"].engine.forced_awaiting()]


def test_describe_says_who_the_participant_is_and_its_coordinator(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            admin = cluster.admin("inventory")
            described = await admin.Describe(participant_pb2.DescribeRequest())
            server = cluster.participants["inventory"]
            assert (
                "inventory",
                server.engine.incarnation,
                cluster.address("inventory"),
                cluster.coordinator_address,
                True,
            ) == (
                described.name,
                described.incarnation,
                described.address,
                described.coordinator,
                described.registered,
            )
            capabilities = described.capabilities
            assert capabilities.one_phase and capabilities.batch
            assert ["dtm.v1.ReserveStock"] == list(capabilities.operation_types)
            # Addressed to another participant, it is refused as the other admin calls are.
            await expect_status(
                admin.Describe(participant_pb2.DescribeRequest(participant="orders")),
                Code.FAILED_PRECONDITION,
                "not 'orders'",
            )

    asyncio.run(scenario())


def test_force_by_address_asks_the_coordinator_the_participant_uses(
    tmp_path: Path, elsewhere: str
) -> None:
    """Without --coordinator, `dtm force --address` was a usage error. It now asks the
    participant's coordinator, which has no record of t-fc (presumed abort): a forced commit
    is refused (exit 5) naming it, a forced rollback goes."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-fc")
            force = ["--timeout", "2", "force", "t-fc", "0", "--i-understand"]
            force += ["--address", cluster.address("inventory")]

            status, out, err = await dtm(*force, "--commit")
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert f"the coordinator at {cluster.coordinator_address} has no record" in err, err
            assert elsewhere not in err, err
            assert BranchState.PREPARED is inventory_state(cluster, "t-fc")

            status, out, err = await dtm(*force, "--rollback")
            assert cli.EXIT_OK == status, err
            assert "branch t-fc/0 forced to rolled_back" in out, out

    asyncio.run(scenario())


def test_forget_by_address_asks_the_coordinator_the_participant_uses(
    tmp_path: Path, elsewhere: str
) -> None:
    """As for a force: the participant's coordinator has no record of t-fc, so inventory's
    forced commit, a heuristic outcome it has not heard of, is kept (exit 5); a forced
    rollback agrees with the presumed abort and is forgotten."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await forced_unknown(cluster, "t-fc", commit=True)
            await forced_unknown(cluster, "t-fr", commit=False)
            forget = ["--timeout", "2", "branches", "forget"]
            target = ["0", "--address", cluster.address("inventory")]

            status, out, err = await dtm(*forget, "t-fc", *target)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert f"the coordinator at {cluster.coordinator_address} has no record" in err, err
            assert elsewhere not in err, err

            status, out, err = await dtm(*forget, "t-fr", *target)
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-fr/0" in out, out
            assert [("t-fc", 0)] == awaiting(cluster)

    asyncio.run(scenario())


def test_a_coordinator_named_other_than_the_participants_own_is_refused(
    tmp_path: Path, unreachable: Callable[[], str]
) -> None:
    """--coordinator naming another coordinator than the participant's: the check asked that
    one, which cannot be reached here, and the force went on unchecked. A usage error now
    (exit 2, nothing forced or forgotten) naming both, for one that cannot be reached as for
    one that does not have the participant registered; its own, also under another name
    (one that has this participant and incarnation registered), is fine."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-r")
            await forced_unknown(cluster, "t-f", commit=False)
            own = cluster.coordinator_address
            another = CoordinatorServer(
                ServerConfig(data_dir=tmp_path / "another", listen="127.0.0.1:0")
            )
            await another.start()
            try:
                target = ["--address", cluster.address("inventory")]
                force = ["force", "t-r", "0", "--rollback", "--i-understand", *target]
                forget = ["branches", "forget", "t-f", "0", *target]
                for other, why in (
                    (unreachable(), "is not known (cannot reach the coordinator"),
                    (f"127.0.0.1:{another.port}", "does not have it registered (inventory"),
                ):
                    for command in (force, forget):
                        status, out, err = await dtm("--coordinator", other, *command)
                        assert (cli.EXIT_USAGE, "") == (status, out), (command, err)
                        assert f"--coordinator {other}" in err, err
                        assert f"coordinator at {own}" in err and why in err, err
            finally:
                await another.stop(0)
            assert BranchState.PREPARED is inventory_state(cluster, "t-r")
            assert [("t-f", 0)] == awaiting(cluster)

            port = own.rsplit(":", 1)[1]
            status, out, err = await dtm("--coordinator", f"localhost:{port}", *force)
            assert cli.EXIT_OK == status, err
            assert "branch t-r/0 forced to rolled_back" in out, out
            status, out, err = await dtm("--coordinator", own, *forget)
            assert cli.EXIT_OK == status, err
            assert "forgot forced branch t-f/0" in out, out

    asyncio.run(scenario())


def test_a_participant_that_cannot_tell_its_coordinator_needs_it_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elsewhere: str
) -> None:
    """A participant from before Describe (UNIMPLEMENTED), or with no coordinator configured:
    without --coordinator, the usage error as before, saying why; with it, the force goes
    on the operator's word, checked with that coordinator."""

    async def before_describe(self: AdminServicer, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    async def scenario(data: Path, why: str) -> None:
        async with InProcessCluster(data, participant_overrides=ASKS_LATER) as cluster:
            force = ["force", "t-fc", "0", "--commit", "--i-understand"]
            force += ["--address", cluster.address("inventory")]
            await prepared_unknown(cluster, "t-fc")
            status, out, err = await dtm(*force)
            assert (cli.EXIT_USAGE, "") == (status, out), err
            assert "--coordinator HOST:PORT" in err and why in err, err
            assert "cannot reach" not in err and elsewhere not in err, err

            named = ["--coordinator", cluster.coordinator_address]
            status, out, err = await dtm(*named, *force)
            assert (cli.EXIT_UNSAFE, "") == (status, out), err
            assert f"coordinator at {cluster.coordinator_address} has no record" in err, err
            assert BranchState.PREPARED is inventory_state(cluster, "t-fc")

    # Patched before the servers start: they take the servicer's methods then.
    with monkeypatch.context() as patched:
        patched.setattr(AdminServicer, "Describe", before_describe)
        asyncio.run(scenario(tmp_path / "old", "it answers Describe UNIMPLEMENTED"))
    with monkeypatch.context() as patched:
        describe_coordinator_as(patched, "")
        asyncio.run(scenario(tmp_path / "none", "it has none configured"))


def test_a_coordinator_at_the_participants_address_for_it_that_lacks_it_is_not_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The participant names its coordinator as its own machine reaches it (127.0.0.1:50050,
    say). From the operator's machine that address may reach another coordinator: a
    --coordinator other than the participant's is held to having it registered, the
    participant's own address was not, and the check asked that other one ("no record": a
    forced commit refused, a forced rollback let go, each on another coordinator's word).
    Refused now (usage, nothing forced) when what answers there does not have this
    participant and incarnation registered; named with --coordinator, it is the operator's
    word, as before."""

    async def scenario(another_address: str) -> None:
        async with InProcessCluster(tmp_path / "data", participant_overrides=ASKS_LATER) as cluster:
            await prepared_unknown(cluster, "t-w")
            force = ["force", "t-w", "0", "--i-understand", "--address"]
            force += [cluster.address("inventory")]
            for direction in ("--commit", "--rollback"):
                status, out, err = await dtm("--timeout", "5", *force, direction)
                assert (cli.EXIT_USAGE, "") == (status, out), err
                assert f"coordinator at {another_address}" in err, err
                assert "does not have it registered (inventory incarnation" in err, err
                assert "--coordinator HOST:PORT" in err, err
            assert BranchState.PREPARED is inventory_state(cluster, "t-w")

    async def with_another() -> None:
        another = CoordinatorServer(
            ServerConfig(data_dir=tmp_path / "another", listen="127.0.0.1:0")
        )
        await another.start()
        try:
            address = f"127.0.0.1:{another.port}"
            with monkeypatch.context() as patched:
                describe_coordinator_as(patched, address)
                await scenario(address)
        finally:
            await another.stop(0)

    asyncio.run(with_another())
