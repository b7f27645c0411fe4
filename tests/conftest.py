"""Fixtures of every test."""

from __future__ import annotations

import os

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
