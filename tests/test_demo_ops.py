"""`python -m dtm.demo` as an operator runs it: its data dir, its lock, its signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from dtm import demo
from dtm.cluster import COORDINATOR, Cluster
from tests.processes import held_lock, processes_of, sleeper


def run_demo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = demo.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_the_demo_refuses_the_data_dir_of_a_running_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo on the data dir `up` serves took over its pidfiles, failed, and its stop left
    the cluster running and out of reach of `down` (found by a bug hunt)."""
    with sleeper(COORDINATOR, tmp_path) as process:
        status, _, err = run_demo(capsys, "--data-dir", str(tmp_path))
        assert [process.pid] == processes_of(tmp_path), "the demo left servers running"
        assert 2 == status, err
        assert f"holds a running cluster (coordinator (pid {process.pid}))" in err
        assert "dtm.cluster down --data-dir" in err and "Traceback" not in err
        assert process.poll() is None
        assert f"{process.pid}\n" == (tmp_path / "pids" / "coordinator.pid").read_text()


def test_the_demo_waits_for_no_one_holding_its_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with held_lock(tmp_path):
        status, out, err = run_demo(capsys, "--data-dir", str(tmp_path))
    assert (2, "") == (status, out)
    assert "another dtm.cluster command is running on" in err
    assert not (tmp_path / "pids").exists()


def test_a_data_dir_that_cannot_be_one_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    for data_dir, why in (
        (tmp_path / "file", "File exists"),
        (tmp_path / "file" / "x", "Not a directory"),
    ):
        status, out, err = run_demo(capsys, "--data-dir", str(data_dir))
        assert (2, "") == (status, out)
        # The level of the path that is a file, not Python's "[Errno 17] File exists: ...".
        named = f"{why} ({tmp_path / 'file'} is a file)"
        assert f"demo: cannot use {data_dir} as the data dir: {named}" in err, err
        assert 1 == len(err.strip().splitlines())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_ends_the_orders_at_an_await_not_inside_whatever_code_runs(signum: int) -> None:
    """SIGTERM raised _Signalled wherever the main thread was: inside grpc's C code (an
    aio channel being made), the demo died of SIGSEGV instead, no `finally` ran, and its
    five servers were left running (2 of 12 SIGTERMs here). The orders now end at their
    next await, by cancellation, and _Signalled (KeyboardInterrupt for Ctrl-C) is raised
    once they have unwound."""
    steps: list[int] = []

    async def orders() -> None:
        signal.raise_signal(signum)
        for step in range(1000):  # where the handler used to raise
            steps.append(step)
        await asyncio.sleep(60)
        steps.append(-1)

    ending = KeyboardInterrupt if signum == signal.SIGINT else demo._Signalled
    with demo._signals_exit():
        with pytest.raises(ending) as stopped:
            demo._run_until_signalled(orders())
        # The handlers of the rest of the demo are back.
        assert demo._raise_signalled is signal.getsignal(signal.SIGTERM)
        assert signal.default_int_handler is signal.getsignal(signal.SIGINT)
    if signum != signal.SIGINT:
        assert isinstance(stopped.value, demo._Signalled)
        assert 128 + signum == stopped.value.status
    assert list(range(1000)) == steps


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_demo_ended_by_a_signal_stops_its_servers(tmp_path: Path, signum: int) -> None:
    """SIGTERM (`timeout`, CI) or SIGHUP (a closed terminal) killed the demo without its
    `finally`, leaving all five servers running with fault injection on; Ctrl-C ended in a
    KeyboardInterrupt traceback (found by a bug hunt). Each now stops the servers and ends
    with one line."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dtm.demo", "--data-dir", str(tmp_path)]
    demo_process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment, text=True
    )
    try:
        assert demo_process.stdout is not None
        for line in demo_process.stdout:  # until the servers run
            if "all healthy and registered" in line:
                break
        else:
            pytest.fail(f"the demo did not start: {demo_process.communicate()}")
        servers = [pid for pid in processes_of(tmp_path) if pid != demo_process.pid]
        assert len(servers) == 5
        demo_process.send_signal(signum)
        _, err = demo_process.communicate(timeout=60)
    finally:
        if demo_process.poll() is None:
            demo_process.kill()
            demo_process.wait()
        left = processes_of(tmp_path)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert [] == left, "servers left running"
    assert 128 + signum == demo_process.returncode, err
    assert "Traceback" not in err
    assert "its servers are stopped" in err.strip().splitlines()[-1]


def fake_run(status: int) -> Callable[[Path], int]:
    """In place of demo._run: the servers' logs written, then `status` (0 PASS, 1 FAIL), or
    a SIGTERM arriving (-1)."""

    def run(data_dir: Path) -> int:
        logs = Cluster(data_dir).logs_dir
        logs.mkdir(parents=True)
        (logs / "coordinator.log").write_text("what the run said\n")
        if status < 0:
            raise demo._Signalled(signal.SIGTERM)
        return status

    return run


@pytest.mark.parametrize(
    ("status", "flags", "kept"),
    [
        (0, [], False),
        (1, [], True),
        (0, ["--keep-logs"], True),
        (1, ["--keep-logs"], True),
        (-1, [], True),
    ],
    ids=["pass", "fail", "pass --keep-logs", "fail --keep-logs", "signal"],
)
def test_the_temporary_data_dir_is_removed_after_a_pass_only(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    flags: list[str],
    kept: bool,
) -> None:
    """Every demo left its temporary data dir behind ("logs kept in DIR"), filling /tmp. A
    PASS removes it now; a FAIL or a signal keeps it, and says where; --keep-logs keeps it
    after a PASS too."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo, "_run", fake_run(status))
    code, out, err = run_demo(capsys, *flags)
    assert (143 if status < 0 else status) == code, err
    left = list(tmp_path.glob("dtm-demo-*"))
    assert kept == bool(left), left
    if not kept:
        assert "its temporary data dir is removed (--keep-logs keeps it)" in out
        return
    [data_dir] = left
    assert "what the run said\n" == (data_dir / "logs" / "coordinator.log").read_text()
    said = f"logs kept in {data_dir / 'logs'}"
    assert said in (err if status < 0 else out), (out, err)


def test_a_data_dir_given_is_never_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "_run", fake_run(0))
    code, out, _ = run_demo(capsys, "--data-dir", str(tmp_path / "mine"))
    assert 0 == code
    assert (tmp_path / "mine" / "logs" / "coordinator.log").exists()
    assert f"logs kept in {tmp_path / 'mine' / 'logs'}" in out
