"""Several apps on one VM (agent.yaml's `apps:`): one sidecar, one entry per app, each app withdrawn and
registered on its own health and maintenance."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.ports import free_port
from devkit.rig import ADDRESS, NS, REPO, Rig, agent_env, group_object, rig, start_sample_app
from devkit.waiting import wait_for

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(240)]


class TwoApps:
    """The rig's billing app, plus ledger: its own WorkloadGroup, port and process."""

    def __init__(self, r: Rig) -> None:
        self.r = r
        self.ledger_port = free_port()
        self.ledger: subprocess.Popen[bytes] | None = None

    def entry(self, group: str) -> dict[str, Any] | None:
        return self.r.api.get("WorkloadEntry", NS, f"{group}-{ADDRESS}")

    def status(self) -> dict[str, Any]:
        return json.loads(self.r.status_file.read_text())

    def write_config(self, **ledger: Any) -> None:
        cfg = self.r.config(str(self.r.bundle_dir))
        billing = {**cfg.pop("app"), "name": "billing"}
        del cfg["registry"]["group"]
        cfg["apps"] = [billing, {"name": "ledger", "ports": [self.ledger_port],
                                 "probe": {"http_get": {"port": self.ledger_port, "path": "/healthz"},
                                           "period": "500ms", "timeout": "500ms", "failure_threshold": 2},
                                 "flap": {"min_dwell": "0s"}, "labels": {"tier": "books"}, **ledger}]
        self.r.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start_ledger(self) -> None:
        self.ledger = start_sample_app(self.ledger_port, "ledger")

    def kill_ledger(self) -> None:
        assert self.ledger is not None
        self.ledger.kill()
        self.ledger.wait(5)
        self.ledger = None


@pytest.fixture
def two(tmp_path: Path) -> Iterator[TwoApps]:
    with rig(tmp_path) as r:
        r.prepare()
        t = TwoApps(r)
        r.api.create(group_object(name="ledger", port=t.ledger_port))
        t.write_config()
        r.start_app()
        t.start_ledger()
        try:
            yield t
        finally:
            if t.ledger is not None:
                t.kill_ledger()


def mesh_agent(r: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(r.config_path)],
                          env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)


def test_each_app_has_its_own_entry_and_only_the_dead_one_leaves(two: TwoApps) -> None:
    r = two.r
    r.start_agent()
    wait_for(lambda: two.entry("billing") and two.entry("ledger"), 60, "both entries")
    ledger = two.entry("ledger")
    assert ledger is not None
    assert ledger["spec"]["labels"]["app"] == "ledger" and ledger["spec"]["labels"]["tier"] == "books"
    assert ledger["spec"]["ports"] == {"http": two.ledger_port}
    billing = two.entry("billing")
    assert billing is not None and "tier" not in billing["spec"]["labels"]
    # One sidecar for both.
    # The entries are in the API a moment before the agent has the answers and writes its status.
    def both_registered() -> dict[str, Any] | None:
        st = two.status()
        return st if all(a["registration"].get("registered") for a in st["apps"].values()) else None
    st = wait_for(both_registered, 10, "both apps registered in status")
    assert set(st["apps"]) == {"billing", "ledger"} and st["sidecar"]["ready"] is True

    two.kill_ledger()
    wait_for(lambda: two.entry("ledger") is None, 15, "ledger's entry withdrawn")
    assert two.entry("billing") is not None  # the other app stays in the mesh
    def ledger_sick() -> dict[str, Any] | None:
        st = two.status()
        return st if st["apps"]["ledger"]["app"].get("healthy") is False else None
    st = wait_for(ledger_sick, 10, "ledger unhealthy in status")
    assert st["apps"]["billing"]["registration"]["registered"] is True
    assert "ledger: withdrawn: app unhealthy" in st["summary"] and "billing: registered" in st["summary"]
    out = mesh_agent(r, "status")
    assert "app ledger:" in out.stdout and "app billing:" in out.stdout, out.stdout

    two.start_ledger()
    wait_for(lambda: two.entry("ledger"), 15, "ledger back")
    assert r.stop_agent() == 0
    assert two.entry("billing") is None and two.entry("ledger") is None  # a stop withdraws every app


def test_maintenance_of_one_app_or_of_the_whole_vm(two: TwoApps) -> None:
    r = two.r
    r.start_agent()
    wait_for(lambda: two.entry("billing") and two.entry("ledger"), 60, "both entries")
    out = mesh_agent(r, "deregister", "--app", "ledger", "--reason", "reindexing")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: two.entry("ledger") is None, 15, "ledger withdrawn for maintenance")
    assert two.entry("billing") is not None
    assert two.status()["apps"]["ledger"]["maintenance"] is True
    assert mesh_agent(r, "deregister", "--app", "nosuch").returncode == 2

    out = mesh_agent(r, "deregister")  # the whole VM
    assert out.returncode == 0, out.stderr
    wait_for(lambda: two.entry("billing") is None, 15, "billing withdrawn with the VM")
    assert mesh_agent(r, "register").returncode == 0
    wait_for(lambda: two.entry("billing"), 15, "billing back after the VM's maintenance")
    assert two.entry("ledger") is None  # its own maintenance still holds
    assert mesh_agent(r, "register", "--app", "ledger").returncode == 0
    wait_for(lambda: two.entry("ledger"), 15, "ledger back")
    assert r.stop_agent() == 0


def test_a_group_with_another_service_account_is_refused_and_the_other_app_runs(two: TwoApps) -> None:
    """The shared sidecar has one identity (the bundle's service account): an entry naming another would
    make Istio expect an identity this proxy cannot present."""
    r = two.r
    r.api.delete("WorkloadGroup", NS, "ledger")
    r.api.create(group_object(name="ledger", port=two.ledger_port, service_account="ledger-vm"))
    r.start_agent()
    wait_for(lambda: two.entry("billing"), 60, "billing's entry")

    def refused() -> dict[str, Any] | None:
        reg = two.status()["apps"]["ledger"]["registration"]
        return reg if reg.get("state") == "refused" else None
    reg = wait_for(refused, 30, "ledger refused")
    assert 'runs as service account "ledger-vm"' in reg["message"] and "billing-vm" in reg["message"]
    assert two.entry("ledger") is None
    doctor = mesh_agent(r, "doctor").stdout
    assert f"{NS}/billing exists" in doctor, doctor
    assert "WorkloadGroup (ledger)" in doctor and "runs as service account ledger-vm, the shared sidecar as " \
        "billing-vm" in doctor, doctor
    assert r.stop_agent() == 0


def test_apps_that_would_share_a_port_or_a_group_are_refused_at_load(two: TwoApps) -> None:
    two.write_config(ports=[two.r.app_port])
    out = mesh_agent(two.r, "config", "check")
    assert out.returncode == 78
    assert f"apps[1].ports: port {two.r.app_port} is also billing's" in out.stderr + out.stdout
