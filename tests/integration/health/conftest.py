"""Real app processes for the health tests, started and killed by the tests."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

APP = Path(__file__).with_name("app.py")


@dataclass
class App:
    proc: subprocess.Popen[str]
    port: int
    child_pid: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)


class Apps:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[App] = []

    def start(self, mode: str, *args: str, port: int = 0, child: bool = False) -> App:
        argv = [sys.executable, str(APP), mode, "--port", str(port), *args]
        if child:
            argv.append("--child")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the app prints its port once it listens
        if not line:
            proc.wait(5)
            raise AssertionError(f"app {mode} did not start (exit {proc.returncode})")
        app = App(proc, int(line))
        if child:
            app.child_pid = int(proc.stdout.readline())
        self.started.append(app)
        return app

    def stop_all(self) -> None:
        for app in self.started:
            if app.child_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(app.child_pid, signal.SIGKILL)
            if app.proc.poll() is None:
                app.proc.kill()
            app.proc.wait(5)


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[Apps]:
    a = Apps(tmp_path)
    yield a
    a.stop_all()


class Events:
    """What a monitor posted, as the daemon's queue would hold it."""

    def __init__(self) -> None:
        self.q: queue.Queue[object] = queue.Queue()
        self.seen: list[object] = []

    def post(self, event: object) -> None:
        self.q.put(event)

    def next(self, timeout: float) -> object:
        event = self.q.get(timeout=timeout)
        self.seen.append(event)
        return event

    def drain(self, seconds: float) -> list[object]:
        end = time.monotonic() + seconds
        out = []
        while (left := end - time.monotonic()) > 0:
            try:
                out.append(self.next(left))
            except queue.Empty:
                break
        return out


@pytest.fixture
def events() -> Events:
    return Events()
