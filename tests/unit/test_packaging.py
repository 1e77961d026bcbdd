"""Packaging facts checked without building: versions agree, the unit keeps its contract."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from agent import __version__
from agent.config_cli import is_configured

REPO = Path(__file__).resolve().parents[2]


def test_changelog_version_matches_the_package() -> None:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"mesh-agent \(([^)]+)\) ", first)
    assert m, first
    assert m.group(1) == __version__
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_the_wheel_and_the_deb_ship_the_agent_only() -> None:
    """pybuild builds the .deb from the same setuptools settings: devkit/, tests/, demo/, bench/ stay out."""
    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "agent" in shipped
    assert {name.split(".")[0] for name in shipped} == {"agent"}
    assert "devkit" in find_packages(str(REPO))  # the check above would see it if it were included


def test_man_page_version_matches() -> None:
    assert f'"mesh-agent {__version__}"' in (REPO / "packaging" / "mesh-agent.8").read_text()


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / "mesh-agent.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_contract() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/bin/mesh-agent run"]
    assert s["ExecReload"] == ["/usr/bin/mesh-agent reload"]  # waits for the answer; no procps needed
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["TimeoutStopSec"] == ["90s"]
    assert s["ExecCondition"] == ["/usr/bin/mesh-agent config is-configured"]
    assert "ProtectProc" not in s  # psutil must see the app's process (see docs/operations.md)
    # ExecCondition runs in the sandbox: a missing path must not make it fail (any failure skips).
    paths = " ".join(s["ReadWritePaths"]).split()
    assert paths and all(p.startswith("-") for p in paths)


def test_shipped_example_is_not_configured() -> None:
    assert not is_configured((REPO / "packaging" / "agent.yaml.example").read_text())


@pytest.mark.parametrize("text, configured", [
    ("", False),
    ("# only\n# comments\n", False),
    ("---\n", False),
    ("bundle:\n  source: /srv/b.tar.gz\n", True),
    ("no_such_key: 1\n", True),  # wrong, but configured: `run` reports it (exit 78)
    ("bundle: [unclosed\n", True),  # broken YAML too
    ("configured: false\nbundle: {source: /srv/b}\n", False),
    ("configured: true\nbundle: {source: /srv/b}\n", True),
])
def test_is_configured(text: str, configured: bool) -> None:
    assert is_configured(text) is configured
