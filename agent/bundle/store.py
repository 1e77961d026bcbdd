"""The stored bundles under <state>/: a complete copy of each installed bundle (bundles/<version>-<n>/,
0700, with its meta.json), the `bundle` link to the last good one, the `bundle.pending` link (the
journal of an install in progress, see agent.bundle.install), and the lock that makes installs, tamper
checks and `mesh-agent bundle install` take turns. The stored copy is also the token's persistent copy
(the live token is on tmpfs, gone after a reboot).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.fsutil import atomic_write, fsync_dir
from agent.paths import Layout
from agent.redact import register_secret

META = "meta.json"
KEEP_VERSIONS = 2  # the last good bundle and the one before it, for an operator to compare


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


def bundles_dir(layout: Layout) -> Path:
    return layout.state / "bundles"


def pending_link(layout: Layout) -> Path:
    return layout.state / "bundle.pending"


def _link_temp(link: Path) -> Path:
    return link.with_name(f".{link.name}.tmp")


def set_link(link: Path, target: Path) -> None:
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


def save(layout: Layout, files: dict[str, bytes], meta: dict[str, Any]) -> Path:
    """Write a complete copy of the bundle (0700 directory, 0600 files) and return its directory."""
    bundles = bundles_dir(layout)
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


_STORE_TEMP = re.compile(r"\.[0-9a-f]{12}-[0-9]+\.tmp")  # save's temp directory


def clear_leftovers(layout: Layout) -> list[str]:
    """Remove the stored copy's temp directory and the links' temp names a crash left behind. Only
    names this module makes are touched; run under the lock."""
    removed: list[str] = []
    bundles = bundles_dir(layout)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for e in os.scandir(bundles):
            if _STORE_TEMP.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
    for link in (layout.last_good_bundle, pending_link(layout)):
        tmp = _link_temp(link)
        if tmp.is_symlink():
            tmp.unlink()
            removed.append(str(tmp))
    return removed


def load(directory: Path) -> tuple[InstalledBundle, dict[str, bytes]]:
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


def resolve(link: Path) -> Path | None:
    if not link.is_symlink():
        return None
    target = link.resolve()
    return target if (target / META).is_file() else None


def commit(layout: Layout, stored: Path) -> None:
    set_link(layout.last_good_bundle, stored)
    try:
        pending_link(layout).unlink()
        fsync_dir(layout.state)
    except FileNotFoundError:
        pass
    _prune(layout, keep=stored)


def _prune(layout: Layout, keep: Path) -> None:
    """Delete stored bundles beyond the newest KEEP_VERSIONS, and copies left half-written by a crash."""
    bundles = bundles_dir(layout)
    others = [p for p in bundles.iterdir() if p.is_dir() and p != keep]
    done = sorted((p for p in others if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime,
                  reverse=True)
    for p in done[KEEP_VERSIONS - 1:] + [p for p in others if p.name.startswith(".")]:
        shutil.rmtree(p, ignore_errors=True)


def last_good(layout: Layout) -> InstalledBundle | None:
    """The last bundle installed completely, if any."""
    d = resolve(layout.last_good_bundle)
    return load(d)[0] if d else None


def last_good_file(layout: Layout, name: str) -> Path:
    """Where the last good bundle keeps one of its files (e.g. the kubeconfig for the registry)."""
    return layout.last_good_bundle / name


@contextlib.contextmanager
def lock(layout: Layout, create: bool = False) -> Iterator[None]:
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


def serialized(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        layout = kwargs.get("layout") or next(a for a in args if isinstance(a, Layout))
        with lock(layout):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def load_last_good(layout: Layout) -> tuple[InstalledBundle, dict[str, bytes]] | None:
    """The last good bundle's record and files, e.g. to rebuild its Bundle after a restart."""
    current = resolve(layout.last_good_bundle)
    return load(current) if current is not None else None
