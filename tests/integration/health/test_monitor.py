"""The monitor with real apps: a killed app is Unhealthy long before the probe period, a restart is
Healthy again, flapping is damped, the sidecar's readiness counts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.health.config import FlapConfig, ProbeConfig
from agent.health.monitor import HealthChanged, Monitor
from agent.health.portwatch import ListenerDown, ListenerUp, OwnerExited, PortWatch
from agent.health.probe_spec import probe_from_istio
from agent.health.state import Health
from agent.health.tracker import Cause

from .conftest import Apps, Events

NO_DAMPING = FlapConfig(min_dwell=0.0, max_transitions=1000, window=1.0)


def http_probe(port: int, **timing: int) -> ProbeConfig:
    # A generous timeout, so that a loaded machine does not fail the probes meant to pass.
    return probe_from_istio({"httpGet": {"port": port, "path": "/ready"}, "timeoutSeconds": 5, **timing})


@pytest.fixture
def monitors() -> Iterator[list[Monitor]]:
    started: list[Monitor] = []
    yield started
    for m in started:
        m.stop()


def start(monitors: list[Monitor], m: Monitor) -> Monitor:
    monitors.append(m)
    m.start()
    return m


def until(events: Events, state: Health, timeout: float) -> HealthChanged:
    """The first HealthChanged to `state`, skipping others."""
    end = time.monotonic() + timeout
    while True:
        ev = health(events.next(max(0.01, end - time.monotonic())))
        if ev.state is state:
            return ev


def health(event: object) -> HealthChanged:
    assert isinstance(event, HealthChanged), event
    return event


def test_sigkill_is_unhealthy_long_before_the_period_and_restart_is_healthy(
        apps: Apps, events: Events, monitors: list[Monitor]) -> None:
    app = apps.start("http")
    port = app.port
    m = start(monitors, Monitor(http_probe(port, periodSeconds=30), ports=[port], post=events.post,
                                flap=NO_DAMPING, sidecar_ready=True))
    assert health(events.next(5)).state is Health.HEALTHY

    killed = time.monotonic()
    os.kill(app.pid, signal.SIGKILL)
    ev = health(events.next(5))
    assert ev.state is Health.UNHEALTHY and ev.cause is Cause.PROCESS_EXITED
    assert ev.at - killed < 3.0  # the probe period is 30 s
    assert f"process {app.pid}" in ev.reason and "SIGKILL" in ev.reason
    app.proc.wait(5)

    apps.start("http", port=port)
    ev = health(events.next(10))  # the new listener is seen at the next scan and probed at once
    assert ev.state is Health.HEALTHY
    assert ev.at - killed < 10.0
    snap = m.snapshot()
    assert snap.state is Health.HEALTHY and snap.last_result is not None and snap.last_result.ok
    assert snap.ports[port]["listening"] is True and snap.ports[port]["pids"] == [apps.started[-1].pid]


def test_app_closing_its_port_is_unhealthy_without_waiting_for_the_probe(
        apps: Apps, events: Events, monitors: list[Monitor]) -> None:
    # A worker shares the listening socket: killing the worker is not the app's death.
    app = apps.start("tcp", child=True)
    start(monitors, Monitor(None, ports=[app.port], post=events.post, flap=NO_DAMPING, sidecar_ready=True,
                            port_interval=0.2))
    assert health(events.next(5)).state is Health.HEALTHY
    assert app.child_pid is not None
    os.kill(app.child_pid, signal.SIGKILL)
    assert events.drain(1.0) == []
    # Now the app itself: the socket closes with it.
    os.kill(app.pid, signal.SIGKILL)
    ev = health(events.next(5))
    assert ev.state is Health.UNHEALTHY and ev.cause is Cause.PROCESS_EXITED


def test_thresholds_and_initial_delay(apps: Apps, events: Events, monitors: list[Monitor],
                                      tmp_path: Path) -> None:
    status = tmp_path / "status"
    app = apps.start("http", "--status-file", str(status))
    cfg = probe_from_istio({"httpGet": {"port": app.port, "path": "/"}, "initialDelaySeconds": 1,
                            "successThreshold": 2, "failureThreshold": 2})
    cfg = ProbeConfig(http_get=cfg.http_get, initial_delay=cfg.initial_delay, period=0.2, timeout=5.0,
                      success_threshold=2, failure_threshold=2)
    started = time.monotonic()
    start(monitors, Monitor(cfg, ports=[app.port], post=events.post, flap=NO_DAMPING, sidecar_ready=True))
    ev = health(events.next(5))
    assert ev.state is Health.HEALTHY
    # No probe before the initial delay; then two successes 0.2 s apart.
    assert ev.at - started >= 1.1
    status.write_text("503")
    failing = time.monotonic()
    ev = health(events.next(5))
    assert ev.state is Health.UNHEALTHY and ev.reason == "probe failed: HTTP 503"
    assert ev.at - failing >= 0.15  # two failures were needed, not one


def test_a_hanging_app_is_unhealthy_after_the_failure_threshold(
        apps: Apps, events: Events, monitors: list[Monitor], tmp_path: Path) -> None:
    status = tmp_path / "status"
    app = apps.start("http", "--status-file", str(status))
    cfg = ProbeConfig(http_get=http_probe(app.port).http_get, period=1.0, timeout=1.0, failure_threshold=2)
    start(monitors, Monitor(cfg, ports=[app.port], post=events.post, flap=NO_DAMPING, sidecar_ready=True))
    until(events, Health.HEALTHY, 10)  # (a loaded machine may miss the 1 s timeout at first)
    status.write_text("hang")
    ev = health(events.next(5))
    assert ev.state is Health.UNHEALTHY and ev.reason == "probe failed: timed out"


def test_flapping_is_damped_and_settles(apps: Apps, events: Events, monitors: list[Monitor],
                                        tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("alternate")
    app = apps.start("http", "--status-file", str(status))
    cfg = ProbeConfig(http_get=http_probe(app.port).http_get, period=0.1, timeout=5.0, failure_threshold=1)
    flap = FlapConfig(min_dwell=0.3, max_transitions=4, window=60.0)
    m = start(monitors, Monitor(cfg, ports=[app.port], post=events.post, flap=flap, sidecar_ready=True))
    seen: list[object] = []
    end = time.monotonic() + 8.0
    while len(seen) < 4 and time.monotonic() < end:  # 4 transitions take about 0.5 s
        seen += events.drain(0.5)
    seen += events.drain(1.5)  # about 15 more alternating probe results: none may get through
    assert 2 <= len(seen) <= 4
    assert m.snapshot().transitions_in_window == len(seen)
    if len(seen) == 4:
        assert health(seen[-1]).state is Health.UNHEALTHY  # held out while it flaps
    # It steadies: damping holds the return until the window frees a slot (reconfigure to show it).
    status.write_text("200")
    m.reconfigure(cfg, ports=[app.port], flap=FlapConfig(min_dwell=0.3, max_transitions=4, window=1.0))
    ev = health(events.next(5))
    assert ev.state is Health.HEALTHY


def test_sidecar_readiness_gates_healthy(apps: Apps, events: Events, monitors: list[Monitor]) -> None:
    app = apps.start("http")
    m = start(monitors, Monitor(http_probe(app.port), ports=[app.port], post=events.post, flap=NO_DAMPING))
    time.sleep(1.0)  # the app answers, but the proxy is not up yet: no verdict, no event
    snap = m.snapshot()
    assert snap.state is Health.UNKNOWN and snap.cause is Cause.SIDECAR_NOT_READY
    m.set_sidecar_ready(True)
    assert health(events.next(2)).state is Health.HEALTHY
    m.set_sidecar_ready(False)
    assert health(events.next(2)).reason == "sidecar not ready"


def test_no_listener_at_start_is_unhealthy_at_once(events: Events, monitors: list[Monitor],
                                                   apps: Apps) -> None:
    app = apps.start("tcp")
    port = app.port
    app.kill()
    start(monitors, Monitor(None, ports=[port], post=events.post, flap=NO_DAMPING, sidecar_ready=True))
    ev = health(events.next(3))
    assert ev.state is Health.UNHEALTHY and ev.cause is Cause.PORT_CLOSED
    assert ev.reason == f"port {port} is not listening"


@pytest.mark.parametrize("use_pidfd", [True, False])
def test_portwatch_reports_owner_and_exit(apps: Apps, events: Events, use_pidfd: bool) -> None:
    app = apps.start("tcp")
    w = PortWatch([app.port], events.post, interval=0.2, use_pidfd=use_pidfd)
    w.start()
    try:
        up = events.next(3)
        assert isinstance(up, ListenerUp) and up.pids == (app.pid,)
        killed = time.monotonic()
        os.kill(app.pid, signal.SIGTERM)
        gone = events.next(3)
        assert isinstance(gone, OwnerExited) and gone.pid == app.pid and gone.ports == (app.port,)
        assert gone.at - killed < 3.0
        # Our test process is the parent and has not reaped it yet, so the status is known.
        assert gone.returncode in (-signal.SIGTERM, None)
        app.proc.wait(5)
        apps.start("tcp", port=app.port)
        again = events.next(3)
        assert isinstance(again, ListenerUp) and again.pids == (apps.started[-1].pid,)
        # Dropping a port forgets it; watching it again reports its listener again.
        w.set_ports([])
        w.set_ports([app.port])
        assert isinstance(events.next(3), ListenerUp)
        assert not any(isinstance(e, ListenerDown) for e in events.drain(0.5))
    finally:
        w.stop()


def test_sock_diag_and_proc_agree_on_listeners() -> None:
    import socket

    from agent.health.listeners import read_listeners_diag, read_listeners_proc

    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, socket.socket() as client:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        port = v4.getsockname()[1]
        v6.bind(("::1", port))
        v6.listen()
        client.connect(("127.0.0.1", port))  # an established socket on the port is not a listener
        found = read_listeners_diag([port, 1])
        assert found == read_listeners_proc([port, 1])
        assert len(found[port]) == 2


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = os.uname().release.split(".")
    return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)


def test_a_listener_that_comes_back_is_seen_within_a_scan_at_the_down_pace(apps: Apps, events: Events) -> None:
    # The resting interval is far longer than the test: every scan seen here is the down pace's.
    app = apps.start("tcp")
    w = PortWatch([app.port], events.post, interval=3600.0, down_interval=0.05)
    w.start()
    try:
        assert isinstance(events.next(3), ListenerUp)
        scans_up = w.scans
        os.kill(app.pid, signal.SIGKILL)
        assert isinstance(events.next(3), OwnerExited)
        app.proc.wait(5)
        # While the port is down it is looked at again and again (the resting pace would not look at all).
        deadline = time.monotonic() + 10
        while w.scans < scans_up + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.scans >= scans_up + 3
        apps.start("tcp", port=app.port)  # listening when this returns
        scans_listening = w.scans
        up = events.next(10)
        assert isinstance(up, ListenerUp) and up.pids == (apps.started[-1].pid,)
        # Seen by the scan under way when it started listening or the next one.
        assert w.scans - scans_listening <= 2
        # Up again: back to the resting pace, no more scans.
        scans_after = w.scans
        assert events.drain(0.5) == []
        assert w.scans == scans_after
    finally:
        w.stop()


def test_a_listener_whose_owner_is_watched_by_pidfd_is_scanned_at_the_slow_pace(apps: Apps, events: Events) -> None:
    # While the owner's exit wakes the watcher, the resting scans slow down to watched_interval (here
    # longer than the test); without pidfds they keep the plain interval.
    app = apps.start("tcp")
    w = PortWatch([app.port], events.post, interval=0.05, watched_interval=3600.0, use_pidfd=True)
    w.start()
    try:
        assert isinstance(events.next(3), ListenerUp)
        time.sleep(0.1)   # the scan under way when the owner was found is done
        scans = w.scans
        assert events.drain(0.5) == []
        assert w.scans == scans
        os.kill(app.pid, signal.SIGKILL)   # still seen at once: the pidfd, not a scan
        gone = events.next(3)
        assert isinstance(gone, OwnerExited) and gone.pid == app.pid
    finally:
        w.stop()
    app2 = apps.start("tcp")
    w = PortWatch([app2.port], events.post, interval=0.05, watched_interval=3600.0, use_pidfd=False)
    w.start()
    try:
        assert isinstance(events.next(3), ListenerUp)
        scans = w.scans
        time.sleep(0.5)
        assert w.scans > scans
    finally:
        w.stop()


def test_exit_status_of_an_app_its_parent_reaps_at_once(events: Events, tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import APP

    # The app's parent (here a shell, on a VM systemd) reaps it before the agent can read /proc.
    parent = subprocess.Popen(["sh", "-c", f'"{sys.executable}" "{APP}" tcp & wait'],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        port = int(parent.stdout.readline())
        w = PortWatch([port], events.post, interval=0.2)
        w.start()
        try:
            up = events.next(3)
            assert isinstance(up, ListenerUp) and len(up.pids) == 1 and up.pids[0] != parent.pid
            os.kill(up.pids[0], signal.SIGKILL)
            gone = events.next(3)
            assert isinstance(gone, OwnerExited) and gone.pid == up.pids[0]
            if w.use_pidfd and _kernel_at_least(6, 15):
                assert gone.returncode == -signal.SIGKILL
            else:
                assert gone.returncode in (-signal.SIGKILL, None)
        finally:
            w.stop()
    finally:
        parent.kill()
        parent.wait(5)


def test_reconfigure(apps: Apps, events: Events, monitors: list[Monitor], tmp_path: Path) -> None:

    status = tmp_path / "status"
    app = apps.start("http", "--status-file", str(status))
    m = start(monitors, Monitor(None, ports=[app.port], post=events.post, flap=NO_DAMPING,
                                sidecar_ready=True))
    assert health(events.next(5)).state is Health.HEALTHY
    assert m.snapshot().probe == f"tcp://127.0.0.1:{app.port}"
    with pytest.raises(ValueError, match="no probe and no app port"):
        m.reconfigure(None, ports=[])
    assert m.snapshot().probe == f"tcp://127.0.0.1:{app.port}"  # the running setup is kept
    # agent.yaml now asks for an HTTP probe; the app answers 500 to it: Unhealthy, without waiting
    # for the next 10 s period.
    status.write_text("500")
    cfg = ProbeConfig(http_get=http_probe(app.port).http_get, timeout=5.0, failure_threshold=1)
    m.reconfigure(cfg, ports=[app.port], flap=NO_DAMPING)
    ev = health(events.next(5))
    assert ev.state is Health.UNHEALTHY and ev.reason == "probe failed: HTTP 500"
    assert m.snapshot().probe == f"http://127.0.0.1:{app.port}/ready"
