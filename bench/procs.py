"""Server processes the bench starts itself (baseline servers, extra service instances).

Each runs in its own session (own process group), like `dtm.cluster.Cluster`'s, so a stop
reaches it and whatever it spawned, and nothing else. Every process started here is stopped on
the way out, even when the run fails or is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

#: The project root: children run `python -m bench...` from here, so `bench` is importable
#: wherever the bench itself was started from.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 20
#: How often `announced` reads a log while it waits for a line.
LOG_POLL_S = 0.05


class ProcessError(RuntimeError):
    """A process the bench started exited early; the message ends with its log's tail."""


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._popen: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def spawn(
        self, name: str, module_args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> None:
        """Start `python -m <module_args...>` as `name`, output to LOG_DIR/<name>.log."""
        if name in self._popen:
            raise ValueError(f"{name} was already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as log:
            self._popen[name] = subprocess.Popen(
                [sys.executable, "-m", *module_args],
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
            )

    def pids(self) -> dict[str, int]:
        return {name: popen.pid for name, popen in self._popen.items()}

    def check_alive(self) -> None:
        """Raise ProcessError naming the first process that has exited."""
        for name, popen in self._popen.items():
            code = popen.poll()
            if code is not None:
                raise ProcessError(
                    f"{name} (pid {popen.pid}) exited with code {code}; "
                    f"{self.log_path(name)} ends with:\n{self.log_tail(name)}"
                )

    async def announced(self, name: str, pattern: re.Pattern[str], timeout_s: float) -> str:
        """The first group of the first match of `pattern` in `name`'s log (where a server
        says it has bound, say); ProcessError if it exits first, TimeoutError if nothing
        matches within `timeout_s`. The log is read again every LOG_POLL_S: a process
        announces nothing else the bench could wait on."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                found = pattern.search(self.log_path(name).read_text(errors="replace"))
            except OSError:
                found = None  # not written yet
            if found is not None:
                return found[1]
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{name} did not say {pattern.pattern!r} within {timeout_s:g} s; "
                    f"{self.log_path(name)} ends with:\n{self.log_tail(name)}"
                )
            await asyncio.sleep(LOG_POLL_S)

    def log_tail(self, name: str) -> str:
        try:
            lines = self.log_path(name).read_text(errors="replace").splitlines()
        except OSError as error:
            return f"    (no log: {error})"
        return "\n".join(f"    {line}" for line in lines[-LOG_TAIL_LINES:])

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every process group, SIGKILL those still running after `grace_s`."""
        for popen in self._popen.values():
            _signal_group(popen, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for popen in self._popen.values():
            try:
                popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(popen, signal.SIGKILL)
                popen.wait(timeout=grace_s)
        self._popen.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _signal_group(popen: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    if popen.poll() is not None:
        return
    # The child leads its own group (start_new_session); a vanished group is already stopped.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signum)
