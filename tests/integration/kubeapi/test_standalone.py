"""`python -m devkit.kubeapi` as the demo runs it, and the plain-HTTP and IPv6 variants."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from kubernetes import client, config

from devkit.kubeapi import KubeAPI, Rule

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.subprocess
def test_standalone_writes_a_kubeconfig_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "devkit.kubeapi", "--port", "0", "--state-dir", str(state),
                             "--namespace", "vm-apps"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("serving https://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
        assert (state / "ca.crt").exists() and (state / "kubeconfig").stat().st_mode & 0o077 == 0
        api = config.new_client_from_config(str(state / "kubeconfig"))
        names = [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
        assert "vm-apps" in names and "default" in names
        api.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_plain_http_on_ipv6_loopback(kubeapi_factory: Callable[..., KubeAPI]) -> None:
    api = kubeapi_factory(host="::1", tls=False)
    assert api.url.startswith("http://[::1]:")
    kc = config.new_client_from_config(str(api.kubeconfig))
    assert client.VersionApi(kc).get_code().git_version == "v1.32.4"
    kc.close()


def test_delete_collection_by_label(tmp_path: Path) -> None:
    with KubeAPI(state_dir=tmp_path) as api:
        kc = config.new_client_from_config(str(api.kubeconfig))
        core = client.CoreV1Api(kc)
        for name, tier in (("a", "x"), ("b", "x"), ("c", "y")):
            core.create_namespaced_config_map("default", client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=name, labels={"tier": tier})))
        core.delete_collection_namespaced_config_map("default", label_selector="tier=x")
        assert [o["metadata"]["name"] for o in api.objects("ConfigMap", "default")] == ["c"]
        kc.close()


def test_lease_through_server_side_apply(tmp_path: Path) -> None:
    with KubeAPI(state_dir=tmp_path) as api:
        kc = config.new_client_from_config(str(api.kubeconfig))
        leases = client.CoordinationV1Api(kc)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "vm"},
                "spec": {"holderIdentity": "vm-1", "leaseDurationSeconds": 40,
                         "renewTime": "2026-01-01T00:00:00.000000Z"}}
        leases.patch_namespaced_lease("vm", "default", body, field_manager="mesh-agent",
                                      _content_type="application/apply-patch+yaml")
        body["spec"]["renewTime"] = "2026-01-01T00:00:10.000000Z"
        renewed = leases.patch_namespaced_lease("vm", "default", body, field_manager="mesh-agent",
                                                _content_type="application/apply-patch+yaml")
        assert renewed.spec.renew_time.second == 10
        assert api.get("Lease", "default", "vm")["metadata"]["managedFields"][0]["manager"] == "mesh-agent"
        kc.close()


def test_certificate_names_the_listening_address(kubeapi_factory: Callable[..., KubeAPI]) -> None:
    api = kubeapi_factory(host="127.0.0.2")
    kc = config.new_client_from_config(str(api.kubeconfig))
    assert kc.configuration.host.startswith("https://127.0.0.2:")
    assert client.VersionApi(kc).get_code().major == "1"  # the TLS check passed for that address
    kc.close()


VM = "system:serviceaccount:vm-apps:vm"
LIST_CONFIGMAPS = [Rule(("list",), ("",), ("configmaps",), ("vm-apps",))]


def test_persist_keeps_ca_tokens_and_objects_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = KubeAPI(state_dir=state, persist=True).start()
    first.create_namespace("vm-apps")
    first.create({"apiVersion": "v1", "kind": "ServiceAccount",
                  "metadata": {"name": "vm", "namespace": "vm-apps"}})
    first.grant(VM, LIST_CONFIGMAPS)
    token = first.mint_token("vm-apps", "vm")
    kubeconfig = (state / "kubeconfig").read_text()
    port = first.port
    first.stop()

    second = KubeAPI(state_dir=state, persist=True, port=port).start()
    try:
        assert (state / "kubeconfig").read_text() == kubeconfig  # same CA, same admin token, same port
        assert second.get("ServiceAccount", "vm-apps", "vm") is not None
        second.grant(VM, LIST_CONFIGMAPS)  # policies given in code are not saved; RBAC objects are
        kc = config.new_client_from_config(str(second.write_kubeconfig(tmp_path / "vm", token)))
        assert client.CoreV1Api(kc).list_namespaced_config_map("vm-apps").items == []
        kc.close()
    finally:
        second.stop()
