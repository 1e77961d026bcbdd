"""The admission policy `mesh-agent manifests` prints: its shape, and its CEL judged (by the emulator's
evaluator, without a server) against exactly what agent.registry.entry builds."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from agent.registry import entry as E
from agent.registry import manifests as MF
from devkit.kubeapi import cel
from devkit.kubeapi.admission import Attributes, evaluate
from devkit.kubeapi.auth import Identity

NS, GROUP, SA = "vm-apps", "billing", "billing-vm"
AGENT = Identity(f"system:serviceaccount:{NS}:{SA}", ("system:serviceaccounts", f"system:serviceaccounts:{NS}"))
NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def docs(**kw: Any) -> list[dict[str, Any]]:
    return MF.build_manifests(group=GROUP, namespace=NS, service_account=SA, ports=[("http", 8080)],
                              labels={"tier": "gold"}, **kw)


def policy_and_binding(per_vm: bool = False, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The group's policy and binding (per_vm: the per-VM owner policy's, printed with identity=True)."""
    name = (MF.owner_policy_name if per_vm else MF.policy_name)(NS, GROUP)
    out = {(d["kind"], d["metadata"]["name"]): d for d in docs(**kw)}
    return out["ValidatingAdmissionPolicy", name], out["ValidatingAdmissionPolicyBinding", name]


def group() -> dict[str, Any]:
    wg = copy.deepcopy(docs()[0])
    wg["metadata"]["uid"] = "0b8f6d2e-0000-4000-8000-000000000001"
    return wg


def entry(address: str = "10.0.0.5") -> dict[str, Any]:
    return E.build_entry(E.EntryInputs(group=group(), address=address, instance="3f2a9c0d1e2b4a5c"))


def judge(operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None = None,
          who: Identity = AGENT, subresource: str = "", **kw: Any) -> str | None:
    """The denial message, or None when admitted (or when the policy does not apply)."""
    policy, binding = policy_and_binding(**kw)
    target = obj or old or {}
    lease = target.get("kind") == "Lease"
    attrs = Attributes(operation, "coordination.k8s.io" if lease else "networking.istio.io", "v1",
                       "leases" if lease else "workloadentries", target.get("kind", ""), subresource, NS,
                       target["metadata"]["name"], who, obj, old)
    decision = evaluate(policy, binding, attrs, None)
    return decision.message if decision else None


def test_shape() -> None:
    policy, binding = policy_and_binding()
    name = f"mesh-agent-{NS}-{GROUP}"
    assert (policy["kind"], binding["kind"]) == ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert policy["metadata"]["name"] == binding["metadata"]["name"] == binding["spec"]["policyName"] == name
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NS}}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    rules = spec["matchConstraints"]["resourceRules"]
    assert {r for rule in rules for r in rule["resources"]} == {"workloadentries", "workloadentries/status", "leases"}
    assert all(rule["operations"] == ["CREATE", "UPDATE", "DELETE"] for rule in rules)
    conditions = {c["name"]: c["expression"] for c in spec["matchConditions"]}
    assert conditions["group-agents"] == f'request.userInfo.username == "system:serviceaccount:{NS}:{SA}"'
    assert f"system:serviceaccount:{NS}:mesh-agent-reaper-{GROUP}" in conditions["not-the-reaper"]
    for item in spec["validations"] + spec["matchConditions"] + spec["variables"]:
        cel.Expression(item["expression"])  # compiles


def test_identity_group_is_matched_only_with_identity() -> None:
    policy, _ = policy_and_binding(identity=True)
    cond = policy["spec"]["matchConditions"][0]["expression"]
    assert f'"mesh-vm:{NS}:{GROUP}" in request.userInfo.groups' in cond
    vm = Identity("mesh-vm:4001", (f"mesh-vm:{NS}:{GROUP}",))
    forged = entry()
    forged["spec"]["serviceAccount"] = "orders-vm"
    assert judge("CREATE", forged, who=vm, identity=True) is not None
    assert judge("CREATE", forged, who=vm) is None  # without --identity the group is not matched
    assert judge("CREATE", entry(), who=vm, identity=True) is None


def test_what_the_agent_writes_is_admitted() -> None:
    own = entry()
    renamed = {**own, "metadata": {**own["metadata"], "name": "orders-10.0.0.5"}}
    assert judge("CREATE", renamed) is not None  # the policy is in force for this caller
    assert judge("CREATE", own) is None
    assert judge("UPDATE", own, own) is None
    assert judge("UPDATE", own, own, subresource="status") is None
    assert judge("DELETE", None, own) is None
    lease = E.build_lease(own["metadata"]["name"], NS, "3f2a9c0d1e2b4a5c", 40, NOW,
                          owner={"apiVersion": E.API_VERSION, "kind": "WorkloadEntry",
                                 "name": own["metadata"]["name"], "uid": "u1"})
    assert judge("CREATE", lease) is None
    assert judge("UPDATE", lease, lease) is None
    assert judge("DELETE", None, lease) is None


