"""Upgrading from the previous release: its .deb, built from its own commit, replaced by this tree's.

On Debian 12 the VM stays in the mesh through the upgrade (same entry, one proxy, the admin's
configuration kept). On Debian 13 the previous release could not register (its Kubernetes client
handling refused python3-kubernetes 30.1's apply); the upgrade is how such a VM gets into the mesh.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.kubeapi.server import KubeAPI
from tests.system.conftest import NEXT_VERSION, REPO, build_deb, needs_daemon, require_root
from tests.system.machine import Machine
from tests.system.test_lifecycle import CONFIG, HOSTS, UNIT, World, _inputs, _registered

# The last commit of release 0.1.0, the first one published.
PREVIOUS_RELEASE = "3f27d0d3ce49748951b984edfe0b63336b5c2876"

pytestmark = [pytest.mark.system, needs_daemon, pytest.mark.timeout(1800)]


@pytest.fixture(scope="session")
def deb_previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's .deb, built from its commit in this repository's history."""
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
                           capture_output=True, check=False)
    if known.returncode != 0:
        pytest.skip(f"the previous release ({PREVIOUS_RELEASE[:12]}) is not in this clone's history")
    tmp = tmp_path_factory.mktemp("previous")
    src = tmp / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_RELEASE],
                             capture_output=True, check=True, timeout=120)
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True, timeout=120)
    return build_deb(tmp / "out", tree=src)


@pytest.fixture(params=["bookworm", "trixie"])
def previous(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             deb_previous: Path) -> Iterator[World]:
    """A booted machine with the previous release installed and configured."""
    require_root()
    tmp = tmp_path_factory.mktemp(f"upgrade-{request.param}")
    api = KubeAPI(state_dir=tmp / "kubeapi").start()
    try:
        with Machine.boot(request.param, tmp / "machine") as m:
            m.apt_update()
            m.write("/etc/hosts", HOSTS)
            w = World(m, api, deb_previous)
            m.install_deb(deb_previous)  # first: it brings python3, which the sample app needs too
            _inputs(w)
            m.write(CONFIG, w.good_config, mode=0o640)
            yield w
    finally:
        api.stop()


def _upgrade(w: World, deb: Path) -> None:
    # The shipped agent.yaml changed between the releases and the admin edited theirs: keep the admin's,
    # as unattended-upgrades does (an interactive apt asks).
    inside = f"/root/{deb.name}"
    w.m.copy_in(deb, inside)
    w.m.run(["apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", inside], timeout=600)


def test_upgrade_from_the_previous_release(previous: World, deb_next: Path) -> None:
    w, m = previous, previous.m
    if m.suite == "bookworm":
        m.systemctl("enable", "--now", UNIT, timeout=200)
        _registered(w)
        uid = w.entry()["metadata"]["uid"]  # type: ignore[index]
    else:
        m.systemctl("enable", "--now", "--no-block", UNIT)
        uid = None
    _upgrade(w, deb_next)
    _registered(w)
    assert m.run(["mesh-agent", "version"]).stdout.strip() == f"mesh-agent {NEXT_VERSION}"
    assert m.read(CONFIG) == w.good_config  # the admin's configuration is kept
    entry = w.entry()
    assert entry is not None, m.journal(UNIT, lines=60)
    if uid is not None:
        assert entry["metadata"]["uid"] == uid, "the entry was withdrawn during the upgrade"
    assert len(w.envoys()) == 1
    # And the new release's own behaviour is there: reload answers through `mesh-agent reload`.
    m.systemctl("reload", UNIT, timeout=90)
    assert w.status()["reload"]["ok"] is True
