"""packaging/build-deb: the .deb's contents, lintian, and reproducibility. No root needed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import __version__
from tests.system.conftest import build_deb

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(900)]


def deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def deb_files(deb: Path) -> list[str]:
    out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    listing = subprocess.run(["tar", "-t"], input=out, capture_output=True, check=True).stdout.decode()
    return [p.removeprefix(".") for p in listing.splitlines()]


def test_contents_and_dependencies(deb: Path) -> None:
    assert deb.name == f"mesh-agent_{__version__}_all.deb"
    assert deb_field(deb, "Version") == __version__
    depends = {d.split()[0] for d in deb_field(deb, "Depends").split(", ")}
    assert {"python3-psutil", "python3-requests", "python3-kubernetes", "python3-yaml", "python3-systemd",
            "python3-watchdog"} <= depends
    files = deb_files(deb)
    assert "/usr/bin/mesh-agent" in files
    assert "/usr/lib/mesh-agent/agent/cli.py" in files
    assert "/usr/lib/mesh-agent/agent/deprovision.py" in files
    assert "/etc/mesh-agent/agent.yaml" in files
    assert "/lib/systemd/system/mesh-agent.service" in files
    assert "/usr/share/man/man8/mesh-agent.8.gz" in files
    assert not [f for f in files if "dist-packages" in f or "site-packages" in f]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    # The private directory holds the agent and its metadata: never devkit/, tests/, demo/ or bench/.
    top = {f.removeprefix("/usr/lib/mesh-agent/").split("/")[0] for f in files
           if f.startswith("/usr/lib/mesh-agent/")}
    assert {t for t in top if t and not t.endswith((".dist-info", ".egg-info"))} == {"agent"}
    # A new /usr/bin/python3 (a release upgrade) restarts a running agent onto it (test_dist_upgrade.py).
    triggers = subprocess.run(["dpkg-deb", "--info", str(deb), "triggers"], capture_output=True, text=True,
                              check=True).stdout
    assert "interest-noawait /usr/bin/python3" in triggers.splitlines()


def test_lintian_clean(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed")
    changes = next(deb.parent.glob("mesh-agent_*.changes"))
    p = subprocess.run(["lintian", "--fail-on", "warning", "--display-info", str(changes)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_two_builds_are_identical(deb: Path, tmp_path: Path) -> None:
    again = build_deb(tmp_path)
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(deb.read_bytes()).hexdigest()


def test_version_option_builds_a_newer_package(deb_next: Path) -> None:
    version = deb_field(deb_next, "Version")
    assert version != __version__
    assert subprocess.run(["dpkg", "--compare-versions", version, "gt", __version__]).returncode == 0
