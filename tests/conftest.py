"""Shared fixtures. Unit tests may not start real subprocesses unless marked `subprocess`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_subprocess_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "tests/unit" not in str(request.node.path) or request.node.get_closest_marker("subprocess"):
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unit tests may not run subprocesses; mark the test with @pytest.mark.subprocess")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
