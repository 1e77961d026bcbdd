"""A server that trickles its answer a byte at a time never times out between bytes; the overall deadline
(bundle.fetch_deadline, the sidecar package's fetch deadline) ends the fetch with one clear line, and
nothing live changes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.bundle.source import FetchError, fetch
from agent.paths import Layout
from agent.sidecar.package import Installer, PackageError, PackageSource
from devkit import bundles as kit
from devkit.bundleserver import serve
from devkit.roots import make_root, tree_hash

pytestmark = pytest.mark.timeout(60)  # without a deadline these fetches would run for days
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def server(tmp_path: Path):
    with serve(tmp_path) as srv:
        srv.state.body = kit.make_tar(kit.files(time.time()))
        yield srv


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_trickling_bundle_server_is_cut_at_the_deadline(server, path: str) -> None:
    cfg = kit.config(server.url + path, ca_file=str(server.ca_file), connect_timeout=2.0, read_timeout=5.0,
                     fetch_deadline=1.5)
    with pytest.raises(FetchError) as err:
        fetch(cfg, sleep=lambda s: None)
    assert str(err.value) == (f"{server.url}{path}: not fetched within bundle.fetch_deadline (1.5s); "
                              "the server is too slow or trickles its answer")
    assert server.state.trickled >= 2  # it really was trickling, and each gap was under read_timeout


def test_bundle_install_from_a_trickling_server_changes_nothing(server, tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    before = tree_hash(layout.root)
    config = tmp_path / "agent.yaml"
    config.write_text(f"root: {layout.root}\nbundle:\n  source: {server.url}/trickle\n"
                      f"  ca_file: {server.ca_file}\n  read_timeout: 5s\n  fetch_deadline: 2s\n")
    r = subprocess.run([sys.executable, "-m", "agent", "bundle", "install", "--config", str(config)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=50)
    assert r.returncode == 1, r.stderr
    assert "cannot fetch the bundle:\n  " in r.stderr
    assert "not fetched within bundle.fetch_deadline (2s)" in r.stderr and "Traceback" not in r.stderr
    assert tree_hash(layout.root) == before


def test_a_trickling_package_server_is_cut_at_the_deadline(server, tmp_path: Path) -> None:
    inst = Installer(Layout(root=tmp_path / "root"), verify=str(server.ca_file), fetch_timeout=(2.0, 5.0),
                     fetch_deadline=1.5)
    source = PackageSource(server.url + "/trickle", "1.0", hashlib.sha256(b"").hexdigest())
    with pytest.raises(PackageError) as err:
        inst.fetch(source)
    assert str(err.value) == (f"cannot fetch the sidecar package from {server.url}/trickle: not fetched "
                              "within 1.5s; the server is too slow or trickles its answer")
    assert not list(inst.cache_dir.iterdir())  # no partial download left behind


def test_a_fast_server_is_unaffected(server) -> None:
    cfg = kit.config(server.url + "/bundle.tar.gz", ca_file=str(server.ca_file), fetch_deadline=1.5)
    assert "cluster.env" in fetch(cfg).files


def test_a_package_download_cut_short_by_a_crash_is_removed_on_the_next_fetch(tmp_path: Path) -> None:
    deb = tmp_path / "pkg.deb"
    deb.write_bytes(b"not really a package, but pinned by its digest")
    inst = Installer(Layout(root=tmp_path / "root"))
    inst.cache_dir.mkdir(parents=True)
    stale = [inst.cache_dir / "istio-sidecar_1.0.deb.part", inst.cache_dir / "istio-sidecar_0.9.deb.part"]
    for p in stale:
        p.write_bytes(b"half a package")
    keep = inst.cache_dir / "other_1.0.deb.part"
    keep.write_bytes(b"not ours")
    got = inst.fetch(PackageSource(str(deb), "1.1", hashlib.sha256(deb.read_bytes()).hexdigest()))
    assert got.read_bytes() == deb.read_bytes()
    assert [p for p in stale if p.exists()] == [] and keep.exists()
