"""Bad input at the edges found by a bug hunt (the CLI, start-up, --initial, Submit and
registration): each case failed on the code before its fix."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from dtmpb.v1 import coordinator_pb2, shop_pb2
from tests.harness import InProcessCluster, pack

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("DTM_")}, "PYTHONPATH": str(ROOT)}


def run(*args: str | bytes, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, env=ENV, cwd=ROOT, timeout=timeout
    )


async def run_async(*args: str | bytes) -> tuple[int, str]:
    """A subprocess while in-process servers keep serving on this loop: (status, stderr+out)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=ENV,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, (err + out).decode(errors="replace")


# ---- 1. a listen host the IDNA codec refuses: traceback instead of "cannot listen on" ----


@pytest.mark.parametrize(
    "flags",
    [
        ["--listen", "a..b:0"],  # a typo: two dots
        ["--listen", "x" * 64 + ".example:0"],  # a DNS label over 63 characters
        ["--listen", "127.0.0.1:0", "--metrics-listen", "a..b:0"],
    ],
)
def test_a_listen_address_gRPC_cannot_bind_is_one_line_not_a_traceback(
    tmp_path: Path, flags: list[str]
) -> None:
    done = run("-m", "dtm.coordinator.server", "--data-dir", str(tmp_path), *flags)
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr, stderr[-600:]
    assert done.returncode == 1
    assert "cannot listen on" in stderr or "cannot serve metrics on" in stderr, stderr


