"""Server-side apply: managedFields, ownership conflicts (409 unless force), field removal, status."""

from __future__ import annotations

import json

import pytest
from kubernetes import client, dynamic

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry

WE = (GROUP, VERSION, NS, "workloadentries")
NAME = "billing-10-0-0-1"
APPLY = "application/apply-patch+yaml"


def apply(co: client.CustomObjectsApi, body: dict, manager: str = "mesh-agent", **kw: object) -> dict:
    co.patch_namespaced_custom_object(*WE, body["metadata"]["name"], body, field_manager=manager,
                                      _content_type=APPLY, **kw)
    return co.get_namespaced_custom_object(*WE, body["metadata"]["name"])


def test_apply_creates_and_records_the_manager(co: client.CustomObjectsApi) -> None:
    out = apply(co, entry())
    [managed] = out["metadata"]["managedFields"]
    assert managed["manager"] == "mesh-agent" and managed["operation"] == "Apply"
    assert managed["fieldsV1"] == {"f:spec": {"f:address": {}, "f:labels": {"f:app": {}},
                                              "f:ports": {"f:http": {}}}}


def test_apply_create_answers_201_which_the_typed_client_returns_as_none(co: client.CustomObjectsApi) -> None:
    # The generated client only decodes 200 for PATCH: callers must not rely on the returned body.
    def once() -> dict | None:
        return co.patch_namespaced_custom_object(*WE, NAME, entry(), field_manager="m", _content_type=APPLY)

    assert once() is None
    assert once()["metadata"]["name"] == NAME


def test_apply_needs_a_field_manager(co: client.CustomObjectsApi) -> None:
    with pytest.raises(client.ApiException) as exc:
        co.patch_namespaced_custom_object(*WE, NAME, entry(), _content_type=APPLY)
    assert exc.value.status == 400 and "fieldManager is required" in exc.value.body


def test_another_manager_changing_an_owned_field_conflicts(co: client.CustomObjectsApi) -> None:
    apply(co, entry())
    with pytest.raises(client.ApiException) as exc:
        apply(co, entry(address="10.0.0.2"), manager="intruder")
    status = json.loads(exc.value.body)
    assert exc.value.status == 409 and status["reason"] == "Conflict"
    assert status["details"]["causes"] == [{
        "reason": "FieldManagerConflict", "field": ".spec.address",
        "message": 'conflict with "mesh-agent" using networking.istio.io/v1'}]
    assert status["message"].startswith("Apply failed with 1 conflict")


def test_force_takes_ownership(co: client.CustomObjectsApi) -> None:
    apply(co, entry())
    out = apply(co, entry(address="10.0.0.2"), manager="intruder", force=True)
    assert out["spec"]["address"] == "10.0.0.2"
    owners = {m["manager"]: m["fieldsV1"]["f:spec"] for m in out["metadata"]["managedFields"]}
    assert "f:address" in owners["intruder"] and "f:address" not in owners["mesh-agent"]


def test_same_value_is_shared_without_conflict(co: client.CustomObjectsApi) -> None:
    apply(co, entry())
    out = apply(co, entry(address="10.0.0.1"), manager="other")
    assert {m["manager"] for m in out["metadata"]["managedFields"]} == {"mesh-agent", "other"}


def test_fields_no_longer_applied_are_removed(co: client.CustomObjectsApi) -> None:
    apply(co, entry())
    out = apply(co, entry(address="10.0.0.1"))
    assert out["spec"] == {"address": "10.0.0.1"}


def test_update_by_another_client_then_apply_conflicts(co: client.CustomObjectsApi) -> None:
    apply(co, entry())
    co.patch_namespaced_custom_object(*WE, NAME, {"spec": {"weight": 7}})
    with pytest.raises(client.ApiException) as exc:
        apply(co, entry(address="10.0.0.1", weight=3))
    cause = json.loads(exc.value.body)["details"]["causes"][0]
    assert exc.value.status == 409 and cause["field"] == ".spec.weight"
    assert cause["message"] == 'conflict with "OpenAPI-Generator" using networking.istio.io/v1'


def test_apply_with_a_stale_resource_version_conflicts(co: client.CustomObjectsApi) -> None:
    first = apply(co, entry())
    apply(co, entry(address="10.0.0.1", weight=1))
    stale = entry()
    stale["metadata"]["resourceVersion"] = first["metadata"]["resourceVersion"]
    with pytest.raises(client.ApiException) as exc:
        apply(co, stale)
    assert exc.value.status == 409


def test_apply_to_main_resource_ignores_status_and_back(co: client.CustomObjectsApi) -> None:
    body = entry()
    body["status"] = {"conditions": [{"type": "Healthy", "status": "True"}]}
    out = apply(co, body)
    assert "status" not in out
    status = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadEntry", "metadata": {"name": NAME},
              "spec": {"address": "9.9.9.9"},
              "status": {"conditions": [{"type": "Healthy", "status": "False", "reason": "Probe"}]}}
    co.patch_namespaced_custom_object_status(*WE, NAME, status, field_manager="mesh-agent",
                                             _content_type=APPLY)
    out = co.get_namespaced_custom_object(*WE, NAME)
    assert out["spec"]["address"] == "10.0.0.1" and out["status"]["conditions"][0]["status"] == "False"
    assert any(m.get("subresource") == "status" for m in out["metadata"]["managedFields"])


def test_apply_that_changes_nothing_keeps_the_resource_version(co: client.CustomObjectsApi) -> None:
    first = apply(co, entry())
    again = apply(co, entry())
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


def test_invalid_applied_object_is_422(co: client.CustomObjectsApi) -> None:
    with pytest.raises(client.ApiException) as exc:
        apply(co, entry(labels={"app": "x"}))
    assert exc.value.status == 422


def test_dynamic_client_server_side_apply(api: KubeAPI, kube_client: client.ApiClient) -> None:
    dyn = dynamic.DynamicClient(kube_client)
    res = dyn.resources.get(api_version=f"{GROUP}/{VERSION}", kind="WorkloadEntry")
    dyn.server_side_apply(res, body=entry(), field_manager="mesh-agent")
    got = dyn.get(res, name=NAME, namespace=NS)
    assert got.spec.address == "10.0.0.1"
    assert [i.metadata.name for i in dyn.get(res, namespace=NS).items] == [NAME]
    with pytest.raises(dynamic.exceptions.ApiException) as exc:
        dyn.patch(res, body={"metadata": {"name": NAME}, "spec": {"weight": 1}}, namespace=NS)
    assert exc.value.status == 415  # strategic merge patch, the dynamic client's default, is not for CRs
    dyn.patch(res, body={"spec": {"weight": 1}}, name=NAME, namespace=NS,
              content_type="application/merge-patch+json")
    leases = dyn.resources.get(api_version="coordination.k8s.io/v1", kind="Lease")
    dyn.create(leases, body={"metadata": {"name": "l"}, "spec": {"holderIdentity": "vm"}}, namespace=NS)
    assert dyn.get(leases, name="l", namespace=NS).spec.holderIdentity == "vm"
