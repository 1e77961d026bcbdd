"""The sidecar package: built with dpkg-deb, holding the real Envoy, installed into a throwaway root."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.paths import Layout
from agent.sidecar import profiles
from agent.sidecar.machine import State
from agent.sidecar.package import Installer, PackageError, PackageFailed, PackageInstalled, PackageJob, PackageSource
from agent.sidecar.supervisor import Supervisor
from devkit.envoy import bootstrap, envoy_binary, sidecar_config
from devkit.ports import free_port

from .helpers import Loop

pytestmark = [
    pytest.mark.subprocess, pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root installs need root"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb"),
]

UNIT = """[Unit]
Description=istio-sidecar: The Istio sidecar
[Service]
ExecStart=/usr/local/bin/istio-start.sh
Restart=always
[Install]
WantedBy=multi-user.target
"""


def build_deb(out: Path, version: str, with_envoy: bool) -> Path:
    """A small istio-sidecar .deb: the real Envoy (or not), a stand-in pilot-agent, istio.service."""
    stage = out / f"stage-{version}"
    (stage / "DEBIAN").mkdir(parents=True)
    (stage / "DEBIAN/control").write_text(
        f"Package: istio-sidecar\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@example.com>\n"
        "Description: Istio sidecar for tests\n")
    bin_dir = stage / "usr/local/bin"
    bin_dir.mkdir(parents=True)
    if with_envoy:
        shutil.copy2(envoy_binary(), bin_dir / "envoy")
    (bin_dir / "pilot-agent").write_text(f"#!/bin/sh\necho pilot-agent {version}\n")
    (bin_dir / "pilot-agent").chmod(0o755)
    (stage / "lib/systemd/system").mkdir(parents=True)
    (stage / "lib/systemd/system/istio.service").write_text(UNIT)
    (stage / "var/lib/istio/envoy").mkdir(parents=True)
    (stage / "var/lib/istio/envoy/sidecar.env").write_text("# all comments\n")
    deb = out / f"istio-sidecar_{version}_all.deb"
    # No compression: the Envoy binary is large, and speed matters more than size here.
    subprocess.run(["dpkg-deb", "-Znone", "--root-owner-group", "--build", str(stage), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(stage)
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    return {"1.0.0": build_deb(out, "1.0.0", with_envoy=True), "1.1.0": build_deb(out, "1.1.0", False)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty dpkg database, and istio.service enabled as an admin might have left it."""
    r = tmp_path / "vm"
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc/systemd/system/multi-user.target.wants"):
        (r / d).mkdir(parents=True)
    (r / "var/lib/dpkg/status").touch()
    (r / "etc/systemd/system/multi-user.target.wants/istio.service").symlink_to(
        "/lib/systemd/system/istio.service")
    return r


def test_install_from_a_path_then_idempotent_then_upgrade(root: Path, debs: dict[str, Path]) -> None:
    layout = Layout(root=root)
    inst = Installer(layout)
    assert inst.installed_version() is None
    v1 = PackageSource(str(debs["1.0.0"]), "1.0.0", sha(debs["1.0.0"]))
    outcome = inst.ensure(v1)
    assert (outcome.action, outcome.version, outcome.previous) == ("installed", "1.0.0", None)
    assert inst.installed_version() == "1.0.0"
    envoy = root / "usr/local/bin/envoy"
    version = subprocess.run([str(envoy), "--version"], capture_output=True, text=True, check=True)
    assert "1.40" in version.stdout
    # istio.service was enabled; the agent runs the sidecar, so it is disabled now.
    assert not (root / "etc/systemd/system/multi-user.target.wants/istio.service").exists()
    assert (root / "lib/systemd/system/istio.service").exists()

    before = envoy.stat().st_mtime_ns
    assert inst.ensure(v1).action == "unchanged"
    assert envoy.stat().st_mtime_ns == before

    v2 = PackageSource(f"file://{debs['1.1.0']}", "1.1.0", sha(debs["1.1.0"]))
    outcome = inst.ensure(v2)
    assert (outcome.action, outcome.version, outcome.previous) == ("installed", "1.1.0", "1.0.0")
    assert (root / "usr/local/bin/pilot-agent").read_text().endswith("pilot-agent 1.1.0\n")
    assert [p.name for p in inst.cache_dir.iterdir()] == ["istio-sidecar_1.1.0.deb"]


