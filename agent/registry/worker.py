"""The registry's API worker: one thread running one operation at a time (agent.registry.converge), so
the loop never blocks on the API and operations on the same entry never overlap; each outcome is posted
back as RegistryResult."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.kube.client import Kube
from agent.kube.errors import ApiError, Unavailable
from agent.registry.converge import Outcome

log = logging.getLogger(__name__)

Post = Callable[[object], None]


@dataclass(frozen=True)
class RegistryResult:
    seq: int
    outcome: Outcome


class RegistryWorker:
    """One thread running one operation at a time; posts RegistryResult(seq, outcome)."""

    def __init__(self, kube: Kube, post: Post) -> None:
        self.kube, self.post = kube, post
        self._q: queue.Queue[tuple[int, Callable[[Kube], Outcome]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="registry-worker", daemon=True)
        self._thread.start()

    def submit(self, seq: int, op: Callable[[Kube], Outcome]) -> None:
        self._q.put((seq, op))

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            seq, op = item
            try:
                outcome = op(self.kube)
            except ApiError as exc:
                outcome = Outcome(error=exc)
            except Exception as exc:  # a bug must not kill the worker: report it as an unknown failure
                log.exception("registry operation failed unexpectedly")
                outcome = Outcome(error=Unavailable("run", "registry operation", 0, repr(exc)))
            self.post(RegistryResult(seq, outcome))
