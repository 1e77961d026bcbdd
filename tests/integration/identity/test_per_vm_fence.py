"""Per-VM fencing: two VMs of ONE group, each with its own cloud identity (real tokens from the test
issuer, verified by the emulator's jwt authenticator), against the cluster set up from `mesh-agent
manifests --identity gcp` (both admission policies, real CEL). Whoever takes root on VM B holds B's
credential (the agent's own client here): the API server refuses it (422) every write to VM A's entry
and lease, while each VM's own life, the reaper and the service-account path go on."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from agent.health.state import Health
from agent.identity.gcp import GcpProvider
from agent.kube.auth import Credentials
from agent.kube.client import ENTRIES, LEASES, Kube
from agent.kube.errors import Invalid
from agent.registry import entry as E
from agent.registry.manifests import owner_policy_name
from agent.registry.reaper import reap
from agent.registry.states import Settings, State
from devkit.identity import FakeGcp, Instance, TestIssuer
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.server import KubeAPI
from devkit.registrydriver import Driver
from devkit.waiting import wait_for
from tests.integration.identity.cloudvm import (  # noqa: F401
    AUD,
    GROUP,
    NS,
    PROJECT,
    SA,
    VM,
    entry,
    issuer,
    setup_cluster,
    start_vm,
)

A_ENTRY = f"{GROUP}-10.0.0.5"
PER_VM = owner_policy_name(NS, GROUP)


def lease(api: KubeAPI, name: str = A_ENTRY) -> dict[str, Any] | None:
    return api.get("Lease", NS, name)


def refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """The call is denied by the per-VM policy (not RBAC, which allows it): its message."""
    with pytest.raises(Invalid) as exc:
        call(*args, **kwargs)
    assert exc.value.status == 422, exc.value
    assert f"ValidatingAdmissionPolicy '{PER_VM}' with binding '{PER_VM}' denied request: " in str(exc.value)
    return str(exc.value)


def two_vms(api: KubeAPI, vms: list[VM], tmp: Path, a_gcp: FakeGcp, b_gcp: FakeGcp, **kw: Any) -> tuple[VM, VM]:
    vm_a = start_vm(api, GcpProvider(AUD, a_gcp.url, timeout=2), tmp, address="10.0.0.5", **kw)
    vm_b = start_vm(api, GcpProvider(AUD, b_gcp.url, timeout=2), tmp, address="10.0.0.6", **kw)
    vms.extend([vm_a, vm_b])
    wait_for(lambda: vm_a.driver.registrar.state is State.REGISTERED, 20, "VM A registered")
    wait_for(lambda: vm_b.driver.registrar.state is State.REGISTERED, 20, "VM B registered")
    return vm_a, vm_b


def test_each_vm_registers_renews_and_withdraws_its_own_entry(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                              vms: list[VM], tmp_path: Path) -> None:
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    with FakeGcp(issuer, Instance("5001")) as a, FakeGcp(issuer, Instance("5002")) as b:
        vm_a, vm_b = two_vms(kubeapi, vms, tmp_path, a, b)
        for address, user in (("10.0.0.5", "mesh-vm:5001"), ("10.0.0.6", "mesh-vm:5002")):
            assert E.owner_of(entry(kubeapi, address)) == user
            assert E.owner_of(lease(kubeapi, f"{GROUP}-{address}")) == user
        renewed = {n: lease(kubeapi, n)["spec"]["renewTime"] for n in (A_ENTRY, f"{GROUP}-10.0.0.6")}
        wait_for(lambda: all(lease(kubeapi, n)["spec"]["renewTime"] != t for n, t in renewed.items()), 10,
                 "both leases renewed by their own VMs")
        # The username is asked once per credential, not per request.
        reviews = [r for r in list(kubeapi.requests) if r.path.endswith("/selfsubjectreviews")]
        assert sorted(r.user for r in reviews) == ["mesh-vm:5001", "mesh-vm:5002"]
        assert vm_b.driver.stop(withdraw=True)
        vms.remove(vm_b)
        vm_b.refresher.stop()
        assert entry(kubeapi, "10.0.0.6") is None and lease(kubeapi, f"{GROUP}-10.0.0.6") is None
        assert vm_a.driver.registrar.state is State.REGISTERED
        assert E.owner_of(entry(kubeapi)) == "mesh-vm:5001"


def test_a_vm_cannot_touch_a_siblings_entry_or_lease(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                     vms: list[VM], tmp_path: Path) -> None:
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    with FakeGcp(issuer, Instance("5001")) as a, FakeGcp(issuer, Instance("5002")) as b:
        vm_a, vm_b = two_vms(kubeapi, vms, tmp_path, a, b)
        before = entry(kubeapi)["metadata"]["resourceVersion"]
        stolen = vm_b.kube  # VM B's credential, in the hands of whoever took B over
        belongs = "belongs to mesh-vm:5001; this credential is mesh-vm:5002"
        # Withdraw A.
        assert f"WorkloadEntry {A_ENTRY} {belongs}" in refused(stolen.delete, ENTRIES, NS, A_ENTRY)
        assert f"Lease {A_ENTRY} {belongs}" in refused(stolen.delete, LEASES, NS, A_ENTRY)
        # Rewrite A (a merge patch, a server-side apply, its status).
        assert belongs in refused(stolen.merge_patch, ENTRIES, NS, A_ENTRY, {"spec": {"weight": 1}})
        group = kubeapi.get("WorkloadGroup", NS, GROUP)
        as_a = E.build_entry(E.EntryInputs(group=group, address="10.0.0.5", instance=vm_a.instance,
                                           owner="mesh-vm:5001"))
        assert belongs in refused(stolen.apply, ENTRIES, {**as_a, "spec": {**as_a["spec"], "weight": 1}})
        down = E.status_patch(as_a, E.healthy_condition(False, dt.datetime.now(dt.UTC)))
        assert belongs in refused(stolen.apply, ENTRIES, down, subresource="status")
        assert belongs in refused(stolen.merge_patch, LEASES, NS, A_ENTRY, {"spec": {"leaseDurationSeconds": 1}})
        # Take A over: the entry and the lease turned B's.
        as_b = E.build_entry(E.EntryInputs(group=group, address="10.0.0.5", instance=vm_b.instance,
                                           owner="mesh-vm:5002"))
        assert belongs in refused(stolen.apply, ENTRIES, as_b)
        assert belongs in refused(stolen.merge_patch, LEASES, NS, A_ENTRY, {
            "metadata": {"annotations": {E.OWNER_ANNOTATION: "mesh-vm:5002"}},
            "spec": {"holderIdentity": vm_b.instance}})
        # Create an entry (and a lease) that claims to be A's.
        forged = E.build_entry(E.EntryInputs(group=group, address="10.0.0.9", instance=vm_a.instance,
                                             owner="mesh-vm:5001"))
        assert (f"WorkloadEntry {GROUP}-10.0.0.9 must name its writer in annotation {E.OWNER_ANNOTATION}, "
                "not mesh-vm:5001; this credential is mesh-vm:5002") in refused(stolen.create, ENTRIES, forged)
        forged_lease = E.build_lease(f"{GROUP}-10.0.0.9", NS, vm_a.instance, 40, dt.datetime.now(dt.UTC),
                                     writer="mesh-vm:5001")
        assert "not mesh-vm:5001" in refused(stolen.create, LEASES, forged_lease)
        # Mint a service-account token it could write with as the group's service account.
        from agent.kube.core import CoreCalls

        assert "only for audience istio-ca" in refused(CoreCalls(stolen).create_token, NS, SA, 3600, None)
        CoreCalls(stolen).create_token(NS, SA, 3600, ["istio-ca"])  # what the bundle source asks for
        # Nothing of A's changed; A lives on.
        assert kubeapi.get("WorkloadEntry", NS, f"{GROUP}-10.0.0.9") is None
        assert E.owner_of(entry(kubeapi)) == "mesh-vm:5001"
        assert entry(kubeapi)["metadata"]["resourceVersion"] == before
        assert lease(kubeapi)["spec"]["holderIdentity"] == vm_a.instance
        assert vm_a.driver.registrar.state is State.REGISTERED


def test_a_vm_at_a_dead_siblings_address_waits_for_the_reaper(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                              vms: list[VM], tmp_path: Path) -> None:
    """A clone (or a VM given a dead VM's address) finds the dead VM's entry, whose lease expired: the
    API server refuses it the take-over. It says who holds the entry, backs off, and registers once
    the reaper has removed the dead entry."""
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    with FakeGcp(issuer, Instance("5001")) as a, FakeGcp(issuer, Instance("5002")) as b:
        vm_a = start_vm(kubeapi, GcpProvider(AUD, a.url, timeout=2), tmp_path, lease=2.0)
        vms.append(vm_a)
        wait_for(lambda: E.owner_of(entry(kubeapi)) == "mesh-vm:5001", 20, "VM A registered")
        vm_a.driver.kill()  # lost power: no withdrawal
        wait_for(lambda: E.lease_expiry(lease(kubeapi)) < dt.datetime.now(dt.UTC), 10, "A's lease expired")
        vm_b = start_vm(kubeapi, GcpProvider(AUD, b.url, timeout=2), tmp_path, address="10.0.0.5", lease=2.0)
        vms.append(vm_b)
        r = vm_b.driver.registrar
        wait_for(lambda: r.state is State.CONFLICT, 20, "CONFLICT")
        assert r.conflict_holder == "mesh-vm:5001"
        assert f"entry {A_ENTRY} belongs to mesh-vm:5001 (its lease expired at" in r.message
        assert "waiting for the reaper" in r.message and "this credential is mesh-vm:5002" in r.message
        # Backing off, not hammering: a few refused attempts over some seconds (a loop would make hundreds).
        seen = len([q for q in list(kubeapi.requests) if q.user == "mesh-vm:5002" and q.code == 422])
        time.sleep(4.0)
        refusals = len([q for q in list(kubeapi.requests) if q.user == "mesh-vm:5002" and q.code == 422]) - seen
        assert 1 <= refusals <= 20, refusals  # at least 0.25 s apart, 1 s on average
        assert r.state is State.CONFLICT and E.owner_of(entry(kubeapi)) == "mesh-vm:5001"
        # The reaper (its own service account, wider rights) removes the dead entry; B then registers.
        kc = kubeapi.write_kubeconfig(tmp_path / "reaper.kubeconfig",
                                      kubeapi.mint_token(NS, f"mesh-agent-reaper-{GROUP}"), user="reaper")
        reaper = Kube.from_credentials(Credentials(kubeconfig=str(kc)), timeout=3.0)
        said: list[str] = []
        assert reap(reaper, NS, grace=0.5, say=said.append) == (1, 0)
        assert any(f"deleted entry {A_ENTRY}" in line for line in said), said
        reaper.close()
        wait_for(lambda: r.state is State.REGISTERED, 20, "VM B registered at the address")
        assert E.owner_of(entry(kubeapi)) == "mesh-vm:5002"
        assert E.owner_of(lease(kubeapi)) == "mesh-vm:5002"
        assert lease(kubeapi)["spec"]["holderIdentity"] == vm_b.instance


def test_the_service_account_path_is_fenced_by_group_as_before(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """VMs on the group's shared service-account token: the per-VM policy does not apply (the API
    server cannot tell them apart); they record the service account as owner, and one takes over
    another's expired entry as it always did. The group's policy still confines them to the group."""
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    user = f"system:serviceaccount:{NS}:{SA}"
    kc = kubeapi.write_kubeconfig(tmp_path / "agent.kubeconfig", kubeapi.mint_token(NS, SA), user="agent")
    drivers: list[Driver] = []

    def agent(instance: str) -> Driver:
        kube = Kube.from_credentials(Credentials(kubeconfig=str(kc)), timeout=3.0)
        settings = Settings(namespace=NS, group=GROUP, instance=instance, lease_duration=2.0, lease_renew=0.5,
                            resync=5.0, backoff_initial=0.2, backoff_max=1.0)

        def build(group: dict[str, Any]) -> dict[str, Any]:
            return E.build_entry(E.EntryInputs(group=group, address="10.0.0.5", instance=instance))
        d = Driver(kube, settings, build, watch_timeout=5).start()
        drivers.append(d)
        d.do(lambda r, now: r.set_health(Health.HEALTHY, ""))
        return d

    try:
        first = agent("sa-1")
        wait_for(lambda: first.registrar.state is State.REGISTERED, 20, "the first VM registered")
        assert E.owner_of(entry(kubeapi)) == user and E.owner_of(lease(kubeapi)) == user
        first.kill()
        wait_for(lambda: E.lease_expiry(lease(kubeapi)) < dt.datetime.now(dt.UTC), 10, "its lease expired")
        second = agent("sa-2")
        wait_for(lambda: second.registrar.state is State.REGISTERED, 20, "the take-over")
        assert lease(kubeapi)["spec"]["holderIdentity"] == "sa-2"
        assert entry(kubeapi)["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == "sa-2"
        # Group-level fencing: the same token may not write another group's entry.
        other = E.build_entry(E.EntryInputs(group=kubeapi.get("WorkloadGroup", NS, GROUP), address="10.0.0.8",
                                            instance="x", extra_labels={"app": "orders"}))
        with pytest.raises(Invalid) as exc:
            second.worker.kube.create(ENTRIES, other)
        assert f"ValidatingAdmissionPolicy 'mesh-agent-{NS}-{GROUP}'" in str(exc.value)
    finally:
        for d in drivers:
            d.kill()
