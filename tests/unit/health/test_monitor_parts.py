"""The monitor's pure parts: where probes connect, the status snapshot's shape."""

from __future__ import annotations

import pytest

from agent.health.config import AppConfig, FlapConfig
from agent.health.monitor import HealthSnapshot, damping, probe_host
from agent.health.probes import ProbeResult
from agent.health.state import Health
from agent.health.tracker import Cause, Damping


def test_probe_host() -> None:
    assert probe_host(AppConfig(), "10.0.0.5") == "127.0.0.1"
    assert probe_host(AppConfig(probe_host="instance"), "10.0.0.5") == "10.0.0.5"
    assert probe_host(AppConfig(probe_host="instance"), None) == "127.0.0.1"


def test_damping_from_config() -> None:
    assert damping(FlapConfig()) == Damping(min_dwell=5.0, max_transitions=6, window=300.0)


def test_snapshot_to_dict_uses_wall_clock_times() -> None:
    snap = HealthSnapshot(Health.UNHEALTHY, Cause.PROCESS_EXITED, "process 7 (app) exited", since=90.0,
                          probe="tcp://127.0.0.1:8080", last_result=ProbeResult(True, "ok", 0.0012),
                          last_probe_at=95.0, sidecar_ready=True, damped=False, transitions_in_window=2,
                          ports={8080: {"listening": False, "pids": []}})
    d = snap.to_dict(now=100.0)
    assert d["state"] == "unhealthy" and d["cause"] == "process-exited"
    assert d["last_probe"]["latency_ms"] == 1.2
    assert d["last_probe"]["at"] - d["since"] == pytest.approx(5.0)
    assert d["ports"] == {"8080": {"listening": False, "pids": []}}


def test_snapshot_wall_times_do_not_jitter_between_snapshots() -> None:
    # The same monotonic moments give the same wall times on every call: status.json is written
    # when something changed, not because two reads of the clocks disagree in the last digits.
    import time

    snap = HealthSnapshot(Health.HEALTHY, Cause.PROBE_SUCCEEDED, "ok", since=time.monotonic() - 30,
                          probe="tcp://127.0.0.1:8080", last_result=ProbeResult(True, "ok", 0.001),
                          last_probe_at=time.monotonic() - 3, sidecar_ready=True, damped=False,
                          transitions_in_window=0)
    first = snap.to_dict()
    assert all(snap.to_dict() == first for _ in range(200))
    assert first["since"] == pytest.approx(time.time() - 30, abs=1.0)
