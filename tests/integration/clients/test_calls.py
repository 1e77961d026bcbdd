"""Every call the agent makes, through each client generation (tests/clientgen.py), against the emulator:
server-side apply (create, unchanged, stale), the status patch, leases (create, renew, stale renew,
delete), delete with preconditions, watch (events and 410), TokenRequest, SelfSubjectAccessReview,
Kubernetes Events (create, the series patch, create again when the event is gone). A failure's test id
names the generation."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from typing import Any

import pytest

from agent.kube.auth import Credentials
from agent.kube.client import GROUPS, LEASES, Kube
from agent.registry import entry as E
from devkit.kubeapi.auth import Rule
from tests.clientgen import RemoteError
from tests.integration.clients.conftest import AGENT_USER, GROUP, NS, SA, Setup

ADDRESS = "10.0.0.7"  # only data in the entry: no traffic goes there
ENTRY = f"{GROUP}-{ADDRESS}"
WHO = {"namespace": NS, "group": GROUP, "address": ADDRESS}

pytestmark = pytest.mark.subprocess


def opened(setup: Setup) -> Any:
    """An agent under this generation, with a kubeconfig for the service account's bound token."""
    kc = setup.api.write_kubeconfig(setup.tmp / "agent.kubeconfig", setup.token(), user="agent")
    agent = setup.agent()
    info = agent.call("open", creds={"kubeconfig": str(kc)})
    assert info["version"] == setup.gen.version
    return agent


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def managers(obj: dict[str, Any]) -> set[str]:
    return {m["manager"] for m in obj["metadata"].get("managedFields") or []}


def test_register_renew_and_withdraw(setup: Setup) -> None:
    agent = opened(setup)
    out = agent.call("converge", want="REGISTER", instance="vm-1", condition_mode=True, **WHO)
    assert out["present"] and out["healthy"] is True
    assert out["wrote"] == ["lease", "entry", "status"]
    entry = setup.api.get("WorkloadEntry", NS, ENTRY)
    assert entry["spec"]["address"] == ADDRESS
    assert E.condition_of(entry) == "True"
    assert "mesh-agent" in managers(entry)
    lease = setup.api.get("Lease", NS, ENTRY)
    assert lease["spec"]["holderIdentity"] == "vm-1"
    assert lease["metadata"]["ownerReferences"][0]["uid"] == entry["metadata"]["uid"]

    again = agent.call("converge", want="REGISTER", instance="vm-1", condition_mode=True, **WHO)
    assert again["wrote"] == ["lease"]
    assert setup.api.get("WorkloadEntry", NS, ENTRY)["metadata"]["resourceVersion"] == \
        entry["metadata"]["resourceVersion"]

    kept = setup.api.get("Lease", NS, ENTRY)
    renewed = agent.call("renew", instance="vm-1", **WHO)
    assert renewed["wrote"] == ["lease"] and not renewed["lost_lease"]
    now = setup.api.get("Lease", NS, ENTRY)
    assert int(now["metadata"]["resourceVersion"]) > int(kept["metadata"]["resourceVersion"])
    assert now["spec"]["renewTime"] != kept["spec"]["renewTime"]
    # A renewal from a lease someone changed meanwhile is refused (409), and reported as lost.
    stale = agent.call("renew_lease_from", lease=kept, instance="vm-1", **WHO)
    assert stale["lost_lease"]

    # Unhealthy in condition mode: the entry stays, its condition turns False (the status patch).
    sick = agent.call("converge", want="MARK_UNHEALTHY", instance="vm-1", condition_mode=True, **WHO)
    assert sick["present"] and sick["healthy"] is False and "status" in sick["wrote"]
    assert E.condition_of(setup.api.get("WorkloadEntry", NS, ENTRY)) == "False"
    gone = agent.call("converge", want="WITHDRAW", instance="vm-1", **WHO)
    assert gone["wrote"] == ["delete entry", "delete lease"]
    assert setup.api.get("WorkloadEntry", NS, ENTRY) is None
    assert setup.api.get("Lease", NS, ENTRY) is None


def test_the_credential_learns_its_username_once_and_records_it(setup: Setup) -> None:
    """SelfSubjectReview through the generic call (Debian 12's client has no typed one), asked once per
    client; converge and renew record the username on the entry and the lease."""
    agent = opened(setup)
    assert agent.kube("whoami") == AGENT_USER
    agent.call("converge", want="REGISTER", instance="vm-1", **WHO)
    agent.call("renew", instance="vm-1", **WHO)
    assert agent.kube("whoami") == AGENT_USER
    assert [r.user for r in setup.api.requests if r.path.endswith("/selfsubjectreviews")] == [AGENT_USER]
    assert E.owner_of(setup.api.get("WorkloadEntry", NS, ENTRY)) == AGENT_USER
    assert E.owner_of(setup.api.get("Lease", NS, ENTRY)) == AGENT_USER