def test_the_installed_envoy_runs_under_the_supervisor(root: Path, debs: dict[str, Path],
                                                       tmp_path: Path) -> None:
    Installer(Layout(root=root)).ensure(PackageSource(str(debs["1.0.0"]), "1.0.0", sha(debs["1.0.0"])))
    admin = free_port()
    (tmp_path / "bootstrap.json").write_text(bootstrap(admin))
    cfg = sidecar_config(tmp_path, admin, envoy_binary=str(root / "usr/local/bin/envoy"))
    spec = profiles.envoy_profile(cfg, (tmp_path / "bootstrap.json").read_text())
    loop = Loop()
    sup = Supervisor(spec, Layout(root=root), loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    finally:
        sup.stop(drain=False)


def test_a_wrong_sha256_is_refused_before_use(root: Path, debs: dict[str, Path]) -> None:
    inst = Installer(Layout(root=root))
    with pytest.raises(PackageError, match=r"sha256 [0-9a-f]{64}, expected 0000"):
        inst.ensure(PackageSource(str(debs["1.1.0"]), "1.1.0", "0" * 64))
    assert inst.installed_version() is None
    assert list(inst.cache_dir.iterdir()) == []
    # A package that is not the one announced is refused too.
    with pytest.raises(PackageError, match=r"holds istio-sidecar 1\.1\.0, not istio-sidecar 2\.0"):
        inst.ensure(PackageSource(str(debs["1.1.0"]), "2.0", sha(debs["1.1.0"])))
    assert inst.installed_version() is None


@pytest.fixture
def http_server(debs: dict[str, Path]) -> Iterator[str]:
    directory = debs["1.1.0"].parent
    handler = partial(SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http_and_a_missing_package(root: Path, debs: dict[str, Path],
                                                   http_server: str) -> None:
    inst = Installer(Layout(root=root))
    deb = debs["1.1.0"]
    assert inst.ensure(PackageSource(f"{http_server}/{deb.name}", "1.1.0", sha(deb))).action == "installed"
    with pytest.raises(PackageError, match="HTTP 404"):
        inst.ensure(PackageSource(f"{http_server}/nope.deb", "1.2.0", "1" * 64))
    assert inst.installed_version() == "1.1.0"


class Posted:
    """A post callback that also records which thread posted."""

    def __init__(self) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self.threads: list[threading.Thread] = []

    def __call__(self, event: object) -> None:
        self.threads.append(threading.current_thread())
        self.events.put(event)

    def one(self) -> object:
        event = self.events.get(timeout=150)
        assert self.events.empty()
        return event


def test_package_job_installs_in_a_worker_thread_and_posts_installed(root: Path, debs: dict[str, Path]) -> None:
    inst = Installer(Layout(root=root))
    source = PackageSource(str(debs["1.0.0"]), "1.0.0", sha(debs["1.0.0"]))
    posted = Posted()
    job = PackageJob(inst, source, posted)
    job.start()
    job.start()   # once only
    event = posted.one()
    assert isinstance(event, PackageInstalled) and event.source == source
    assert (event.outcome.action, event.outcome.version, event.outcome.previous) == ("installed", "1.0.0", None)
    assert job.join(10) and not job.running
    assert posted.threads and all(t is not threading.main_thread() for t in posted.threads)
    assert posted.events.empty()
    assert inst.installed_version() == "1.0.0"
    assert (root / "usr/local/bin/envoy").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/istio.service").exists()

    # The same version again: unchanged, still posted.
    again = Posted()
    PackageJob(inst, source, again).start()
    event = again.one()
    assert isinstance(event, PackageInstalled) and event.outcome.action == "unchanged"


def test_package_job_posts_failed_and_installs_nothing(root: Path, debs: dict[str, Path]) -> None:
    inst = Installer(Layout(root=root))
    source = PackageSource(str(debs["1.1.0"]), "1.1.0", "0" * 64)
    posted = Posted()
    job = PackageJob(inst, source, posted)
    job.start()
    event = posted.one()
    assert isinstance(event, PackageFailed) and event.source == source
    assert "has sha256" in event.error and "expected 0000" in event.error and "refusing it" in event.error
    assert job.join(10)
    assert inst.installed_version() is None
    assert list(inst.cache_dir.iterdir()) == []


def test_package_job_reports_an_unexpected_error_too(tmp_path: Path, debs: dict[str, Path]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("a file where the root should be\n")
    source = PackageSource(str(debs["1.1.0"]), "1.1.0", sha(debs["1.1.0"]))
    posted = Posted()
    PackageJob(Installer(Layout(root=not_a_dir)), source, posted).start()
    event = posted.one()
    assert isinstance(event, PackageFailed)
    assert event.error.startswith("ensuring istio-sidecar 1.1.0 failed: ") and "Not a directory" in event.error
