"""Records the registry's Kubernetes Events without ever holding up registration: the loop turns the
registrar's changes into writes (agent.registry.events: pure) and hands them to a small writer thread
through a bounded queue. When the queue is full the oldest write is dropped and counted; a failed
write is logged at debug level and counted, never retried (the next change records again).

    recorder = Recorder(kube, instance, count=lambda result: metrics.inc("events", result))
    recorder.record(changes)      # loop thread: cheap, never blocks
    recorder.stop(timeout)        # sends what is queued, for at most `timeout` seconds
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable

from agent.kube.client import EVENTS, Kube
from agent.kube.errors import ApiError, NotFound
from agent.registry import events
from agent.registry.states import Change

log = logging.getLogger(__name__)

QUEUE_SIZE = 32


def send(kube: Kube, write: events.Write) -> str:
    """One write: create, or patch a series (and create it, series included, when the event is gone, as
    client-go does once the server has dropped it). Returns "created" or "patched"; raises ApiError."""
    if write.op == "patch":
        try:
            kube.merge_patch(EVENTS, write.namespace, write.name, write.series_patch())
            return "patched"
        except NotFound:
            pass
    kube.create(EVENTS, write.body)
    return "created"


class Recorder:
    """The aggregator (loop thread) and the writer thread behind a bounded queue."""

    def __init__(self, kube: Kube, instance: str, count: Callable[[str], None] = lambda result: None,
                 size: int = QUEUE_SIZE, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
                 ) -> None:
        self.kube, self.count, self.clock = kube, count, clock
        self.aggregator = events.Aggregator(instance)
        self._q: collections.deque[events.Write] = collections.deque()
        self._size = size
        self._cond = threading.Condition()
        self._stopping = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="registry-events", daemon=True)
        self._thread.start()

    def record(self, changes: Iterable[Change]) -> None:
        for change in changes:
            n = events.notice(change)
            if n is None:
                continue
            write = self.aggregator.record(n, self.clock())
            if write is None:
                self.count("filtered")
                continue
            with self._cond:
                if len(self._q) >= self._size:
                    self._q.popleft()
                    self.dropped += 1
                    self.count("dropped")
                self._q.append(write)
                self._cond.notify()

    def stop(self, timeout: float = 2.0) -> None:
        """Let the writer send what is queued, for at most `timeout` seconds, then end it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._stopping:
                    self._cond.wait()
                if not self._q:
                    return
                write = self._q.popleft()
            try:
                self.count(send(self.kube, write))
            except ApiError as exc:
                log.debug("event %s %s not recorded: %s", write.body.get("reason"), write.name, exc)
                self.count("failed")
            except Exception:  # a bug must not end the writer
                log.debug("event %s not recorded", write.name, exc_info=True)
                self.count("failed")
