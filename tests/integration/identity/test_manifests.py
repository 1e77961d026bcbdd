"""`mesh-agent manifests --identity ...`: the RBAC bound to the VM group (same Roles as the service
account's), and an AuthenticationConfiguration that the emulator's authenticator loads, admitting a
matching token and refusing others."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.registry.identity_manifests import identity_authenticator, identity_bindings
from agent.registry.manifests import build_manifests
from devkit.identity import FakeAzure, TestIssuer
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.oidc import OIDCAuthenticators
from devkit.kubeapi.server import KubeAPI

REPO = Path(__file__).resolve().parents[3]
AUD = "https://kube.mesh.test"


def manifests(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "manifests", "--group", "billing", "--namespace",
                           "vm-apps", "--service-account", "billing-vm", "--port", "http=8080", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def gce_claims(issuer: TestIssuer, **gce: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"project_id": "mesh-project", "instance_id": "42", "license_id": ["777"], "zone": "z"}
    base.update(gce)
    return {"iss": issuer.url, "aud": AUD, "sub": "1", "iat": now, "exp": now + 600,
            "google": {"compute_engine": base}}


@pytest.mark.subprocess
def test_cli_writes_the_authenticator_and_binds_the_group(tmp_path: Path, issuer: TestIssuer) -> None:
    ca = tmp_path / "issuer-ca.pem"
    ca.write_text(issuer.ca_pem)
    out = tmp_path / "authn.yaml"
    done = manifests("--identity", "gcp", "--audience", AUD, "--project", "mesh-project", "--image", "777",
                     "--issuer", issuer.url, "--issuer-ca", str(ca), "--authn-config", str(out))
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    binding = next(d for d in docs if d["metadata"]["name"] == "mesh-agent-billing-identity")
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                                    "name": "mesh-vm:vm-apps:billing"}]
    assert binding["roleRef"]["name"] == "mesh-agent-billing"  # the service account's own Role
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    assert '"mesh-vm:vm-apps:billing" in request.userInfo.groups' in policy["spec"]["matchConditions"][0]["expression"]
    config = yaml.safe_load(out.read_text())
    assert config["kind"] == "AuthenticationConfiguration"
    assert config["apiVersion"] == "apiserver.config.k8s.io/v1beta1"
    authn = OIDCAuthenticators(config)
    ident = authn.authenticate(issuer.sign(gce_claims(issuer)))
    assert ident is not None and ident.user == "mesh-vm:42" and ident.groups == ("mesh-vm:vm-apps:billing",)
    assert authn.authenticate(issuer.sign(gce_claims(issuer, project_id="other"))) is None
    assert authn.authenticate(issuer.sign(gce_claims(issuer, license_id=["888"]))) is None


@pytest.mark.subprocess
@pytest.mark.parametrize(("args", "message"), [
    (["--identity", "gcp", "--audience", AUD, "--project", "p"], "--identity needs --authn-config"),
    (["--identity", "gcp", "--project", "p", "--authn-config", "/dev/null"], "--audience is needed"),
    (["--identity", "aws", "--audience", AUD, "--project", "1", "--authn-config", "/dev/null"], "needs --issuer"),
    (["--identity", "azure", "--audience", AUD, "--authn-config", "/dev/null"], "needs --tenant and --project"),
])
def test_cli_refuses_incomplete_identity_options(args: list[str], message: str) -> None:
    done = manifests(*args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


def test_the_identity_rbac_is_the_service_accounts() -> None:
    docs = build_manifests(group="billing", namespace="vm-apps", service_account="billing-vm",
                           ports=[("http", 8080)], read_istio_config="istio-system")
    bindings = identity_bindings(docs, "vm-apps", "billing")
    sa_bindings = [d for d in docs if d["kind"] == "RoleBinding" and "reaper" not in d["metadata"]["name"]]
    assert [(b["metadata"]["namespace"], b["roleRef"]) for b in bindings] == \
        [(b["metadata"]["namespace"], b["roleRef"]) for b in sa_bindings]
    assert all(s["kind"] == "Group" for b in bindings for s in b["subjects"])


def test_azure_authenticator_pins_tenant_subscription_and_group(issuer: TestIssuer) -> None:
    sub = "0b1f6471-1bf0-4dda-aec3-cb9272f09590"
    jwt = identity_authenticator(provider="azure", namespace="vm-apps", group="billing", audience=AUD,
                                 issuer=issuer.url, issuer_ca=issuer.ca_pem, tenant=FakeAzure.TENANT, project=sub,
                                 resource_group="Mesh-RG")
    authn = OIDCAuthenticators({"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration",
                                "jwt": [jwt]})
    now = int(time.time())

    def claims(**over: Any) -> dict[str, Any]:
        c = {"iss": issuer.url, "aud": AUD, "iat": now, "exp": now + 60, "oid": "o-1", "tid": FakeAzure.TENANT,
             "xms_mirid": f"/subscriptions/{sub}/resourcegroups/mesh-rg/providers/Microsoft.Compute/"
                          "virtualMachines/vm1"}
        c.update(over)
        return c

    assert authn.authenticate(issuer.sign(claims())).user == "mesh-vm:o-1"  # type: ignore[union-attr]
    assert authn.authenticate(issuer.sign(claims(tid="another-tenant"))) is None
    assert authn.authenticate(issuer.sign(claims(xms_mirid=f"/subscriptions/{sub}/resourcegroups/other/x"))) is None


@pytest.mark.subprocess
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_printed_manifests_apply_with_kubectl(kubeapi: KubeAPI, tmp_path: Path,  # noqa: F811
                                                  issuer: TestIssuer) -> None:
    """What `manifests --identity gcp` prints, both admission policies included, is accepted by the API
    server (the emulator checks each object's schema and compiles every CEL expression) through kubectl's
    server-side apply, and applying it again changes nothing."""
    kubeapi.create_namespace("vm-apps")
    done = manifests("--identity", "gcp", "--audience", AUD, "--project", "mesh-project",
                     "--authn-config", str(tmp_path / "authn.yaml"))
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(kubeapi.kubeconfig)}
    for _ in range(2):
        applied = subprocess.run(["kubectl", "--cache-dir", str(tmp_path / "cache"), "apply", "--server-side",
                                  "--field-manager", "mesh-agent-manifests", "-f", "-"], input=done.stdout,
                                 capture_output=True, text=True, timeout=60, env=env)
        assert applied.returncode == 0, applied.stderr
    for name in ("mesh-agent-vm-apps-billing", "mesh-agent-vm-apps-billing.per-vm"):
        policy = kubeapi.get("ValidatingAdmissionPolicy", "", name)
        assert policy is not None and policy["spec"]["validations"], name
        assert kubeapi.get("ValidatingAdmissionPolicyBinding", "", name)["spec"]["policyName"] == name
    assert kubeapi.get("RoleBinding", "vm-apps", "mesh-agent-billing-identity") is not None
