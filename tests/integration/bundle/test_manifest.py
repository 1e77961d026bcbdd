"""What the agent wrote outside its own directories is recorded when the installer writes, and
`mesh-agent deprovision --all` and the package's postrm on purge remove exactly that."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent import deprovision, manifest
from agent.bundle import hosts
from agent.bundle.install import install
from agent.bundle.model import parse_bundle
from agent.bundle.source import fetch
from agent.paths import Layout
from devkit import bundles as kit
from devkit.roots import ORIGINAL_HOSTS, tree_hash

REPO = Path(__file__).resolve().parents[3]
POSTRM = REPO / "debian" / "mesh-agent.postrm"
NOW = time.time()
ADMIN_PEM = b"an admin's own certificate\n"


def vm_root(tmp: Path) -> Layout:
    """A root shaped like a Debian system before the agent ran: /etc/hosts, /var/lib, /run, /var/run,
    and a file of the admin's own in /etc/certs."""
    root = tmp / "root"
    for d in ("etc/certs", "var/lib", "run"):
        (root / d).mkdir(parents=True)
    (root / "var/run").symlink_to("../run")
    (root / "etc/hosts").write_bytes(ORIGINAL_HOSTS)
    (root / "etc/certs/admin.pem").write_bytes(ADMIN_PEM)
    return Layout(root=root)


def install_bundle(tmp: Path, layout: Layout, now: float = NOW) -> None:
    src = kit.write_dir(tmp / f"bundle-{now}", kit.files(now))
    bundle = parse_bundle(fetch(kit.config(str(src))).files, now, kit.config())
    install(bundle, layout, source=str(src), fetched_at=now, user=None)


