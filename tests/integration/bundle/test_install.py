"""Installing bundles into a root prefix: layout, modes, /etc/hosts block, last good copy, rollback,
crash recovery, restore at boot, tamper detection."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent import fsutil
from agent.bundle import store
from agent.bundle.hosts import HOSTS_BEGIN, HOSTS_END, block_lines
from agent.bundle.install import InstallError, drifted, install, restore_last_good
from agent.bundle.model import parse_bundle
from agent.bundle.source import fetch
from agent.bundle.store import last_good
from agent.paths import Layout
from devkit import bundles as kit
from devkit.roots import ORIGINAL_HOSTS, live_files, make_root, tree_hash

REPO = Path(__file__).resolve().parents[3]
NOW = time.time()
USER = "nobody" if os.geteuid() == 0 else None  # a user that exists; ownership needs root


def load(tmp: Path, name: str, files: dict[str, bytes]):  # -> Bundle
    src = kit.write_dir(tmp / name, files)
    fetched = fetch(kit.config(str(src)))
    return parse_bundle(fetched.files, NOW, kit.config()), str(src)


def do_install(layout: Layout, bundle, source: str = "test", **kw):  # -> InstallResult
    return install(bundle, layout, source=source, fetched_at=NOW, user=USER, **kw)


@pytest.mark.parametrize("ipv6", [False, True])
def test_istioctl_directory_installs_into_istio_layout(tmp_path: Path, ipv6: bool) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW, ipv6=ipv6)
    bundle, src = load(tmp_path, "vm", files)
    result = do_install(layout, bundle, src)

    assert layout.cluster_env.read_bytes() == files["cluster.env"]  # byte-identical
    assert layout.mesh_config.read_bytes() == files["mesh.yaml"]
    assert layout.root_cert.read_bytes() == files["root-cert.pem"]
    assert layout.istio_token.read_bytes() == files["istio-token"]
    assert layout.istio_token.stat().st_mode & 0o777 == 0o600
    assert layout.cluster_env.stat().st_mode & 0o777 == 0o644
    hosts = layout.etc_hosts.read_bytes()
    assert hosts.startswith(ORIGINAL_HOSTS)
    want = (kit.HOSTS_V6 if ipv6 else kit.HOSTS_V4).strip()
    assert hosts[len(ORIGINAL_HOSTS):].decode() == f"{HOSTS_BEGIN}\n{want}\n{HOSTS_END}\n"
    assert set(result.changed) == {"cluster.env", "mesh.yaml", "root-cert.pem", "istio-token", "hosts"}
    if USER:
        import pwd

        nobody = pwd.getpwnam("nobody")
        assert layout.istio_token.stat().st_uid == nobody.pw_uid and result.ownership_applied
    else:
        assert not result.ownership_applied

    good = last_good(layout)
    assert good is not None and good.digest == bundle.digest and good.source == src
    assert good.token_expiry == bundle.token_expiry and good.fetched_at == NOW
    assert (layout.last_good_bundle / "istio-token").read_bytes() == files["istio-token"]
    assert (layout.last_good_bundle / "istio-token").stat().st_mode & 0o777 == 0o600
    assert drifted(layout) == []

    again = do_install(layout, bundle, src)
    assert again.changed == ()


def test_hosts_block_is_replaced_never_appended_twice(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    a, _ = load(tmp_path, "a", kit.files(NOW))
    canary = b"192.0.2.99 istiod-canary.istio-system.svc\n"
    b, _ = load(tmp_path, "b", kit.files(NOW, replace={"hosts": canary}))
    do_install(layout, a)
    # an admin adds a line after our block: it must survive
    with layout.etc_hosts.open("ab") as f:
        f.write(b"10.9.9.9 added.later\n")
    do_install(layout, b)
    text = layout.etc_hosts.read_bytes()
    assert text.count(HOSTS_BEGIN.encode()) == 1
    assert b"192.0.2.10" not in text and b"192.0.2.99 istiod-canary" in text
    assert text.startswith(ORIGINAL_HOSTS) and text.endswith(b"10.9.9.9 added.later\n")
    empty, _ = load(tmp_path, "c", kit.files(NOW, replace={"hosts": b""}))
    do_install(layout, empty)
    assert layout.etc_hosts.read_bytes() == ORIGINAL_HOSTS + b"10.9.9.9 added.later\n"


def test_hosts_on_a_bind_mount_is_rewritten_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = make_root(tmp_path)
    inode = layout.etc_hosts.stat().st_ino
    real = fsutil._rename

    def replace(dir_fd: int, src: str, dst: str) -> None:
        if dst == "hosts" and os.fstat(dir_fd).st_ino == layout.etc_hosts.parent.stat().st_ino:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real(dir_fd, src, dst)

    monkeypatch.setattr(fsutil, "_replace", replace)
    bundle, _ = load(tmp_path, "vm", kit.files(NOW))
    result = do_install(layout, bundle)
    assert result.hosts_in_place
    assert layout.etc_hosts.stat().st_ino == inode
    assert block_lines(layout.etc_hosts.read_bytes()) == [kit.HOSTS_V4.strip()]
    assert not [p for p in layout.etc_hosts.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.subprocess
@pytest.mark.root
def test_hosts_on_a_real_bind_mount(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    layout = make_root(tmp_path)
    outside = tmp_path / "real-hosts"
    outside.write_bytes(ORIGINAL_HOSTS)
    if subprocess.run(["mount", "--bind", str(outside), str(layout.etc_hosts)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        bundle, _ = load(tmp_path, "vm", kit.files(NOW))
        assert do_install(layout, bundle).hosts_in_place
        assert outside.read_bytes() == ORIGINAL_HOSTS + (
            f"{HOSTS_BEGIN}\n{kit.HOSTS_V4}{HOSTS_END}\n").encode()
    finally:
        subprocess.run(["umount", str(layout.etc_hosts)], check=False)


def test_damaged_markers_refuse_before_touching_anything(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    layout.etc_hosts.write_bytes(ORIGINAL_HOSTS + HOSTS_BEGIN.encode() + b"\n1.2.3.4 x\n")
    before = tree_hash(layout.root)
    bundle, _ = load(tmp_path, "vm", kit.files(NOW))
    with pytest.raises(InstallError, match="marker lines are damaged"):
        do_install(layout, bundle)
    assert tree_hash(layout.root) == before


@pytest.mark.parametrize("fail_after", ["cluster.env", "mesh.yaml", "root-cert.pem", "istio-token", "hosts"])
def test_failure_midway_puts_the_old_bundle_back(tmp_path: Path, fail_after: str) -> None:
    layout = make_root(tmp_path)
    old, _ = load(tmp_path, "old", kit.files(NOW))
    do_install(layout, old)
    before = tree_hash(layout.root)
    new_files = kit.files(NOW + 1, ipv6=True)
    new, _ = load(tmp_path, "new", new_files)

    def hook(name: str) -> None:
        if name == fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InstallError, match=r"No space left on device.*previous files were put back"):
        do_install(layout, new, hook=hook)
    assert tree_hash(layout.root) == before
    good = last_good(layout)
    assert good is not None and good.digest == old.digest


def test_failure_on_first_install_leaves_no_live_files(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    bundle, _ = load(tmp_path, "vm", kit.files(NOW))

    def hook(name: str) -> None:
        if name == "root-cert.pem":
            raise OSError(errno.EIO, "I/O error")

    with pytest.raises(InstallError):
        do_install(layout, bundle, hook=hook)
    live = live_files(layout)
    assert live["etc/hosts"] == ORIGINAL_HOSTS
    assert [k for k, v in live.items() if v is not None] == ["etc/hosts"]
    assert last_good(layout) is None


CRASHER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from agent.bundle.install import install
    from agent.bundle.model import parse_bundle
    from agent.bundle.source import fetch
    from agent.config import BundleConfig
    from agent.paths import Layout

    root, src, stop_after, user = sys.argv[1:5]
    cfg = BundleConfig(source=src)
    bundle = parse_bundle(fetch(cfg).files, time.time(), cfg)

    def hook(name):
        if name == stop_after:
            os._exit(9)  # the process dies here: no rollback, no cleanup

    install(bundle, Layout(root=Path(root)), source=src, fetched_at=time.time(), user=user or None, hook=hook)
""")


