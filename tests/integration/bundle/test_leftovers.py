"""What a crash or a full disk leaves behind: start-up (restore_last_good) and every install clear the
temp files the agent names itself, and nothing else; a full disk leaves nothing partial, and the message
says truly what was and was not put back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bundle.install import InstallError, install, restore_last_good
from agent.bundle.model import parse_bundle
from agent.bundle.store import last_good
from agent.paths import Layout
from devkit import bundles as kit
from devkit.roots import live_files, make_root

REPO = Path(__file__).resolve().parents[3]
NOW = time.time()


def bundle(lifetime: float = 3600.0):  # type: ignore[no-untyped-def]
    return parse_bundle(kit.files(NOW, replace={"istio-token": kit.make_token(NOW, lifetime=lifetime)}), NOW,
                        kit.config())


def plant(layout: Layout) -> tuple[list[Path], list[Path]]:
    """Leftovers of a killed install, and look-alikes that are not the agent's."""
    token_dir, env_dir = layout.istio_token.parent, layout.cluster_env.parent
    bundles = layout.state / "bundles"
    for d in (token_dir, env_dir, bundles):
        d.mkdir(parents=True, exist_ok=True)
    ours = [layout.etc_hosts.parent / ".hosts.k3j2h1g0.tmp", env_dir / ".cluster.env.a1b2c3d4.tmp",
            token_dir / ".istio-token.zz_9y8x7.tmp", layout.mesh_config.parent / ".mesh.0f0f0f0f.tmp"]
    layout.mesh_config.parent.mkdir(parents=True, exist_ok=True)
    for p in ours:
        p.write_bytes(b"half a token")
    store_tmp = bundles / ".0123456789ab-1764628800000000000.tmp"
    store_tmp.mkdir()
    (store_tmp / "istio-token").write_bytes(b"a full token copy")
    link_tmp = layout.state / ".bundle.pending.tmp"
    link_tmp.symlink_to("bundles/nowhere")
    theirs = [layout.etc_hosts.parent / ".hosts.keep", layout.etc_hosts.parent / "hosts.tmp",
              token_dir / ".other-token.a1b2c3d4.tmp", env_dir / ".cluster.env.tmp", bundles / "notes.tmp"]
    for p in theirs:
        p.write_bytes(b"not the agent's")
    return [*ours, store_tmp, link_tmp], theirs


def test_start_up_clears_the_agents_own_leftovers_only(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    install(bundle(), layout, source="t", fetched_at=NOW, user=None)
    ours, theirs = plant(layout)
    before = live_files(layout)
    assert restore_last_good(layout, user=None) is not None  # what the daemon runs at start
    assert [p for p in ours if os.path.lexists(p)] == []
    assert [p for p in theirs if not p.exists()] == []
    assert live_files(layout) == before


@pytest.mark.subprocess
def test_bundle_install_clears_them_too(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    ours, theirs = plant(layout)
    src = kit.write_dir(tmp_path / "vm", kit.files(NOW))
    r = subprocess.run([sys.executable, "-m", "agent", "bundle", "install", "--root", str(layout.root),
                        "--user", "nobody" if os.geteuid() == 0 else "unused", str(src)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [p for p in ours if os.path.lexists(p)] == []
    assert [p for p in theirs if not p.exists()] == []


@contextlib.contextmanager
def full_tmpfs(where: Path, size: str = "64k") -> Iterator[Path]:
    """A small tmpfs at `where`; the caller fills it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


@pytest.mark.root
def test_a_full_state_disk_leaves_no_half_stored_bundle(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    with full_tmpfs(layout.state):
        first = install(bundle(), layout, source="t", fetched_at=NOW, user=None).installed
        fill(layout.state)
        before = live_files(layout)
        with pytest.raises(InstallError) as err:
            install(bundle(lifetime=7200), layout, source="t", fetched_at=NOW, user=None)
        assert str(err.value).startswith(f"cannot store the bundle under {layout.state}: [Errno 28] No space")
        assert sorted(p.name for p in (layout.state / "bundles").iterdir()) == [first.path.name]  # type: ignore
        assert not (layout.state / "bundle.pending").exists()
        assert [p.name for p in layout.state.iterdir() if p.name.endswith(".tmp")] == []
        assert live_files(layout) == before
        assert last_good(layout) == first


@pytest.mark.root
def test_a_full_live_disk_puts_back_what_changed_and_says_so_truly(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    install(bundle(), layout, source="t", fetched_at=NOW, user=None)
    with full_tmpfs(tmp_path / "tokens"):
        # the token's directory is a full disk: the new token cannot be written, the old one is intact
        (tmp_path / "tokens/istio-token").write_bytes(layout.istio_token.read_bytes())
        (tmp_path / "tokens/istio-token").chmod(0o600)
        layout.istio_token.unlink()
        layout.istio_token.parent.rmdir()
        layout.istio_token.parent.symlink_to(tmp_path / "tokens")  # a link in a root-owned directory
        fill(tmp_path / "tokens")
        before = live_files(layout)
        with pytest.raises(InstallError) as err:
            install(bundle(lifetime=7200), layout, source="t", fetched_at=NOW, user=None)
        text = str(err.value)
        assert "No space left on device" in text and "\n" not in text
        assert text.endswith("; the previous files were put back"), text
        assert "rolling back also failed" not in text
        assert live_files(layout) == before
        assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["filler", "istio-token"]
        assert [p.name for p in (layout.state / "bundles").iterdir() if p.name.startswith(".")] == []