def test_apply_conflicts_and_delete_preconditions(setup: Setup) -> None:
    agent = opened(setup)
    group = setup.api.get("WorkloadGroup", NS, GROUP)
    obj = E.build_entry(E.EntryInputs(group=group, address=ADDRESS, instance="vm-1"))
    created = agent.kube("apply", "ENTRIES", obj)
    rv, uid = created["metadata"]["resourceVersion"], created["metadata"]["uid"]
    assert setup.api.get("WorkloadEntry", NS, ENTRY)["metadata"]["uid"] == uid
    same = agent.kube("apply", "ENTRIES", {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv}})
    assert same["metadata"]["resourceVersion"] == rv

    changed = {**obj, "spec": {**obj["spec"], "weight": 7}}
    newer = agent.kube("apply", "ENTRIES", changed)
    assert newer["spec"]["weight"] == 7
    with pytest.raises(RemoteError) as exc:  # the resourceVersion read before is a precondition
        agent.kube("apply", "ENTRIES", {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv}})
    assert (exc.value.type, exc.value.status) == ("Conflict", 409)

    with pytest.raises(RemoteError) as exc:
        agent.kube("delete", "ENTRIES", NS, ENTRY, uid="00000000-0000-0000-0000-000000000000")
    assert (exc.value.type, exc.value.status) == ("Conflict", 409)
    with pytest.raises(RemoteError) as exc:
        agent.kube("delete", "ENTRIES", NS, ENTRY, uid=uid, resource_version=rv)
    assert exc.value.type == "Conflict"
    assert setup.api.get("WorkloadEntry", NS, ENTRY) is not None
    assert agent.kube("delete", "ENTRIES", NS, ENTRY, uid=uid,
                      resource_version=newer["metadata"]["resourceVersion"]) is True
    assert agent.kube("delete", "ENTRIES", NS, ENTRY) is False
    assert agent.kube("get", "ENTRIES", NS, ENTRY) is None

    lease = E.build_lease(ENTRY, NS, "vm-1", 30, _now())
    made = agent.kube("create", "LEASES", json.loads(json.dumps(lease, default=str)))
    assert made["spec"]["holderIdentity"] == "vm-1"
    with pytest.raises(RemoteError) as exc:
        agent.kube("create", "LEASES", json.loads(json.dumps(E.build_lease(ENTRY, NS, "vm-2", 30, _now()),
                                                             default=str)))
    assert exc.value.type == "Conflict"
    assert agent.kube("delete", "LEASES", NS, ENTRY, uid=made["metadata"]["uid"]) is True


def _relabel(setup: Setup, value: str) -> None:
    admin = Kube.from_credentials(Credentials(kubeconfig=str(setup.api.kubeconfig)), timeout=5.0)
    try:
        admin.apply(GROUPS, {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                             "metadata": {"name": GROUP, "namespace": NS, "labels": {"tier": value}}},
                    field_manager="test")
    finally:
        admin.close()


def test_watch_sees_changes_and_expiry(setup: Setup) -> None:
    agent = opened(setup)
    group, rv = agent.kube("get_for_watch", "GROUPS", NS, GROUP)
    assert group["metadata"]["name"] == GROUP and rv
    _relabel(setup, "gold")
    events = agent.kube("watch", "GROUPS", NS, GROUP, rv, 1)
    assert [(t, o["metadata"]["labels"].get("tier")) for t, o in events] == [("MODIFIED", "gold")]

    setup.api.compact()
    expired = agent.kube("watch", "GROUPS", NS, GROUP, rv, 1)
    assert expired[0][0] == "ERROR" and expired[0][1]["code"] == 410


def _rotate_root_cert(setup: Setup, pem: str) -> None:
    """What istiod does when the mesh's root rotates: a new value in the namespace's ConfigMap."""
    from kubernetes import client

    admin = Kube.from_credentials(Credentials(kubeconfig=str(setup.api.kubeconfig)), timeout=5.0)
    try:
        client.CoreV1Api(admin.api_client).patch_namespaced_config_map(
            "istio-ca-root-cert", NS, {"data": {"root-cert.pem": pem}})
    finally:
        admin.close()


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_token_request_and_access_reviews(setup: Setup) -> None:
    token_file = setup.tmp / "agent-token"
    first = setup.token(seconds=3600)
    token_file.write_text(first + "\n")
    agent = setup.agent()
    agent.call("open", creds={"server": setup.api.url, "ca_file": str(setup.api.ca_path),
                              "token_file": str(token_file)})
    expiry = agent.call("renew_own_token", token_file=str(token_file))
    renewed = token_file.read_text().strip()
    assert renewed != first and expiry > time.time() + 600
    assert _claims(renewed)["sub"] == AGENT_USER
    assert agent.kube("get", "GROUPS", NS, GROUP)["metadata"]["name"] == GROUP
    assert [r.user for r in setup.api.requests if r.path.endswith(f"/workloadgroups/{GROUP}")][-1] == AGENT_USER

    minted = agent.call("core", method="create_token", args=[NS, SA, 600, ["istio-ca"]])
    assert _claims(minted["status"]["token"])["aud"] == ["istio-ca"]
    cm = agent.call("core", method="get_configmap", args=[NS, "istio-ca-root-cert"])
    assert "root-cert.pem" in cm["data"]
    # The emulator authorises a one-name watch only without resourceNames (see tests/integration/cluster).
    setup.api.grant(AGENT_USER, [Rule(("watch", "list"), ("",), ("configmaps",), (NS,))])
    _rotate_root_cert(setup, "-----BEGIN CERTIFICATE-----\nrotated\n-----END CERTIFICATE-----\n")
    events = agent.call("core", method="watch_configmap",
                        args=[NS, "istio-ca-root-cert", cm["metadata"]["resourceVersion"], 1])
    assert [(t, "rotated" in o["data"]["root-cert.pem"]) for t, o in events] == [("MODIFIED", True)]

    checks = dict(agent.call("access_checks", settings={"namespace": NS, "group": GROUP,
                                                        "read_istio_config": False}, service_account=SA))
    assert checks == {f'get workloadgroups "{GROUP}" in {NS}': True,
                      f'create serviceaccounts/token "{SA}" in {NS}': True,
                      f'get configmaps "istio-ca-root-cert" in {NS}': True,
                      f'watch configmaps "istio-ca-root-cert" in {NS}': True}
    rbac = agent.call("doctor", namespace=NS)
    assert [level for level, _ in rbac] == ["pass"], rbac

    # Refused: no rule lets it mint tokens for another service account.
    with pytest.raises(RemoteError) as exc:
        agent.call("core", method="create_token", args=[NS, "someone-else", 600, None])
    assert (exc.value.type, exc.value.status) == ("Unauthorized", 403)