Change = Any  # a function changing an entry in place


def _meta(key: str, name: str, value: str | None) -> Change:
    def change(e: dict[str, Any]) -> None:
        if value is None:
            del e["metadata"][key][name]
        else:
            e["metadata"][key][name] = value
    return change


def _spec(name: str, value: Any) -> Change:
    def change(e: dict[str, Any]) -> None:
        if value is None:
            del e["spec"][name]
        else:
            e["spec"][name] = value
    return change


def _label(name: str, value: str | None) -> Change:
    def change(e: dict[str, Any]) -> None:
        if value is None:
            del e["spec"]["labels"][name]
        else:
            e["spec"]["labels"][name] = value
    return change


def _rename(e: dict[str, Any]) -> None:
    e["metadata"]["name"] = "orders-10.0.0.5"


def _other_owner(e: dict[str, Any]) -> None:
    e["metadata"]["ownerReferences"][0]["name"] = "orders"


@pytest.mark.parametrize(("change", "message"), [
    (_rename, "named billing-"),
    (_spec("serviceAccount", "orders-vm"), "spec.serviceAccount must be billing-vm"),
    (_spec("serviceAccount", None), "spec.serviceAccount must be billing-vm"),
    (_other_owner, "owned only by WorkloadGroup billing"),
    (_label("app", "orders"), "spec.labels must carry the group's labels app=billing, tier=gold"),
    (_label("tier", None), "spec.labels must carry"),
    (_meta("labels", E.MANAGED_BY_LABEL, None), "managed-by=mesh-agent"),
    (_meta("annotations", E.INSTANCE_ANNOTATION, None), "annotation mesh-agent.io/instance"),
], ids=["name", "other-sa", "no-sa", "owner", "app-label", "tier-label", "managed-by", "instance"])
def test_forged_entries_are_refused_on_create_and_delete(change: Change, message: str) -> None:
    forged = entry()
    change(forged)
    for operation, obj, old in (("CREATE", forged, None), ("DELETE", None, forged)):
        denied = judge(operation, obj, old)
        assert denied is not None and message in denied, (operation, denied)


def test_another_groups_entry_cannot_be_taken_over() -> None:
    theirs = entry()
    theirs["spec"]["serviceAccount"] = "orders-vm"
    assert "may not take over another group's WorkloadEntry" in judge("UPDATE", entry(), theirs)


def test_leases_other_than_the_agents_are_refused() -> None:
    unrelated = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": "controller-leader", "namespace": NS}, "spec": {}}
    assert "named billing-" in judge("DELETE", None, unrelated)
    same_prefix = copy.deepcopy(unrelated)
    same_prefix["metadata"]["name"] = "billing-operator"
    assert "must carry label" in judge("DELETE", None, same_prefix)
    took = copy.deepcopy(same_prefix)
    took["metadata"]["labels"] = {E.MANAGED_BY_LABEL: E.FIELD_MANAGER}
    assert "does not manage" in judge("UPDATE", took, same_prefix)
    owned = E.build_lease("billing-10.0.0.5", NS, "x", 40, NOW,
                          owner={"apiVersion": E.API_VERSION, "kind": "WorkloadEntry", "name": "billing-10.0.0.6",
                                 "uid": "u"})
    assert "owned only by the WorkloadEntry of its name" in judge("CREATE", owned)


def test_the_reaper_and_others_are_not_matched() -> None:
    forged = entry()
    forged["metadata"]["name"] = "orders-10.0.0.5"
    reaper = Identity(f"system:serviceaccount:{NS}:mesh-agent-reaper-{GROUP}")
    assert judge("DELETE", None, forged, who=reaper) is None
    assert judge("DELETE", None, forged, who=Identity("admin", ("system:masters",))) is None
    assert judge("DELETE", None, forged) is not None


# --- the per-VM policy (identity=True): each VM only its own entries and leases --------------------------

VM_A = Identity("mesh-vm:4001", (f"mesh-vm:{NS}:{GROUP}", "system:authenticated"))
VM_B = Identity("mesh-vm:4002", (f"mesh-vm:{NS}:{GROUP}", "system:authenticated"))


def owned_entry(owner: str | None, address: str = "10.0.0.5") -> dict[str, Any]:
    return E.build_entry(E.EntryInputs(group=group(), address=address, instance="3f2a9c0d1e2b4a5c", owner=owner))


def owned_lease(writer: str | None) -> dict[str, Any]:
    return E.build_lease("billing-10.0.0.5", NS, "3f2a9c0d1e2b4a5c", 40, NOW, writer=writer)


def per_vm(operation: str, obj: dict[str, Any] | None, old: dict[str, Any] | None = None,
           who: Identity = VM_A, subresource: str = "") -> str | None:
    return judge(operation, obj, old, who=who, subresource=subresource, per_vm=True, identity=True)


