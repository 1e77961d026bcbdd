"""`update` fetches, validates and installs in one call (`mesh-agent bundle install`), through
agent.bundle.accept as the daemon does; the Refresher fetches in the daemon's background and posts what
it got, for the loop to accept."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.bundle import accept
from agent.bundle.accept import Unchanged
from agent.bundle.install import InstallResult
from agent.bundle.model import Bundle
from agent.bundle.source import Fetched, FetchError, NotModified, Validators, fetch
from agent.bundle.store import InstalledBundle, last_good
from agent.config import BundleConfig
from agent.paths import Layout
from agent.retry import Backoff


@dataclass(frozen=True)
class Updated:
    bundle: Bundle
    result: InstallResult

    @property
    def installed(self) -> InstalledBundle:
        return self.result.installed


def update(cfg: BundleConfig, layout: Layout, *, user: str | None = "istio-proxy",
           now: float | None = None) -> Updated | Unchanged:
    """Fetch cfg.source, validate it completely, install it. Unchanged on HTTP 304 or when it is the
    installed bundle. Raises source.FetchError, model.BundleError or install.InstallError; on any of
    them the live files are unchanged."""
    current = last_good(layout)
    previous = Validators(current.etag, current.last_modified) if current else None
    fetched = fetch(cfg, previous)
    if isinstance(fetched, NotModified):
        if current is None:  # we sent no validators: a server answering 304 anyway is broken
            raise FetchError(f"{fetched.source}: HTTP 304 Not Modified, but no bundle is installed yet")
        return Unchanged(current)
    assert isinstance(fetched, Fetched)
    wall = time.time() if now is None else now
    prepared = accept.prepare(fetched.files, source=fetched.source, cfg=cfg, now=wall, layout=layout,
                              installed=current)
    if isinstance(prepared, Unchanged):
        return prepared
    result = accept.commit(prepared, layout, user=user, validators=fetched.validators)
    return Updated(prepared.bundle, result)


# --- the daemon's background fetch ------------------------------------------------------------------

@dataclass(frozen=True)
class BundleFetched:
    """A bundle was downloaded or read; the loop validates and installs `files`."""
    files: dict[str, bytes]
    source: str
    validators: Validators


@dataclass(frozen=True)
class BundleNotModified:
    """The source still has the installed bundle (HTTP 304)."""
    source: str


@dataclass(frozen=True)
class BundleFetchFailed:
    """The fetch failed after its retries; the installed bundle stays. Tried again in `retry_in` s."""
    error: str
    retry_in: float


class Refresher:
    """Fetches cfg.source in its own thread when due, and posts what it got; never installs.

    Installing happens on the daemon's loop thread, so that the tamper watch (also handled there)
    never sees a half-installed bundle. The loop calls `schedule(seconds)` after each install (from
    watch.refresh_delay) and `refresh_now()` on reload.
    """

    def __init__(self, cfg: BundleConfig, post: Callable[[object], None],
                 validators: Callable[[], Validators | None], retry: Backoff | None = None) -> None:
        self.cfg = cfg
        self.post = post
        self.validators = validators
        self.retry = retry or Backoff(initial=5.0, max=300.0)
        self._due: float | None = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bundle-fetch", daemon=True)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def schedule(self, seconds: float) -> None:
        self._due = time.monotonic() + max(0.0, seconds)
        self._wake.set()

    def refresh_now(self) -> None:
        self.schedule(0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._due is None:  # the loop schedules the next fetch
                self._wake.wait()
                self._wake.clear()
                continue
            wait = self._due - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            self._due = None
            try:
                got = fetch(self.cfg, self.validators())
            except FetchError as exc:
                delay = self.retry.next_delay()
                self._due = time.monotonic() + delay
                self.post(BundleFetchFailed(str(exc), delay))
                continue
            self.retry.reset()
            if isinstance(got, NotModified):
                self.post(BundleNotModified(got.source))
            else:
                self.post(BundleFetched(got.files, got.source, got.validators))
