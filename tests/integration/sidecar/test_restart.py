"""Supervisor.restart(): returns at once, the old proxy is stopped in a worker thread, the new one
starts from the loop; an asked restart is not a crash. With the real Envoy and with a stand-in proxy
that keeps running for a while after SIGTERM."""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest

from agent.paths import Layout
from agent.sidecar import profiles
from agent.sidecar.adopt import read_pidfile
from agent.sidecar.envoy_admin import active_requests
from agent.sidecar.machine import State
from agent.sidecar.profiles import LaunchSpec, Policy
from agent.sidecar.supervisor import Supervisor
from devkit.envoy import bootstrap, sidecar_config
from devkit.ports import free_port

from .helpers import App, Loop

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(120)]
STUBBORN = Path(__file__).with_name("stubborn_proxy.py")
LINGER = 3.0   # how long the stand-in keeps running after SIGTERM; below its stop_grace


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(root=tmp_path / "root")


def stubborn_spec(tmp_path: Path) -> tuple[LaunchSpec, Path]:
    """The stand-in, with pre-start and post-stop commands that write to the same record."""
    port = free_port()
    record = tmp_path / "record.txt"
    record.touch()
    spec = LaunchSpec(
        profile="istio", argv=(sys.executable, str(STUBBORN), str(port), str(LINGER), str(record)),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, user=None,
        readiness_url=f"http://127.0.0.1:{port}/ready", admin_address=("127.0.0.1", port), ports=(port,),
        drain="signal", identifier="stubborn",
        pre_start=(("sh", "-c", f"echo pre-start >> {record}"),),
        post_stop=(("sh", "-c", f"echo post-stop >> {record}"),),
        policy=Policy(ready_timeout=20.0, backoff_initial=0.05, backoff_max=0.5, max_exits=5, window=60.0,
                      drain_timeout=5.0, stop_grace=LINGER + 10.0))
    return spec, record


def lines(record: Path) -> list[str]:
    return record.read_text().splitlines()


def test_restart_returns_while_the_old_proxy_still_runs(tmp_path: Path, layout: Layout) -> None:
    spec, record = stubborn_spec(tmp_path)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    new: int | None = None
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        old = sup.pid
        assert old is not None
        sup.restart()
        # Returned: the old proxy is still running (it ignores SIGTERM for a while), nothing new yet.
        assert sup.state is State.RESTARTING and sup.pid is None
        assert _alive(old)
        sup.restart()   # asked again while one runs: folded into it
        assert sup.state is State.RESTARTING and sup.requested_restarts == 1

        # The loop keeps running meanwhile; a new proxy only once the old one is gone.
        overlap: list[int] = []

        def done() -> bool:
            if sup.pid is not None and _alive(old):
                overlap.append(sup.pid)
            return sup.state is State.RUNNING

        assert loop.run_until(sup, done, timeout=30), sup.reason
        new = sup.pid
        assert overlap == [] and new is not None and new != old and not _alive(old)
        assert sup.restarts == 0 and sup.requested_restarts == 1
        assert loop.states(sup) == [State.STARTING, State.RUNNING, State.RESTARTING, State.STARTING,
                                    State.RUNNING]
        pidfile = read_pidfile(layout.sidecar_pidfile)
        assert pidfile is not None and pidfile.pid == new
        with urllib.request.urlopen(spec.readiness_url, timeout=2) as resp:
            assert resp.status == 200
        assert lines(record) == ["pre-start", f"start {old}", f"sigterm {old}", f"exit {old}", "post-stop",
                                 "pre-start", f"start {new}"]

        # A crash after an asked restart is still a crash: restarted with the usual accounting.
        os.kill(new, signal.SIGKILL)
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING and sup.pid != new), sup.reason
        assert sup.restarts == 1 and sup.requested_restarts == 1
        new = sup.pid
    finally:
        sup.stop(drain=False)
    # The final stop still works after a restart.
    assert sup.state is State.STOPPED
    assert new is not None and not _alive(new)
    assert lines(record)[-3:] == [f"sigterm {new}", f"exit {new}", "post-stop"]
    assert not layout.sidecar_pidfile.exists()


def test_stop_during_a_restart_stops_the_old_proxy_and_starts_nothing(tmp_path: Path, layout: Layout) -> None:
    spec, record = stubborn_spec(tmp_path)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
    old = sup.pid
    assert old is not None
    sup.restart()
    assert sup.state is State.RESTARTING and _alive(old)
    sup.stop(drain=False)   # blocking: waits for the restart's worker, which stops the old proxy
    assert sup.state is State.STOPPED and not _alive(old)
    # Whatever the worker posted is stale now: handling it starts nothing.
    assert not loop.run_until(sup, lambda: sup.state is not State.STOPPED, timeout=0.5)
    assert sup.pid is None
    assert lines(record) == ["pre-start", f"start {old}", f"sigterm {old}", f"exit {old}", "post-stop"]
    assert loop.states(sup)[-3:] == [State.RESTARTING, State.STOPPING, State.STOPPED]
    sup.restart()           # nothing to restart once stopped
    assert sup.state is State.STOPPED and sup.requested_restarts == 1