def test_the_per_vm_policy_is_printed_only_with_identity() -> None:
    names = {d["metadata"]["name"] for d in docs() if "AdmissionPolicy" in d["kind"]}
    assert names == {f"mesh-agent-{NS}-{GROUP}"}
    names = {d["metadata"]["name"] for d in docs(identity=True) if "AdmissionPolicy" in d["kind"]}
    assert names == {f"mesh-agent-{NS}-{GROUP}", f"mesh-agent-{NS}-{GROUP}.per-vm"}
    policy, binding = policy_and_binding(per_vm=True, identity=True)
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    for item in spec["validations"] + spec["matchConditions"] + spec["variables"]:
        cel.Expression(item["expression"])
    for item in spec["validations"]:
        cel.Expression(item["messageExpression"])


def test_a_vm_writes_and_deletes_its_own_entry_and_lease() -> None:
    mine, lease = owned_entry("mesh-vm:4001"), owned_lease("mesh-vm:4001")
    for obj in (mine, lease):
        assert per_vm("CREATE", obj) is None
        assert per_vm("UPDATE", obj, obj) is None
        assert per_vm("DELETE", None, obj) is None
    assert per_vm("UPDATE", mine, mine, subresource="status") is None


def test_a_vm_cannot_touch_a_siblings_entry_or_lease() -> None:
    theirs, their_lease = owned_entry("mesh-vm:4001"), owned_lease("mesh-vm:4001")
    taken, taken_lease = owned_entry("mesh-vm:4002"), owned_lease("mesh-vm:4002")
    belongs = "belongs to mesh-vm:4001; this credential is mesh-vm:4002"
    assert per_vm("DELETE", None, theirs, VM_B) == f"WorkloadEntry billing-10.0.0.5 {belongs}"
    assert per_vm("UPDATE", theirs, theirs, VM_B) == f"WorkloadEntry billing-10.0.0.5 {belongs}"
    assert per_vm("UPDATE", theirs, theirs, VM_B, "status") == f"WorkloadEntry billing-10.0.0.5 {belongs}"
    assert per_vm("UPDATE", taken, theirs, VM_B) == f"WorkloadEntry billing-10.0.0.5 {belongs}"  # take-over
    assert per_vm("DELETE", None, their_lease, VM_B) == f"Lease billing-10.0.0.5 {belongs}"
    assert per_vm("UPDATE", taken_lease, their_lease, VM_B) == f"Lease billing-10.0.0.5 {belongs}"
    # Creating one that claims a sibling as its writer, or names nobody.
    assert per_vm("CREATE", theirs, None, VM_B) == (
        "WorkloadEntry billing-10.0.0.5 must name its writer in annotation mesh-agent.io/owner, not "
        "mesh-vm:4001; this credential is mesh-vm:4002")
    assert "not nobody (no mesh-agent.io/owner annotation)" in per_vm("CREATE", owned_lease(None), None, VM_B)
    # An entry from before owners were recorded is nobody's: only the reaper or an admin removes it.
    assert "belongs to nobody (no mesh-agent.io/owner annotation)" in per_vm("DELETE", None, owned_entry(None))


def test_the_per_vm_policy_leaves_service_accounts_and_the_reaper_alone() -> None:
    theirs = owned_entry("mesh-vm:4001")
    reaper = Identity(f"system:serviceaccount:{NS}:mesh-agent-reaper-{GROUP}")
    stranger = Identity("mesh-vm:9999", ("mesh-vm:other-ns:billing",))
    for who in (AGENT, reaper, Identity("admin", ("system:masters",)), stranger):
        assert per_vm("DELETE", None, theirs, who) is None, who
    # The group's policy still confines the service account (group-level fencing).
    assert judge("DELETE", None, owned_entry("mesh-vm:4001", "10.0.0.6") | {"spec": {}}) is not None


def test_a_vm_may_mint_service_account_tokens_only_for_istio() -> None:
    """A token of the group's service account for the API server's audience would let a VM write as the
    service account, which the per-VM policy does not fence: per-VM identities get istio-ca tokens only."""
    policy, binding = policy_and_binding(per_vm=True, identity=True)

    def mint(audiences: list[str] | None, who: Identity = VM_A) -> str | None:
        spec: dict[str, Any] = {"expirationSeconds": 3600}
        if audiences is not None:
            spec["audiences"] = audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": SA, "namespace": NS}, "spec": spec}
        attrs = Attributes("CREATE", "", "v1", "serviceaccounts", "TokenRequest", "token", NS, SA, who, body, None)
        decision = evaluate(policy, binding, attrs, None)
        return decision.message if decision else None

    assert mint(["istio-ca"]) is None
    for audiences in (None, [], ["https://kubernetes.default.svc"], ["istio-ca", "https://kube.mesh.test"]):
        assert mint(audiences) == ("a VM may ask for service-account tokens only for audience istio-ca; "
                                   "this credential is mesh-vm:4001"), audiences
    assert mint(None, who=AGENT) is None  # the service-account path renews its own token (renew_token)
