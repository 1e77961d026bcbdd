"""Install a validated bundle into Istio's layout, atomically.

Every file is written to a temp file in its own directory, fsynced, renamed over the target, and the
directory fsynced. A bundle touches five places, which no single rename can switch together, so:

1. the new bundle is first stored whole under <state>/bundles/<version>-<n>/ and <state>/bundle.pending
   is pointed at it (the journal: "an install is in progress"; agent.bundle.store);
2. the live files are replaced one by one; if one fails, every file already replaced gets its previous
   bytes back (kept in memory), so the live tree is the old bundle again;
3. <state>/bundle (the last good bundle, a symlink) is switched to the new copy and the pending link
   removed.

If the process dies during 2, `restore_last_good` (run at every start) finds the pending link and
completes the install from the stored copy: the live tree ends up the new bundle, never a mix.

/etc/hosts is not replaced but edited: only the managed block changes (agent.bundle.hosts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent import manifest
from agent.bundle import store
from agent.bundle.hosts import (
    HOSTS_BEGIN,
    HOSTS_END,
    DamagedBlock,
    block_lines,
    scan_hosts,
    shadowing_lines,
    with_block,
    write_hosts,
)
from agent.bundle.model import Bundle
from agent.bundle.store import InstalledBundle
from agent.fsutil import atomic_write, clear_temp_files, read_nofollow
from agent.paths import Layout

log = logging.getLogger("agent.bundle.install")

# Bundle file -> (Layout property, mode). All owned by the sidecar's user (REFERENCE.md §2: the package
# chowns these directories to istio-proxy; pilot-agent reads them as istio-proxy).
LIVE_FILES: dict[str, tuple[str, int]] = {
    "cluster.env": ("cluster_env", 0o644),
    "mesh.yaml": ("mesh_config", 0o644),
    "root-cert.pem": ("root_cert", 0o644),
    "istio-token": ("istio_token", 0o600),
}


class InstallError(Exception):
    """The bundle could not be installed; the live files are as they were before."""


@dataclass(frozen=True)
class InstallResult:
    installed: InstalledBundle
    changed: tuple[str, ...]  # bundle files whose live copy changed ("hosts" for the /etc/hosts block)
    ownership_applied: bool  # False when not root: files keep the current user (tests, the demo)
    hosts_in_place: bool = False  # /etc/hosts had to be rewritten in place (bind mount)
    notes: tuple[str, ...] = field(default=())  # things the operator should fix (logged as warnings)


# --- small file-system helpers --------------------------------------------------------------------

def _read(path: Path) -> bytes | None:
    """A live file's bytes (None when missing); a link there is refused, never read through."""
    return read_nofollow(path)


@dataclass(frozen=True)
class _Snapshot:
    """A live file as it was before the install, to put back on failure."""
    data: bytes | None
    mode: int = 0o644
    owner: tuple[int, int] | None = None


def _snapshot(path: Path) -> _Snapshot:
    """What is at a live path. A link (or anything but a regular file) counts as nothing: it is replaced
    by the install, never followed, and not put back by a rollback."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return _Snapshot(None)
    if not stat.S_ISREG(st.st_mode):
        return _Snapshot(None)
    return _Snapshot(read_nofollow(path), stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))


# --- owners ---------------------------------------------------------------------------------------

class MissingUser(InstallError):
    """The sidecar's user does not exist: only installing the sidecar package (or the config) fixes it."""


def resolve_owner(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) of the sidecar's user; None when ownership is not managed: no user asked for, or not
    running as root (tests and the demo; logged at debug level). Raises InstallError for a missing user."""
    if user is None:
        return None
    if os.geteuid() != 0:
        log.debug("not root: installed files keep the current owner instead of %s", user)
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise MissingUser(f"user {user!r} does not exist; it is created by the istio-sidecar package "
                           "(install it first), or choose another user (sidecar.user, --user)") from None
    return pw.pw_uid, pw.pw_gid


def _ensure_dir(path: Path, owner: tuple[int, int] | None) -> None:
    """Create missing parents of a live file (0755), owning the last one as the package would."""
    if path.is_dir():
        return
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, *owner)


# --- writing the live files -----------------------------------------------------------------------

Hook = Callable[[str], None]


def _live_path(layout: Layout, name: str) -> Path:
    return getattr(layout, LIVE_FILES[name][0])


def _hosts_lines(files: dict[str, bytes]) -> list[str]:
    data = files.get("hosts", b"")
    lines, _problems = scan_hosts(data.decode("utf-8", "replace"))
    return [str(h) for h in lines]


def _hosts_now(layout: Layout, lines: list[str]) -> tuple[bytes, bytes]:
    """/etc/hosts as it is, and as it should be with lines in the block. Raises InstallError when the
    block's markers are damaged."""
    current = _read(layout.etc_hosts) or b""
    try:
        return current, with_block(current, lines)
    except DamagedBlock as exc:
        raise InstallError(f"{layout.etc_hosts}: {exc}; remove the block by hand, the agent writes it "
                           "again") from None


