"""A coordinator whose start is refused (a log it cannot replay, a port in use) lets go of
what it took, so that a process embedding it (a test, an in-process user) can start it again
on the same directory; and it resumes nothing before every port is bound."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtm.coordinator.server import CoordinatorServer, ServerConfig
from dtm.records import RecordType, ReplayError
from dtm.wal import WriteAheadLog
from dtmpb.v1 import coordinator_pb2, log_pb2


def log_directory(data_dir: Path) -> Path:
    return data_dir / "coordinator" / "wal"


def write_log(data_dir: Path, records: list[tuple[int, bytes]]) -> None:
    log, _ = WriteAheadLog.open(log_directory(data_dir))
    for record_type, payload in records:
        log.append(record_type, payload)
    log.sync()
    log.close()


def replayed(data_dir: Path) -> list[int]:
    """The record types of the log, read by a fresh open: LogInUseError if it is still held."""
    log, records = WriteAheadLog.open(log_directory(data_dir))
    log.close()
    return [record.record_type for record in records]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def a_commit_owed_phase_two() -> list[tuple[int, bytes]]:
    """A registered participant (at an address nobody serves) and a commit decision for it
    with no end record: a start resumes its phase 2."""
    participant = coordinator_pb2.ParticipantInfo(
        name="inventory", address="127.0.0.1:1", incarnation="i-1"
    )
    decided = log_pb2.CommitDecided(
        transaction_id="t-owed",
        branches=[log_pb2.DecisionBranch(branch=0, participant="inventory")],
        decided_at_unix_ms=1,
        fingerprint=b"fp",
    )
    return [
        (
            RecordType.PARTICIPANT_REGISTERED,
            log_pb2.ParticipantRegistered(participant=participant).SerializeToString(),
        ),
        (RecordType.COMMIT_DECIDED, decided.SerializeToString()),
    ]


@pytest.mark.parametrize("wal_sync", ["loop", "thread"])
def test_a_coordinator_whose_replay_fails_lets_go_of_its_log(tmp_path: Path, wal_sync: str) -> None:
    """Before, the refused start kept the log's directory lock, and the next start in the same
    process was refused "in use by another process (pid <itself>)" (LogInUseError). With
    wal_sync="thread" it also left its sync thread waiting for ever, one per refused start."""
    write_log(tmp_path, [(RecordType.COMMIT_DECIDED, b"\xff\xff\xff")])  # does not parse
    config = ServerConfig(data_dir=tmp_path, listen="127.0.0.1:0", wal_sync=wal_sync)
    syncing = {thread for thread in threading.enumerate() if thread.name == "dtm-wal-sync"}
    for _ in range(2):
        with pytest.raises(ReplayError, match="record at LSN 1 \\(COMMIT_DECIDED\\)"):
            CoordinatorServer(config)
    assert [RecordType.COMMIT_DECIDED] == replayed(tmp_path)  # released, and left as it was
    left = {thread for thread in threading.enumerate() if thread.name == "dtm-wal-sync"}
    assert set() == left - syncing


def test_a_coordinator_refused_its_port_can_start_again_on_its_directory(
    tmp_path: Path, held_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the refused start kept the log, and the start on another port was refused
    with LogInUseError naming this process."""

    async def scenario() -> None:
        refused = CoordinatorServer(
            ServerConfig(data_dir=tmp_path, listen=f"127.0.0.1:{held_port}")
        )
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{held_port}"):
            await refused.start()
        again = CoordinatorServer(ServerConfig(data_dir=tmp_path, listen="127.0.0.1:0"))
        assert await again.start() != held_port
        await again.stop(0)
        capsys.readouterr()
        await refused.stop()  # nothing is left to stop: no "coordinator stopping" line
        assert "coordinator stopping" not in capsys.readouterr().err

    asyncio.run(scenario())


def test_a_coordinator_refused_its_port_lets_go_of_its_metrics_port(
    tmp_path: Path, held_port: int
) -> None:
    """/metrics is bound first (a gRPC server lets go of its port only once started, an HTTP
    server at once), so a refused gRPC port must close it again."""

    async def scenario() -> None:
        refused = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path,
                listen=f"127.0.0.1:{held_port}",
                metrics_listen="127.0.0.1:0",
            )
        )
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{held_port}"):
            await refused.start()
        metrics_port = refused.metrics_port
        again = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path,
                listen="127.0.0.1:0",
                metrics_listen=f"127.0.0.1:{metrics_port}",
            )
        )
        await again.start()
        assert metrics_port == again.metrics_port
        await again.stop(0)

    asyncio.run(scenario())


def test_a_coordinator_refused_its_metrics_port_resumes_no_commit_and_lets_go_of_all(
    tmp_path: Path, held_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, phase 2 of the commits owed was resumed (and the log said "recovered commit:
    resuming phase 2") before /metrics was bound, and stayed resumed when it was refused; the
    gRPC port stayed bound (a gRPC server lets go of its port only once started) and the log
    held. Now the start binds every port before it resumes anything, and lets go of them."""
    write_log(tmp_path, a_commit_owed_phase_two())

    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))  # a port for gRPC, free again once closed
            grpc_port = probe.getsockname()[1]
        refused = CoordinatorServer(
            ServerConfig(
                data_dir=tmp_path,
                listen=f"127.0.0.1:{grpc_port}",
                metrics_listen=f"127.0.0.1:{held_port}",
            )
        )
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{held_port}"):
            await refused.start()
        assert not refused.engine.active
        assert "recovered commit" not in capsys.readouterr().err
        again = CoordinatorServer(ServerConfig(data_dir=tmp_path, listen=f"127.0.0.1:{grpc_port}"))
        assert grpc_port == await again.start()
        assert ["t-owed"] == list(again.engine.active)
        await again.stop(0)

    asyncio.run(scenario())


def test_a_sighup_stops_a_server_gracefully_as_a_sigterm_does(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal, or `kill -HUP` meant as a reload) killed a server at once,
    by its default action: no graceful stop, no stopping line (found by a bug hunt). It has
    no configuration to reload: SIGHUP stops it as SIGTERM does. A real process."""
    command = [sys.executable, "-m", "dtm.coordinator.server", "--listen", "127.0.0.1:0"]
    command += ["--data-dir", str(tmp_path / "data")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        assert server.stderr is not None
        lines = []
        for line in server.stderr:  # until it serves (or exits: the loop ends)
            lines.append(line)
            if "coordinator serving" in line:
                break
        assert "coordinator serving" in lines[-1], lines
        server.send_signal(signal.SIGHUP)
        rest = server.stderr.read()
        assert 0 == server.wait(timeout=60), rest
        assert "coordinator stopping" in rest, rest
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
