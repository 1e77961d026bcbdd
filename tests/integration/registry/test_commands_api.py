"""The reaper and the manifests, run as the `mesh-agent` command against the emulator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent.health.state import Health
from agent.kube.auth import Credentials
from agent.kube.client import Kube
from agent.kube.errors import Unauthorized
from agent.registry.states import State
from devkit.registrydriver import Driver
from tests.integration.registry.conftest import NS, Cluster, wait_for

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.subprocess


def mesh_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def test_killed_agent_is_reaped_after_lease_and_grace(cluster: Cluster, drivers: list[Driver]) -> None:
    kc = cluster.reaper_kubeconfig  # the reaper's ServiceAccount, bound by the manifests' Role
    live = cluster.agent("inst-live", address="10.0.0.6", lease=3.0)
    dying = cluster.agent("inst-dying", address="10.0.0.5", lease=3.0)
    drivers += [live, dying]
    for d in (live, dying):
        d.do(lambda r, now: r.set_health(Health.HEALTHY))
    wait_for(lambda: cluster.entry("billing-10.0.0.5") and cluster.entry("billing-10.0.0.6"), what="entries")
    dying.kill()  # no withdraw: as if the VM lost power
    killed_at = time.monotonic()

    early = mesh_agent("reap", "--namespace", NS, "--grace", "1s", "--kubeconfig", str(kc))
    assert early.returncode == 0, early.stderr
    assert "reaped 0" in early.stdout
    assert cluster.entry("billing-10.0.0.5") is not None

    time.sleep(max(0.0, killed_at + 3.0 + 1.2 - time.monotonic()))
    dry = mesh_agent("reap", "--namespace", NS, "--grace", "1s", "--dry-run", "--kubeconfig", str(kc))
    assert dry.returncode == 0, dry.stderr
    assert "would delete entry billing-10.0.0.5" in dry.stdout
    assert "10.0.0.6" not in dry.stdout
    assert cluster.entry("billing-10.0.0.5") is not None

    done = mesh_agent("reap", "--namespace", NS, "--grace", "1s", "--kubeconfig", str(kc))
    assert done.returncode == 0, done.stderr
    assert "deleted entry billing-10.0.0.5" in done.stdout
    assert cluster.entry("billing-10.0.0.5") is None
    assert cluster.lease("billing-10.0.0.5") is None
    assert cluster.entry("billing-10.0.0.6") is not None  # the live one stays
    assert live.registrar.state is State.REGISTERED


def test_reaper_names_what_rbac_refused(cluster: Cluster) -> None:
    cluster.api.add_token("nobody-token-" + "n" * 20, "nobody", [])
    kc = cluster.api.write_kubeconfig(cluster.tmp / "nobody.kubeconfig", "nobody-token-" + "n" * 20)
    out = mesh_agent("reap", "--namespace", NS, "--kubeconfig", str(kc))
    assert out.returncode == 1
    assert "list workloadentries.networking.istio.io in namespace vm-apps: 403" in out.stderr


def test_manifests_applied_then_used_with_exactly_that_rbac(cluster: Cluster, drivers: list[Driver]) -> None:
    ns, group, sa = "shop", "cart", "cart-vm"
    cluster.api.create_namespace(ns)
    out = mesh_agent("manifests", "--group", group, "--namespace", ns, "--service-account", sa,
                     "--port", "http=8080", "--port", "grpc-admin=9090", "--probe", "http:8080/ready")
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    for doc in docs:  # every object, the RBAC and the CronJob included, as `kubectl apply` would
        cluster.api.create(doc, manager="kubectl")
    assert cluster.api.get("CronJob", ns, f"mesh-agent-reaper-{group}") is not None
    token = cluster.api.mint_token(ns, sa)
    kc = cluster.api.write_kubeconfig(cluster.tmp / "cart.kubeconfig", token)

    from agent.registry import entry as E
    from agent.registry.states import Settings
    from devkit.registrydriver import Driver as D

    kube = Kube.from_credentials(Credentials(kubeconfig=str(kc)), timeout=3.0)

    def build(g: dict) -> dict:
        return E.build_entry(E.EntryInputs(group=g, address="10.1.0.9", instance="cart-1",
                                           condition_mode=True))
    d = D(kube, Settings(ns, group, "cart-1", lease_duration=3, lease_renew=0.5, condition_mode=True), build,
          watch_timeout=5).start()
    drivers.append(d)
    d.do(lambda r, now: r.set_health(Health.HEALTHY))
    entry = wait_for(lambda: E.condition_of(cluster.api.get("WorkloadEntry", ns, "cart-10.1.0.9")) == "True"
                     and cluster.api.get("WorkloadEntry", ns, "cart-10.1.0.9"), what="the entry")
    assert entry["spec"]["serviceAccount"] == sa
    assert entry["spec"]["labels"] == {"app": group}
    se = cluster.api.get("ServiceEntry", ns, group)
    assert se["spec"]["workloadSelector"]["labels"].items() <= entry["spec"]["labels"].items()
    assert d.stop()
    assert cluster.api.get("WorkloadEntry", ns, "cart-10.1.0.9") is None
    # Nothing beyond what it needs: not the group, not another namespace.
    with pytest.raises(Unauthorized):
        kube.delete(("networking.istio.io", "v1", "workloadgroups"), ns, group)
    with pytest.raises(Unauthorized):
        kube.list(("networking.istio.io", "v1", "workloadentries"), NS)
    kube.close()


def test_deregister_and_register_only_touch_the_maintenance_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = mesh_agent("deregister", "--root", str(root), "--reason", "disk swap")
    assert out.returncode == 0, out.stderr
    control = root / "var/lib/mesh-agent/maintenance"
    assert "disk swap" in control.read_text()
    from agent.maintenance import maintenance_requested
    from agent.paths import Layout

    assert maintenance_requested(Layout(root))
    out = mesh_agent("register", "--root", str(root))
    assert out.returncode == 0 and "maintenance ended" in out.stdout
    assert not control.exists()
    assert "not in maintenance" in mesh_agent("register", "--root", str(root)).stdout