def _write_live(layout: Layout, files: dict[str, bytes], owner: tuple[int, int] | None,
                hook: Hook | None, snapshots: dict[Path, _Snapshot] | None) -> tuple[list[str], bool]:
    """Write every live file (skipping identical ones). Records what was there in snapshots, and
    what is about to be written in the manifest (agent.manifest) before writing it."""
    changed: list[str] = []
    plan: dict[str, bool] = {}  # name -> already as wanted
    for name, (_prop, mode) in LIVE_FILES.items():
        path = _live_path(layout, name)
        before = _snapshot(path)
        plan[name] = before.data == files[name] and before.mode == mode and \
            (owner is None or before.owner == owner)
    current, new = _hosts_now(layout, _hosts_lines(files))
    manifest.record(
        layout, files={_live_path(layout, n): files[n] for n, same in plan.items() if not same},
        dirs=[d for n in LIVE_FILES for d in manifest.missing_dirs(_live_path(layout, n).parent)],
        hosts=layout.etc_hosts if new != current and block_lines(new) else None,
        markers=(HOSTS_BEGIN, HOSTS_END))
    for name, (_prop, mode) in LIVE_FILES.items():
        path = _live_path(layout, name)
        data = files[name]
        _ensure_dir(path.parent, owner)
        before = _snapshot(path)
        same = plan[name]
        if not same:
            if snapshots is not None:
                snapshots[path] = before
            atomic_write(path, data, mode, owner)
            changed.append(name)
        if hook is not None:
            hook(name)
    path = layout.etc_hosts
    in_place = False
    if new != current:
        if snapshots is not None:
            snapshots[path] = _snapshot(path)
        _ensure_dir(path.parent, None)
        in_place = write_hosts(path, new)
        changed.append("hosts")
    if hook is not None:
        hook("hosts")
    return changed, in_place


def _roll_back(snapshots: dict[Path, _Snapshot], hosts_path: Path) -> list[str]:
    """Put every snapshotted file back as it was. Returns the failures (to report, not to raise)."""
    failures = []
    for path, snap in reversed(list(snapshots.items())):
        try:
            if _snapshot(path) == snap:
                continue  # never replaced (the write failed before its rename): intact, nothing to undo
            if path == hosts_path:
                if snap.data is None:
                    path.unlink(missing_ok=True)
                else:
                    write_hosts(path, snap.data)
            elif snap.data is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write(path, snap.data, snap.mode, snap.owner if os.geteuid() == 0 else None)
        except OSError as exc:
            failures.append(f"{path}: {exc}")
    return failures


def install(bundle: Bundle, layout: Layout, *, source: str, fetched_at: float,
            user: str | None = "istio-proxy", etag: str | None = None, last_modified: str | None = None,
            hook: Hook | None = None) -> InstallResult:
    """Install a validated bundle. On failure, the live files are put back as they were and
    InstallError is raised. `hook(name)` runs after each live file is handled (tests inject faults)."""
    owner = resolve_owner(user)
    _hosts_now(layout, list(bundle.hosts_lines))  # damaged markers: refuse before touching anything
    with store.lock(layout, create=True):
        return _install_locked(bundle, layout, owner, source, fetched_at, etag, last_modified, hook)


def clear_leftovers(layout: Layout) -> list[str]:
    """Remove what a crash (SIGKILL, power loss) left half-done: the temp files of the live files and of
    /etc/hosts, and the store's (agent.bundle.store). Only names the agent itself makes are touched.
    Run under the bundle lock, so no install is writing them at the moment."""
    removed: list[str] = []
    for path in live_paths(layout).values():
        removed += [str(path.parent / n) for n in clear_temp_files(path.parent, [path.name])]
    removed += store.clear_leftovers(layout)
    if removed:
        log.warning("removed what an interrupted write left behind: %s", ", ".join(removed))
    return removed


