"""Processes that pass for a cluster's (sleepers with its command line and pidfiles), the
lock `up`, `down` and the demo hold, and the processes started on a data dir, by /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from dtm import cluster
from dtm.cluster import MODULES


@contextlib.contextmanager
def sleeper(name: str, data_dir: Path, *, hung: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """A process that passes for `name` of the cluster in `data_dir`, with its pidfile;
    killed at the end whatever the test did to it. `hung`: SIGTERM does not stop it, as a
    server whose event loop is stuck (only SIGKILL does)."""
    data_dir = data_dir.resolve()
    code = "import time; print('running', flush=True); time.sleep(60)"
    if hung:
        code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + code
    command = [sys.executable, "-c", code, MODULES[name]]
    command += ["--listen", "127.0.0.1:1", "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, start_new_session=True)
    try:
        # Popen returns before the kernel has laid out the new program's arguments: until
        # then /proc/PID/cmdline reads empty and the sleeper passes for nothing (212 of 300
        # spawns looked so right after Popen). A test that looked before then found no
        # process of the cluster: under load, the likeliest cause of the one failure of
        # test_down_of_a_copied_data_dir_leaves_the_original_cluster_alone.
        assert process.stdout is not None
        assert process.stdout.readline() == b"running\n", "the sleeper did not start"
        (data_dir / "pids").mkdir(parents=True, exist_ok=True)
        (data_dir / "pids" / f"{name}.pid").write_text(f"{process.pid}\n")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


@contextlib.contextmanager
def held_lock(data_dir: Path) -> Iterator[None]:
    """DIR/cluster.lock held as another `up`, `down` or demo holds it."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "cluster.lock").open("w") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def processes_of(data_dir: Path) -> list[int]:
    """The pids of every process started with `--data-dir DATA_DIR` (by /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # Any program's arguments: not necessarily UTF-8.
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            args = raw.decode(errors="surrogateescape").split("\0")
        except OSError:
            continue
        if cluster._has_option(args, "--data-dir", str(data_dir.resolve())):
            found.append(int(entry))
    return found
