"""mesh-agent deprovision on a temporary root: what goes, what stays, and malformed hosts files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from agent import deprovision
from agent.bundle import store
from agent.bundle.hosts import HOSTS_BEGIN as BEGIN_MARKER
from agent.bundle.hosts import HOSTS_END as END_MARKER
from agent.bundle.hosts import DamagedBlock
from agent.paths import Layout

HOSTS = (f"127.0.0.1 localhost\n{BEGIN_MARKER}\n10.0.0.5 istiod.istio-system.svc\n{END_MARKER}\n"
         "192.168.1.9 build-server # the admin's own\n")


def populate(root: Path) -> Layout:
    layout = Layout(root=root)
    files = {
        "/etc/mesh-agent/agent.yaml": "bundle:\n  source: /srv/bundle.tar.gz\n",
        "/etc/hosts": HOSTS,
        "/var/lib/mesh-agent/bundle/cluster.env": "ISTIO_SERVICE_CIDR=*\n",
        "/var/lib/mesh-agent/bundle/istio-token": "eyJ-secret\n",
        "/var/lib/mesh-agent/maintenance": "{}\n",
        "/var/run/secrets/tokens/istio-token": "eyJ-secret\n",
        "/etc/certs/root-cert.pem": "ROOT\n",
        "/etc/certs/key.pem": "KEY\n",
        "/etc/certs/cert-chain.pem": "CHAIN\n",
        "/var/lib/istio/envoy/cluster.env": "ISTIO_SERVICE_CIDR=*\n",
        "/etc/istio/config/mesh": "defaultConfig: {}\n",
        "/run/mesh-agent/status.json": "{}\n",
        "/run/mesh-agent/sidecar.pid": "1234\n",
        "/etc/machine-id": "0123456789abcdef0123456789abcdef\n",
    }
    for path, text in files.items():
        target = layout.under(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return layout


def test_removes_instance_state_and_keeps_config_and_mesh_files(tmp_path: Path) -> None:
    layout = populate(tmp_path)
    hosts_inode = layout.etc_hosts.stat().st_ino
    layout.etc_hosts.chmod(0o644)

    done = deprovision.deprovision(layout)

    for gone in ("/var/lib/mesh-agent/bundle", "/var/run/secrets/tokens/istio-token", "/etc/certs/key.pem",
                 "/etc/certs/cert-chain.pem", "/run/mesh-agent/status.json", "/run/mesh-agent/sidecar.pid",
                 "/var/lib/mesh-agent/maintenance"):
        assert not layout.under(gone).exists(), gone
    for kept in ("/etc/mesh-agent/agent.yaml", "/etc/certs/root-cert.pem", "/var/lib/istio/envoy/cluster.env",
                 "/etc/istio/config/mesh", "/var/lib/mesh-agent", "/run/mesh-agent"):
        assert layout.under(kept).exists(), kept
    assert layout.under("/etc/machine-id").read_text().strip()  # only with machine_id=True
    assert layout.etc_hosts.read_text() == "127.0.0.1 localhost\n192.168.1.9 build-server # the admin's own\n"
    assert layout.etc_hosts.stat().st_ino == hosts_inode  # rewritten in place (bind mounts, owner, mode)
    assert layout.etc_hosts.stat().st_mode & 0o777 == 0o644
    assert len(done) == 8


def test_the_stored_bundles_go_with_the_link_to_the_last_good_one(tmp_path: Path) -> None:
    """As the installer keeps them: `bundle` links to a stored copy under bundles/, which holds the
    istio token's persistent copy. Nothing of the token may stay behind for an image."""
    layout = Layout(root=tmp_path)
    token = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ2bSJ9.c2lnbmF0dXJl\n"
    older = store.save(layout, {"istio-token": token, "cluster.env": b"A=1\n"}, {"version": "0123456789ab"})
    stored = store.save(layout, {"istio-token": token, "cluster.env": b"A=1\n"}, {"version": "0123456789ab"})
    store.commit(layout, stored)
    store.set_link(store.pending_link(layout), older)
    assert layout.last_good_bundle.is_symlink()

    done = deprovision.deprovision(layout)

    assert not os.path.lexists(layout.last_good_bundle) and not os.path.lexists(store.pending_link(layout))
    assert not store.bundles_dir(layout).exists()
    left = [p for p in layout.state.rglob("*") if p.is_file() and token.strip() in p.read_bytes()]
    assert left == [] and layout.state.is_dir()
    assert any("stored bundles" in line for line in done)


def test_second_run_has_nothing_to_do(tmp_path: Path) -> None:
    layout = populate(tmp_path)
    deprovision.deprovision(layout)
    assert deprovision.deprovision(layout) == []


def test_machine_id_emptied_on_request(tmp_path: Path) -> None:
    layout = populate(tmp_path)
    done = deprovision.deprovision(layout, machine_id=True)
    assert layout.machine_id.read_text() == ""
    assert any("machine-id" in line for line in done)


def test_missing_files_are_fine(tmp_path: Path) -> None:
    assert deprovision.deprovision(Layout(root=tmp_path)) == []


def test_malformed_hosts_block_removes_nothing(tmp_path: Path) -> None:
    layout = populate(tmp_path)
    broken = f"127.0.0.1 localhost\n{BEGIN_MARKER}\n10.0.0.5 istiod\n192.168.1.9 build-server\n"
    layout.etc_hosts.write_text(broken)
    with pytest.raises(DamagedBlock, match="damaged"):
        deprovision.deprovision(layout)
    assert layout.etc_hosts.read_text() == broken
    assert layout.last_good_bundle.exists()  # checked before anything was removed


def test_the_block_goes_by_the_installers_rule(tmp_path: Path) -> None:
    """CRLF lines, a block at the end without a newline (agent.bundle.hosts.split_block; its own tests
    hold the other cases, run against the postrm too)."""
    layout = populate(tmp_path)
    layout.etc_hosts.write_bytes(f"a\r\n{BEGIN_MARKER}\r\nx\r\n{END_MARKER}".encode())
    assert any("managed block" in line for line in deprovision.deprovision(layout))
    assert layout.etc_hosts.read_bytes() == b"a\r\n"


@pytest.mark.parametrize("text", [
    f"{END_MARKER}\n",
    f"{BEGIN_MARKER}\nx\n",
    f"{BEGIN_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n",
    f"a\n{BEGIN_MARKER}\nx\n{END_MARKER}\nb\n{BEGIN_MARKER}\ny\n{END_MARKER}\n",  # two blocks
])
def test_a_damaged_block_removes_nothing(tmp_path: Path, text: str) -> None:
    layout = populate(tmp_path)
    layout.etc_hosts.write_text(text)
    with pytest.raises(DamagedBlock):
        deprovision.deprovision(layout)
    assert layout.etc_hosts.read_text() == text
    assert layout.last_good_bundle.exists()


def test_cli_with_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    populate(tmp_path)
    args = argparse.Namespace(root=str(tmp_path), machine_id=False, force=False)
    assert deprovision.main(args) == 0
    out = capsys.readouterr().out
    assert "removed last good bundle" in out and "the configuration is kept" in out


def test_cli_malformed_hosts_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = populate(tmp_path)
    layout.etc_hosts.write_text(f"{BEGIN_MARKER}\n")
    args = argparse.Namespace(root=str(tmp_path), machine_id=False, force=False)
    assert deprovision.main(args) == 1
    assert "nothing was removed" in capsys.readouterr().err
