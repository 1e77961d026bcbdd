"""The real kubectl against the emulator: discovery, get, client-side and server-side apply, auth."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import NS

pytestmark = [pytest.mark.subprocess,
              pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")]

MANIFEST = f"""\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: billing-10-0-0-1
  namespace: {NS}
spec:
  address: 10.0.0.1
  labels:
    app: billing
"""


def kubectl(api: KubeAPI, tmp_path: Path, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(api.kubeconfig)}
    proc = subprocess.run(["kubectl", "--cache-dir", str(tmp_path / "cache"), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_get_lists_entries_across_namespaces(api: KubeAPI, tmp_path: Path) -> None:
    api.create(yaml.safe_load(MANIFEST))
    out = yaml.safe_load(kubectl(api, tmp_path, "get", "workloadentries", "-A", "-o", "yaml").stdout)
    assert [i["metadata"]["name"] for i in out["items"]] == ["billing-10-0-0-1"]
    table = kubectl(api, tmp_path, "get", "we", "-A").stdout.split()
    assert table[:4] == ["NAMESPACE", "NAME", "AGE", "ADDRESS"] and table[4:6] == [NS, "billing-10-0-0-1"]
    assert table[-1] == "10.0.0.1"


def test_client_side_apply_creates_then_patches(api: KubeAPI, tmp_path: Path) -> None:
    assert "created" in kubectl(api, tmp_path, "apply", "-f", "-", stdin=MANIFEST).stdout
    changed = MANIFEST.replace("10.0.0.1", "10.0.0.2")
    assert "configured" in kubectl(api, tmp_path, "apply", "-f", "-", stdin=changed).stdout
    assert api.get("WorkloadEntry", NS, "billing-10-0-0-1")["spec"]["address"] == "10.0.0.2"


def test_apply_reports_schema_errors(api: KubeAPI, tmp_path: Path) -> None:
    bad = MANIFEST.replace("  address: 10.0.0.1\n", "")
    proc = kubectl(api, tmp_path, "apply", "-f", "-", stdin=bad, check=False)
    assert proc.returncode != 0 and "Address is required" in proc.stderr
    typo = MANIFEST.replace("  address:", "  addres: x\n  address:")
    proc = kubectl(api, tmp_path, "apply", "-f", "-", stdin=typo, check=False)
    assert proc.returncode != 0 and 'unknown field "spec.addres"' in proc.stderr


def test_server_side_apply_and_its_conflicts(api: KubeAPI, tmp_path: Path) -> None:
    kubectl(api, tmp_path, "apply", "--server-side", "--field-manager", "mesh-agent", "-f", "-",
            stdin=MANIFEST)
    changed = MANIFEST.replace("10.0.0.1", "10.0.0.2")
    proc = kubectl(api, tmp_path, "apply", "--server-side", "-f", "-", stdin=changed, check=False)
    assert proc.returncode != 0 and 'conflict with "mesh-agent"' in proc.stderr
    kubectl(api, tmp_path, "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=changed)
    assert api.get("WorkloadEntry", NS, "billing-10-0-0-1")["spec"]["address"] == "10.0.0.2"


def test_auth_can_i_and_delete(api: KubeAPI, tmp_path: Path) -> None:
    can_i = kubectl(api, tmp_path, "auth", "can-i", "delete", "workloadentries", "-n", NS)
    assert can_i.stdout.strip() == "yes"
    api.create(yaml.safe_load(MANIFEST))
    kubectl(api, tmp_path, "delete", "workloadentry", "billing-10-0-0-1", "-n", NS)
    assert api.get("WorkloadEntry", NS, "billing-10-0-0-1") is None


def test_typed_create_commands_sent_as_protobuf(api: KubeAPI, tmp_path: Path) -> None:
    kubectl(api, tmp_path, "create", "namespace", "demo")
    kubectl(api, tmp_path, "-n", "demo", "create", "configmap", "c", "--from-literal=a=b")
    kubectl(api, tmp_path, "-n", "demo", "create", "serviceaccount", "billing-vm")
    token = kubectl(api, tmp_path, "-n", "demo", "create", "token", "billing-vm", "--audience=istio-ca")
    payload = token.stdout.strip().split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == ["istio-ca"] and claims["sub"] == "system:serviceaccount:demo:billing-vm"
    assert api.get("ConfigMap", "demo", "c")["data"] == {"a": "b"}


def test_manifests_applied_by_kubectl_and_a_policy_denial_as_kubectl_shows_it(api: KubeAPI, tmp_path: Path) -> None:
    from agent.registry.manifests import build_manifests

    docs = build_manifests(group="billing", namespace=NS, service_account="billing-vm", ports=[("http", 8080)])
    text = yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)
    out = kubectl(api, tmp_path, "apply", "-f", "-", stdin=text).stdout
    assert f"validatingadmissionpolicy.admissionregistration.k8s.io/mesh-agent-{NS}-billing created" in out
    assert "unchanged" in kubectl(api, tmp_path, "apply", "-f", "-", stdin=text).stdout
    kubectl(api, tmp_path, "apply", "--server-side", "-f", "-", stdin=text)
    api.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "controller-leader", "namespace": NS}, "spec": {"holderIdentity": "c"}})
    token = kubectl(api, tmp_path, "-n", NS, "create", "token", "billing-vm").stdout.strip()
    refused = kubectl(api, tmp_path, "--token", token, "-n", NS, "delete", "lease", "controller-leader", check=False)
    assert refused.returncode == 1
    assert (f'The leases "controller-leader" is invalid: : ValidatingAdmissionPolicy \'mesh-agent-{NS}-billing\' '
            f"with binding 'mesh-agent-{NS}-billing' denied request: a VM of group billing may only write "
            "Leases named billing-...") in refused.stderr
    assert api.get("Lease", NS, "controller-leader") is not None
