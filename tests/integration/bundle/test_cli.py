"""`mesh-agent bundle fetch|verify|show|install`, run as the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit import bundles as kit
from devkit.bundleserver import serve
from devkit.roots import make_root

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[3]
NOW = time.time()
USER = "nobody" if os.geteuid() == 0 else "unused"


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MESH_AGENT_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "agent", "bundle", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_verify_good_and_bad(tmp_path: Path) -> None:
    good = kit.write_dir(tmp_path / "good", kit.files(NOW, extras=True))
    r = agent("verify", str(good))
    assert r.returncode == 0, r.stderr
    assert "ok, bundle" in r.stdout

    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(kit.make_tar(kit.files(NOW, replace={
        "istio-token": kit.make_token(NOW, ns="other"), "cluster.env": b"A=$(x)\n"})))
    r = agent("verify", str(archive))
    assert r.returncode == 1
    assert "the bundle is invalid" in r.stderr and "cluster.env:1: A: unquoted '$'" in r.stderr
    assert "subject must be" not in r.stderr  # POD_NAMESPACE is unknown: no false comparison

    r = agent("verify", "https://127.0.0.1:1/x.tar.gz")
    assert r.returncode == 2 and "offline" in r.stderr


def test_show_redacts_the_token(tmp_path: Path) -> None:
    files = kit.files(NOW, extras=True)
    src = kit.write_dir(tmp_path / "vm", files)
    token = files["istio-token"].decode()
    for extra in ([], ["--json"]):
        r = agent("show", *extra, str(src))
        assert r.returncode == 0, r.stderr
        assert token.split(".")[1] not in r.stdout and token.split(".")[2] not in r.stdout
        assert "not-a-real-token" not in r.stdout
        assert "[REDACTED]" in r.stdout
    data = json.loads(agent("show", "--json", str(src)).stdout)
    assert data["env"]["SERVICE_ACCOUNT"] == kit.SA and data["probe"]["http_get"]["port"] == 8080


def test_install_then_show_installed(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    src = kit.write_dir(tmp_path / "vm", kit.files(NOW))
    r = agent("install", "--root", str(layout.root), "--user", USER, str(src))
    assert r.returncode == 0, r.stderr
    assert "installed bundle" in r.stdout
    assert layout.cluster_env.read_bytes() == kit.CLUSTER_ENV_V4.encode()
    r = agent("install", "--root", str(layout.root), "--user", USER, str(src))
    assert r.returncode == 0 and "already installed" in r.stdout
    r = agent("show", "--root", str(layout.root), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == str(src)


def test_install_failure_exit_code(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    r = agent("install", "--root", str(layout.root), str(tmp_path / "missing"))
    assert r.returncode == 1 and "cannot fetch the bundle" in r.stderr
    assert not layout.cluster_env.exists()


def test_fetch_over_https_with_config_file(tmp_path: Path) -> None:
    with serve(tmp_path) as srv:
        srv.state.body = kit.make_tar(kit.files(NOW))
        conf = tmp_path / "agent.yaml"
        conf.write_text(f"bundle:\n  source: {srv.url}/bundle.tar.gz\n  ca_file: {srv.ca_file}\n"
                        "  read_timeout: 2s\n")
        out = tmp_path / "saved"
        r = agent("fetch", "--config", str(conf), "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert (out / "cluster.env").read_bytes() == kit.CLUSTER_ENV_V4.encode()
        assert (out / "istio-token").stat().st_mode & 0o777 == 0o600
        r = agent("fetch", str(srv.url) + "/bundle.tar.gz")  # no CA: system CAs refuse the test CA
        assert r.returncode == 1 and "TLS verification failed" in r.stderr


def test_bad_config_file_is_exit_78(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text("bundle:\n  sourse: x\n")
    r = agent("verify", "--config", str(conf), str(tmp_path))
    assert r.returncode == 78 and "agent.yaml:2" in r.stderr
