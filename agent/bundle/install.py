"""Install a validated bundle into Istio's layout, atomically, and keep the last good one.

Every file is written to a temp file in its own directory, fsynced, renamed over the target, and the
directory fsynced. A bundle touches five places, which no single rename can switch together, so:

1. the new bundle is first stored whole under <state>/bundles/<version>-<n>/ and <state>/bundle.pending
   is pointed at it (the journal: "an install is in progress");
2. the live files are replaced one by one; if one fails, every file already replaced gets its previous
   bytes back (kept in memory), so the live tree is the old bundle again;
3. <state>/bundle (the last good bundle, a symlink) is switched to the new copy and the pending link
   removed.

If the process dies during 2, `restore_last_good` (run at every start) finds the pending link and
completes the install from the stored copy: the live tree ends up the new bundle, never a mix.
The stored copy is also the token's persistent copy (the live token is on tmpfs, gone after a reboot).

/etc/hosts is not replaced but edited: only the block between our marker lines changes. When it is a
bind mount (systemd's ReadWritePaths=/etc/hosts), rename fails with EBUSY and it is rewritten in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import pwd
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent import manifest
from agent.bundle.model import Bundle, scan_hosts
from agent.fsutil import UnsafePathError, atomic_write, clear_temp_files, fsync_dir, read_nofollow
from agent.paths import Layout
from agent.redact import register_secret

log = logging.getLogger("agent.bundle.install")

# Bundle file -> (Layout property, mode). All owned by the sidecar's user (REFERENCE.md §2: the package
# chowns these directories to istio-proxy; pilot-agent reads them as istio-proxy).
LIVE_FILES: dict[str, tuple[str, int]] = {
    "cluster.env": ("cluster_env", 0o644),
    "mesh.yaml": ("mesh_config", 0o644),
    "root-cert.pem": ("root_cert", 0o644),
    "istio-token": ("istio_token", 0o600),
}
HOSTS_BEGIN = "# BEGIN mesh-agent: istiod address from the mesh bundle (managed; edits are replaced)"
HOSTS_END = "# END mesh-agent"
META = "meta.json"
KEEP_VERSIONS = 2  # the last good bundle and the one before it, for an operator to compare

# Tests replace this to simulate a bind-mounted /etc/hosts where rename fails.


class InstallError(Exception):
    """The bundle could not be installed; the live files are as they were before."""


@dataclass(frozen=True)
class InstalledBundle:
    """What is known about an installed bundle (its meta.json)."""
    version: str
    digest: str
    source: str
    fetched_at: float
    installed_at: float
    token_expiry: float | None
    token_issued_at: float | None
    cert_expiry: float | None
    etag: str | None = None
    last_modified: str | None = None
    warnings: tuple[str, ...] = ()
    path: Path | None = None  # the stored copy

    def status(self) -> dict[str, Any]:
        """The `bundle` section of status.json."""
        return {"version": self.version, "digest": self.digest, "source": self.source,
                "fetched_at": self.fetched_at, "installed_at": self.installed_at,
                "token_expiry": self.token_expiry, "cert_expiry": self.cert_expiry}


@dataclass(frozen=True)
class InstallResult:
    installed: InstalledBundle
    changed: tuple[str, ...]  # bundle files whose live copy changed ("hosts" for the /etc/hosts block)
    ownership_applied: bool  # False when not root: files keep the current user (tests, the demo)
    hosts_in_place: bool = False  # /etc/hosts had to be rewritten in place (bind mount)
    notes: tuple[str, ...] = field(default=())  # things the operator should fix (logged as warnings)


# --- small file-system helpers --------------------------------------------------------------------

def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite a file's contents without replacing the inode (a bind-mounted file cannot be renamed
    over). Not atomic against a crash, which is why it is used only where rename is impossible."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


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


# --- /etc/hosts -----------------------------------------------------------------------------------

def hosts_with_block(current: bytes, lines: Iterable[str]) -> bytes:
    """current /etc/hosts with our block set to lines (removed when there are none). Everything outside
    the block is kept byte for byte. Raises InstallError when the markers are damaged."""
    text = current.decode("latin-1")  # lossless for any bytes: what we do not touch stays identical
    rows = text.splitlines(keepends=True)
    begins = [i for i, r in enumerate(rows) if r.rstrip("\r\n") == HOSTS_BEGIN]
    ends = [i for i, r in enumerate(rows) if r.rstrip("\r\n") == HOSTS_END]
    if len(begins) > 1 or len(ends) > 1 or len(begins) != len(ends) or (begins and ends[0] < begins[0]):
        raise InstallError(f"/etc/hosts: the mesh-agent marker lines are damaged ({len(begins)} begin, "
                           f"{len(ends)} end); remove the block by hand, the agent writes it again")
    lines = list(lines)
    block = [HOSTS_BEGIN + "\n", *(ln + "\n" for ln in lines), HOSTS_END + "\n"] if lines else []
    if begins:
        rows[begins[0]:ends[0] + 1] = block
    elif block:
        if rows and not rows[-1].endswith("\n"):
            rows[-1] += "\n"
        rows.extend(block)
    return "".join(rows).encode("latin-1")


def shadowing_lines(current: bytes, lines: Iterable[str]) -> list[str]:
    """Lines outside our block that name one of our hosts with another address. The resolver takes the
    first match, so such a line (often left by the manual `cat hosts >> /etc/hosts` setup) wins."""
    ours: dict[str, str] = {}
    for ln in lines:
        addr, *names = ln.split()
        for n in names:
            ours.setdefault(n.lower(), addr)
    out = []
    inside = False
    for i, row in enumerate(current.decode("latin-1").splitlines(), 1):
        if row in (HOSTS_BEGIN, HOSTS_END):
            inside = row == HOSTS_BEGIN
            continue
        fields = row.split("#", 1)[0].split()
        if inside or len(fields) < 2:
            continue
        for n in fields[1:]:
            if n.lower() in ours and fields[0] != ours[n.lower()]:
                out.append(f"/etc/hosts:{i}: {n} -> {fields[0]} outside the mesh-agent block takes "
                           f"precedence over {ours[n.lower()]}; remove that line")
    return out


def hosts_block(current: bytes) -> list[str] | None:
    """The lines inside our block, or None when there is no block."""
    rows = current.decode("latin-1").splitlines()
    if HOSTS_BEGIN not in rows or HOSTS_END not in rows:
        return None
    i, j = rows.index(HOSTS_BEGIN), rows.index(HOSTS_END)
    return rows[i + 1:j] if i < j else None


def write_hosts(path: Path, data: bytes) -> bool:
    """Write /etc/hosts keeping its mode and owner. Returns True when it had to be done in place."""
    try:
        st = path.lstat()
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o644, None
    if owner is not None and os.geteuid() != 0:
        owner = None
    try:
        atomic_write(path, data, mode, owner)
        return False
    except UnsafePathError:
        raise
    except OSError as exc:
        # EBUSY/EXDEV: a bind mount (systemd's ReadWritePaths=/etc/hosts); EROFS/EACCES: its directory
        # is read-only to us (ProtectSystem=strict) while the file itself is writable.
        if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EROFS, errno.EACCES):
            raise
        log.info("%s cannot be replaced (%s, a bind mount?): rewriting it in place", path, exc.strerror)
    rewrite_in_place(path, data)
    return True


# --- the stored bundles ---------------------------------------------------------------------------

def _bundles_dir(layout: Layout) -> Path:
    return layout.state / "bundles"


def _pending_link(layout: Layout) -> Path:
    return layout.state / "bundle.pending"


def _link_temp(link: Path) -> Path:
    return link.with_name(f".{link.name}.tmp")


def _set_link(link: Path, target: Path) -> None:
    """Point link at target atomically (a new symlink renamed over the old one)."""
    tmp = _link_temp(link)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(link.parent)


def _store(layout: Layout, files: dict[str, bytes], meta: dict[str, Any]) -> Path:
    """Write a complete copy of the bundle (0700 directory, 0600 files) and return its directory."""
    bundles = _bundles_dir(layout)
    bundles.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(bundles, 0o700)
    final = bundles / f"{meta['version']}-{time.time_ns()}"
    tmp = bundles / f".{final.name}.tmp"
    tmp.mkdir(mode=0o700)
    try:
        for name, data in [*files.items(), (META, json.dumps(meta, indent=2, sort_keys=True).encode())]:
            atomic_write(tmp / name, data, 0o600)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written copy behind
        raise
    fsync_dir(bundles)
    return final


_STORE_TEMP = re.compile(r"\.[0-9a-f]{12}-[0-9]+\.tmp")  # _store's temp directory


def clear_leftovers(layout: Layout) -> list[str]:
    """Remove what a crash (SIGKILL, power loss) left half-done: the temp files of the live files and of
    /etc/hosts, the stored copy's temp directory, the links' temp names. Only names the agent itself
    makes are touched. Run under the bundle lock, so no install is writing them at the moment."""
    removed: list[str] = []
    for path in live_paths(layout).values():
        removed += [str(path.parent / n) for n in clear_temp_files(path.parent, [path.name])]
    bundles = _bundles_dir(layout)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for e in os.scandir(bundles):
            if _STORE_TEMP.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
    for link in (layout.last_good_bundle, _pending_link(layout)):
        tmp = _link_temp(link)
        if tmp.is_symlink():
            tmp.unlink()
            removed.append(str(tmp))
    if removed:
        log.warning("removed what an interrupted write left behind: %s", ", ".join(removed))
    return removed


def _load_stored(directory: Path) -> tuple[InstalledBundle, dict[str, bytes]]:
    meta = json.loads((directory / META).read_text())
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != META and p.is_file()}
    if files.get("istio-token"):
        register_secret(files["istio-token"].decode("utf-8", "replace"))
    info = InstalledBundle(
        version=meta["version"], digest=meta["digest"], source=meta["source"],
        fetched_at=meta["fetched_at"], installed_at=meta.get("installed_at", 0.0),
        token_expiry=meta.get("token_expiry"), token_issued_at=meta.get("token_issued_at"),
        cert_expiry=meta.get("cert_expiry"), etag=meta.get("etag"), last_modified=meta.get("last_modified"),
        warnings=tuple(meta.get("warnings", ())), path=directory)
    return info, files


def _resolve(link: Path) -> Path | None:
    if not link.is_symlink():
        return None
    target = link.resolve()
    return target if (target / META).is_file() else None


def _commit(layout: Layout, stored: Path) -> None:
    _set_link(layout.last_good_bundle, stored)
    try:
        _pending_link(layout).unlink()
        fsync_dir(layout.state)
    except FileNotFoundError:
        pass
    _prune(layout, keep=stored)


def _prune(layout: Layout, keep: Path) -> None:
    """Delete stored bundles beyond the newest KEEP_VERSIONS, and copies left half-written by a crash."""
    bundles = _bundles_dir(layout)
    others = [p for p in bundles.iterdir() if p.is_dir() and p != keep]
    done = sorted((p for p in others if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime,
                  reverse=True)
    for p in done[KEEP_VERSIONS - 1:] + [p for p in others if p.name.startswith(".")]:
        shutil.rmtree(p, ignore_errors=True)


def last_good(layout: Layout) -> InstalledBundle | None:
    """The last bundle installed completely, if any."""
    d = _resolve(layout.last_good_bundle)
    return _load_stored(d)[0] if d else None


def last_good_file(layout: Layout, name: str) -> Path:
    """Where the last good bundle keeps one of its files (e.g. the kubeconfig for the registry)."""
    return layout.last_good_bundle / name


# --- one install at a time -----------------------------------------------------------------------

@contextlib.contextmanager
def _lock(layout: Layout, create: bool = False) -> Iterator[None]:
    """An exclusive flock on <state>/bundle.lock: the daemon's installs, its tamper checks (which may run
    while a worker thread installs) and `mesh-agent bundle install` never interleave. Without a state
    directory nothing is installed yet and there is nothing to lock, unless `create`."""
    if not layout.state.is_dir():
        if not create:
            yield
            return
        layout.state.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(layout.state / "bundle.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


F = TypeVar("F", bound=Callable[..., Any])


def _serialized(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        layout = kwargs.get("layout") or next(a for a in args if isinstance(a, Layout))
        with _lock(layout):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


# --- writing the live files -----------------------------------------------------------------------

Hook = Callable[[str], None]


def _live_path(layout: Layout, name: str) -> Path:
    return getattr(layout, LIVE_FILES[name][0])


def _hosts_lines(files: dict[str, bytes]) -> list[str]:
    data = files.get("hosts", b"")
    lines, _problems = scan_hosts(data.decode("utf-8", "replace"))
    return [str(h) for h in lines]


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
    current = _read(layout.etc_hosts)
    new = hosts_with_block(current or b"", _hosts_lines(files))
    manifest.record(
        layout, files={_live_path(layout, n): files[n] for n, same in plan.items() if not same},
        dirs=[d for n in LIVE_FILES for d in manifest.missing_dirs(_live_path(layout, n).parent)],
        hosts=layout.etc_hosts if new != (current or b"") and hosts_block(new) else None,
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
    if new != (current or b""):
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
    hosts_now = _read(layout.etc_hosts) or b""
    hosts_with_block(hosts_now, bundle.hosts_lines)  # damaged markers: refuse before touching anything
    with _lock(layout, create=True):
        return _install_locked(bundle, layout, owner, source, fetched_at, etag, last_modified, hook)


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
        stored = _store(layout, files, meta)
        _set_link(_pending_link(layout), stored)
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
        _pending_link(layout).unlink(missing_ok=True)
        shutil.rmtree(stored, ignore_errors=True)
        msg = f"installing bundle {bundle.version} failed: {exc}"
        if failures:
            msg += "; rolling back also failed for: " + "; ".join(failures)
        else:
            msg += "; the previous files were put back"
        raise InstallError(msg) from exc
    _commit(layout, stored)
    info, _ = _load_stored(stored)
    log.info("installed bundle %s from %s (%s)", bundle.version, source,
             ", ".join(changed) if changed else "no file changed")
    notes = shadowing_lines(_read(layout.etc_hosts) or b"", bundle.hosts_lines)
    for note in notes:
        log.warning("%s", note)
    return InstallResult(info, tuple(changed), owner is not None, in_place, tuple(notes))


@_serialized
def restore_last_good(layout: Layout, *, user: str | None = "istio-proxy") -> InstalledBundle | None:
    """Make the live files the last good bundle again; run at start and when files were tampered with.

    An install interrupted by a crash (the pending link is there) is completed from its stored copy.
    Only files that differ are written. Returns the bundle now live, or None when there is none."""
    owner = resolve_owner(user)
    clear_leftovers(layout)
    pending = _resolve(_pending_link(layout))
    if pending is not None:
        info, files = _load_stored(pending)
        log.warning("completing the install of bundle %s interrupted earlier", info.version)
        _write_live(layout, files, owner, None, None)
        _commit(layout, pending)
        return info
    _pending_link(layout).unlink(missing_ok=True)
    current = _resolve(layout.last_good_bundle)
    if current is None:
        return None
    info, files = _load_stored(current)
    changed, _ = _write_live(layout, files, owner, None, None)
    if changed:
        log.warning("restored %s from the last good bundle %s", ", ".join(changed), info.version)
    return info


@_serialized
def drifted(layout: Layout) -> list[str]:
    """Bundle files whose live copy differs from the last good bundle (edited, deleted, mode changed),
    "hosts" when the /etc/hosts block differs. Empty when there is no last good bundle."""
    current = _resolve(layout.last_good_bundle)
    if current is None:
        return []
    _info, files = _load_stored(current)
    out = []
    for name, (_prop, mode) in LIVE_FILES.items():
        snap = _snapshot(_live_path(layout, name))
        if snap.data != files.get(name) or snap.mode != mode:
            out.append(name)
    block = hosts_block(_read(layout.etc_hosts) or b"")
    want = _hosts_lines(files)
    if (block or []) != want:
        out.append("hosts")
    return out


def live_paths(layout: Layout) -> dict[str, Path]:
    """The live path of each installed bundle file (hosts: /etc/hosts)."""
    out = {name: _live_path(layout, name) for name in LIVE_FILES}
    out["hosts"] = layout.etc_hosts
    return out


def load_last_good(layout: Layout) -> tuple[InstalledBundle, dict[str, bytes]] | None:
    """The last good bundle's record and files, e.g. to rebuild its Bundle after a restart."""
    current = _resolve(layout.last_good_bundle)
    return _load_stored(current) if current is not None else None
