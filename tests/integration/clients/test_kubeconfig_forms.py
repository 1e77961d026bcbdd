"""Every kubeconfig form a VM's operator may hand the agent, with every client generation
(tests/clientgen.py), against the emulator: a static token, a tokenFile (re-read when it rotates), a
client certificate and key (files and inline data), an exec credential plugin
(client.authentication.k8s.io/v1 ExecCredential; run again when its credential expires), and a
pod's in-cluster service account (KUBERNETES_SERVICE_HOST/PORT with token and ca.crt under a
directory, as the reaper's CronJob runs).

Each test reads the WorkloadGroup through the agent's layer and checks, in the emulator's request
log, who the server took the caller for."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import pytest

from devkit.kubeapi import rules
from tests.clientgen import Agent, RemoteError
from tests.integration.clients.conftest import AGENT_USER, GROUP, NS, Setup

pytestmark = pytest.mark.subprocess
GROUP_PATH = f"/namespaces/{NS}/workloadgroups/{GROUP}"
READ_GROUP = [rules("get", "workloadgroups", NS)]


def read_group_as(setup: Setup, agent: Agent) -> str:
    """Read the group through the agent; the user the server saw for that request."""
    before = len(setup.api.requests)
    assert agent.kube("get", "GROUPS", NS, GROUP)["metadata"]["name"] == GROUP
    users = [r.user for r in setup.api.requests[before:] if r.path.endswith(GROUP_PATH) and r.code == 200]
    assert users, "the read reached the server"
    return users[-1]


def kubeconfig(setup: Setup, name: str, user_entry: dict) -> str:
    return str(setup.api.write_kubeconfig(setup.tmp / name, user="vm", credentials=user_entry))


def test_static_token(setup: Setup) -> None:
    agent = setup.agent()
    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "static.kubeconfig", {"token": setup.token()})})
    assert read_group_as(setup, agent) == AGENT_USER


def test_token_file_is_read_again_when_it_rotates(setup: Setup) -> None:
    """The kubeconfig names a token file (relative to the kubeconfig); a new token written there is used
    from the next request on, and the old one, revoked, is refused. With the newest client this once
    sent `Bearer Bearer <token>`, which the server refused."""
    setup.api.add_token("token-one", "vm-operator", READ_GROUP)
    setup.api.add_token("token-two", "vm-operator-next", READ_GROUP)
    token_file = setup.tmp / "token"
    token_file.write_text("token-one\n")
    agent = setup.agent()
    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "file.kubeconfig", {"tokenFile": "token"})})
    assert read_group_as(setup, agent) == "vm-operator"
    assert all(r.code != 401 for r in setup.api.requests)

    fresh = setup.tmp / "token.new"
    fresh.write_text("token-two\n")
    os.replace(fresh, token_file)
    setup.api.cluster.auth.revoke("token-one")
    assert read_group_as(setup, agent) == "vm-operator-next"

    token_file.write_text("token-one\n")  # rewritten in place this time: the revoked token is refused
    with pytest.raises(RemoteError) as exc:
        agent.kube("get", "GROUPS", NS, GROUP)
    assert (exc.value.type, exc.value.status) == ("Unauthorized", 401)


def test_client_certificate(setup: Setup) -> None:
    """CN is the user, each O a group: only the group is granted the read."""
    cert = setup.api.issue_client_cert("vm-cert", ["vm-operators", "mesh-vms"])
    setup.api.grant("mesh-vms", READ_GROUP)
    (setup.tmp / "vm.crt").write_bytes(cert.cert_pem)
    (setup.tmp / "vm.key").write_bytes(cert.key_pem)
    (setup.tmp / "vm.key").chmod(0o600)
    agent = setup.agent()
    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "cert.kubeconfig", {
        "client-certificate": str(setup.tmp / "vm.crt"), "client-key": str(setup.tmp / "vm.key")})})
    assert read_group_as(setup, agent) == "vm-cert"

    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "cert-data.kubeconfig", {
        "client-certificate-data": base64.b64encode(cert.cert_pem).decode(),
        "client-key-data": base64.b64encode(cert.key_pem).decode()})})
    assert read_group_as(setup, agent) == "vm-cert"

    other = setup.api.issue_client_cert("vm-stranger", ["elsewhere"])
    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "stranger.kubeconfig", {
        "client-certificate-data": base64.b64encode(other.cert_pem).decode(),
        "client-key-data": base64.b64encode(other.key_pem).decode()})})
    with pytest.raises(RemoteError) as exc:
        agent.kube("get", "GROUPS", NS, GROUP)
    assert (exc.value.type, exc.value.status) == ("Unauthorized", 403)


def test_exec_credential_plugin(setup: Setup) -> None:
    setup.api.add_token("exec-token", "vm-exec", READ_GROUP)
    plugin = setup.tmp / "credential-plugin"
    answer = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
              "status": {"token": "exec-token"}}
    plugin.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(answer)}\nEOF\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    agent = setup.agent()
    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "exec.kubeconfig", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin), "args": [],
        "interactiveMode": "Never"}})})
    assert read_group_as(setup, agent) == "vm-exec"


def test_exec_plugin_is_run_again_when_its_credential_expires(setup: Setup) -> None:
    """A plugin whose ExecCredential carries an expirationTimestamp (short-lived cloud tokens): once it
    passed, the client runs the plugin again and sends the new token."""
    setup.api.add_token("exec-one", "vm-exec", READ_GROUP)
    setup.api.add_token("exec-two", "vm-exec-next", READ_GROUP)
    current = setup.tmp / "exec-token"
    current.write_text("exec-one")
    plugin = setup.tmp / "credential-plugin"
    plugin.write_text(
        "#!/bin/sh\n"
        f"token=$(cat '{current}')\n"
        "expiry=$(date -u -d '+2 seconds' +%Y-%m-%dT%H:%M:%SZ)\n"
        'printf \'{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", '
        '"status": {"token": "%s", "expirationTimestamp": "%s"}}\\n\' "$token" "$expiry"\n')
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    agent = setup.agent()
    agent.call("open", creds={"kubeconfig": kubeconfig(setup, "exec.kubeconfig", {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
        "interactiveMode": "Never"}})})
    assert read_group_as(setup, agent) == "vm-exec"
    current.write_text("exec-two")
    setup.api.cluster.auth.revoke("exec-one")
    time.sleep(3)  # past the first credential's expiry
    assert read_group_as(setup, agent) == "vm-exec-next"


def in_cluster_root(setup: Setup, token: str) -> Path:
    sa_dir = setup.tmp / "run" / "secrets" / "kubernetes.io" / "serviceaccount"
    sa_dir.mkdir(parents=True)
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_bytes(setup.api.ca_pem)
    (sa_dir / "namespace").write_text(NS)
    return sa_dir


def test_in_cluster_service_account(setup: Setup) -> None:
    """What a pod sees (the reaper's CronJob): the service's address in the environment, the projected
    token and the CA in files. The kubelet rotates the token by swapping the file."""
    sa_dir = in_cluster_root(setup, setup.token())
    env = {"KUBERNETES_SERVICE_HOST": setup.api.host, "KUBERNETES_SERVICE_PORT": str(setup.api.port)}
    agent = setup.agent()
    agent.call("open", in_cluster={"env": env, "sa_dir": str(sa_dir)})
    assert read_group_as(setup, agent) == AGENT_USER

    setup.api.add_token("rotated", "vm-pod-next", READ_GROUP)
    fresh = sa_dir / "token.new"
    fresh.write_text("rotated")
    os.replace(fresh, sa_dir / "token")
    assert read_group_as(setup, agent) == "vm-pod-next"

    with pytest.raises(RemoteError):  # outside a pod: no such environment
        agent.call("open", in_cluster={"env": {}, "sa_dir": str(sa_dir)})
