"""An emulated cluster with an Istio control plane's ConfigMaps, a WorkloadGroup and an agent credential
bound to exactly the rules `mesh-agent manifests` prints."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("devkit.kubeapi.server", reason="the Kubernetes API emulator is not in this tree")

from agent.bundle.cluster_inputs import Settings
from agent.bundle.cluster_source import ClusterRefresher, ClusterSource
from agent.config import BundleConfig, KubernetesSourceConfig
from agent.kube.auth import Credentials
from agent.kube.client import Kube
from agent.paths import Layout
from agent.registry.manifests import build_manifests
from agent.retry import Backoff
from devkit.kubeapi.auth import Rule
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.server import KubeAPI
from devkit.waiting import wait_for  # noqa: F401 (used here and by the tests importing it)

FIXTURES = Path(__file__).resolve().parents[2] / "unit" / "fixtures" / "istioctl"
CASE = "labels-annotation-tcp-network"   # the group, mesh config and expected files used here
NS, GROUP, SA, ISTIO_NS = "vm-apps", "billing", "billing-vm", "istio-system"
AGENT_USER = f"system:serviceaccount:{NS}:{SA}"


def manifest_rules(read_istio: bool = True) -> dict[str, list[Rule]]:
    """The Roles `mesh-agent manifests` prints for the agents, as emulator rules per namespace."""
    docs = build_manifests(group=GROUP, namespace=NS, service_account=SA, ports=[("http", 8080)],
                           read_istio_config=ISTIO_NS if read_istio else None)
    out: dict[str, list[Rule]] = {}
    bound = {(d["metadata"]["namespace"], d["roleRef"]["name"]) for d in docs if d["kind"] == "RoleBinding"
             and any(s["name"] == SA and s["namespace"] == NS for s in d["subjects"])}
    for d in docs:
        if d["kind"] == "Role" and (d["metadata"]["namespace"], d["metadata"]["name"]) in bound:
            ns = d["metadata"]["namespace"]
            out.setdefault(ns, []).extend(
                Rule(tuple(r["verbs"]), tuple(r["apiGroups"]), tuple(r["resources"]), (ns,),
                     tuple(r.get("resourceNames") or ())) for r in d["rules"])
    return out


def root_cert(common_name: str) -> str:
    import trustme

    return trustme.CA(organization_unit_name=common_name).cert_pem.bytes().decode()


@dataclass
class World:
    api: KubeAPI
    tmp: Path
    token_file: Path
    events: queue.Queue = field(default_factory=queue.Queue)
    kubes: list[Kube] = field(default_factory=list)
    refreshers: list[ClusterRefresher] = field(default_factory=list)

    def layout(self) -> Layout:
        return Layout(root=self.tmp / "vm")

    def bundle_config(self) -> BundleConfig:
        return BundleConfig(source="kubernetes", kubernetes=KubernetesSourceConfig(namespace=NS, group=GROUP))

    def creds(self) -> Credentials:
        return Credentials(server=self.api.url, ca_file=str(self.api.ca_path), token_file=str(self.token_file))

    def kube(self) -> Kube:
        k = Kube.from_credentials(self.creds(), timeout=5.0)
        self.kubes.append(k)
        return k

    def set_rules(self, rules: list[Rule]) -> None:
        self.api.cluster.auth.set_policy(AGENT_USER, rules)

    def settings(self, **kw: Any) -> Settings:
        base: dict[str, Any] = dict(namespace=NS, group=GROUP, istio_namespace=ISTIO_NS, token_lifetime=3600)
        base.update(kw)
        return Settings(**base)

    def source(self, **kw: Any) -> ClusterSource:
        return ClusterSource(self.kube(), self.settings(**kw))

    def refresher(self, source: ClusterSource, **kw: Any) -> ClusterRefresher:
        kw.setdefault("backoff", Backoff(initial=0.2, max=1.0))
        kw.setdefault("watch_timeout", 2)
        r = ClusterRefresher(source, self.events.put, **kw).start()
        self.refreshers.append(r)
        return r

    def next_event(self, kind: type, timeout: float = 30.0) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                ev = self.events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(ev, kind):
                return ev
        raise AssertionError(f"no {kind.__name__} within {timeout}s")

    def set_root_cert(self, pem: str) -> None:
        """Rotate the root certificate as istiod would: a new value in the namespace's ConfigMap."""
        from kubernetes import client

        admin = Kube.from_credentials(Credentials(kubeconfig=str(self.api.kubeconfig)), timeout=5.0)
        try:
            core = client.CoreV1Api(admin.api_client)
            cm = core.read_namespaced_config_map("istio-ca-root-cert", NS)
            cm.data = {"root-cert.pem": pem}
            core.replace_namespaced_config_map("istio-ca-root-cert", NS, cm)
        finally:
            admin.close()


def _set_gateway_ip(api: KubeAPI, ip: str) -> None:
    """What the cloud's load-balancer controller does: the address in the Service's status."""
    from kubernetes import client

    admin = Kube.from_credentials(Credentials(kubeconfig=str(api.kubeconfig)), timeout=5.0)
    try:
        core = client.CoreV1Api(admin.api_client)
        svc = core.read_namespaced_service("istio-eastwestgateway", ISTIO_NS)
        svc.status = client.V1ServiceStatus(load_balancer=client.V1LoadBalancerStatus(
            ingress=[client.V1LoadBalancerIngress(ip=ip)]))
        core.replace_namespaced_service_status("istio-eastwestgateway", ISTIO_NS, svc)
    finally:
        admin.close()


@pytest.fixture
def world(kubeapi: KubeAPI, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    api = kubeapi
    for ns in (NS, ISTIO_NS):
        api.create_namespace(ns)
    api.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA, "namespace": NS}})
    group = yaml.safe_load((FIXTURES / CASE / "workloadgroup.yaml").read_text())
    api.create(group)
    api.create({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "istio-ca-root-cert", "namespace": NS},
                "data": {"root-cert.pem": root_cert("first")}})
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio", "namespace": ISTIO_NS},
                "data": {"mesh": (FIXTURES / CASE / "meshconfig.yaml").read_text()}})
    api.create({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "istio-sidecar-injector", "namespace": ISTIO_NS},
                "data": {"values": '{"global": {"multiCluster": {"clusterName": "cluster1"}}}'}})
    api.create({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "istio-eastwestgateway", "namespace": ISTIO_NS},
                "spec": {"type": "LoadBalancer", "ports": [{"name": "tls-istiod", "port": 15012}]}})
    _set_gateway_ip(api, "192.0.2.10")
    # The agent's credential: a bound token of the group's service account, in a file.
    token_file = tmp_path / "agent-token"
    token_file.write_text(api.mint_token(NS, SA, seconds=3600))
    w = World(api, tmp_path, token_file)
    rules = manifest_rules()
    w.set_rules([r for ns_rules in rules.values() for r in ns_rules])
    try:
        yield w
    finally:
        for r in w.refreshers:
            r.stop(timeout=3.0)
        for k in w.kubes:
            k.close()


@pytest.fixture
def short_istio_tokens(world: World, monkeypatch: pytest.MonkeyPatch) -> int:
    """istio-ca tokens live 5 s (the API refuses less than 10 minutes; time is what a test lacks)."""
    lifetime = 5
    auth = world.api.cluster.auth
    real = auth.mint

    def mint(namespace: str, sa: str, uid: str, audiences: list[str], seconds: int, now: float | None = None):
        if audiences == ["istio-ca"]:
            seconds = lifetime
        return real(namespace, sa, uid, audiences, seconds, now)

    monkeypatch.setattr(auth, "mint", mint)
    return lifetime