def test_a_participant_listen_address_gRPC_cannot_bind_is_one_line(tmp_path: Path) -> None:
    done = run(
        "-m",
        "participants.services.inventory",
        "--data-dir",
        str(tmp_path),
        "--listen",
        "a..b:0",
        "--coordinator",
        "127.0.0.1:1",
    )
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr, stderr[-600:]
    assert done.returncode == 1


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="gRPC binds localhost to one address here")
def test_a_listen_name_half_of_whose_addresses_another_process_holds_is_refused(
    tmp_path: Path,
) -> None:
    """gRPC binds localhost:P to [::1]:P and 127.0.0.1:P and succeeds if either binds: with a
    participant on 127.0.0.1:P, a coordinator told localhost:P said "coordinator serving
    port=P" on [::1] alone, and a client of localhost:P could reach either (found by a bug
    hunt). It is refused, naming the address held."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = run(
            "-m",
            "dtm.coordinator.server",
            "--data-dir",
            str(tmp_path),
            "--listen",
            f"localhost:{port}",
        )
    stderr = done.stderr.decode()
    assert 1 == done.returncode, stderr[-600:]
    assert f"cannot listen on localhost:{port}: 127.0.0.1:{port} is in use" in stderr, stderr


# ---- 2. `dtm --coordinator HOST:PORT` with a port over 65535: gRPC wraps it ----


def test_cli_refuses_a_port_over_65535_instead_of_dialing_it_modulo_65536(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            port = int(cluster.coordinator_address.rsplit(":", 1)[1])
            wrapped = f"127.0.0.1:{port + 65536}"
            status, said = await run_async(
                "-m", "dtm.cli", "--timeout", "5", "--coordinator", wrapped, "participants"
            )
            # On the current code: exit 0, the real coordinator's four participants listed,
            # as if a coordinator at 127.0.0.1:<port + 65536> had answered. The same value in
            # [participant] coordinator is refused: "expected host:port with port 1..65535".
            assert status == 2, f"status {status}: {said}"
            assert "65535" in said

    asyncio.run(scenario())


# ---- 3. `dtm --timeout 1e10`: every call fails at once, blaming the timeout ----


def test_cli_a_huge_timeout_is_refused_or_works_never_fails_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            status, said = await run_async(
                "-m",
                "dtm.cli",
                "--timeout",
                "1e10",
                "--coordinator",
                cluster.coordinator_address,
                "txn",
                "list",
            )
            # On the current code: exit 1 at once, "did not answer within 1e+10 s (try a
            # longer --timeout)": the deadline overflows gRPC's clock and is already past.
            assert "did not answer within" not in said, said
            assert status in (0, 2), said

    asyncio.run(scenario())


# ---- 4. invalid Unicode on the command line or in a submit file: a traceback ----


@pytest.mark.parametrize(
    "args",
    [
        [b"txn", b"show", b"t\xff"],
        [b"txn", b"retry", b"t\xff"],
        [b"participants", b"remove", b"p\xff"],
        [b"heuristics", b"forget", b"t\xff", b"0"],
        [b"branches", b"forget", b"t\xff", b"0", b"--address", b"127.0.0.1:1"],
        [b"--coordinator", b"\xff:1", b"txn", b"list"],
    ],
)
def test_cli_non_utf8_arguments_are_a_one_line_error(args: list[bytes]) -> None:
    done = run("-m", "dtm.cli", "--timeout", "1", *args)
    stderr = done.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-400:]
    assert stderr.startswith("dtm: error:") or "usage:" in stderr


@pytest.mark.parametrize("field", ["transaction_id", "participant", "type"])
def test_cli_submit_file_with_a_lone_surrogate_is_a_one_line_error(
    tmp_path: Path, field: str
) -> None:
    # "\ud800" is a valid JSON escape (json.loads accepts it), not a valid string for protobuf.
    branch = {"participant": "inventory", "type": "dtm.v1.ReserveStock", "operation": {}}
    document = '{"transaction_id": "t-1", "branches": [BRANCH]}'
    if field == "transaction_id":
        document = document.replace('"t-1"', '"t\\ud800"')
    else:
        branch[field] = branch[field] + "SURROGATE"
    text = document.replace("BRANCH", str(branch).replace("'", '"')).replace("SURROGATE", "\\ud800")
    path = tmp_path / "submit.json"
    path.write_text(text)
    done = run(
        "-m", "dtm.cli", "--timeout", "1", "--coordinator", "127.0.0.1:1", "submit", str(path)
    )
    stderr = done.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-400:]
    assert stderr.startswith("dtm: error:")


# ---- 5. --initial nested too deeply: a traceback (the CLI's submit handles the same) ----


def test_initial_file_nested_too_deeply_is_a_usage_error(tmp_path: Path) -> None:
    from participants.services.catalog import split_initial_arg

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit):  # on the current code: RecursionError
        split_initial_arg(["--initial", str(path)])


# ---- 6. a timeout_ms of 1..10 is accepted but can never succeed ----


def test_a_timeout_too_short_to_send_a_prepare_is_refused_or_honoured(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            operation = pack(
                shop_pb2.ReserveStock(lines=[shop_pb2.StockLine(sku="sku-apple", quantity=1)])
            )
            request = coordinator_pb2.SubmitRequest(
                branches=[
                    coordinator_pb2.BranchRequest(participant="inventory", operation=operation)
                ],
                timeout_ms=10,
            )
            try:
                answer = await cluster.client.Submit(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "timeout_ms" in (error.details() or "")
                return
            # On the current code: ABORTED, "one-phase answer lost: its prepare deadline
            # passed before its batched call left; rolled back": never sent, yet "lost", and
            # a probe Rollback spent on it. Every timeout_ms <= 10 ends so (batched
            # participants drop a prepare with less than PREPARE_SEND_MARGIN_S = 10 ms left).
            assert answer.outcome == coordinator_pb2.OUTCOME_COMMITTED, answer.reason

    asyncio.run(scenario())


# ---- 7. a registration whose operation types can never match ----


def test_registration_refuses_an_operation_type_that_can_never_match(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            request = coordinator_pb2.RegisterParticipantRequest(
                name="warehouse",
                address="127.0.0.1:9",
                capabilities=coordinator_pb2.Capabilities(
                    # A type URL, not a message name: Submit compares the name after the last
                    # "/", so no operation can ever match and every Submit is refused.
                    operation_types=["type.googleapis.com/dtm.v1.ReserveStock"]
                ),
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await cluster.client.RegisterParticipant(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("h:65535", False),
        ("h:00080", False),
        ("h:000065536", True),
        ("h:0", True),
        ("h:0000000080", True),
    ],
)
def test_cli_port_bounds_ignore_leading_zeros(address: str, refused: bool) -> None:
    """A review found 000065536 accepted (gRPC dials it modulo 65536) and 0000000080
    refused: the first eight characters were read as the port. The flags now check as the
    settings do (config.ADDRESS): a port of more than five digits is refused whatever its
    value, with the settings' message, rather than misread."""
    import argparse

    from dtm.cli import _address

    if refused:
        with pytest.raises(argparse.ArgumentTypeError):
            _address(address)
    else:
        assert address == _address(address)
