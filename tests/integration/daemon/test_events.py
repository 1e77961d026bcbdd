"""The whole agent (devkit/rig.py) records Kubernetes Events that say why the VM left or joined the mesh:
read back from the emulator as events.k8s.io/v1 objects and through kubectl, as an operator would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.kubeapi.events import core_view
from devkit.rig import GROUP, NS, REPO, Rig, agent_env, app_rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    # Flap damping would hold the app unhealthy after a few flaps; here every flap must go through.
    with app_rig(tmp_path, app={"flap": {"min_dwell": "0s", "max_transitions": 100}}) as rg:
        yield rg


def events(r: Rig, reason: str, kind: str | None = None, uid: str | None = None) -> list[dict[str, Any]]:
    return [e for e in r.api.objects("Event", NS) if e["reason"] == reason
            and (kind is None or e["regarding"]["kind"] == kind)
            and (uid is None or e["regarding"].get("uid") == uid)]


def kubectl(r: Rig, tmp: Path, *args: str) -> str:
    env = {**os.environ, "HOME": str(tmp), "KUBECONFIG": str(r.api.kubeconfig)}
    proc = subprocess.run(["kubectl", "--cache-dir", str(tmp / "cache"), "-n", NS, *args], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def described_events(r: Rig, tmp: Path, kind: str, name: str) -> str:
    """The Events section of `kubectl describe`, or, without kubectl, the same query it makes: core/v1
    events with a field selector on the involved object's kind, name, namespace and uid."""
    obj = r.api.get(kind, NS, name)
    assert obj is not None
    if shutil.which("kubectl") is not None:
        return kubectl(r, tmp, "describe", kind.lower(), name).split("Events:", 1)[1]
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(str(r.api.kubeconfig)))
    sel = (f"involvedObject.kind={kind},involvedObject.name={name},involvedObject.namespace={NS},"
           f"involvedObject.uid={obj['metadata']['uid']}")
    return "\n".join(f"{e.type} {e.reason} {e.series.count if e.series else 1} {e.message}"
                     for e in core.list_namespaced_event(NS, field_selector=sel, limit=500).items)


def test_app_exits_and_returns_are_events_and_flaps_are_one_series(r: Rig, tmp_path: Path) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    entry = r.entry()
    assert entry is not None
    uid = entry["metadata"]["uid"]
    wait_for(lambda: events(r, "Registered", "WorkloadEntry", uid), 15, "the Registered event on the entry")
    [registered] = events(r, "Registered", "WorkloadEntry", uid)
    assert registered["type"] == "Normal" and registered["reportingController"] == "mesh-agent.io/registry"
    assert "127.0.0.1" in registered["note"]
    instance = registered["reportingInstance"]
    assert len(instance) == 16

    flaps = 3
    for n in range(1, flaps + 1):
        r.kill_app()
        wait_for(lambda: r.entry() is None, 15, "the entry to be withdrawn")
        # The entry is gone: the withdrawal is recorded on the group, with the exit as the app's health saw it.
        wait_for(lambda n=n: any((e.get("series") or {}).get("count", 1) == n
                                 for e in events(r, "AppExited", "WorkloadGroup")), 15, f"AppExited #{n}")
        r.start_app()
        wait_for(r.entry, 30, "registration after the app came back")
        back = r.entry()
        assert back is not None
        wait_for(lambda b=back: events(r, "Registered", "WorkloadEntry", b["metadata"]["uid"]), 15,
                 "the Registered event on the new entry")

    # N flaps: one AppExited object whose series counts them, not N objects.
    [exited] = events(r, "AppExited")
    assert exited["type"] == "Warning" and exited["action"] == "Withdraw"
    assert exited["series"]["count"] == flaps
    assert "exited" in exited["note"] and exited["note"].endswith(f"entry {r.entry_name} withdrawn")
    assert exited["regarding"]["name"] == GROUP and exited["reportingInstance"] == instance
    # Each registration is about its own entry (a new object, a new uid), so each has its event.
    assert len(events(r, "Registered")) == flaps + 1

    # What an operator sees without logging in to the VM.
    on_group = described_events(r, tmp_path, "WorkloadGroup", GROUP)
    assert "AppExited" in on_group and "exited" in on_group
    assert f"x{flaps}" in on_group or f"AppExited {flaps}" in on_group
    on_entry = described_events(r, tmp_path, "WorkloadEntry", r.entry_name)
    assert "Registered" in on_entry and "AppExited" not in on_entry
    assert core_view(exited)["message"] == exited["note"]

    assert r.stop_agent() == 0
    wait_for(lambda: events(r, "Shutdown", "WorkloadGroup"), 10, "the Shutdown event")


def _verb(r: Rig, verb: str) -> None:
    out = subprocess.run([sys.executable, "-m", "agent", verb, "--root", str(r.root), "--config", str(r.config_path)],
                         env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_maintenance_is_recorded(r: Rig) -> None:
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    _verb(r, "deregister")
    wait_for(lambda: r.entry() is None, 15, "the entry to be withdrawn")
    wait_for(lambda: events(r, "MaintenanceStarted") and events(r, "Maintenance", "WorkloadGroup"), 15,
             "the maintenance events")
    [started] = events(r, "MaintenanceStarted")
    assert started["regarding"]["kind"] == "WorkloadEntry" and started["type"] == "Normal"
    _verb(r, "register")
    wait_for(r.entry, 30, "registration after maintenance")
    wait_for(lambda: events(r, "MaintenanceEnded"), 15, "the MaintenanceEnded event")
    assert r.stop_agent() == 0
