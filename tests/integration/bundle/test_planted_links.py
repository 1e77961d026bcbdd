"""Planted symbolic links and unsafe directories: `bundle fetch -o`, `bundle install` and the stored
bundles never write through a link, and every file written gets its mode whether or not it existed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bundle.install import InstallError, install
from agent.bundle.model import parse_bundle
from devkit import bundles as kit
from devkit.roots import live_files, make_root

pytestmark = pytest.mark.subprocess
REPO = Path(__file__).resolve().parents[3]
NOW = time.time()


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "bundle", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def root_only(tmp: Path) -> Path:
    secret = tmp / "shadow"
    secret.write_text("root:secret\n")
    secret.chmod(0o600)
    return secret


def test_fetch_output_replaces_a_planted_link_and_fixes_modes(tmp_path: Path) -> None:
    src = kit.write_dir(tmp_path / "vm", kit.files(NOW, extras=True))
    secret = root_only(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "kubeconfig").symlink_to(secret)
    (out / "istio-token").write_text("old token\n")
    (out / "istio-token").chmod(0o644)
    r = agent("fetch", "-o", str(out), str(src))
    assert r.returncode == 0, r.stderr
    assert secret.read_text() == "root:secret\n"
    assert not (out / "kubeconfig").is_symlink()
    assert (out / "kubeconfig").read_bytes() == (src / "kubeconfig").read_bytes()
    assert mode(out / "kubeconfig") == 0o600 and mode(out / "istio-token") == 0o600
    assert (out / "istio-token").read_bytes() == (src / "istio-token").read_bytes()
    assert mode(out / "cluster.env") == 0o644
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_install_replaces_a_link_planted_at_a_live_file(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    secret = root_only(tmp_path)
    layout.istio_token.parent.mkdir(parents=True)
    layout.istio_token.symlink_to(secret)
    layout.cluster_env.parent.mkdir(parents=True)
    layout.cluster_env.symlink_to(secret)
    bundle = parse_bundle(kit.files(NOW), NOW, kit.config())
    install(bundle, layout, source="test", fetched_at=NOW, user=None)
    assert secret.read_text() == "root:secret\n"
    assert not layout.istio_token.is_symlink() and mode(layout.istio_token) == 0o600
    assert layout.istio_token.read_bytes() == bundle.files["istio-token"]
    assert layout.cluster_env.read_bytes() == bundle.files["cluster.env"]


def test_install_refuses_a_world_writable_live_directory_and_changes_nothing(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    layout.root_cert.parent.mkdir(parents=True)
    layout.root_cert.parent.chmod(0o777)
    before = live_files(layout)
    r = agent("install", "--root", str(layout.root), "--user", "nobody",
              str(kit.write_dir(tmp_path / "vm", kit.files(NOW))))
    assert r.returncode == 1
    assert f"{layout.root_cert.parent}: writable by group or others (mode 0777): refusing to write under it" \
        in r.stderr, r.stderr
    assert "the previous files were put back" in r.stderr and "Traceback" not in r.stderr
    assert live_files(layout) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_install_refuses_a_live_directory_swapped_for_a_link_another_user_controls(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    layout.istio_token.parent.parent.mkdir(parents=True)
    layout.istio_token.parent.symlink_to(theirs)  # .../secrets/tokens -> a directory nobody owns
    with pytest.raises(InstallError, match="owned by uid 65534, not root"):
        install(parse_bundle(kit.files(NOW), NOW, kit.config()), layout, source="t", fetched_at=NOW, user=None)
    assert not list(theirs.iterdir())
