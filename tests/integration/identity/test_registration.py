"""End to end: a VM registers its WorkloadEntry with nothing but its cloud's identity token. The emulator
is set up from `mesh-agent manifests --identity ...` (RBAC applied as admin, the AuthenticationConfiguration
loaded into its JWT authenticator); the agent's identity refresher keeps the token in the file its
Kubernetes client reads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.identity.aws import AwsProvider
from agent.identity.azure import AzureProvider
from agent.identity.gcp import GcpProvider
from agent.identity.oidc_file import OidcFileProvider
from agent.registry import entry as E
from agent.registry.manifests import build_manifests
from agent.registry.states import State
from devkit.identity import FakeAzure, FakeGcp, FakeSts, Instance, TestIssuer
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.server import KubeAPI
from devkit.waiting import wait_for
from tests.integration.identity.cloudvm import (  # noqa: F401
    AUD,
    GROUP,
    NS,
    PROJECT,
    VM,
    entry,
    issuer,
    setup_cluster,
    start_vm,
    writers,
)


def test_gcp_vm_registers_with_its_instance_identity(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                     vms: list[VM], tmp_path: Path) -> None:
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT, image="777")
    with FakeGcp(issuer, Instance("4001", project=PROJECT, image="777")) as gcp:
        vm = start_vm(kubeapi, GcpProvider(AUD, gcp.url, timeout=2), tmp_path)
        vms.append(vm)
        obj = wait_for(lambda: entry(kubeapi), 20, "the entry")
    assert obj["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == vm.instance
    assert kubeapi.get("Lease", NS, f"{GROUP}-10.0.0.5")["spec"]["holderIdentity"] == vm.instance
    assert writers(kubeapi) >= {"mesh-vm:4001"}


def test_azure_vm_registers_with_its_managed_identity(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                      vms: list[VM], tmp_path: Path) -> None:
    inst = Instance("az-1", project="0b1f6471-1bf0-4dda-aec3-cb9272f09590")
    setup_cluster(kubeapi, issuer, "azure", project=inst.project, tenant=FakeAzure.TENANT,
                  resource_group=FakeAzure.RESOURCE_GROUP)
    with FakeAzure(issuer, inst) as az:
        vms.append(start_vm(kubeapi, AzureProvider(AUD, az.url, timeout=2), tmp_path))
        wait_for(lambda: entry(kubeapi), 20, "the entry")
    assert f"mesh-vm:{inst.principal}" in writers(kubeapi)


def test_aws_vm_registers_with_its_role_token(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                              vms: list[VM], tmp_path: Path, aws_env: None) -> None:
    inst = Instance("i-0123456789abcdef0", project="111122223333", zone="eu-west-1", image="golden-7")
    setup_cluster(kubeapi, issuer, "aws", project=inst.project, role=FakeSts.role, tags={"mesh-image": "golden-7"})
    with FakeSts(issuer, inst) as sts:
        vms.append(start_vm(kubeapi, AwsProvider(AUD, "eu-west-1", sts.url, duration=900, timeout=2), tmp_path))
        wait_for(lambda: entry(kubeapi), 20, "the entry")
    assert "mesh-vm:i-0123456789abcdef0" in writers(kubeapi)


def test_oidc_file_vm_registers_with_a_jwt_svid(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                vms: list[VM], tmp_path: Path) -> None:
    setup_cluster(kubeapi, issuer, "oidc", require={"tenant": "blue"})
    svid = tmp_path / "jwt-svid"
    now = int(time.time())
    svid.write_text(issuer.sign({"iss": issuer.url, "aud": [AUD], "sub": "spiffe://mesh.test/vm/7", "tenant": "blue",
                                 "iat": now, "exp": now + 300}, "ES256"))
    vms.append(start_vm(kubeapi, OidcFileProvider(str(svid)), tmp_path))
    wait_for(lambda: entry(kubeapi), 20, "the entry")
    assert "mesh-vm:spiffe://mesh.test/vm/7" in writers(kubeapi)


def test_two_clones_of_one_image_are_two_registrations_fenced_from_each_other(
        kubeapi: KubeAPI, issuer: TestIssuer, vms: list[VM], tmp_path: Path) -> None:  # noqa: F811
    """Same image, same machine-id (a clone captured without deprovisioning): two cloud instances."""
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    with FakeGcp(issuer, Instance("5001")) as a, FakeGcp(issuer, Instance("5002")) as b:
        vm_a = start_vm(kubeapi, GcpProvider(AUD, a.url, timeout=2), tmp_path, address="10.0.0.5")
        vm_b = start_vm(kubeapi, GcpProvider(AUD, b.url, timeout=2), tmp_path, address="10.0.0.6")
        vms.extend([vm_a, vm_b])
        ea = wait_for(lambda: entry(kubeapi, "10.0.0.5"), 20, "clone A's entry")
        eb = wait_for(lambda: entry(kubeapi, "10.0.0.6"), 20, "clone B's entry")
        assert vm_a.instance != vm_b.instance
        assert ea["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == vm_a.instance
        assert eb["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == vm_b.instance
        assert writers(kubeapi) >= {"mesh-vm:5001", "mesh-vm:5002"}
        # Clone B, coming up with A's address, must not take A's live entry.
        intruder = start_vm(kubeapi, GcpProvider(AUD, b.url, timeout=2), tmp_path, address="10.0.0.5")
        vms.append(intruder)
        wait_for(lambda: intruder.driver.registrar.state is State.CONFLICT, 20, "CONFLICT")
        assert intruder.driver.registrar.conflict_holder == vm_a.instance
        assert entry(kubeapi, "10.0.0.5")["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == vm_a.instance


@pytest.mark.parametrize("case", ["other-project", "other-image", "other-audience", "untrusted-issuer"])
def test_a_vm_the_rules_do_not_admit_cannot_register(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                      vms: list[VM], tmp_path: Path, case: str) -> None:
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT, image="777")
    inst = Instance("6001", project="other" if case == "other-project" else PROJECT,
                    image="888" if case == "other-image" else "777")
    audience = "https://elsewhere.test" if case == "other-audience" else AUD
    with TestIssuer() as stranger, FakeGcp(stranger if case == "untrusted-issuer" else issuer, inst) as gcp:
        vm = start_vm(kubeapi, GcpProvider(audience, gcp.url, timeout=2), tmp_path)
        vms.append(vm)
        wait_for(lambda: "401" in vm.driver.registrar.message, 20, "a 401 from the API server")
    assert entry(kubeapi) is None
    assert not any(u.startswith("mesh-vm:") for u in writers(kubeapi))


def test_refreshed_token_keeps_the_registration(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                vms: list[VM], tmp_path: Path) -> None:
    """Tokens living 6 s, refreshed at 75 %: the lease keeps being renewed well past the first expiry."""
    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    with FakeGcp(issuer, Instance("7001", lifetime=6)) as gcp:
        vm = start_vm(kubeapi, GcpProvider(AUD, gcp.url, timeout=2), tmp_path)
        vms.append(vm)
        wait_for(lambda: entry(kubeapi), 20, "the entry")
        first = vm.refresher.current
        assert first is not None
        wait_for(lambda: time.time() > first.expiry + 3, 20, "the first token to be long expired")
        renewed = kubeapi.get("Lease", NS, f"{GROUP}-10.0.0.5")["spec"]["renewTime"]
        wait_for(lambda: kubeapi.get("Lease", NS, f"{GROUP}-10.0.0.5")["spec"]["renewTime"] != renewed, 10,
                 "a lease renewal with a later token")
        assert vm.refresher.current is not None and vm.refresher.current.jwt != first.jwt
        assert vm.token_file.read_text().strip() in gcp.issued[1:]
        assert vm.driver.registrar.state is State.REGISTERED


def test_issuer_key_rotation_keeps_the_vm_and_refuses_the_old_token(
        kubeapi: KubeAPI, issuer: TestIssuer, vms: list[VM], tmp_path: Path) -> None:  # noqa: F811
    import requests

    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    with FakeGcp(issuer, Instance("9001", lifetime=6)) as gcp:
        vm = start_vm(kubeapi, GcpProvider(AUD, gcp.url, timeout=2), tmp_path)
        vms.append(vm)
        wait_for(lambda: entry(kubeapi), 20, "the entry")
        old = vm.refresher.current
        assert old is not None
        issuer.rotate()
        wait_for(lambda: vm.refresher.current is not None and vm.refresher.current.jwt != old.jwt, 20,
                 "a token signed with the new key")
        renewed = kubeapi.get("Lease", NS, f"{GROUP}-10.0.0.5")["spec"]["renewTime"]
        wait_for(lambda: kubeapi.get("Lease", NS, f"{GROUP}-10.0.0.5")["spec"]["renewTime"] != renewed, 10,
                 "a lease renewal with the new key's token")
        stolen = requests.get(f"{kubeapi.url}/apis/networking.istio.io/v1/namespaces/{NS}/workloadgroups/{GROUP}",
                              headers={"Authorization": f"Bearer {old.jwt}"}, verify=str(kubeapi.ca_path),
                              timeout=5)
        assert stolen.status_code == 401
        assert vm.driver.registrar.state is State.REGISTERED


def test_a_vm_identity_is_confined_to_its_groups_objects(kubeapi: KubeAPI, issuer: TestIssuer,  # noqa: F811
                                                         vms: list[VM], tmp_path: Path) -> None:
    """The admission policy matches the identity group too: the VM registers and renews as usual, and
    its token is refused another group's entry and an unrelated lease."""
    import json

    import requests

    setup_cluster(kubeapi, issuer, "gcp", project=PROJECT)
    for doc in build_manifests(group="orders", namespace=NS, service_account="orders-vm", ports=[("http", 9090)]):
        kubeapi.create(doc, manager="kubectl")
    orders = E.build_entry(E.EntryInputs(group=kubeapi.get("WorkloadGroup", NS, "orders"), address="10.0.0.7",
                                         instance="orders-1"))
    kubeapi.create(orders, manager="mesh-agent")
    kubeapi.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": "controller-leader", "namespace": NS}, "spec": {"holderIdentity": "c"}})
    with FakeGcp(issuer, Instance("4101", project=PROJECT)) as gcp:
        vm = start_vm(kubeapi, GcpProvider(AUD, gcp.url, timeout=2), tmp_path)
        vms.append(vm)
        wait_for(lambda: entry(kubeapi), 20, "the entry")
        token = vm.token_file.read_text().strip()
    for path in (f"/apis/networking.istio.io/v1/namespaces/{NS}/workloadentries/orders-10.0.0.7",
                 f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/controller-leader"):
        answer = requests.delete(kubeapi.url + path, headers={"Authorization": f"Bearer {token}"},
                                 verify=str(kubeapi.ca_path), timeout=5)
        assert answer.status_code == 422, answer.text
        assert f"ValidatingAdmissionPolicy 'mesh-agent-{NS}-{GROUP}'" in json.loads(answer.text)["message"]
    assert kubeapi.get("WorkloadEntry", NS, "orders-10.0.0.7") is not None
    assert kubeapi.get("Lease", NS, "controller-leader") is not None
    assert "mesh-vm:4101" in writers(kubeapi)
