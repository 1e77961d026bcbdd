"""Keep the installed bundle as installed, and say when to fetch a fresh one.

InstalledFilesWatcher (watchdog) posts a BundleFilesChanged event when an installed file is edited,
replaced or deleted; the daemon's loop then calls `restore_tampered`, which compares every live file
with the last good bundle and puts back the ones that differ. The agent's own installs also produce
events; they find nothing to restore, because the loop handles them after the install has committed.

`refresh_delay` is pure: the seconds until the next fetch, from the token's lifetime.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.bundle import install
from agent.config import BundleConfig
from agent.paths import Layout

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger("agent.bundle.watch")

MIN_RETRY = 30.0  # an overdue refresh that found nothing new is tried again at most this often


# --- refresh schedule (pure) ----------------------------------------------------------------------

def refresh_at(token_expiry: float | None, token_issued_at: float | None, fetched_at: float,
               cfg: BundleConfig) -> float:
    """Wall-clock time at which the bundle should be fetched again: refresh_fraction of the token's
    lifetime (from iat, else from when it was fetched), or refresh_interval after the fetch when the
    token does not expire."""
    if token_expiry is None:
        return fetched_at + cfg.refresh_interval
    start = token_issued_at if token_issued_at is not None and token_issued_at < token_expiry else fetched_at
    start = min(start, token_expiry)
    return start + cfg.refresh_fraction * (token_expiry - start)


def refresh_delay(token_expiry: float | None, token_issued_at: float | None, fetched_at: float,
                  cfg: BundleConfig, now: float, last_attempt: float | None = None) -> float:
    """Seconds from `now` (wall clock) until the next fetch. `last_attempt` is when the source was last
    asked: once the refresh is overdue and the source had nothing newer, retry at a pace that still
    leaves several tries before the token expires, never faster than MIN_RETRY."""
    due = refresh_at(token_expiry, token_issued_at, fetched_at, cfg)
    if due > now:
        return due - now
    if last_attempt is None or last_attempt < due:
        return 0.0
    remaining = token_expiry - now if token_expiry is not None else cfg.refresh_interval
    return max(MIN_RETRY, min(cfg.refresh_interval, remaining / 4))


# --- tamper watch ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleFilesChanged:
    """An installed bundle file (or its directory) was modified, created, moved or deleted."""
    path: str
    kind: str


def restore_tampered(layout: Layout, user: str | None = "istio-proxy") -> list[str]:
    """Put back every live file that differs from the last good bundle. Returns what was restored."""
    changed = install.drifted(layout)
    if changed:
        log.warning("installed bundle files changed by someone else: %s; restoring them", ", ".join(changed))
        install.restore_last_good(layout, user=user)
    return changed


class InstalledFilesWatcher:
    """Watches the directories of the installed files (not recursively) and posts BundleFilesChanged.

    Call `rewatch()` after files were restored: a deleted directory loses its watch."""

    def __init__(self, layout: Layout, post: Callable[[object], None]) -> None:
        self._post = post
        self._paths = {str(p) for p in install.live_paths(layout).values()}
        self._dirs = sorted({os.path.dirname(p) for p in self._paths})
        self._lock = threading.Lock()
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                watcher._on_event(event.event_type, os.fsdecode(event.src_path),
                                  os.fsdecode(getattr(event, "dest_path", "") or ""))

        with self._lock:
            if self._observer is not None:
                return
            observer = Observer()
            observer.daemon = True
            handler = Handler()
            for d in self._dirs:
                if Path(d).is_dir():
                    observer.schedule(handler, d, recursive=False)
                else:
                    log.debug("not watching %s: it does not exist", d)
            observer.start()
            self._observer = observer

    def stop(self) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def rewatch(self) -> None:
        self.stop()
        self.start()

    def _on_event(self, kind: str, src: str, dest: str) -> None:
        if kind in ("opened", "closed", "closed_no_write"):
            return
        for path in (dest, src):
            if path in self._paths or (kind == "deleted" and path in self._dirs):
                self._post(BundleFilesChanged(path, kind))
                return
