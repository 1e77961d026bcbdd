"""The whole agent (subprocess, real Envoy) on a "GCP VM": no kubeconfig and no token anywhere, only
the metadata server. It builds its bundle from the cluster (TokenRequest for the istio token, with the
identity token as its credential) and registers its WorkloadEntry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.registry.identity_manifests import authentication_configuration, identity_authenticator, identity_bindings
from agent.registry.manifests import build_manifests
from devkit import bundles
from devkit.identity import FakeGcp, Instance, TestIssuer
from devkit.kubeapi.oidc import install
from devkit.ports import free_port
from devkit.rig import NS, REPO, agent_env, rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
AUD = "https://kube.mesh.test"


def test_gcp_vm_builds_its_bundle_and_registers_with_its_identity(tmp_path: Path, issuer: TestIssuer) -> None:
    with rig(tmp_path) as r, FakeGcp(issuer, Instance("8001", project="mesh-project")) as gcp:
        api = r.api
        api.create_namespace(NS)
        api.create_namespace("istio-system")
        docs = build_manifests(group="billing", namespace=NS, service_account="billing-vm",
                               ports=[("http", r.app_port)], read_istio_config="istio-system")
        for doc in docs + identity_bindings(docs, NS, "billing"):
            api.create(doc, manager="kubectl")
        install(api, authentication_configuration(identity_authenticator(
            provider="gcp", namespace=NS, group="billing", audience=AUD, issuer=issuer.url,
            issuer_ca=issuer.ca_pem, project="mesh-project")))
        root_pem = bundles.make_cert(time.time()).decode()
        api.create({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "istio-ca-root-cert", "namespace": NS}, "data": {"root-cert.pem": root_pem}})
        api.create({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "istio", "namespace": "istio-system"},
                    "data": {"mesh": "trustDomain: cluster.local\ndefaultConfig:\n  discoveryAddress: "
                                     f"istiod.istio-system.svc:{r.istiod_port}\n"}})
        r.overrides = {
            "bundle": {"kubernetes": {"namespace": NS, "group": "billing", "gateway_address": "127.0.0.1"}},
            "registry": {"kubeconfig": None, "server": api.url, "ca_file": str(api.ca_path),
                         "address": {"value": "127.0.0.1"}},
            "identity": {"provider": "gcp", "audience": AUD, "endpoint": gcp.url, "timeout": "2s"},
        }
        r.prepare("kubernetes")
        r.start_app()
        r.start_agent()
        try:
            entry = wait_for(r.entry, 60, "registration")
        except AssertionError:
            print(r.log_text()[-5000:])
            raise
        istio_token = (r.root / "var/run/secrets/tokens/istio-token").read_text()
        assert istio_token.count(".") == 2  # minted by TokenRequest for billing-vm
        identity_token = (r.root / "run/mesh-agent/identity-token").read_text().strip()
        assert identity_token in gcp.issued
        users = {rec.user for rec in list(api.requests)}
        assert "mesh-vm:8001" in users
        creates = [rec for rec in list(api.requests) if rec.method == "POST" and rec.path.endswith("/token")]
        assert creates and all(rec.user == "mesh-vm:8001" for rec in creates)
        assert entry["spec"]["address"] == "127.0.0.1"
        status = json.loads(r.status_file.read_text())
        assert status["bundle"]["source"] == "kubernetes"
        assert status["identity"]["provider"] == "gcp" and status["identity"]["expiry"] > time.time()
        shown = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(r.config_path)],
                               env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "identity:     gcp (GCE instance vm-8001 (8001) in mesh-project), token expiry" in shown.stdout, \
            shown.stdout + shown.stderr

        doctor = [sys.executable, "-m", "agent", "doctor", "--json", "--config", str(r.config_path)]
        done = subprocess.run(doctor, env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        checks = {c["name"]: c for c in json.loads(done.stdout)}
        assert checks["identity"]["result"] == "pass", checks
        assert "GCE instance vm-8001 (8001) in mesh-project" in checks["identity"]["message"]
        assert checks["identity audience"] == {"name": "identity audience", "result": "pass", "message": AUD,
                                               "hint": ""}
        assert checks["identity expiry"]["result"] == "pass"
        assert checks["identity token file"]["result"] == "pass"
        assert checks["RBAC"]["result"] == "pass", checks["RBAC"]  # asked with the identity token
        assert r.stop_agent() == 0

        # Off GCP: nothing answers at the metadata address.
        r.overrides["identity"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
        r.write_config()
        done = subprocess.run(doctor[:4] + doctor[5:], env=agent_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1
        assert "FAIL identity: gcp: no metadata service answered at http://127.0.0.1:" in done.stdout
        assert "is this VM on GCP (Compute Engine)?" in done.stdout
        assert "hint: on GCP, the VM needs a service account attached" in done.stdout
