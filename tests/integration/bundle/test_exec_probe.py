"""A bundle whose readinessProbe is an exec command is refused by `bundle verify` and `bundle install`
(the same way the kubeconfig's exec plugin is): the command is never run and nothing live changes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from devkit import bundles as kit
from devkit.roots import make_root, tree_hash

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[3]


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def exec_bundle(tmp: Path, marker: Path) -> Path:
    mesh = yaml.safe_load(kit.MESH_YAML)
    mesh["defaultConfig"]["readinessProbe"] = {"exec": {"command": ["/bin/sh", "-c", f"id > {marker}"]}}
    return kit.write_dir(tmp / "vm", kit.files(time.time(), replace={"mesh.yaml": yaml.safe_dump(mesh).encode()}))


def test_verify_and_install_refuse_a_bundle_exec_probe(tmp_path: Path) -> None:
    marker = tmp_path / "probe-ran"
    src = exec_bundle(tmp_path, marker)
    layout = make_root(tmp_path)
    before = tree_hash(layout.root)
    want = ("mesh.yaml: defaultConfig.readinessProbe.exec: an exec probe from the mesh is refused "
            "(it would run a command on this machine)")

    r = agent("bundle", "verify", str(src))
    assert r.returncode == 1 and want in r.stderr, r.stderr
    r = agent("bundle", "install", "--root", str(layout.root), str(src))
    assert r.returncode == 1 and want in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert tree_hash(layout.root) == before
    assert not marker.exists()


def test_verify_accepts_it_when_agent_yaml_opts_in(tmp_path: Path) -> None:
    marker = tmp_path / "probe-ran"
    src = exec_bundle(tmp_path, marker)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"bundle:\n  source: {src}\n  allow_exec_probe: true\n")
    r = agent("bundle", "verify", "--config", str(cfg), str(src))
    assert r.returncode == 0, r.stderr
    assert not marker.exists()  # verifying never runs a probe
