"""The loyalty example (examples/loyalty/): a fifth service written from README.md's "Writing a
new participant", whose code block is the example file itself, so the docs cannot drift from
what these tests run. Its operation type is compiled from examples/loyalty/loyalty.proto here,
as the README tells a developer to."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_tools import protoc

from dtm.coordinator import server as coordinator_server
from dtmpb.v1 import coordinator_pb2
from tests.harness import STOCK, InProcessCluster, eventually

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "loyalty"
COMMITTED, ABORTED = coordinator_pb2.OUTCOME_COMMITTED, coordinator_pb2.OUTCOME_ABORTED


def compile_proto(out: Path) -> None:
    """What the README's line does: `python -m grpc_tools.protoc -I. --python_out=. ...`."""
    assert 0 == protoc.main(["protoc", f"-I{EXAMPLE}", f"--python_out={out}", "loyalty.proto"])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loyalty-generated")
    compile_proto(out)
    return out


@pytest.fixture(scope="module")
def example(generated: Path) -> Iterator[ModuleType]:
    sys.path.insert(0, str(generated))
    try:
        spec = importlib.util.spec_from_file_location(
            "loyalty_service", EXAMPLE / "loyalty_service.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(generated))


def readme_example() -> str:
    """The first python block of README.md's "Writing a new participant"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Writing a new participant", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_shows_the_example_as_it_is() -> None:
    assert (EXAMPLE / "loyalty_service.py").read_text(encoding="utf-8") == readme_example()


async def submit(
    cluster: InProcessCluster, request: coordinator_pb2.SubmitRequest
) -> coordinator_pb2.SubmitResponse:
    response: coordinator_pb2.SubmitResponse = await cluster.client.Submit(request, timeout=30)
    return response


def test_orders_with_points_commit_abort_and_survive_a_restart(
    tmp_path: Path, example: ModuleType
) -> None:
    async def scenario() -> None:
        loyalty = example.Loyalty()
        async with InProcessCluster(tmp_path, extra_services=[loyalty]) as cluster:
            committed = await submit(cluster, example.order_with_points("o-1", "m-alice", 35))
            assert COMMITTED == committed.outcome, committed.reason

            frozen = await submit(cluster, example.order_with_points("o-2", "m-frozen", 35))
            assert ABORTED == frozen.outcome
            assert "loyalty refused: member m-frozen is frozen" in frozen.reason

            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await submit(cluster, example.order_with_points("o-3", "m-alice", 0))
            assert grpc.StatusCode.INVALID_ARGUMENT is invalid.value.code()
            assert "points must be > 0" in (invalid.value.details() or "")

            # Escrow, no lock: a member's concurrent orders all commit.
            answers = await asyncio.gather(
                *(
                    submit(cluster, example.order_with_points(f"o-c{n}", "m-bob", 1))
                    for n in range(8)
                )
            )
            assert [COMMITTED] * 8 == [answer.outcome for answer in answers]

            async def applied() -> bool:  # phase 2 goes on after the client's answer
                return {"m-alice": 35, "m-bob": 8, "m-frozen": 0} == loyalty.points

            await eventually(applied)
            # Only the committed orders took stock: the frozen member's order left none held.
            stock = await cluster.stock()
            assert STOCK["sku-apple"] - 9 == stock["sku-apple"].available
            assert 0 == stock["sku-apple"].reserved

            restarted = example.Loyalty()
            await cluster.restart_participant("loyalty", restarted)
            assert {"m-alice": 35, "m-bob": 8, "m-frozen": 0} == restarted.points
            assert {} == restarted.awards

    asyncio.run(scenario())


#: A file for the coordinator and every service, loyalty's section declared.
SHARED_CONFIGURATION = """
[services]
custom = ["loyalty"]

[coordinator]
listen = "127.0.0.1:50090"

[loyalty]
max_points = 40
"""


@pytest.mark.slow
def test_the_example_runs_as_its_own_process(
    tmp_path: Path, generated: Path, example: ModuleType
) -> None:
    """The README's command line: the example started as a script, against a coordinator,
    with a configuration file every process may share: a section [loyalty] of its own setting
    (before, every process refused "unknown section [loyalty]")."""
    shared = tmp_path / "dtm.toml"
    shared.write_text(SHARED_CONFIGURATION, encoding="utf-8")
    assert "127.0.0.1:50090" == coordinator_server.parse_args(["--config", str(shared)]).listen

    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "cluster") as cluster:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("DTM_")},
                "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "generated", generated))),
            }
            with (tmp_path / "loyalty.log").open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(EXAMPLE / "loyalty_service.py"),
                    *("--config", str(shared)),
                    *("--coordinator", cluster.coordinator_address),
                    *("--data-dir", str(tmp_path / "loyalty")),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            try:

                async def registered() -> bool:
                    listed = await cluster.client.ListParticipants(
                        coordinator_pb2.ListParticipantsRequest()
                    )
                    assert process.returncode is None, (tmp_path / "loyalty.log").read_text()
                    return any(p.name == "loyalty" for p in listed.participants)

                await eventually(registered, timeout_s=30)
                answer = await submit(cluster, example.order_with_points("o-1", "m-alice", 35))
                assert COMMITTED == answer.outcome, answer.reason
                with pytest.raises(grpc.aio.AioRpcError) as too_many:  # [loyalty] max_points
                    await submit(cluster, example.order_with_points("o-2", "m-alice", 41))
                assert grpc.StatusCode.INVALID_ARGUMENT is too_many.value.code()
                assert "at most 40 points per order" in (too_many.value.details() or "")
                await submitted_by_the_cli(cluster.coordinator_address, tmp_path)
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                assert 0 == await asyncio.wait_for(process.wait(), 30), (
                    tmp_path / "loyalty.log"
                ).read_text()

    asyncio.run(scenario())


async def submitted_by_the_cli(coordinator: str, tmp_path: Path) -> None:
    """`dtm submit` of a loyalty branch, by a `dtm` without the generated module: it learns
    loyalty.v1.AwardPoints from the loyalty process's server reflection. Before, the file was
    refused as "unknown message type 'loyalty.v1.AwardPoints' (... loyalty takes
    loyalty.v1.AwardPoints ...)"."""
    award = {"member_id": "m-bob", "order_id": "o-cli", "points": 5}
    branch = {"participant": "loyalty", "type": "loyalty.v1.AwardPoints", "operation": award}
    order = tmp_path / "order.json"
    # Two branches of the type: it is asked for once (the second is the first's description).
    order.write_text(json.dumps({"transaction_id": "t-cli", "branches": [branch, branch]}))
    status, out = await cli("--coordinator", coordinator, "submit", str(order))
    assert (0, True) == (status, "transaction t-cli: COMMITTED" in out), out

    # The type is known, but not to the participant the branch names: said so.
    misplaced = {**branch, "participant": "payment"}
    order.write_text(json.dumps({"transaction_id": "t-cli-2", "branches": [misplaced]}))
    status, out = await cli("--coordinator", coordinator, "submit", str(order))
    assert 1 == status, out
    assert "payment does not take message type 'loyalty.v1.AwardPoints' (" in out, out


async def cli(*args: str) -> tuple[int, str]:
    """`python -m dtm.cli ARGS` in its own process, whose descriptor pool has only dtm's
    types (this one has loyalty_pb2's); its exit status and output."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DTM_")},
        "PYTHONPATH": os.pathsep.join(map(str, (ROOT, ROOT / "generated"))),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dtm.cli",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()
