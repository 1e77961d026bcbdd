"""Stored Roles and RoleBindings (and their cluster-wide kin) authorize like the real RBAC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry

WE = (GROUP, VERSION, NS, "workloadentries")
RBAC = "rbac.authorization.k8s.io"


def role(name: str, rules: list[dict], kind: str = "Role") -> dict:
    meta = {"name": name, "namespace": NS} if kind == "Role" else {"name": name}
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": meta, "rules": rules}


def binding(name: str, role_name: str, subjects: list[dict], kind: str = "RoleBinding",
            role_kind: str = "Role") -> dict:
    meta = {"name": name, "namespace": NS} if kind == "RoleBinding" else {"name": name}
    return {"apiVersion": f"{RBAC}/v1", "kind": kind, "metadata": meta,
            "roleRef": {"apiGroup": RBAC, "kind": role_kind, "name": role_name}, "subjects": subjects}


def as_sa(api: KubeAPI, sa: str, tmp_path: Path) -> client.ApiClient:
    api.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}})
    return config.new_client_from_config(str(api.write_kubeconfig(tmp_path / sa, api.mint_token(NS, sa))))


def test_role_binding_grants_its_role_in_its_namespace_only(api: KubeAPI, tmp_path: Path) -> None:
    api.create(role("agent", [{"apiGroups": [GROUP], "resources": ["workloadentries"],
                               "verbs": ["get", "create"]}]))
    api.create(binding("agent", "agent", [{"kind": "ServiceAccount", "name": "vm", "namespace": NS}]))
    co = client.CustomObjectsApi(as_sa(api, "vm", tmp_path))
    co.create_namespaced_custom_object(*WE, entry())
    with pytest.raises(client.ApiException) as exc:
        co.delete_namespaced_custom_object(*WE, "billing-10-0-0-1")
    assert exc.value.status == 403
    api.create_namespace("other")
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(GROUP, VERSION, "other", "workloadentries", entry() | {
            "metadata": {"name": "x"}})
    assert exc.value.status == 403


def test_cluster_role_binding_and_resource_names(api: KubeAPI, tmp_path: Path) -> None:
    api.create(role("read-one", [{"apiGroups": [GROUP], "resources": ["workloadentries"], "verbs": ["get"],
                                  "resourceNames": ["billing-10-0-0-1"]}], kind="ClusterRole"))
    api.create(binding("read-one", "read-one", [{"kind": "Group", "name": "system:serviceaccounts"}],
                       kind="ClusterRoleBinding", role_kind="ClusterRole"))
    api.create(entry())
    api.create(entry("other"))
    co = client.CustomObjectsApi(as_sa(api, "reader", tmp_path))
    assert co.get_namespaced_custom_object(*WE, "billing-10-0-0-1")["metadata"]["name"] == "billing-10-0-0-1"
    with pytest.raises(client.ApiException) as exc:
        co.get_namespaced_custom_object(*WE, "other")
    assert exc.value.status == 403


def test_bindings_are_validated_and_role_ref_is_immutable(co: client.CustomObjectsApi,
                                                          kube_client: client.ApiClient) -> None:
    rbac = client.RbacAuthorizationV1Api(kube_client)
    with pytest.raises(client.ApiException) as exc:
        rbac.create_namespaced_role_binding(NS, binding("b", "r", [{"kind": "Robot", "name": "x"}]))
    assert exc.value.status == 422
    made = rbac.create_namespaced_role_binding(NS, binding("b", "r", [{"kind": "User", "name": "x"}]))
    made.role_ref.name = "other"
    with pytest.raises(client.ApiException) as exc:
        rbac.replace_namespaced_role_binding("b", NS, made)
    assert exc.value.status == 422 and "cannot change roleRef" in json.loads(exc.value.body)["message"]


@pytest.mark.subprocess
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_applies_rbac_and_cronjobs(api: KubeAPI, tmp_path: Path) -> None:
    docs = [role("agent", [{"apiGroups": [GROUP], "resources": ["workloadentries"], "verbs": ["get"]}]),
            binding("agent", "agent", [{"kind": "ServiceAccount", "name": "vm", "namespace": NS}]),
            {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "reap", "namespace": NS},
             "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": {"spec": {
                 "restartPolicy": "Never", "containers": [{"name": "r", "image": "x"}]}}}}}}]
    manifest = yaml.safe_dump_all(docs)
    env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(api.kubeconfig)}
    proc = subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert api.get("CronJob", NS, "reap")["spec"]["schedule"] == "*/5 * * * *"
    assert api.get("RoleBinding", NS, "agent")["roleRef"]["name"] == "agent"
