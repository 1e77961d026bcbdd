"""An agent killed with SIGKILL (or re-executed) and started again: the proxy is adopted or
replaced, never doubled."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.paths import Layout
from agent.sidecar import profiles
from agent.sidecar.adopt import read_pidfile
from devkit.envoy import bootstrap, sidecar_config
from devkit.ports import free_port

from .helpers import IstioStandIn

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[3]
ROOT = os.geteuid() == 0


class Agent:
    """tests/integration/sidecar/run_supervisor.py in a subprocess, read line by line."""

    def __init__(self, spec_file: Path, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.p = subprocess.Popen([sys.executable, "-m", "tests.integration.sidecar.run_supervisor",
                                   str(spec_file), str(root)], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.p.stderr or ()), daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def wait_for(self, word: str, timeout: float = 20.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if line.startswith(word):
                return line
        raise AssertionError(f"no {word!r} line; got {self.lines}; stderr: {''.join(self.errors)[-3000:]}")

    def running_pid(self) -> int:
        return int(self.wait_for("state running").split()[3])

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        self.wait_for("stopped")
        assert self.p.wait(10) == 0


def alive_with(arg: str) -> list[int]:
    """Pids of live (not zombie) processes with `arg` on their command line."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if arg in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def write_spec(spec: profiles.LaunchSpec, path: Path) -> Path:
    data = dataclasses.asdict(spec)
    data["env"] = dict(spec.env)
    path.write_text(json.dumps(data))
    return path


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.agents: list[Agent] = []

    def agent(self, spec_file: Path) -> Agent:
        a = Agent(spec_file, self.root)
        self.agents.append(a)
        return a

    def close(self, *markers: str) -> None:
        for a in self.agents:
            if a.p.poll() is None:
                a.p.kill()
                a.p.wait()
        for marker in markers:
            for pid in alive_with(marker):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close(str(tmp_path / "bootstrap.json"))


def envoy_spec(tmp: Path) -> tuple[Path, str]:
    admin = free_port()
    (tmp / "bootstrap.json").write_text(bootstrap(admin))
    spec = profiles.envoy_profile(sidecar_config(tmp, admin), (tmp / "bootstrap.json").read_text())
    return write_spec(spec, tmp / "spec.json"), str(tmp / "bootstrap.json")


def test_plain_envoy_after_the_agent_was_killed_there_is_exactly_one(world: World) -> None:
    spec_file, marker = envoy_spec(world.tmp)
    first = world.agent(spec_file)
    old = first.running_pid()
    first.kill()
    # Envoy asks the kernel for SIGTERM when its parent dies; the next agent finds what is left.
    second = world.agent(spec_file)
    new = second.running_pid()
    assert alive_with(marker) == [new]
    assert new != old
    second.stop()
    assert alive_with(marker) == []


def test_reexecuted_agent_adopts_its_envoy(world: World) -> None:
    spec_file, marker = envoy_spec(world.tmp)
    agent = world.agent(spec_file)
    pid = agent.running_pid()
    agent.p.send_signal(signal.SIGUSR1)
    agent.wait_for("reexec")
    assert agent.wait_for("state running") == f"state running pid {pid} adopted the running proxy"
    assert alive_with(marker) == [pid]
    record = read_pidfile(Layout(root=world.root).sidecar_pidfile)
    assert record is not None and record.pid == pid
    # The adopted Envoy is still supervised: killed, it is replaced by exactly one new one.
    os.kill(pid, signal.SIGKILL)
    agent.wait_for("state backoff")
    new = agent.running_pid()
    assert new != pid and alive_with(marker) == [new]
    agent.stop()
    assert alive_with(marker) == []


def test_reexecuted_agent_with_a_changed_environment_replaces_its_envoy(world: World) -> None:
    spec_file, marker = envoy_spec(world.tmp)
    agent = world.agent(spec_file)
    pid = agent.running_pid()
    data = json.loads(spec_file.read_text())
    data["env"]["CHANGED"] = "yes"      # as if cluster.env had changed while the agent was away
    spec_file.write_text(json.dumps(data))
    agent.p.send_signal(signal.SIGUSR1)
    agent.wait_for("reexec")
    new = agent.running_pid()
    assert new != pid and alive_with(marker) == [new]
    assert psutil.Process(new).environ()["CHANGED"] == "yes"
    agent.stop()


@pytest.fixture
def standin(world: World) -> Iterator[IstioStandIn]:
    s = IstioStandIn(user="nobody" if ROOT else None, stop_grace=1.0)
    yield s
    world.close(str(s.bootstrap), str(s.pilot_agent))
    s.cleanup()


def test_killed_agent_leaves_pilot_agent_running_and_the_next_adopts_it(world: World,
                                                                         standin: IstioStandIn) -> None:
    spec_file = write_spec(standin.spec, world.tmp / "spec.json")
    first = world.agent(spec_file)
    pid = first.running_pid()
    first.kill()
    assert alive_with(str(standin.pilot_agent)) == [pid]   # pilot-agent outlives the agent

    second = world.agent(spec_file)
    assert second.wait_for("state running") == f"state running pid {pid} adopted the running proxy"
    assert alive_with(str(standin.pilot_agent)) == [pid]
    assert len(alive_with(str(standin.bootstrap))) == 1     # one Envoy
    second.stop()
    assert alive_with(str(standin.pilot_agent)) == [] and alive_with(str(standin.bootstrap)) == []


def test_killed_agent_leaves_an_unhealthy_proxy_and_the_next_replaces_it(world: World,
                                                                         standin: IstioStandIn) -> None:
    spec_file = write_spec(standin.spec, world.tmp / "spec.json")
    first = world.agent(spec_file)
    pid = first.running_pid()
    first.kill()
    [envoy] = alive_with(str(standin.bootstrap))
    os.kill(envoy, signal.SIGSTOP)   # frozen: it no longer answers its readiness probe

    second = world.agent(spec_file)
    new = second.running_pid()
    assert new != pid
    assert alive_with(str(standin.pilot_agent)) == [new]
    assert len(alive_with(str(standin.bootstrap))) == 1
    second.stop()
