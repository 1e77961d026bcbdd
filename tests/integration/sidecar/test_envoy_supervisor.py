"""The supervisor running the real Envoy: start, ready, restart, crash loop, drain, port conflicts."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from agent.paths import Layout
from agent.sidecar import profiles
from agent.sidecar.adopt import read_pidfile
from agent.sidecar.machine import STABLE_AFTER, SidecarStateChanged, State
from agent.sidecar.supervisor import Supervisor
from devkit.envoy import bootstrap, sidecar_config
from devkit.ports import free_port

from .helpers import App, Loop

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(120)]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(root=tmp_path / "root")


def make(tmp_path: Path, listener: bool = False, app_port: int | None = None, **overrides: object
         ) -> profiles.LaunchSpec:
    admin = free_port()
    listener_port = free_port() if listener else None
    (tmp_path / "bootstrap.json").write_text(bootstrap(admin, listener_port, app_port))
    cfg = sidecar_config(tmp_path, admin, **overrides)
    return profiles.envoy_profile(cfg, (tmp_path / "bootstrap.json").read_text())


def test_start_ready_sigkill_restart_and_stop(tmp_path: Path, layout: Layout) -> None:
    spec = make(tmp_path)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        first = sup.pid
        assert first is not None and psutil.Process(first).is_running()
        record = read_pidfile(layout.sidecar_pidfile)
        assert record is not None and record.pid == first and record.argv == spec.argv
        assert os.getpgid(first) == first  # its own process group

        os.kill(first, signal.SIGKILL)
        assert loop.run_until(sup, lambda: sup.state is State.BACKOFF)
        assert "SIGKILL" in sup.reason
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING and sup.pid != first), sup.reason
        assert sup.restarts == 1
        assert sup.snapshot().as_dict() == {"profile": "envoy", "state": "running", "ready": True, "pid": sup.pid,
                                  "restarts": 1, "requested_restarts": 0, "reason": "ready",
                                  "restart_epoch": 0}
        with urllib.request.urlopen(spec.readiness_url, timeout=2) as resp:
            assert resp.read().strip() == b"LIVE"
        states = loop.states(sup)
        assert states == [State.STARTING, State.RUNNING, State.BACKOFF, State.STARTING, State.RUNNING]
    finally:
        pid = sup.pid
        sup.stop(drain=True)
    assert sup.state is State.STOPPED
    assert pid is not None and not _alive(pid)
    assert not layout.sidecar_pidfile.exists()


def test_crash_loop_goes_fatal(tmp_path: Path, layout: Layout) -> None:
    spec = make(tmp_path)
    # An Envoy that cannot start: the bootstrap it is given does not exist.
    argv = list(spec.argv)
    argv[argv.index("-c") + 1] = str(tmp_path / "missing.yaml")
    from dataclasses import replace

    spec = replace(spec, argv=tuple(argv), policy=replace(spec.policy, max_exits=3, window=60.0))
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert loop.run_until(sup, lambda: sup.state is State.FATAL, timeout=30), sup.reason
    assert "crash loop" in sup.reason and "exited with status" in sup.reason
    assert sup.restarts == 3  # 4 exits: the first start and 3 restarts
    assert sup.pid is None
    sup.stop()


def test_a_first_crash_after_a_healthy_run_restarts_at_once_and_a_crash_loop_still_ends_fatal(
        tmp_path: Path, layout: Layout) -> None:
    from dataclasses import replace

    spec = make(tmp_path)
    spec = replace(spec, policy=replace(spec.policy, max_exits=3, window=600.0))
    shift = [0.0]   # the supervisor's clock, moved on to stand for a long healthy run
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post, clock=lambda: time.monotonic() + shift[0])
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        shift[0] += STABLE_AFTER
        first = sup.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert loop.run_until(sup, lambda: sup.state is not State.RUNNING)
        assert sup.state is State.BACKOFF and sup.reason.endswith("restarting in 0.00s")
        assert sup.machine.backoff.attempts == 0   # no backoff step drawn
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING and sup.pid != first), sup.reason
        # Killed again as soon as it is up, again and again: each restart draws a growing backoff
        # step, and the fourth exit within the window is a crash loop.
        for n in (1, 2, 3):
            pid = sup.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert loop.run_until(sup, lambda: sup.state in (State.BACKOFF, State.FATAL)), sup.reason
            if n == 3:
                break
            assert sup.state is State.BACKOFF and sup.machine.backoff.attempts == n
            assert loop.run_until(sup, lambda p=pid: sup.state is State.RUNNING and sup.pid != p), sup.reason
        assert sup.state is State.FATAL and "4 exits within 600s (crash loop)" in sup.reason
        assert sup.restarts == 3
    finally:
        sup.stop(drain=False)


def test_not_ready_in_time_is_restarted(tmp_path: Path, layout: Layout) -> None:
    from dataclasses import replace

    spec = make(tmp_path)
    # Probe a port nobody serves: Envoy runs but never looks ready.
    spec = replace(spec, readiness_url=f"http://127.0.0.1:{free_port()}/ready",
                   policy=replace(spec.policy, ready_timeout=1.0))
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    first = sup.pid
    try:
        assert loop.run_until(sup, lambda: sup.restarts >= 1, timeout=15)
        assert any(isinstance(e, SidecarStateChanged) and "not ready within 1s" in e.reason
                   for e in loop.seen)
        assert first is not None and not _alive(first)
    finally:
        sup.stop(drain=False)


def test_port_conflict_is_fatal_with_a_clear_message(tmp_path: Path, layout: Layout) -> None:
    spec = make(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(spec.admin_address)
        squatter.listen()
        loop = Loop()
        sup = Supervisor(spec, layout, loop.post)
        sup.start()
        assert sup.state is State.FATAL
        port = spec.admin_address[1]
        assert f"port {port} is already in use by pid {os.getpid()} ({psutil.Process().name()})" \
            in sup.reason
        assert sup.pid is None
        # No restart loop: time passes, nothing is started.
        assert not loop.run_until(sup, lambda: sup.state is not State.FATAL, timeout=0.5)
        assert sup.restarts == 0


def test_drain_under_load_loses_no_accepted_request(tmp_path: Path, layout: Layout) -> None:
    app = App(delay=0.3)
    # Clients keep sending to the end: the drain runs to its timeout, then Envoy is stopped.
    spec = make(tmp_path, listener=True, app_port=app.port, drain_timeout=2.0)
    listener_port = spec.ports[1]
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason

    results: list[tuple[float, bool]] = []   # (time the request was sent, succeeded)
    stop_clients = threading.Event()

    def client() -> None:
        while not stop_clients.is_set():
            sent = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{listener_port}/slow", timeout=5) as r:
                    ok = r.status == 200 and r.read() == b"ok\n"
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                ok = False
            results.append((sent, ok))
            if not ok:
                time.sleep(0.02)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    drain_began = time.monotonic()
    sup.stop(drain=True)
    took = time.monotonic() - drain_began
    stop_clients.set()
    for t in clients:
        t.join(10)
    app.close()

    before = [ok for sent, ok in results if sent < drain_began - 0.05]
    assert len(before) >= 8
    assert all(before), f"{before.count(False)} of {len(before)} requests sent before the drain failed"
    assert took < spec.policy.drain_timeout + spec.policy.stop_grace
    assert sup.state is State.STOPPED


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_drain_waits_for_in_flight_requests_then_stops_early(tmp_path: Path, layout: Layout) -> None:
    app = App(delay=1.0)
    spec = make(tmp_path, listener=True, app_port=app.port, drain_timeout=10.0)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    answer: list[bytes] = []

    def one_request() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{spec.ports[1]}/slow", timeout=5) as r:
            answer.append(r.read())

    t = threading.Thread(target=one_request)
    t.start()
    time.sleep(0.3)   # the request is in flight, the app answers after 1 s
    began = time.monotonic()
    sup.stop(drain=True)
    took = time.monotonic() - began
    t.join(5)
    app.close()
    assert answer == [b"ok\n"]
    assert 0.4 < took < 5.0   # waited for the request, not for the whole drain timeout


def test_output_goes_to_log_dir_when_asked(tmp_path: Path, layout: Layout) -> None:
    from agent import manifest

    spec = make(tmp_path, log_dir=str(layout.under("/var/log/istio")))
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    finally:
        sup.stop(drain=False)
    text = layout.under("/var/log/istio/envoy.log").read_text()
    assert "starting main dispatch loop" in text or "caught ENVOY_SIGTERM" in text
    # Created by the agent: recorded, so that a purge removes it (and the directories it made).
    written = manifest.load(layout)
    assert written.logs == ["/var/log/istio/envoy.log"]
    assert written.dirs == ["/var", "/var/log", "/var/log/istio"]


def test_hot_restart_hands_over_without_failed_requests(tmp_path: Path, layout: Layout) -> None:
    from agent.sidecar.envoy_admin import server_epoch

    app = App(delay=0.05)
    # drain_timeout 1 s: the old epoch drains for 1 s and is told to exit 6 s after the hand-over.
    spec = make(tmp_path, listener=True, app_port=app.port, drain_timeout=1.0)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    old = sup.pid
    assert old is not None and server_epoch(spec) == 0

    failures: list[str] = []
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{spec.ports[1]}/slow", timeout=5) as r:
                    r.read()
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.3)
    assert sup.hot_restart()
    assert sup.state is State.STARTING
    assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    new = sup.pid
    assert new != old and server_epoch(spec) == 1
    cmdline = psutil.Process(new).cmdline()
    assert cmdline[cmdline.index("--restart-epoch") + 1] == "1"
    # The old epoch goes away by itself; that is not an exit of the proxy.
    assert loop.run_until(sup, lambda: not _alive(old), timeout=15)
    time.sleep(0.2)
    done.set()
    t.join(10)
    app.close()
    loop.states(sup)
    assert sup.state is State.RUNNING and sup.pid == new and sup.restarts == 0
    assert failures == []
    record = read_pidfile(layout.sidecar_pidfile)
    assert record is not None and record.pid == new
    assert record.argv[record.argv.index("--restart-epoch") + 1] == "1"
    sup.stop(drain=False)
    assert not _alive(new)


def test_a_port_taken_while_in_backoff_is_fatal_not_a_restart_loop(tmp_path: Path, layout: Layout) -> None:
    from agent.config import BackoffConfig

    spec = make(tmp_path, backoff=BackoffConfig(1.0, 1.0))
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    old = sup.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert loop.run_until(sup, lambda: sup.state is State.BACKOFF)
    with socket.socket() as squatter:
        squatter.bind(spec.admin_address)
        squatter.listen()
        assert loop.run_until(sup, lambda: sup.state is State.FATAL, timeout=10)
        assert f"port {spec.admin_address[1]} is already in use by pid {os.getpid()}" in sup.reason
        assert sup.restarts == 1 and sup.pid is None


def test_a_missing_binary_is_fatal_at_once(tmp_path: Path, layout: Layout) -> None:
    spec = make(tmp_path, envoy_binary=str(tmp_path / "no-envoy"))
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert sup.state is State.FATAL
    assert sup.reason.startswith(f"cannot start {tmp_path / 'no-envoy'}: ")
    assert "No such file" in sup.reason


def test_a_hung_envoy_is_taken_out_comes_back_and_if_hung_for_good_is_restarted(
        tmp_path: Path, layout: Layout) -> None:
    """SIGSTOP freezes the real Envoy: its /ready no longer answers. After failure_threshold missed
    answers the sidecar is not ready; SIGCONT brings it back; frozen past restart_threshold it is
    killed and replaced, which counts as a crash."""
    from dataclasses import replace

    spec = make(tmp_path)
    spec = replace(spec, policy=replace(spec.policy, liveness_period=0.2, liveness_timeout=0.2,
                                        failure_threshold=2, restart_threshold=8))
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        first = sup.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        assert loop.run_until(sup, lambda: sup.state is State.UNRESPONSIVE, timeout=20), sup.reason
        assert not sup.ready and "not answering its readiness check" in sup.reason
        os.kill(first, signal.SIGCONT)
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING, timeout=20), sup.reason
        assert sup.pid == first and sup.restarts == 0  # the same proxy, nothing counted

        os.kill(first, signal.SIGSTOP)
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING and sup.pid != first, timeout=30), sup.reason
        assert sup.restarts == 1 and len(sup.machine.exits) == 1  # a crash, counted
        assert not psutil.pid_exists(first)
    finally:
        sup.stop(drain=False)
