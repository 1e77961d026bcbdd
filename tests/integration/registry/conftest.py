"""An emulated cluster with one WorkloadGroup, and mesh-agent registrars driven like the daemon does."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.kube.auth import Credentials
from agent.kube.client import Kube
from agent.registry import entry as E
from agent.registry.manifests import build_manifests
from agent.registry.states import Settings
from devkit.registrydriver import Driver

pytest.importorskip("devkit.kubeapi.server", reason="the Kubernetes API emulator is not in this tree")

from devkit.kubeapi.auth import Rule
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.server import KubeAPI
from devkit.waiting import wait_for  # noqa: F401 (used here and by the tests importing it)

NS = "vm-apps"
GROUP = "billing"
ADDRESS = "10.0.0.5"   # only data in the entry: no traffic goes there
ENTRY = f"{GROUP}-{ADDRESS}"


def role_to_rules(role_rules: list[dict[str, Any]], namespace: str) -> list[Rule]:
    """A Role's rules as the emulator's RBAC rules, bound in one namespace (a RoleBinding)."""
    return [Rule(tuple(r["verbs"]), tuple(r["apiGroups"]), tuple(r["resources"]), (namespace,),
                 tuple(r.get("resourceNames") or ())) for r in role_rules]


def group_obj(labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": GROUP, "namespace": NS},
            "spec": {"metadata": {"labels": labels or {"app": GROUP}},
                     "template": {"serviceAccount": "billing-vm", "ports": {"http": 8080}}}}


@dataclass
class Cluster:
    api: KubeAPI
    tmp: Path
    agent_kubeconfig: Path
    reaper_kubeconfig: Path
    admin: Kube

    def agent(self, instance: str = "inst-a", *, condition_mode: bool = False, lease: float = 3.0,
              renew: float = 0.5, resync: float = 5.0, creds: Credentials | None = None,
              address: str = ADDRESS, watch_timeout: int = 5, deadline: float = 30.0) -> Driver:
        kube = Kube.from_credentials(creds or Credentials(kubeconfig=str(self.agent_kubeconfig)), timeout=3.0,
                                     deadline=deadline)
        settings = Settings(namespace=NS, group=GROUP, instance=instance, lease_duration=lease,
                            lease_renew=renew, resync=resync, condition_mode=condition_mode,
                            backoff_initial=0.2, backoff_max=2.0)

        def build(group: dict[str, Any]) -> dict[str, Any]:
            return E.build_entry(E.EntryInputs(group=group, address=address, instance=instance,
                                               workload_labels={"version": "v1"},
                                               condition_mode=condition_mode))
        return Driver(kube, settings, build, watch_timeout=watch_timeout).start()

    def entry(self, name: str = ENTRY) -> dict[str, Any] | None:
        return self.api.get("WorkloadEntry", NS, name)

    def lease(self, name: str = ENTRY) -> dict[str, Any] | None:
        return self.api.get("Lease", NS, name)


@pytest.fixture
def cluster(kubeapi: KubeAPI, tmp_path: Path) -> Iterator[Cluster]:  # noqa: F811
    """The namespace set up with exactly what `mesh-agent manifests` prints (its RBAC authorizes the
    agents' and the reaper's service-account tokens)."""
    kubeapi.create_namespace(NS)
    docs = build_manifests(group=GROUP, namespace=NS, service_account="billing-vm", ports=[("http", 8080)])
    for doc in docs:
        kubeapi.create(doc, manager="kubectl")
    kc = kubeapi.write_kubeconfig(tmp_path / "agent.kubeconfig", kubeapi.mint_token(NS, "billing-vm"),
                                  user="agent")
    rkc = kubeapi.write_kubeconfig(tmp_path / "reaper.kubeconfig",
                                   kubeapi.mint_token(NS, f"mesh-agent-reaper-{GROUP}"), user="reaper")
    admin = Kube.from_credentials(Credentials(kubeconfig=str(kubeapi.kubeconfig)), timeout=5.0)
    yield Cluster(kubeapi, tmp_path, kc, rkc, admin)
    admin.close()


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    """Drivers a test started; killed at the end whatever happened."""
    started: list[Driver] = []
    yield started
    for d in started:
        d.kill()
