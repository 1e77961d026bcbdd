"""Every object mesh-agent writes validates against Istio's CRDs (the emulator's validator)."""

from __future__ import annotations

import datetime as dt
import itertools
import random

import pytest

from agent.registry import entry as E
from agent.registry import manifests as MF

openapi = pytest.importorskip("devkit.kubeapi.openapi",
                              reason="the Kubernetes API emulator is not in this tree")
resources = pytest.importorskip("devkit.kubeapi.resources")

NOW = dt.datetime(2026, 11, 25, 12, 0, 0, 0, tzinfo=dt.UTC)  # microsecond 0: the MicroTime trap

ADDRESSES = ["10.0.0.5", "192.168.1.254", "fd00:10:96::1", "2001:db8::1", "::ffff:10.0.0.1"]
NETWORKS = [None, "", "net1", "vpc-west.2"]
TEMPLATES = [
    {},
    {"serviceAccount": "billing-vm", "ports": {"http": 8080}},
    {"serviceAccount": "sa", "ports": {"http": 8080, "grpc-admin": 9090, "tcp-db": 5432},
     "network": "tmpl-net", "locality": "eu/west-1/a", "weight": 5,
     "labels": {"app": "x", "track": "stable"}},
]
LABELS = [{}, {"version": "v1"}, {"app.kubernetes.io/name": "billing", "x": ""}]


def groups() -> list[dict]:
    out = []
    for tmpl, meta in itertools.product(TEMPLATES, [{}, {"labels": {"team": "pay"},
                                                          "annotations": {"owner": "team-pay@example.com"}}]):
        out.append({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                    "metadata": {"name": "billing", "namespace": "vm-apps",
                                 "uid": "7d3c2f1e-0000-4000-8000-1"},
                    "spec": {"template": tmpl, "metadata": meta}})
    return out


def test_entries_validate_over_many_inputs() -> None:
    rng = random.Random(7)
    count = 0
    for group, address, network, labels in itertools.product(groups(), ADDRESSES, NETWORKS, LABELS):
        inp = E.EntryInputs(group=group, address=address, instance="0123456789abcdef", network=network,
                            locality=rng.choice([None, "us-east1", "eu/west-1/b"]),
                            weight=rng.choice([None, 0, 1, 4294967295]),
                            service_account=rng.choice([None, "other-sa"]), workload_labels=labels,
                            extra_labels=rng.choice([{}, {"rack": "r12"}]),
                            condition_mode=rng.choice([False, True]))
        obj = E.build_entry(inp)
        assert openapi.validate_object(obj) == [], obj
        for healthy in (True, False):
            status = E.status_patch(obj, E.healthy_condition(healthy, NOW, message="probe said so"))
            assert openapi.validate_object({**status, "spec": obj["spec"]}) == []
        count += 1
    assert count >= 300


def test_leases_validate() -> None:
    lease = E.build_lease("billing-10.0.0.5", "vm-apps", "me", 40, NOW)
    assert lease["spec"]["renewTime"].endswith(".000000Z")
    body = {k: v for k, v in lease.items() if k not in ("apiVersion", "kind", "metadata")}
    assert openapi.validate(resources.LEASE_SCHEMA, body) == []


def test_manifests_validate() -> None:
    docs = MF.build_manifests(group="billing", namespace="vm-apps", service_account="billing-vm",
                              ports=[("http", 8080), ("grpc", 9090)], labels={"tier": "gold"},
                              network="net1", probe=MF.parse_probe("tcp:8080"))
    for doc in docs:
        if doc["apiVersion"].startswith("networking.istio.io/"):
            assert openapi.validate_object(doc) == [], doc["kind"]
