"""ValidatingAdmissionPolicies: evaluated with CEL on every write they match, answered as the real
API server answers (status, reason, message, causes; failurePolicy; Warn and Audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry

WE = (GROUP, VERSION, NS, "workloadentries")
ADM = ("admissionregistration.k8s.io", "v1")
USER = f"system:serviceaccount:{NS}:vm"


def policy(name: str = "entries", validations: list[dict[str, Any]] | None = None, **spec: Any) -> dict:
    body: dict[str, Any] = {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": [{"apiGroups": [GROUP], "apiVersions": ["*"],
                                                "operations": ["CREATE", "UPDATE", "DELETE"],
                                                "resources": ["workloadentries", "workloadentries/status"]}]},
        "matchConditions": [{"name": "the-vm", "expression": f"request.userInfo.username == '{USER}'"}],
        "validations": validations or [{"expression": "variables.obj.metadata.name.startsWith('billing-')",
                                        "message": "not a billing entry"}],
        "variables": [{"name": "obj", "expression": "request.operation == 'DELETE' ? oldObject : object"}],
    }
    body.update(spec)
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name}, "spec": body}


def binding(name: str = "entries", actions: tuple[str, ...] = ("Deny",), namespace: str = NS) -> dict:
    return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": "entries", "validationActions": list(actions),
                     "matchResources": {"namespaceSelector": {
                         "matchLabels": {"kubernetes.io/metadata.name": namespace}}}}}


@pytest.fixture
def vm(api: KubeAPI, tmp_path: Path) -> client.CustomObjectsApi:
    """A service account that RBAC allows everything on entries (only the policy stands in its way)."""
    api.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "vm", "namespace": NS}})
    api.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "vm", "namespace": NS},
                "rules": [{"apiGroups": [GROUP], "resources": ["workloadentries", "workloadentries/status"],
                           "verbs": ["*"]}]})
    api.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "vm", "namespace": NS},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vm"},
                "subjects": [{"kind": "ServiceAccount", "name": "vm", "namespace": NS}]})
    kc = api.write_kubeconfig(tmp_path / "vm.kubeconfig", api.mint_token(NS, "vm"))
    return client.CustomObjectsApi(config.new_client_from_config(str(kc)))


def install(co: client.CustomObjectsApi, pol: dict, bind: dict) -> None:
    co.create_cluster_custom_object(*ADM, "validatingadmissionpolicies", pol)
    co.create_cluster_custom_object(*ADM, "validatingadmissionpolicybindings", bind)


def refused(call: Any, *args: Any, **kwargs: Any) -> tuple[int, dict]:
    with pytest.raises(client.ApiException) as exc:
        call(*args, **kwargs)
    return exc.value.status, json.loads(exc.value.body)


def test_denial_is_422_invalid_with_the_servers_message(co: client.CustomObjectsApi,
                                                        vm: client.CustomObjectsApi) -> None:
    install(co, policy(), binding())
    code, body = refused(vm.create_namespaced_custom_object, *WE, entry("orders-10-0-0-1"))
    msg = ("ValidatingAdmissionPolicy 'entries' with binding 'entries' denied request: not a billing entry")
    assert code == 422 and body["reason"] == "Invalid"
    assert body["message"] == f'workloadentries.{GROUP} "orders-10-0-0-1" is forbidden: {msg}'
    assert body["details"]["causes"] == [{"message": msg}]
    vm.create_namespaced_custom_object(*WE, entry("billing-10-0-0-1"))  # what the policy allows goes through


def test_reason_message_expression_and_default_message(co: client.CustomObjectsApi,
                                                       vm: client.CustomObjectsApi) -> None:
    install(co, policy(validations=[
        {"expression": "object.spec.address != '10.9.9.9'"},
        {"expression": "variables.obj.metadata.name.startsWith('billing-')", "reason": "Forbidden",
         "messageExpression": "'entry ' + variables.obj.metadata.name + ' is not billing'"}]), binding())
    code, body = refused(vm.create_namespaced_custom_object, *WE, entry("orders-1"))
    assert code == 403 and body["reason"] == "Forbidden"
    assert body["message"].endswith("denied request: entry orders-1 is not billing")
    code, body = refused(vm.create_namespaced_custom_object, *WE,
                         entry("billing-1", address="10.9.9.9", ports={"http": 80}))
    assert code == 422
    assert body["message"].endswith("denied request: failed expression: object.spec.address != '10.9.9.9'")


def test_update_patch_apply_and_delete_are_judged(api: KubeAPI, co: client.CustomObjectsApi,
                                                  vm: client.CustomObjectsApi) -> None:
    api.create(entry("orders-10-0-0-1"))
    install(co, policy(), binding())
    patch = {"metadata": {"labels": {"x": "y"}}}
    assert refused(vm.patch_namespaced_custom_object, *WE, "orders-10-0-0-1", patch)[0] == 422
    live = vm.get_namespaced_custom_object(*WE, "orders-10-0-0-1")
    assert refused(vm.replace_namespaced_custom_object, *WE, "orders-10-0-0-1", live)[0] == 422
    code, body = refused(vm.patch_namespaced_custom_object, *WE, "orders-10-0-0-1", entry("orders-10-0-0-1"),
                         field_manager="vm", _content_type="application/apply-patch+yaml")
    assert code == 422 and "denied request: not a billing entry" in body["message"]
    code, body = refused(vm.delete_namespaced_custom_object, *WE, "orders-10-0-0-1")
    assert code == 422 and "not a billing entry" in body["message"]  # judged on oldObject
    assert api.get("WorkloadEntry", NS, "orders-10-0-0-1")["metadata"].get("labels") is None


def test_match_conditions_namespace_selector_and_other_users(api: KubeAPI, co: client.CustomObjectsApi,
                                                             vm: client.CustomObjectsApi) -> None:
    install(co, policy(), binding(namespace="elsewhere"))
    vm.create_namespaced_custom_object(*WE, entry("orders-1"))  # the binding is for another namespace
    co.delete_cluster_custom_object(*ADM, "validatingadmissionpolicybindings", "entries")
    co.create_cluster_custom_object(*ADM, "validatingadmissionpolicybindings", binding())
    assert refused(vm.create_namespaced_custom_object, *WE, entry("orders-2"))[0] == 422
    co.create_namespaced_custom_object(*WE, entry("orders-2"))  # the admin is not matched


def test_evaluation_error_fails_closed_or_open(co: client.CustomObjectsApi, vm: client.CustomObjectsApi) -> None:
    install(co, policy(validations=[{"expression": "object.metadata.labels['team'] == 'billing'"}]), binding())
    code, body = refused(vm.create_namespaced_custom_object, *WE, entry("billing-1"))
    assert code == 422
    assert ("denied request: expression 'object.metadata.labels['team'] == 'billing'' resulted in error: "
            in body["message"])
    pol = co.get_cluster_custom_object(*ADM, "validatingadmissionpolicies", "entries")
    pol["spec"]["failurePolicy"] = "Ignore"
    co.replace_cluster_custom_object(*ADM, "validatingadmissionpolicies", "entries", pol)
    vm.create_namespaced_custom_object(*WE, entry("billing-1"))


def test_warn_and_audit_admit(api: KubeAPI, co: client.CustomObjectsApi, vm: client.CustomObjectsApi) -> None:
    install(co, policy(), binding(actions=("Warn", "Audit")))
    resp = vm.create_namespaced_custom_object(*WE, entry("orders-1"), _preload_content=False)
    assert resp.status == 201
    assert ("Validation failed for ValidatingAdmissionPolicy 'entries' with binding 'entries': "
            "not a billing entry") in resp.headers.get("Warning", "")
    assert any("denied request: not a billing entry" in a for a in api.cluster.audit)


def test_policy_that_does_not_compile_is_refused(co: client.CustomObjectsApi) -> None:
    code, body = refused(co.create_cluster_custom_object, *ADM, "validatingadmissionpolicies",
                         policy(validations=[{"expression": "object.metadata.name.startsWith("}]))
    assert code == 422 and "spec.validations[0].expression" in body["message"]
    code, body = refused(co.create_cluster_custom_object, *ADM, "validatingadmissionpolicybindings",
                         binding(actions=()))
    assert code == 422 and "spec.validationActions" in body["message"]


def test_match_condition_errors_follow_failure_policy_unless_another_is_false(
        co: client.CustomObjectsApi, vm: client.CustomObjectsApi) -> None:
    broken = {"name": "broken", "expression": "object.metadata.labels['team'] == 'x'"}
    install(co, policy(matchConditions=[broken, policy()["spec"]["matchConditions"][0]]), binding())
    code, body = refused(vm.create_namespaced_custom_object, *WE, entry("billing-1"))
    assert code == 422 and body["message"].endswith(
        "denied request: expression 'object.metadata.labels['team'] == 'x'' resulted in error: no such key: labels")
    co.create_namespaced_custom_object(*WE, entry("billing-2"))  # the admin: the other condition is false
    pol = co.get_cluster_custom_object(*ADM, "validatingadmissionpolicies", "entries")
    pol["spec"]["failurePolicy"] = "Ignore"
    co.replace_cluster_custom_object(*ADM, "validatingadmissionpolicies", "entries", pol)
    vm.create_namespaced_custom_object(*WE, entry("orders-1"))  # not matched: the error is ignored
