"""Pure parts of the reaper, the manifests and maintenance."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from agent import maintenance as M
from agent.paths import Layout
from agent.registry import entry as E
from agent.registry import manifests as MF
from agent.registry.reaper import dead

NOW = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)


def ent(name: str, lease: str | None, created: str = "2026-11-25T11:00:00Z") -> dict:
    ann = {E.LEASE_ANNOTATION: lease} if lease else {}
    return {"metadata": {"name": name, "annotations": ann, "creationTimestamp": created}}


def test_reaper_picks_only_expired_past_grace() -> None:
    leases = [E.build_lease("old", "ns", "a", 40, NOW - dt.timedelta(seconds=200)),
              E.build_lease("young", "ns", "b", 40, NOW - dt.timedelta(seconds=60)),
              E.build_lease("live", "ns", "c", 40, NOW - dt.timedelta(seconds=5)),
              E.build_lease("orphan", "ns", "d", 40, NOW - dt.timedelta(seconds=500))]
    entries = [ent("old", "old"), ent("young", "young"), ent("live", "live"),
               ent("handmade", None), ent("nolease", "nolease"),
               ent("newnolease", "newnolease", created="2026-11-25T11:59:50Z")]
    got = {(v.entry, v.lease) for v in dead(entries, leases, NOW, grace=60)}
    assert got == {("old", "old"), ("nolease", None), (None, "orphan")}


def test_manifests_rbac_is_least_privilege() -> None:
    docs = MF.build_manifests(group="billing", namespace="vm", service_account="billing-vm",
                              ports=[("http", 8080), ("grpc-api", 9090)],
                              probe=MF.parse_probe("http:8080/healthz"))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["WorkloadGroup", "ServiceAccount", "Role", "RoleBinding", "ServiceEntry",
                     "ServiceAccount", "Role", "RoleBinding", "CronJob", "ValidatingAdmissionPolicy",
                     "ValidatingAdmissionPolicyBinding"]
    role = docs[2]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"workloadentries", "workloadentries/status", "leases", "workloadgroups",
                         "serviceaccounts/token", "configmaps", "events"}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if rule["resources"] == ["workloadgroups"]:
            assert set(rule["verbs"]) == {"get", "list", "watch"}
        if rule["resources"] == ["events"]:
            # Events: written only (created, then their series patched) and only the new API group.
            assert rule["apiGroups"] == ["events.k8s.io"] and sorted(rule["verbs"]) == ["create", "patch"]
    se = docs[4]["spec"]
    assert se["workloadSelector"]["labels"] == docs[0]["spec"]["metadata"]["labels"]
    assert [p["protocol"] for p in se["ports"]] == ["HTTP", "GRPC"]
    assert docs[0]["spec"]["probe"]["httpGet"] == {"port": 8080, "path": "/healthz"}
    assert docs[8]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == \
        "mesh-agent-reaper-billing"


@pytest.mark.parametrize("bad", ["http", "http=0", "=80", "ht_tp=80"])
def test_bad_port_flags(bad: str) -> None:
    with pytest.raises(ValueError):
        MF.parse_port(bad)


def test_maintenance_file_round_trip(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert not M.maintenance_requested(layout)
    M.request_maintenance(layout, "kernel upgrade", now=NOW)
    assert M.maintenance_requested(layout)
    info = M.maintenance_info(layout)
    assert info is not None and info["reason"] == "kernel upgrade" and info["since"] == "2026-11-25T12:00:00Z"
    assert M.end_maintenance(layout)
    assert not M.maintenance_requested(layout)
    assert not M.end_maintenance(layout)


def test_plan_from_config_and_cluster_env() -> None:
    from agent import config as C
    from agent.registry.service import PlanError, make_plan

    cfg = C.parse("bundle: {source: /b}\nregistry: {labels: {rack: r1}, on_unhealthy: condition}\n")
    env = {"POD_NAMESPACE": "vm-apps", "ISTIO_META_WORKLOAD_NAME": "billing",
           "ISTIO_METAJSON_LABELS": '{"app":"billing","version":"v1"}', "ISTIO_META_NETWORK": "net1"}
    plan = make_plan(cfg.registry, env, machine_id="m" * 32, address="10.0.0.5", bundle_kubeconfig="/b/kc")
    assert plan.settings.namespace == "vm-apps" and plan.settings.group == "billing"
    assert plan.settings.lease_duration == 40 and plan.settings.lease_renew == 20
    assert plan.settings.condition_mode and plan.credentials.kubeconfig == "/b/kc"
    assert plan.events  # Kubernetes Events by default
    quiet = C.parse("bundle: {source: /b}\nregistry: {events: false}\n")
    assert not make_plan(quiet.registry, env, machine_id="m" * 32, address="10.0.0.5", bundle_kubeconfig="/kc").events
    group = {"metadata": {"name": "billing", "namespace": "vm-apps", "uid": "u"}, "spec": {}}
    obj = plan.build(group)
    assert obj["metadata"]["name"] == "billing-10.0.0.5-net1"
    assert obj["spec"]["labels"] == {"app": "billing", "version": "v1", "rack": "r1",
                                     "topology.istio.io/network": "net1"}
    # The network from cluster.env's ISTIO_META_NETWORK: spec.network and the label on the object.
    assert obj["spec"]["network"] == "net1"
    assert obj["metadata"]["labels"]["topology.istio.io/network"] == "net1"
    # registry.network wins over the bundle's.
    cfg2 = C.parse("bundle: {source: /b}\nregistry: {network: west}\n")
    obj2 = make_plan(cfg2.registry, env, machine_id="m" * 32, address="10.0.0.5",
                     bundle_kubeconfig="/b/kc").build(group)
    assert obj2["metadata"]["name"] == "billing-10.0.0.5-west" and obj2["spec"]["network"] == "west"
    assert obj2["metadata"]["labels"]["topology.istio.io/network"] == "west"
    # Without a network anywhere: neither the field nor the label.
    env3 = {k: v for k, v in env.items() if k != "ISTIO_META_NETWORK"}
    obj3 = make_plan(cfg.registry, env3, machine_id="m" * 32, address="10.0.0.5",
                     bundle_kubeconfig="/b/kc").build(group)
    assert "network" not in obj3["spec"] and "topology.istio.io/network" not in obj3["metadata"]["labels"]
    with pytest.raises(PlanError, match=r"registry\.namespace"):
        make_plan(cfg.registry, {}, machine_id="m" * 32, address="10.0.0.5", bundle_kubeconfig="/kc")
    with pytest.raises(PlanError, match="no API credentials"):
        make_plan(cfg.registry, env, machine_id="m" * 32, address="10.0.0.5")
    with pytest.raises(PlanError, match="ISTIO_METAJSON_LABELS"):
        make_plan(cfg.registry, {**env, "ISTIO_METAJSON_LABELS": "[1]"}, machine_id="m" * 32,
                  address="10.0.0.5", bundle_kubeconfig="/kc")