def _install_locked(bundle: Bundle, layout: Layout, owner: tuple[int, int] | None, source: str,
                    fetched_at: float, etag: str | None, last_modified: str | None,
                    hook: Hook | None) -> InstallResult:
    meta = {"version": bundle.version, "digest": bundle.digest, "source": source, "fetched_at": fetched_at,
            "installed_at": time.time(), "token_expiry": bundle.token_expiry,
            "token_issued_at": bundle.token_issued_at, "cert_expiry": bundle.cert_expiry,
            "etag": etag, "last_modified": last_modified, "warnings": list(bundle.warnings)}
    files = dict(bundle.files)
    clear_leftovers(layout)
    stored: Path | None = None
    try:
        layout.state.mkdir(mode=0o755, parents=True, exist_ok=True)
        stored = store.save(layout, files, meta)
        store.set_link(store.pending_link(layout), stored)
    except OSError as exc:
        if stored is not None:
            shutil.rmtree(stored, ignore_errors=True)
        raise InstallError(f"cannot store the bundle under {layout.state}: {exc}") from exc

    snapshots: dict[Path, _Snapshot] = {}
    recorded = manifest.load(layout)
    try:
        changed, in_place = _write_live(layout, files, owner, hook, snapshots)
    except Exception as exc:
        failures = _roll_back(snapshots, layout.etc_hosts)
        with contextlib.suppress(OSError):  # a stale entry is harmless: its hash matches no file
            manifest.roll_back(layout, recorded)
        store.pending_link(layout).unlink(missing_ok=True)
        shutil.rmtree(stored, ignore_errors=True)
        msg = f"installing bundle {bundle.version} failed: {exc}"
        if failures:
            msg += "; rolling back also failed for: " + "; ".join(failures)
        else:
            msg += "; the previous files were put back"
        raise InstallError(msg) from exc
    store.commit(layout, stored)
    info, _ = store.load(stored)
    log.info("installed bundle %s from %s (%s)", bundle.version, source,
             ", ".join(changed) if changed else "no file changed")
    notes = shadowing_lines(_read(layout.etc_hosts) or b"", bundle.hosts_lines)
    for note in notes:
        log.warning("%s", note)
    return InstallResult(info, tuple(changed), owner is not None, in_place, tuple(notes))


@store.serialized
def restore_last_good(layout: Layout, *, user: str | None = "istio-proxy") -> InstalledBundle | None:
    """Make the live files the last good bundle again; run at start and when files were tampered with.

    An install interrupted by a crash (the pending link is there) is completed from its stored copy.
    Only files that differ are written. Returns the bundle now live, or None when there is none."""
    owner = resolve_owner(user)
    clear_leftovers(layout)
    pending = store.resolve(store.pending_link(layout))
    if pending is not None:
        info, files = store.load(pending)
        log.warning("completing the install of bundle %s interrupted earlier", info.version)
        _write_live(layout, files, owner, None, None)
        store.commit(layout, pending)
        return info
    store.pending_link(layout).unlink(missing_ok=True)
    current = store.resolve(layout.last_good_bundle)
    if current is None:
        return None
    info, files = store.load(current)
    changed, _ = _write_live(layout, files, owner, None, None)
    if changed:
        log.warning("restored %s from the last good bundle %s", ", ".join(changed), info.version)
    return info


@store.serialized
def drifted(layout: Layout) -> list[str]:
    """Bundle files whose live copy differs from the last good bundle (edited, deleted, mode changed),
    "hosts" when the /etc/hosts block differs. Empty when there is no last good bundle."""
    current = store.resolve(layout.last_good_bundle)
    if current is None:
        return []
    _info, files = store.load(current)
    out = []
    for name, (_prop, mode) in LIVE_FILES.items():
        snap = _snapshot(_live_path(layout, name))
        if snap.data != files.get(name) or snap.mode != mode:
            out.append(name)
    block = block_lines(_read(layout.etc_hosts) or b"")
    want = _hosts_lines(files)
    if (block or []) != want:
        out.append("hosts")
    return out


def live_paths(layout: Layout) -> dict[str, Path]:
    """The live path of each installed bundle file (hosts: /etc/hosts)."""
    out = {name: _live_path(layout, name) for name in LIVE_FILES}
    out["hosts"] = layout.etc_hosts
    return out
