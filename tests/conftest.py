"""Fixtures several test modules use by name (`pytest.mark.usefixtures`)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def no_dtm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own DTM_* variables (a coordinator address, TLS files, a config file)
    must not leak into a test of the CLI or the configuration."""
    for name in list(os.environ):
        if name.startswith("DTM_"):
            monkeypatch.delenv(name)