def purge(layout: Layout) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DPKG_ROOT": str(layout.root)}
    return subprocess.run(["sh", "-e", str(POSTRM), "purge"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_installer_records_what_it_writes(tmp_path: Path) -> None:
    layout = vm_root(tmp_path)
    install_bundle(tmp_path, layout)
    m = manifest.load(layout)
    assert m.files == {"/etc/certs/root-cert.pem": manifest.sha256(layout.root_cert.read_bytes()),
                       "/etc/istio/config/mesh": manifest.sha256(layout.mesh_config.read_bytes()),
                       "/var/lib/istio/envoy/cluster.env": manifest.sha256(layout.cluster_env.read_bytes()),
                       "/var/run/secrets/tokens/istio-token": manifest.sha256(layout.istio_token.read_bytes())}
    # Only what it created: /etc/certs was there already.
    assert sorted(m.dirs) == ["/etc/istio", "/etc/istio/config", "/var/lib/istio", "/var/lib/istio/envoy",
                              "/var/run/secrets", "/var/run/secrets/tokens"]
    assert m.hosts == "/etc/hosts" and m.markers == (hosts.HOSTS_BEGIN, hosts.HOSTS_END)
    # A new bundle updates the hashes.
    install_bundle(tmp_path, layout, NOW + 60)
    assert manifest.load(layout).files["/var/run/secrets/tokens/istio-token"] == \
        manifest.sha256(layout.istio_token.read_bytes())


def test_the_markers_are_said_in_one_place() -> None:
    assert hosts.HOSTS_BEGIN not in POSTRM.read_text()  # the postrm reads them from the manifest
    assert hosts.HOSTS_END not in POSTRM.read_text()


@pytest.mark.parametrize("how", ["deprovision --all", "postrm purge"])
def test_everything_written_goes_and_nothing_else(tmp_path: Path, how: str) -> None:
    layout = vm_root(tmp_path)
    before = tree_hash(layout.root)
    install_bundle(tmp_path, layout)
    (layout.certs_dir / "key.pem").write_bytes(b"KEY\n")  # what pilot-agent writes: the instance's
    (layout.certs_dir / "cert-chain.pem").write_bytes(b"CHAIN\n")
    if how == "postrm purge":
        out = purge(layout)
        assert out.returncode == 0, out.stderr
        # The workload key and certificate are not the agent's: the package leaves them (deprovision
        # removes them); everything else is as before the agent ran.
        (layout.certs_dir / "key.pem").unlink()
        (layout.certs_dir / "cert-chain.pem").unlink()
    else:
        done = deprovision.deprovision(layout, everything=True, owned=lambda _vm: False)
        assert f"removed {layout.root_cert}" in done and f"removed {layout.cluster_env}" in done
        assert not manifest.manifest_path(layout).exists()  # nothing left to remember
        # The agent's own state directory is the package's to remove.
        shutil.rmtree(layout.state)
    assert layout.etc_hosts.read_bytes() == ORIGINAL_HOSTS
    assert (layout.certs_dir / "admin.pem").read_bytes() == ADMIN_PEM
    assert tree_hash(layout.root) == before, sorted(str(p.relative_to(layout.root))
                                                    for p in layout.root.rglob("*"))


@pytest.mark.parametrize("how", ["deprovision --all", "postrm purge"])
def test_a_file_changed_since_the_agent_wrote_it_is_left(tmp_path: Path, how: str) -> None:
    layout = vm_root(tmp_path)
    install_bundle(tmp_path, layout)
    layout.mesh_config.write_text("# the admin's own mesh config\n")
    hosts_inode = layout.etc_hosts.stat().st_ino
    if how == "postrm purge":
        out = purge(layout)
        assert out.returncode == 0, out.stderr
        assert f"left {layout.mesh_config}: changed since mesh-agent wrote it" in out.stderr
    else:
        done = deprovision.deprovision(layout, everything=True, owned=lambda _vm: False)
        assert f"left {layout.mesh_config}: changed since mesh-agent wrote it" in done
        assert manifest.load(layout).files.keys() == {"/etc/istio/config/mesh"}  # still recorded
    assert layout.mesh_config.read_text() == "# the admin's own mesh config\n"
    assert layout.mesh_config.parent.is_dir()
    assert not layout.root_cert.exists() and not layout.cluster_env.exists()
    assert layout.etc_hosts.read_bytes() == ORIGINAL_HOSTS
    assert layout.etc_hosts.stat().st_ino == hosts_inode  # rewritten in place


def test_a_file_a_package_owns_is_left(tmp_path: Path) -> None:
    layout = vm_root(tmp_path)
    install_bundle(tmp_path, layout)
    done = deprovision.deprovision(layout, everything=True,
                                   owned=lambda vm: vm == "/var/lib/istio/envoy/cluster.env")
    assert f"left {layout.cluster_env}: a Debian package owns it" in done
    assert layout.cluster_env.exists() and not layout.root_cert.exists()
    assert manifest.load(layout).files.keys() == {"/var/lib/istio/envoy/cluster.env"}


def test_damaged_markers_leave_the_hosts_file_alone_on_purge(tmp_path: Path) -> None:
    layout = vm_root(tmp_path)
    install_bundle(tmp_path, layout)
    damaged = layout.etc_hosts.read_bytes().replace(hosts.HOSTS_END.encode() + b"\n", b"")
    layout.etc_hosts.write_bytes(damaged)
    out = purge(layout)
    assert out.returncode == 0, out.stderr
    assert "its marker lines are damaged" in out.stderr
    assert layout.etc_hosts.read_bytes() == damaged
    assert not layout.root_cert.exists()


def test_purge_without_a_manifest_removes_only_the_agents_directories(tmp_path: Path) -> None:
    layout = vm_root(tmp_path)
    before = tree_hash(layout.root)
    (layout.state / "bundle").mkdir(parents=True)
    out = purge(layout)
    assert out.returncode == 0, out.stderr
    assert tree_hash(layout.root) == before
    assert os.path.lexists(layout.root / "var/run")


@pytest.mark.parametrize("how", ["deprovision --all", "postrm purge"])
def test_the_proxys_log_goes_whatever_it_holds(tmp_path: Path, how: str) -> None:
    """The proxy's log file (sidecar.log_dir) is created by the agent and appended to by the proxy."""
    layout = vm_root(tmp_path)
    before = tree_hash(layout.root)
    log = layout.under("/var/log/istio/istio-proxy.log")
    manifest.record(layout, dirs=manifest.missing_dirs(log.parent), logs=[log])
    log.parent.mkdir(parents=True)
    log.write_text("a proxy's lines\n")
    if how == "postrm purge":
        assert purge(layout).returncode == 0
    else:
        assert f"removed {log}" in deprovision.deprovision(layout, everything=True, owned=lambda _vm: False)
        shutil.rmtree(layout.state)
    assert tree_hash(layout.root) == before
