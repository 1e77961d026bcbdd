"""Create, read, update, delete: the semantics a real API server has."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry, group

WE = (GROUP, VERSION, NS, "workloadentries")


def status_of(exc: pytest.ExceptionInfo[client.ApiException]) -> dict:
    return json.loads(exc.value.body)


def test_create_fills_in_uid_generation_timestamp_and_resource_version(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry())
    meta = made["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert meta["generation"] == 1 and int(meta["resourceVersion"]) > 0
    assert co.get_namespaced_custom_object(*WE, meta["name"]) == made


def test_resource_versions_are_monotonic(co: client.CustomObjectsApi) -> None:
    a = co.create_namespaced_custom_object(*WE, entry("a"))
    b = co.create_namespaced_custom_object(*WE, entry("b"))
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])


def test_create_of_existing_name_is_409_already_exists(co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*WE, entry())
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(*WE, entry())
    body = status_of(exc)
    assert exc.value.status == 409 and body["reason"] == "AlreadyExists"
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure"
    assert body["details"] == {"name": "billing-10-0-0-1", "group": GROUP, "kind": "workloadentries"}


def test_missing_object_is_404(co: client.CustomObjectsApi) -> None:
    with pytest.raises(client.ApiException) as exc:
        co.get_namespaced_custom_object(*WE, "nope")
    assert exc.value.status == 404 and status_of(exc)["reason"] == "NotFound"
    assert status_of(exc)["message"] == 'workloadentries.networking.istio.io "nope" not found'


def test_missing_namespace_is_404(co: client.CustomObjectsApi) -> None:
    body = entry()
    del body["metadata"]["namespace"]
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(GROUP, VERSION, "nowhere", "workloadentries", body)
    assert exc.value.status == 404 and status_of(exc)["details"]["kind"] == "namespaces"


def test_update_with_stale_resource_version_is_409(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry())
    fresh = dict(made, spec={**made["spec"], "weight": 2})
    co.replace_namespaced_custom_object(*WE, made["metadata"]["name"], fresh)
    stale = dict(made, spec={**made["spec"], "weight": 3})
    with pytest.raises(client.ApiException) as exc:
        co.replace_namespaced_custom_object(*WE, made["metadata"]["name"], stale)
    assert exc.value.status == 409 and status_of(exc)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(exc)["message"]


def test_update_of_custom_object_needs_a_resource_version(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry())
    del made["metadata"]["resourceVersion"]
    with pytest.raises(client.ApiException) as exc:
        co.replace_namespaced_custom_object(*WE, made["metadata"]["name"], made)
    assert exc.value.status == 422
    assert status_of(exc)["details"]["causes"][0]["field"] == "metadata.resourceVersion"


def test_spec_change_bumps_generation_and_a_no_op_write_changes_nothing(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry())
    same = co.replace_namespaced_custom_object(*WE, made["metadata"]["name"], made)
    assert same["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"]
    labelled = co.patch_namespaced_custom_object(*WE, made["metadata"]["name"],
                                                 {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1
    changed = co.patch_namespaced_custom_object(*WE, made["metadata"]["name"], {"spec": {"weight": 5}})
    assert changed["metadata"]["generation"] == 2


def test_put_to_a_missing_object_is_404(co: client.CustomObjectsApi) -> None:
    body = entry()
    body["metadata"]["resourceVersion"] = "1"
    with pytest.raises(client.ApiException) as exc:
        co.replace_namespaced_custom_object(*WE, "billing-10-0-0-1", body)
    assert exc.value.status == 404


def test_name_in_body_must_match_url(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry())
    with pytest.raises(client.ApiException) as exc:
        co.replace_namespaced_custom_object(*WE, "other", made)
    assert exc.value.status == 400


def test_json_merge_patch_removes_with_null(co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*WE, entry())
    out = co.patch_namespaced_custom_object(*WE, "billing-10-0-0-1", {"spec": {"labels": None, "weight": 3}})
    assert "labels" not in out["spec"] and out["spec"]["weight"] == 3


def test_json_patch_with_failing_test_op_is_rejected(api: KubeAPI, kube_client: client.ApiClient) -> None:
    co = client.CustomObjectsApi(kube_client)
    co.create_namespaced_custom_object(*WE, entry())
    ops = [{"op": "test", "path": "/spec/address", "value": "10.0.0.1"},
           {"op": "replace", "path": "/spec/address", "value": "10.0.0.9"}]
    out = co.patch_namespaced_custom_object(*WE, "billing-10-0-0-1", ops,
                                            _content_type="application/json-patch+json")
    assert out["spec"]["address"] == "10.0.0.9"
    with pytest.raises(client.ApiException) as exc:
        co.patch_namespaced_custom_object(*WE, "billing-10-0-0-1", ops,
                                          _content_type="application/json-patch+json")
    assert exc.value.status == 422


def test_strategic_merge_patch_is_refused_for_custom_resources(co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*WE, entry())
    with pytest.raises(client.ApiException) as exc:
        co.patch_namespaced_custom_object(*WE, "billing-10-0-0-1", {"spec": {"weight": 1}},
                                          _content_type="application/strategic-merge-patch+json")
    assert exc.value.status == 415


def test_list_filters_by_label_and_field_selector(co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*WE, entry("a") | {"metadata": {"name": "a", "labels": {"app": "x"}}})
    co.create_namespaced_custom_object(*WE, entry("b") | {"metadata": {"name": "b", "labels": {"app": "y"}}})
    names = lambda out: [i["metadata"]["name"] for i in out["items"]]  # noqa: E731
    assert names(co.list_namespaced_custom_object(*WE, label_selector="app=x")) == ["a"]
    assert names(co.list_namespaced_custom_object(*WE, label_selector="app in (x,y),app!=y")) == ["a"]
    assert names(co.list_namespaced_custom_object(*WE, field_selector="metadata.name=b")) == ["b"]
    with pytest.raises(client.ApiException) as exc:
        co.list_namespaced_custom_object(*WE, field_selector="spec.address=1")
    assert exc.value.status == 400
    everywhere = co.list_cluster_custom_object(GROUP, VERSION, "workloadentries")
    assert everywhere["kind"] == "WorkloadEntryList" and len(everywhere["items"]) == 2


def test_list_pages_with_limit_and_continue(co: client.CustomObjectsApi) -> None:
    for i in range(5):
        co.create_namespaced_custom_object(*WE, entry(f"e{i}"))
    first = co.list_namespaced_custom_object(*WE, limit=2)
    assert len(first["items"]) == 2 and first["metadata"]["continue"]
    rest = co.list_namespaced_custom_object(*WE, limit=10, _continue=first["metadata"]["continue"])
    assert [i["metadata"]["name"] for i in rest["items"]] == ["e2", "e3", "e4"]


def test_delete_honours_resource_version_precondition(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry())
    co.patch_namespaced_custom_object(*WE, "billing-10-0-0-1", {"spec": {"weight": 9}})
    stale = client.V1DeleteOptions(preconditions=client.V1Preconditions(
        resource_version=made["metadata"]["resourceVersion"]))
    with pytest.raises(client.ApiException) as exc:
        co.delete_namespaced_custom_object(*WE, "billing-10-0-0-1", body=stale)
    assert exc.value.status == 409 and "Precondition failed" in status_of(exc)["message"]
    co.delete_namespaced_custom_object(*WE, "billing-10-0-0-1")
    with pytest.raises(client.ApiException):
        co.get_namespaced_custom_object(*WE, "billing-10-0-0-1")


def test_finalizers_hold_deletion_until_removed(co: client.CustomObjectsApi) -> None:
    body = entry()
    body["metadata"]["finalizers"] = ["example.com/hold"]
    co.create_namespaced_custom_object(*WE, body)
    co.delete_namespaced_custom_object(*WE, "billing-10-0-0-1")
    held = co.get_namespaced_custom_object(*WE, "billing-10-0-0-1")
    assert held["metadata"]["deletionTimestamp"]
    co.patch_namespaced_custom_object(*WE, "billing-10-0-0-1", {"metadata": {"finalizers": None}})
    with pytest.raises(client.ApiException) as exc:
        co.get_namespaced_custom_object(*WE, "billing-10-0-0-1")
    assert exc.value.status == 404


def test_deleting_a_group_deletes_the_entries_it_owns(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    wg = co.create_namespaced_custom_object(GROUP, VERSION, NS, "workloadgroups", group())
    owned = entry()
    owned["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadGroup",
                                             "name": "billing", "uid": wg["metadata"]["uid"]}]
    co.create_namespaced_custom_object(*WE, owned)
    co.create_namespaced_custom_object(*WE, entry("unowned"))
    co.delete_namespaced_custom_object(GROUP, VERSION, NS, "workloadgroups", "billing")
    deadline = time.monotonic() + 20
    while api.get("WorkloadEntry", NS, "billing-10-0-0-1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get("WorkloadEntry", NS, "billing-10-0-0-1") is None
    assert api.get("WorkloadEntry", NS, "unowned") is not None


def test_an_owner_reference_with_a_wrong_uid_gets_the_entry_collected(api: KubeAPI,
                                                                      co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(GROUP, VERSION, NS, "workloadgroups", group())
    owned = entry()
    owned["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadGroup",
                                             "name": "billing", "uid": "not-the-group-uid"}]
    co.create_namespaced_custom_object(*WE, owned)
    deadline = time.monotonic() + 20
    while api.get("WorkloadEntry", NS, "billing-10-0-0-1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get("WorkloadEntry", NS, "billing-10-0-0-1") is None


def test_orphan_propagation_keeps_dependents(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    wg = co.create_namespaced_custom_object(GROUP, VERSION, NS, "workloadgroups", group())
    owned = entry()
    owned["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadGroup",
                                             "name": "billing", "uid": wg["metadata"]["uid"]}]
    co.create_namespaced_custom_object(*WE, owned)
    co.delete_namespaced_custom_object(GROUP, VERSION, NS, "workloadgroups", "billing",
                                       propagation_policy="Orphan")
    time.sleep(0.3)
    kept = api.get("WorkloadEntry", NS, "billing-10-0-0-1")
    assert kept is not None and "ownerReferences" not in kept["metadata"]
    assert "ownerReferences" not in json.dumps(kept["metadata"]["managedFields"])


def test_namespace_deletion_waits_for_its_content(api: KubeAPI, kube_client: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    held = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="held", finalizers=["example.com/hold"]))
    core.create_namespaced_config_map(NS, held)
    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="plain")))
    core.delete_namespace(NS)
    assert core.read_namespace(NS).status.phase == "Terminating"
    with pytest.raises(client.ApiException) as exc:
        core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="new")))
    assert exc.value.status == 403 and "being terminated" in json.loads(exc.value.body)["message"]
    deadline = time.monotonic() + 20
    while api.get("ConfigMap", NS, "plain") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get("ConfigMap", NS, "plain") is None
    assert core.read_namespaced_config_map("held", NS).metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", NS, {"metadata": {"finalizers": None}})
    while api.get("Namespace", "", NS) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get("Namespace", "", NS) is None


def test_core_types_and_leases_round_trip(api: KubeAPI, kube_client: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_service(NS, client.V1Service(
        metadata=client.V1ObjectMeta(name="billing"),
        spec=client.V1ServiceSpec(selector={"app": "billing"}, ports=[client.V1ServicePort(port=80)])))
    assert core.read_namespaced_service("billing", NS).spec.ports[0].port == 80
    assert core.read_namespaced_service_account("default", NS).metadata.name == "default"
    cm = core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"),
                                                                  data={"k": "v"}))
    cm.data["k"] = "w"
    assert core.replace_namespaced_config_map("c", NS, cm).data == {"k": "w"}


def test_strategic_merge_patch_merges_keyed_lists_of_built_in_types(kube_client: client.ApiClient,
                                                                     api: KubeAPI) -> None:
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_service(NS, client.V1Service(
        metadata=client.V1ObjectMeta(name="billing", finalizers=["example.com/a"]),
        spec=client.V1ServiceSpec(ports=[client.V1ServicePort(port=80, name="http")])))
    # The Python client sends a dict patch for a built-in type as a strategic merge patch.
    out = core.patch_namespaced_service("billing", NS, {
        "metadata": {"finalizers": ["example.com/b"]},
        "spec": {"ports": [{"port": 443, "name": "https"}]}})
    assert [p.port for p in out.spec.ports] == [80, 443]
    assert out.metadata.finalizers == ["example.com/a", "example.com/b"]
    out = core.patch_namespaced_service("billing", NS, {
        "metadata": {"$deleteFromPrimitiveList/finalizers": ["example.com/a", "example.com/b"]},
        "spec": {"ports": [{"port": 80, "$patch": "delete"}]}})
    assert [p.port for p in out.spec.ports] == [443] and not out.metadata.finalizers


def test_dry_run_validates_but_stores_nothing(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    out = co.create_namespaced_custom_object(*WE, entry(), dry_run="All")
    assert out["metadata"]["uid"] and api.get("WorkloadEntry", NS, "billing-10-0-0-1") is None
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(*WE, entry(labels={}), dry_run="All")
    assert exc.value.status == 422
