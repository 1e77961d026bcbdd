"""The generations of the `kubernetes` Python client the agent must work with, each in its own Python,
and a handle on the agent's API layer running under one of them (tests/clientchild.py).

- debian12: Debian 12's python3-kubernetes (22.6) under /usr/bin/python3, what the .deb depends on
  (scripts/setup.sh --system-test installs it);
- k30: the 30.1.0 that Debian 13 ships, from PyPI into .venv-k30 (scripts/setup.sh makes it);
- newest: the newest release on PyPI, in the main .venv.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Generation:
    id: str
    python: str
    what: str
    major: tuple[int, ...] = ()   # the client majors expected there (empty: any)

    @functools.cached_property
    def version(self) -> str | None:
        """The client version under this Python, or None when that Python or client is missing."""
        if not os.path.exists(self.python):
            return None
        probe = subprocess.run([self.python, "-c", "import kubernetes, yaml; print(kubernetes.__version__)"],
                               capture_output=True, text=True, check=False, env=_env(), timeout=60)
        version = probe.stdout.strip()
        if probe.returncode != 0 or not version:
            return None
        if self.major and int(version.split(".")[0]) not in self.major:
            return None
        return version

    def skip_reason(self) -> str:
        return f"{self.what} is not installed ({self.python}; run scripts/setup.sh --system-test)"


GENERATIONS = (
    Generation("debian12", "/usr/bin/python3", "Debian 12's python3-kubernetes (22.x)", (22,)),
    Generation("k30", str(REPO / ".venv-k30" / "bin" / "python"), "kubernetes 30.1.0 (Debian 13's)", (30,)),
    Generation("newest", sys.executable, "the newest kubernetes client from PyPI"),
)


@pytest.fixture(params=GENERATIONS, ids=[g.id for g in GENERATIONS])
def gen(request: pytest.FixtureRequest) -> Generation:
    """Each generation in turn (the test id names it); skipped where it is not installed."""
    g: Generation = request.param
    if g.version is None:
        pytest.skip(g.skip_reason())
    return g


def _env() -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
    return env


class RemoteError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        self.type, self.status = error.get("type"), error.get("status")
        super().__init__(f"{error.get('type')}: {error.get('message')}\n{error.get('trace', '')}")


class Agent:
    """The agent's API layer in a child process under one generation's Python."""

    def __init__(self, gen: Generation, extra_env: dict[str, str] | None = None) -> None:
        self.gen = gen
        # A file, not a pipe: the child never blocks on it. Closed in close().
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen([gen.python, "-m", "tests.clientchild"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env={**_env(), **(extra_env or {})}, cwd=str(REPO))

    def ask(self, op: str, **kw: Any) -> dict[str, Any]:
        """The raw answer: {"ok": ...} or {"error": ...}."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            self.stderr.seek(0)
            err = self.stderr.read()
            raise AssertionError(f"[{self.gen.id}] the child ended: {err[-3000:]}")
        return json.loads(line)

    def call(self, op: str, **kw: Any) -> Any:
        """The result; RemoteError (type and status of the agent's exception) on an error."""
        answer = self.ask(op, **kw)
        if "error" in answer:
            raise RemoteError(answer["error"])
        return answer["ok"]

    def kube(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.call("kube", method=method, args=list(args), kwargs=kwargs)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()
