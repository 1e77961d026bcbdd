"""A compromised VM's service-account token against the cluster set up from `mesh-agent manifests`:
RBAC would let it write any WorkloadEntry and Lease in the namespace; the manifests' admission policy
(CEL, evaluated by the emulator as the API server does) confines it to its own group's objects, while
the agents' own life and the reaper's work go on. Every refusal here is a write RBAC allows."""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client, config

from agent.health.state import Health
from agent.registry import entry as E
from agent.registry.manifests import build_manifests, policy_name
from devkit.registrydriver import Driver
from tests.integration.registry.conftest import ENTRY, GROUP, NS, Cluster, wait_for
from tests.integration.registry.test_commands_api import mesh_agent

WE = ("networking.istio.io", "v1", NS, "workloadentries")
OTHER = "orders"
OTHER_ENTRY = f"{OTHER}-10.0.0.7"
POLICY = policy_name(NS, GROUP)


@pytest.fixture
def other_group(cluster: Cluster) -> dict[str, Any]:
    """A second group in the namespace, with its own manifests and one registered entry and lease."""
    for doc in build_manifests(group=OTHER, namespace=NS, service_account=f"{OTHER}-vm", ports=[("http", 9090)]):
        cluster.api.create(doc, manager="kubectl")
    group = cluster.api.get("WorkloadGroup", NS, OTHER)
    cluster.api.create(E.build_entry(E.EntryInputs(group=group, address="10.0.0.7", instance="orders-1")),
                       manager="mesh-agent")
    cluster.api.create(E.build_lease(OTHER_ENTRY, NS, "orders-1", 30, dt.datetime.now(dt.UTC)))
    return group


@pytest.fixture
def stolen(cluster: Cluster) -> Iterator[client.ApiClient]:
    """The billing VMs' token, in the hands of whoever took over one of them."""
    api = config.new_client_from_config(str(cluster.agent_kubeconfig))
    yield api
    api.close()


def own_entry(cluster: Cluster, address: str = "10.0.0.9", instance: str = "inst-x") -> dict[str, Any]:
    group = cluster.api.get("WorkloadGroup", NS, GROUP)
    return E.build_entry(E.EntryInputs(group=group, address=address, instance=instance))


def refused(call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The call is denied by the group's policy (not by RBAC: that would be 403 Forbidden from RBAC)."""
    with pytest.raises(client.ApiException) as exc:
        call(*args, **kwargs)
    body = json.loads(exc.value.body)
    assert exc.value.status == 422 and body["reason"] == "Invalid", body
    assert f"ValidatingAdmissionPolicy '{POLICY}' with binding '{POLICY}' denied request: " in body["message"]
    return body["message"]


def test_another_groups_entry_cannot_be_deleted_or_changed(cluster: Cluster, other_group: dict[str, Any],
                                                           stolen: client.ApiClient) -> None:
    co = client.CustomObjectsApi(stolen)
    assert "named billing-" in refused(co.delete_namespaced_custom_object, *WE, OTHER_ENTRY)
    refused(co.patch_namespaced_custom_object, *WE, OTHER_ENTRY, {"spec": {"address": "10.66.6.6"}})
    refused(co.patch_namespaced_custom_object_status, *WE, OTHER_ENTRY,
            {"status": {"conditions": [{"type": "Healthy", "status": "False"}]}})
    hijack = own_entry(cluster, "10.0.0.7")
    hijack["metadata"]["name"] = OTHER_ENTRY
    refused(co.patch_namespaced_custom_object, *WE, OTHER_ENTRY, hijack, field_manager="mesh-agent",
            force=True, _content_type="application/apply-patch+yaml")
    kept = cluster.api.get("WorkloadEntry", NS, OTHER_ENTRY)
    assert kept["spec"]["address"] == "10.0.0.7" and "status" not in kept
    assert kept["metadata"]["labels"]["app"] == OTHER


def _renamed(e: dict[str, Any]) -> None:
    e["metadata"]["name"] = f"{OTHER}-10.0.0.9"


def _other_sa(e: dict[str, Any]) -> None:
    e["spec"]["serviceAccount"] = f"{OTHER}-vm"


def _other_labels(e: dict[str, Any]) -> None:
    e["spec"]["labels"]["app"] = OTHER  # would be selected by the other group's ServiceEntry


def _no_instance(e: dict[str, Any]) -> None:
    del e["metadata"]["annotations"][E.INSTANCE_ANNOTATION]


def _other_owner(e: dict[str, Any]) -> None:
    e["metadata"]["ownerReferences"][0]["name"] = OTHER


@pytest.mark.parametrize("forge", [_renamed, _other_sa, _other_labels, _no_instance, _other_owner],
                         ids=["other-name", "other-service-account", "other-group-labels", "no-instance",
                              "other-owner"])
def test_an_entry_that_is_not_the_groups_cannot_be_created(cluster: Cluster, other_group: dict[str, Any],
                                                           stolen: client.ApiClient,
                                                           forge: Callable[[dict[str, Any]], None]) -> None:
    co = client.CustomObjectsApi(stolen)
    forged = copy.deepcopy(own_entry(cluster))
    if forge is _other_owner:
        forged["metadata"]["ownerReferences"][0]["uid"] = other_group["metadata"]["uid"]
    forge(forged)
    refused(co.create_namespaced_custom_object, *WE, forged)
    assert cluster.api.objects("WorkloadEntry", NS) == [cluster.api.get("WorkloadEntry", NS, OTHER_ENTRY)]


def test_unrelated_and_other_groups_leases_are_out_of_reach(cluster: Cluster, other_group: dict[str, Any],
                                                            stolen: client.ApiClient) -> None:
    co = client.CoordinationV1Api(stolen)
    cluster.api.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": "billing-operator-leader", "namespace": NS},
                        "spec": {"holderIdentity": "operator-0", "leaseDurationSeconds": 15}})
    cluster.api.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": "controller-leader", "namespace": NS},
                        "spec": {"holderIdentity": "controller-0", "leaseDurationSeconds": 15}})
    assert "named billing-" in refused(co.delete_namespaced_lease, "controller-leader", NS)
    assert "must carry label" in refused(co.patch_namespaced_lease, "billing-operator-leader", NS,
                                         {"spec": {"holderIdentity": "me"}})
    takeover = {"metadata": {"labels": {E.MANAGED_BY_LABEL: E.FIELD_MANAGER}}, "spec": {"holderIdentity": "me"}}
    assert "does not manage" in refused(co.patch_namespaced_lease, "billing-operator-leader", NS, takeover)
    refused(co.delete_namespaced_lease, "billing-operator-leader", NS)
    refused(co.delete_namespaced_lease, OTHER_ENTRY, NS)
    refused(co.create_namespaced_lease, NS, E.build_lease("orders-10.0.0.8", NS, "me", 30, dt.datetime.now(dt.UTC)))
    unlabelled = E.build_lease("billing-10.0.0.8", NS, "me", 30, dt.datetime.now(dt.UTC))
    del unlabelled["metadata"]["labels"]
    refused(co.create_namespaced_lease, NS, unlabelled)
    assert {lease["metadata"]["name"] for lease in cluster.api.objects("Lease", NS)} == {
        "billing-operator-leader", "controller-leader", OTHER_ENTRY}
    assert cluster.api.get("Lease", NS, "billing-operator-leader")["spec"]["holderIdentity"] == "operator-0"