@pytest.mark.subprocess
@pytest.mark.parametrize("stop_after", ["mesh.yaml", "istio-token"])
def test_crash_between_files_recovers_to_the_new_bundle_never_a_mix(tmp_path: Path, stop_after: str) -> None:
    layout = make_root(tmp_path)
    old_files = kit.files(NOW)
    old, _ = load(tmp_path, "old", old_files)
    do_install(layout, old)
    old_live = live_files(layout)
    new_files = kit.files(NOW + 5, ipv6=True)
    new_dir = kit.write_dir(tmp_path / "new", new_files)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", CRASHER, str(layout.root), str(new_dir), stop_after, USER or ""]
    proc = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    mixed = live_files(layout)
    assert mixed != old_live and mixed["cluster.env"] == new_files["cluster.env"]
    assert mixed["istio-token"] == (new_files if stop_after == "istio-token" else old_files)["istio-token"]

    info = restore_last_good(layout, user=USER)  # what the agent runs at start
    assert info is not None and info.digest == parse_bundle(new_files, NOW + 5, kit.config()).digest
    live = live_files(layout)
    for name in ("cluster.env", "mesh.yaml", "root-cert.pem", "istio-token"):
        assert live[name] == new_files[name], name
    assert block_lines(live["etc/hosts"] or b"") == [kit.HOSTS_V6.strip()]
    assert drifted(layout) == []
    assert not (layout.state / "bundle.pending").exists()


