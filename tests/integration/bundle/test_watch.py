"""The tamper watch: a real watchdog observer on the installed files, and their restoration."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

from agent.bundle.install import install
from agent.bundle.model import parse_bundle
from agent.bundle.watch import BundleFilesChanged, InstalledFilesWatcher, restore_tampered
from devkit import bundles as kit
from devkit.roots import make_root

NOW = time.time()
USER = "nobody" if os.geteuid() == 0 else None


def wait_for(events: queue.Queue[object], path: Path, timeout: float = 5.0) -> BundleFilesChanged:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(ev, BundleFilesChanged) and ev.path == str(path):
            return ev
    raise AssertionError(f"no event for {path}")


def drain(events: queue.Queue[object]) -> list[object]:
    time.sleep(0.3)
    out = []
    while not events.empty():
        out.append(events.get())
    return out


def test_edits_and_deletions_are_posted_and_restored(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    files = kit.files(NOW)
    bundle = parse_bundle(files, NOW, kit.config())
    install(bundle, layout, source="t", fetched_at=NOW, user=USER)
    events: queue.Queue[object] = queue.Queue()
    watcher = InstalledFilesWatcher(layout, events.put)
    watcher.start()
    try:
        drain(events)
        layout.cluster_env.write_text("CA_ADDR=evil:15012\n")
        assert wait_for(events, layout.cluster_env).kind in ("modified", "created")
        layout.istio_token.unlink()
        assert wait_for(events, layout.istio_token).kind == "deleted"
        with layout.etc_hosts.open("ab") as f:
            f.write(b"198.51.100.7 other\n")  # outside our block: not tampering
        wait_for(events, layout.etc_hosts)

        assert restore_tampered(layout, user=USER) == ["cluster.env", "istio-token"]
        assert layout.cluster_env.read_bytes() == files["cluster.env"]
        assert layout.istio_token.read_bytes() == files["istio-token"]
        assert layout.etc_hosts.read_bytes().endswith(b"198.51.100.7 other\n")
        # the restore itself is seen, and then finds nothing to do
        wait_for(events, layout.cluster_env)
        assert restore_tampered(layout, user=USER) == []
        # unrelated files in the same directories are ignored
        drain(events)
        (layout.cluster_env.parent / "sidecar.env").write_text("# x\n")
        assert [e for e in drain(events) if isinstance(e, BundleFilesChanged)] == []
    finally:
        watcher.stop()


def test_a_deleted_directory_is_restored_and_watched_again(tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    bundle = parse_bundle(kit.files(NOW), NOW, kit.config())
    install(bundle, layout, source="t", fetched_at=NOW, user=USER)
    events: queue.Queue[object] = queue.Queue()
    watcher = InstalledFilesWatcher(layout, events.put)
    watcher.start()
    try:
        layout.istio_token.unlink()
        layout.istio_token.parent.rmdir()
        wait_for(events, layout.istio_token)
        assert restore_tampered(layout, user=USER) == ["istio-token"]
        watcher.rewatch()
        drain(events)
        layout.istio_token.write_text("x")
        wait_for(events, layout.istio_token)
    finally:
        watcher.stop()