def test_the_agents_life_and_the_reaper_work_under_the_policy(cluster: Cluster, drivers: list[Driver],
                                                              other_group: dict[str, Any],
                                                              stolen: client.ApiClient) -> None:
    d = cluster.agent("inst-a", lease=3.0, condition_mode=True)
    drivers.append(d)
    d.do(lambda r, now: r.set_health(Health.HEALTHY))
    wait_for(lambda: E.condition_of(cluster.entry()) == "True", what="registered, with its status")
    renewed = cluster.lease()["spec"]["renewTime"]
    wait_for(lambda: cluster.lease()["spec"]["renewTime"] != renewed, what="a renewal")
    # The same token, in the same cluster, is refused anything beyond its own group.
    refused(client.CustomObjectsApi(stolen).delete_namespaced_custom_object, *WE, OTHER_ENTRY)
    assert d.stop(withdraw=True)
    assert cluster.entry() is None and cluster.lease() is None

    dying = cluster.agent("inst-b", lease=2.0)
    drivers.append(dying)
    dying.do(lambda r, now: r.set_health(Health.HEALTHY))
    wait_for(cluster.entry, what="registered again")
    dying.kill()  # lost power: no withdraw
    time.sleep(2.0 + 1.2)
    done = mesh_agent("reap", "--namespace", NS, "--grace", "1s", "--kubeconfig", str(cluster.reaper_kubeconfig))
    assert done.returncode == 0, done.stderr
    assert f"deleted entry {ENTRY}" in done.stdout
    assert cluster.entry() is None and cluster.lease() is None
    assert cluster.api.get("WorkloadEntry", NS, OTHER_ENTRY) is not None  # live: not the reaper's to take



def test_an_agent_refused_by_the_policy_says_why_and_writes_nothing(cluster: Cluster,
                                                                     drivers: list[Driver]) -> None:
    """A misconfigured VM (registry.labels overriding the group's `app` label) is REFUSED with the
    policy's words, and retries later; nothing is written in its name."""
    from agent.kube.auth import Credentials
    from agent.kube.client import Kube
    from agent.registry.states import Settings, State

    kube = Kube.from_credentials(Credentials(kubeconfig=str(cluster.agent_kubeconfig)), timeout=3.0)

    def build(group: dict[str, Any]) -> dict[str, Any]:
        return E.build_entry(E.EntryInputs(group=group, address="10.0.0.5", instance="inst-a",
                                           extra_labels={"app": OTHER}))
    d = Driver(kube, Settings(namespace=NS, group=GROUP, instance="inst-a", lease_duration=3.0, lease_renew=0.5,
                              backoff_initial=0.2, backoff_max=2.0), build, watch_timeout=5).start()
    drivers.append(d)
    d.do(lambda r, now: r.set_health(Health.HEALTHY))
    wait_for(lambda: d.registrar.state is State.REFUSED, what="REFUSED")
    assert f"ValidatingAdmissionPolicy '{POLICY}'" in d.registrar.message
    assert "spec.labels must carry the group's labels app=billing" in d.registrar.message
    assert cluster.entry() is None