def test_token_is_restored_at_boot_from_the_persistent_copy(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW)
    bundle, _ = load(tmp_path, "vm", files)
    do_install(layout, bundle)
    layout.istio_token.unlink()  # /var/run is a tmpfs: gone after a reboot
    layout.istio_token.parent.rmdir()
    assert drifted(layout) == ["istio-token"]
    info = restore_last_good(layout, user=USER)
    assert info is not None and info.version == bundle.version
    assert layout.istio_token.read_bytes() == files["istio-token"]
    assert layout.istio_token.stat().st_mode & 0o777 == 0o600


def test_tampered_files_are_detected_and_restored(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW)
    bundle, _ = load(tmp_path, "vm", files)
    do_install(layout, bundle)
    layout.cluster_env.write_bytes(b"CA_ADDR=evil.example:15012\n")
    layout.root_cert.chmod(0o666)
    hosts = layout.etc_hosts.read_bytes().replace(b"192.0.2.10", b"203.0.113.1")
    layout.etc_hosts.write_bytes(hosts)
    assert drifted(layout) == ["cluster.env", "root-cert.pem", "hosts"]
    restore_last_good(layout, user=USER)
    assert drifted(layout) == []
    assert layout.cluster_env.read_bytes() == files["cluster.env"]
    assert layout.root_cert.stat().st_mode & 0o777 == 0o644


def test_no_last_good_bundle(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    assert restore_last_good(layout, user=USER) is None
    assert last_good(layout) is None and drifted(layout) == []


def test_missing_user_is_a_clear_error_and_touches_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("ownership is only managed as root")
    layout = make_root(tmp_path)
    before = tree_hash(layout.root)
    bundle, _ = load(tmp_path, "vm", kit.files(NOW))
    with pytest.raises(InstallError, match=r"user 'no-such-user-here' does not exist.*istio-sidecar package"):
        install(bundle, layout, source="x", fetched_at=NOW, user="no-such-user-here")
    assert tree_hash(layout.root) == before


def test_old_stored_bundles_are_pruned(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    for i in range(4):
        b, _ = load(tmp_path, f"b{i}", kit.files(NOW + i, replace={"hosts": f"192.0.2.{i} x.y\n".encode()}))
        do_install(layout, b)
    stored = [p for p in (layout.state / "bundles").iterdir()]
    assert len(stored) == store.KEEP_VERSIONS
    assert layout.last_good_bundle.resolve() in stored


def test_tamper_checks_during_an_install_in_another_thread_never_revert_it(tmp_path: Path) -> None:
    import threading

    from agent.bundle.watch import restore_tampered

    layout = make_root(tmp_path)
    old, _ = load(tmp_path, "old", kit.files(NOW))
    do_install(layout, old)
    new_files = kit.files(NOW + 1, ipv6=True)
    new, _ = load(tmp_path, "new", new_files)
    errors: list[BaseException] = []

    def slow_install() -> None:
        try:
            do_install(layout, new, hook=lambda _name: time.sleep(0.05))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=slow_install)
    t.start()
    restored: list[str] = []
    while t.is_alive():
        restored += restore_tampered(layout, user=USER)  # what the loop does on a file event
        time.sleep(0.01)
    t.join()
    assert errors == [] and restored == []
    live = live_files(layout)
    assert all(live[n] == new_files[n] for n in ("cluster.env", "mesh.yaml", "root-cert.pem", "istio-token"))


def test_a_stale_manual_istiod_line_is_reported(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    layout.etc_hosts.write_bytes(ORIGINAL_HOSTS + b"203.0.113.9 istiod.istio-system.svc\n")
    bundle, _ = load(tmp_path, "vm", kit.files(NOW))
    result = do_install(layout, bundle)
    assert len(result.notes) == 1
    assert result.notes[0].startswith("/etc/hosts:5: istiod.istio-system.svc -> 203.0.113.9 outside")
    # not ours to edit
    assert layout.etc_hosts.read_bytes().startswith(ORIGINAL_HOSTS + b"203.0.113.9 istiod")
