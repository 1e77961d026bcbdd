"""One shape for the agent's periodic threads (the address watch, the identity refresh, the own-token
renewal): a daemon thread running `run()`, whose waits are on `_stop` so that stop() ends them at once.
They only post events; the loop decides."""

from __future__ import annotations

import threading
from typing import Self


class Background:
    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run(self) -> None:
        raise NotImplementedError
