"""Following one named object: read it, watch it from the resourceVersion the read gave, read again
when that history is gone (410 Gone, an expired watch), back off on failures; report what was seen.

One thread per followed object; it only calls back (`seen(obj)`, `gone()`, `failed(error)`), so the
caller decides what an observation means (the registrar posts it to the loop; the cluster bundle source
rebuilds when the object is not the one it built from).

- The read lists by name (a list's resourceVersion, never the object's own: that one can be older than
  the server's watch history, and a watch from it would end in 410 at once). A target that may not list
  (RBAC with resourceNames allows get and watch only) has no read: the watch then starts from no
  resourceVersion, and the server's initial ADDED event is the read.
- When a watch ends (the server's timeout, or it broke), the follower reads and watches again; with
  `resume`, it watches on from the last resourceVersion it saw instead, and reads again only when the
  server says that version is gone.
- With `jitter`, each watch asks for a timeout drawn uniformly in [T, 2T] (as client-go's reflectors
  do), so that followers started together do not all end their watches together ever after.
- Every failure is reported and waited out with agent.retry's backoff (the server's Retry-After is a
  floor); an expired watch is waited out too (so a server that expires every watch at once is not
  hammered), without a report. The backoff resets once a watch ends normally.
- A watch the server does not end when it was asked to (plus the request deadline) is cut by the client
  (agent.kube.client, DeadlineExceeded): a failure like any other, so it is read and watched again.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.kube.client import Kube, Resource
from agent.kube.errors import ApiError, DeadlineExceeded
from agent.retry import Backoff

log = logging.getLogger(__name__)

Obj = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """What to follow: `watch(resource_version, timeout_seconds)` yields (type, object) until the server
    ends the watch; `read()` gives (the object or None, the resourceVersion to watch from), or is None
    when the object may only be watched."""

    what: str
    watch: Callable[[str | None, int], Iterable[tuple[str, Obj]]]
    read: Callable[[], tuple[Obj | None, str]] | None = None


def custom_object(kube: Kube, res: Resource, namespace: str, name: str, what: str = "") -> Target:
    """A custom object (a WorkloadGroup, say) through Kube: listed by name, watched by name."""
    return Target(what=what or f"{res[2]} {namespace}/{name}",
                  watch=lambda rv, timeout: kube.watch(res, namespace, name, rv, timeout),
                  read=lambda: kube.get_for_watch(res, namespace, name))


def version_of(obj: Obj | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


class Expired(Exception):
    """The watch's resourceVersion is gone from the server's history (or the server ended it with an
    error event): read again."""


class Follower:
    """Follows one Target in its own thread (start/stop), or in the caller's (run)."""

    def __init__(self, target: Target, *, seen: Callable[[Obj], None], gone: Callable[[], None],
                 failed: Callable[[ApiError], None] | None = None, watch_timeout: int = 300,
                 backoff: Backoff | None = None, resume: bool = False, since: str | None = None,
                 name: str = "follow", jitter: bool = False, rng: random.Random | None = None) -> None:
        """`since`: a resourceVersion already known (what the caller last read itself): the first watch
        starts there, without a read. `jitter`: each watch's timeout is drawn in [watch_timeout,
        2 x watch_timeout]."""
        self.target = target
        self.seen, self.gone, self.failed = seen, gone, failed
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.resume = resume
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.version: str | None = since or None   # where the next watch starts; None: read first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end (at once when it is waiting; after the watch's next event or end when it
        is watching); with a timeout, wait that long for it."""
        self._stop.set()
        if timeout is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.version is None and self.target.read is not None:
                    obj, rv = self.target.read()
                    self._report(obj)
                    self.version = rv or None
                self._watch()
            except Expired:
                log.debug("%s: watch expired; reading again", self.target.what)
                self.version = None
                self._stop.wait(self.backoff.next_delay())
                continue
            except ApiError as exc:
                if exc.status == 410 or not self.resume:
                    self.version = None
                if self.failed is not None:
                    self.failed(exc)
                delay = self.backoff.next_delay(getattr(exc, "retry_after", None))
                # A cut is said once, here when no caller reports failures (an outage is not news).
                level = logging.WARNING if isinstance(exc, DeadlineExceeded) and self.failed is None \
                    else logging.DEBUG
                log.log(level, "%s: %s; again in %.1fs", self.target.what, exc, delay)
                self._stop.wait(delay)
                continue
            except Exception:  # a bug here must not end the following: log it, read again later
                log.exception("%s: following failed unexpectedly", self.target.what)
                self.version = None
                self._stop.wait(self.backoff.next_delay())
                continue
            self.backoff.reset()
            if not self.resume:
                self.version = None

    def next_timeout(self) -> int:
        """The timeoutSeconds of the next watch."""
        if not self.jitter:
            return self.watch_timeout
        return self.watch_timeout + int(self.rng.random() * (self.watch_timeout + 1))

    def _watch(self) -> None:
        for kind, obj in self.target.watch(self.version, self.next_timeout()):
            if self._stop.is_set():
                return
            if kind == "ERROR":
                raise Expired(str(obj.get("message") or obj.get("reason") or obj.get("code") or "error"))
            if kind in ("ADDED", "MODIFIED"):
                self.seen(obj)
            elif kind == "DELETED":
                self.gone()
            self.version = version_of(obj) or self.version

    def _report(self, obj: Obj | None) -> None:
        if obj is None:
            self.gone()
        else:
            self.seen(obj)
