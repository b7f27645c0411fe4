"""Fixtures of every test."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(autouse=True)
def no_dtm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own DTM_* variables (a coordinator address, TLS files, a config file)
    must not leak into a test: every test that runs the `dtm` CLI read them (with
    DTM_CONFIG=/nonexistent set, test_heuristics' CLI test failed). A module-scoped fixture
    that starts processes runs before this one, and clears them itself (test_trace)."""
    for name in list(os.environ):
        if name.startswith("DTM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def unreachable() -> Iterator[Callable[[], str]]:
    """Addresses where nothing listens, for as long as the test runs. Each port stays bound,
    not listening: a connection is refused, and no server can bind it meanwhile (a port only
    probed free and let go could be bound by any server asking for port 0 before the test
    dialled it, on a machine running other tests)."""
    with contextlib.ExitStack() as held:

        def address() -> str:
            port = held.enter_context(socket.socket())
            port.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{port.getsockname()[1]}"

        yield address