def test_a_newer_spec_asked_during_a_restart_is_the_one_started(tmp_path: Path, layout: Layout) -> None:
    spec, record = stubborn_spec(tmp_path)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        old = sup.pid
        sup.restart()
        newer = dataclasses.replace(spec, pre_start=(("sh", "-c", f"echo pre-start newer >> {record}"),))
        sup.restart(spec=newer)   # folded into the running restart, but its spec wins
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING, timeout=30), sup.reason
        new = sup.pid
        assert sup.spec is newer and sup.requested_restarts == 1 and sup.restarts == 0
        # The start prepared for the first spec is undone (post-stop) before the newer one's pre-start.
        assert lines(record) == ["pre-start", f"start {old}", f"sigterm {old}", f"exit {old}", "post-stop",
                                 "pre-start", "post-stop", "pre-start newer", f"start {new}"]
    finally:
        sup.stop(drain=False)


def test_a_restart_whose_new_port_is_taken_is_fatal(tmp_path: Path, layout: Layout) -> None:
    spec, _ = stubborn_spec(tmp_path)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        try:
            assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
            old = sup.pid
            assert old is not None
            sup.restart(spec=dataclasses.replace(spec, ports=(*spec.ports, taken)))
            assert loop.run_until(sup, lambda: sup.state is State.FATAL, timeout=30), sup.reason
            assert f"port {taken} is already in use by pid {os.getpid()}" in sup.reason
            assert sup.pid is None and not _alive(old) and sup.restarts == 0
        finally:
            sup.stop(drain=False)


def test_a_restart_whose_pre_start_fails_counts_as_an_exit(tmp_path: Path, layout: Layout) -> None:
    spec, _ = stubborn_spec(tmp_path)
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        sup.restart(spec=dataclasses.replace(spec, pre_start=(("false",),)))
        assert loop.run_until(sup, lambda: sup.state is State.BACKOFF, timeout=30), sup.reason
        assert sup.reason.startswith("pre-start command failed; restarting in ")
        assert sup.machine.exits and sup.pid is None
    finally:
        sup.stop(drain=False)


def test_envoy_restart_drains_the_request_in_flight(tmp_path: Path, layout: Layout) -> None:
    app = App(delay=2.0)
    admin = free_port()
    listener = free_port()
    (tmp_path / "bootstrap.json").write_text(bootstrap(admin, listener, app.port))
    cfg = sidecar_config(tmp_path, admin, drain_timeout=10.0)
    spec = profiles.envoy_profile(cfg, (tmp_path / "bootstrap.json").read_text())
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        old = sup.pid
        assert old is not None
        answer: list[bytes] = []

        def one_request() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", listener, timeout=10)
            conn.request("GET", "/slow")
            answer.append(conn.getresponse().read())
            conn.close()

        t = threading.Thread(target=one_request)
        t.start()
        assert loop.run_until(sup, lambda: active_requests(spec) == 1, timeout=10)
        sup.restart(drain=True)
        # The drain waits for the request in flight: the old Envoy is still there.
        assert sup.state is State.RESTARTING and _alive(old)
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING, timeout=30), sup.reason
        t.join(10)
        assert answer == [b"ok\n"]
        new = sup.pid
        assert new is not None and new != old and not _alive(old)
        assert sup.restarts == 0 and sup.requested_restarts == 1
        with urllib.request.urlopen(spec.readiness_url, timeout=2) as resp:
            assert resp.read().strip() == b"LIVE"
        with urllib.request.urlopen(f"http://127.0.0.1:{listener}/", timeout=5) as resp:
            assert resp.read() == b"ok\n"   # the new Envoy serves the listener
        assert State.BACKOFF not in loop.states(sup)
    finally:
        sup.stop(drain=False)
        app.close()
    assert sup.state is State.STOPPED


@pytest.mark.parametrize("drain", [True, False])
def test_stop_during_a_draining_restart_drains_only_when_asked(tmp_path: Path, layout: Layout,
                                                               drain: bool) -> None:
    app = App(delay=5.0)
    admin, listener = free_port(), free_port()
    (tmp_path / "bootstrap.json").write_text(bootstrap(admin, listener, app.port))
    spec = profiles.envoy_profile(sidecar_config(tmp_path, admin, drain_timeout=20.0),
                                  (tmp_path / "bootstrap.json").read_text())
    loop = Loop()
    sup = Supervisor(spec, layout, loop.post)
    sup.start()
    outcome: list[object] = []

    def one_request() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", listener, timeout=15)
        try:
            conn.request("GET", "/slow")
            outcome.append(conn.getresponse().read())
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)
        finally:
            conn.close()

    t = threading.Thread(target=one_request)
    try:
        assert loop.run_until(sup, lambda: sup.state is State.RUNNING), sup.reason
        old = sup.pid
        assert old is not None
        t.start()
        assert loop.run_until(sup, lambda: active_requests(spec) == 1, timeout=10)
        sup.restart(drain=True)
        assert sup.state is State.RESTARTING and _alive(old)
        sup.stop(drain=drain)
        assert sup.state is State.STOPPED and not _alive(old) and sup.pid is None
        t.join(15)
        if drain:   # the restart's drain went on: the request was answered before Envoy stopped
            assert outcome == [b"ok\n"]
        else:       # cut short: Envoy stopped with the request unanswered
            assert len(outcome) == 1 and isinstance(outcome[0], OSError | http.client.HTTPException)
    finally:
        sup.stop(drain=False)
        app.close()
