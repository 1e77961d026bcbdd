"""A registrar driven the way the daemon drives it, without the rest of the agent: for the registry's
tests and the fleet benchmark."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.kube.client import Kube
from agent.registry.group import WATCH_TIMEOUT, follow_group
from agent.registry.registrar import Registrar
from agent.registry.states import Settings
from agent.registry.worker import RegistryWorker


class Driver:
    """Runs a Registrar with its worker and group follower the way the daemon does: one queue, one loop
    thread."""

    def __init__(self, kube: Kube, settings: Settings, build: Callable[[dict[str, Any]], dict[str, Any]],
                 watch_group: bool = True, watch_timeout: int = WATCH_TIMEOUT) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self.worker = RegistryWorker(kube, self.events.put)
        self.registrar = Registrar(settings, build, self.worker.submit)
        self.watcher = follow_group(kube, settings.namespace, settings.group, self.events.put,
                                    watch_timeout) if watch_group else None
        self.calls: queue.Queue[Callable[[Registrar, float], None]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="registry-loop", daemon=True)

    def start(self) -> Driver:
        if self.watcher:
            self.watcher.start()
        self._thread.start()
        return self

    def do(self, fn: Callable[[Registrar, float], None]) -> None:
        """Run fn(registrar, now) on the loop thread (inputs must come from there)."""
        self.calls.put(fn)
        self.events.put(_Wake())

    def _loop(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            try:
                ev = self.events.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                ev = None
            now = time.monotonic()
            while not self.calls.empty():
                self.calls.get()(self.registrar, now)
            if ev is not None and not isinstance(ev, _Wake):
                self.registrar.handle(ev, now)
            deadline = self.registrar.tick(time.monotonic())

    def stop(self, withdraw: bool = True, timeout: float = 15.0) -> bool:
        """Shut down like the daemon; True when the registrar finished within timeout."""
        self.do(lambda r, now: r.shutdown(now, timeout, withdraw))
        end = time.monotonic() + timeout + 2
        while time.monotonic() < end and not self.registrar.finished:
            time.sleep(0.05)
        self.kill()
        return self.registrar.finished

    def kill(self) -> None:
        """Stop every thread without any API call (as if the VM died)."""
        self._stop.set()
        if self.watcher:
            self.watcher.stop()
        self.worker.stop(timeout=1.0)
        self._thread.join(2.0)


class _Wake:
    pass