def test_reaper_deletes_what_an_expired_lease_left(setup: Setup) -> None:
    """`mesh-agent reap` with the reaper's own service account (its Role from `manifests`)."""
    agent = opened(setup)
    agent.call("converge", want="REGISTER", instance="vm-1", **WHO)
    agent.call("converge", want="REGISTER", instance="vm-2", namespace=NS, group=GROUP, address="10.0.0.8")
    # vm-1 died an hour ago: its lease was last renewed then.
    admin = Kube.from_credentials(Credentials(kubeconfig=str(setup.api.kubeconfig)), timeout=5.0)
    try:
        admin.apply(LEASES, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                             "metadata": {"name": ENTRY, "namespace": NS},
                             "spec": {"renewTime": (_now() - dt.timedelta(hours=1)).strftime(
                                 "%Y-%m-%dT%H:%M:%S.%fZ")}}, field_manager="test")
    finally:
        admin.close()
    reaper_kc = setup.api.write_kubeconfig(setup.tmp / "reaper.kubeconfig",
                                           setup.api.mint_token(NS, f"mesh-agent-reaper-{GROUP}"), user="reaper")
    reaper = setup.agent()
    reaper.call("open", creds={"kubeconfig": str(reaper_kc)})
    out = reaper.call("reap", namespace=NS, grace=5)
    assert (out["deleted"], out["skipped"]) == (1, 0), out["said"]
    assert setup.api.get("WorkloadEntry", NS, ENTRY) is None
    assert setup.api.get("Lease", NS, ENTRY) is None
    assert setup.api.get("WorkloadEntry", NS, f"{GROUP}-10.0.0.8") is not None


def test_events_create_then_series_patch(setup: Setup) -> None:
    agent = opened(setup)
    ref = {"kind": "WorkloadGroup", "namespace": NS, "name": GROUP, "uid": "group-uid"}
    first = agent.call("event", regarding=ref, reason="AppExited", note="process 41 exited",
                       at="2026-01-02T03:04:05Z")
    assert first["result"] == "created" and first["op"] == "create"
    for n, at in enumerate(["2026-01-02T03:04:15Z", "2026-01-02T03:04:25Z"], start=2):
        again = agent.call("event", regarding=ref, reason="AppExited", note=f"process {n} exited", at=at)
        assert again == {"result": "patched", "name": first["name"], "op": "patch"}
    events = setup.api.objects("Event", NS)
    assert len(events) == 1
    ev = events[0]
    assert ev["series"] == {"count": 3, "lastObservedTime": "2026-01-02T03:04:25.000000Z"}
    assert ev["note"] == "process 41 exited" and ev["eventTime"] == "2026-01-02T03:04:05.000000Z"
    assert ev["reportingController"] == "mesh-agent.io/registry" and ev["reportingInstance"] == "vm-1"
    assert ev["regarding"]["uid"] == "group-uid"
    # Sent by the service account with exactly the manifests' RBAC.
    patches = [r for r in setup.api.requests if r.method == "PATCH" and "/events/" in r.path]
    assert len(patches) == 2 and all(r.user == AGENT_USER and r.code == 200 for r in patches)
    # The event was removed meanwhile (its TTL ran out): the next of the series creates it again.
    setup.api.delete("Event", NS, first["name"])
    back = agent.call("event", regarding=ref, reason="AppExited", note="process 4 exited",
                      at="2026-01-02T03:04:35Z")
    assert back["result"] == "created"
    assert setup.api.get("Event", NS, first["name"])["series"]["count"] == 4
