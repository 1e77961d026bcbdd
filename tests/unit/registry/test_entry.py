from __future__ import annotations

import datetime as dt

import pytest

from agent.registry import entry as E

NOW = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)


def group(**spec: object) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": "billing", "namespace": "vm-apps", "uid": "u-1"},
            "spec": {"template": {"serviceAccount": "billing-vm", "ports": {"http": 8080},
                                  "labels": {"app": "billing", "tier": "t"}},
                     "metadata": {"labels": {"tier": "group", "team": "pay"},
                                  "annotations": {"note": "x"}}, **spec}}


def inputs(**kw: object) -> E.EntryInputs:
    base = {"group": group(), "address": "10.0.0.5", "instance": "abc123"}
    base.update(kw)
    return E.EntryInputs(**base)  # type: ignore[arg-type]


def test_name_follows_istiod_scheme() -> None:
    assert E.entry_name("billing", "10.0.0.5") == "billing-10.0.0.5"
    assert E.entry_name("billing", "fd00::1", "net1") == "billing-fd00--1-net1"
    with pytest.raises(E.EntryError, match="not a valid Kubernetes name"):
        E.entry_name("billing", "10.0.0.5", "Net_1")


def test_entry_merges_labels_in_order_and_marks_ownership() -> None:
    obj = E.build_entry(inputs(workload_labels={"version": "v1", "team": "core"},
                               extra_labels={"version": "v2"}))
    assert obj["metadata"]["name"] == "billing-10.0.0.5"
    assert obj["metadata"]["namespace"] == "vm-apps"
    labels = {"app": "billing", "tier": "group", "team": "core", "version": "v2"}
    assert obj["spec"]["labels"] == labels
    assert obj["metadata"]["labels"] == {**labels, E.MANAGED_BY_LABEL: "mesh-agent"}
    ann = obj["metadata"]["annotations"]
    assert ann == {"note": "x", E.INSTANCE_ANNOTATION: "abc123", E.LEASE_ANNOTATION: "billing-10.0.0.5"}
    assert obj["spec"]["address"] == "10.0.0.5"
    assert obj["spec"]["serviceAccount"] == "billing-vm"
    assert obj["spec"]["ports"] == {"http": 8080}
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert obj["metadata"]["ownerReferences"][0]["kind"] == "WorkloadGroup"


def test_condition_mode_and_overrides() -> None:
    obj = E.build_entry(inputs(address="FD00:0:0::7", network="net-a", locality="r/z/s", weight=3,
                               service_account="other", condition_mode=True))
    assert obj["metadata"]["name"] == "billing-fd00--7-net-a"
    assert obj["spec"]["address"] == "fd00::7"
    assert obj["spec"]["network"] == "net-a"
    assert obj["spec"]["locality"] == "r/z/s"
    assert obj["spec"]["weight"] == 3
    assert obj["spec"]["serviceAccount"] == "other"
    assert obj["metadata"]["annotations"][E.HEALTH_CHECKS_ANNOTATION] == "true"


def test_bundle_group_without_uid_has_no_owner_reference() -> None:
    g = group()
    del g["metadata"]["uid"]
    assert "ownerReferences" not in E.build_entry(inputs(group=g))["metadata"]


@pytest.mark.parametrize("kw,match", [
    ({"address": "not-an-ip"}, "not an IP address"),
    ({"workload_labels": {"bad key!": "v"}}, "ISTIO_METAJSON_LABELS"),
    ({"extra_labels": {"ok": "bad value!"}}, "registry.labels"),
    ({"locality": "a/b/c/d"}, "locality"),
])
def test_bad_inputs_are_named(kw: dict, match: str) -> None:
    with pytest.raises(E.EntryError, match=match):
        E.build_entry(inputs(**kw))


def test_bad_template_port_is_refused() -> None:
    with pytest.raises(E.EntryError, match="port"):
        E.build_entry(inputs(group=group(template={"ports": {"http": 70000}})))


def test_instance_id_is_hashed_and_stable() -> None:
    a = E.instance_id("0123456789abcdef0123456789abcdef\n")
    assert a == E.instance_id("0123456789abcdef0123456789abcdef")
    assert len(a) == 16 and "0123456789abcdef" not in a
    with pytest.raises(E.EntryError):
        E.instance_id("  \n")


def test_lease_times_use_micro_time_and_takeover_counts() -> None:
    lease = E.build_lease("n", "ns", "me", 40, NOW)
    assert lease["spec"]["renewTime"] == "2026-11-25T12:00:00.000000Z"
    assert lease["spec"]["leaseTransitions"] == 0
    assert E.lease_expiry(lease) == NOW + dt.timedelta(seconds=40)
    lease["metadata"]["resourceVersion"] = "7"
    theirs = {**lease, "spec": {**lease["spec"], "holderIdentity": "other"}}
    taken = E.build_lease("n", "ns", "me", 40, NOW + dt.timedelta(seconds=60), previous=theirs)
    assert taken["spec"]["leaseTransitions"] == 1
    assert taken["spec"]["acquireTime"] == "2026-11-25T12:01:00.000000Z"
    assert taken["metadata"]["resourceVersion"] == "7"
    renewed = E.build_lease("n", "ns", "me", 40, NOW + dt.timedelta(seconds=10), previous=lease)
    assert renewed["spec"]["acquireTime"] == lease["spec"]["acquireTime"]


def _entry(owner: str) -> dict:
    return {"metadata": {"annotations": {E.INSTANCE_ANNOTATION: owner}}}


def test_ownership() -> None:
    live_other = E.build_lease("n", "ns", "other", 40, NOW - dt.timedelta(seconds=5))
    dead_other = E.build_lease("n", "ns", "other", 40, NOW - dt.timedelta(seconds=100))
    mine = E.build_lease("n", "ns", "me", 40, NOW - dt.timedelta(seconds=5))
    assert E.ownership(_entry("other"), live_other, "me", NOW).conflict
    assert E.ownership(_entry("other"), dead_other, "me", NOW).mine
    assert E.ownership(_entry("me"), mine, "me", NOW).mine
    assert E.ownership(_entry("me"), None, "me", NOW).mine
    assert E.ownership(_entry("me"), live_other, "me", NOW).conflict
    assert E.ownership(None, None, "me", NOW).mine
    assert E.ownership(None, live_other, "me", NOW).conflict
    assert E.ownership({"metadata": {}}, None, "me", NOW).mine  # hand-written, no lease: adopted


def test_healthy_condition_keeps_transition_time() -> None:
    first = E.healthy_condition(False, NOW)
    prev = {"status": {"conditions": [first]}}
    later = E.healthy_condition(False, NOW + dt.timedelta(seconds=30), prev)
    assert later["lastTransitionTime"] == first["lastTransitionTime"]
    assert later["lastProbeTime"] == "2026-11-25T12:00:30Z"
    flipped = E.healthy_condition(True, NOW + dt.timedelta(seconds=30), prev)
    assert flipped["lastTransitionTime"] == "2026-11-25T12:00:30Z"
    assert flipped["status"] == "True"


def test_drift() -> None:
    desired = E.build_entry(inputs())
    live = {**desired, "metadata": {**desired["metadata"], "resourceVersion": "3",
                                    "labels": {**desired["metadata"]["labels"], "added": "by-admin"}}}
    assert not E.drifted(desired, live)
    assert E.drifted(desired, None)
    assert E.drifted(desired, {**live, "spec": {**live["spec"], "weight": 9}})
    assert E.drifted(desired, {**live, "metadata": {**live["metadata"], "ownerReferences": []}})


def test_an_app_sharing_the_sidecar_must_run_as_its_service_account() -> None:
    """Several apps share one sidecar, whose identity is the bundle's service account."""
    assert E.build_entry(inputs(sidecar_service_account="billing-vm"))["spec"]["serviceAccount"] == "billing-vm"
    with pytest.raises(E.EntryError, match='WorkloadGroup billing runs as service account "billing-vm", but '
                                           'this VM\'s sidecar is "ledger-vm"'):
        E.build_entry(inputs(sidecar_service_account="ledger-vm"))
    # A group without a service account takes the sidecar's default: nothing to refuse.
    g = group()
    del g["spec"]["template"]["serviceAccount"]
    assert "serviceAccount" not in E.build_entry(inputs(group=g, sidecar_service_account="ledger-vm"))["spec"]


def test_the_writer_is_recorded_on_the_entry_and_the_lease() -> None:
    group = {"metadata": {"name": "g", "namespace": "ns", "uid": "u"}, "spec": {"template": {}}}
    plain = E.build_entry(E.EntryInputs(group=group, address="10.0.0.1", instance="i"))
    assert E.OWNER_ANNOTATION not in plain["metadata"]["annotations"]
    mine = E.build_entry(E.EntryInputs(group=group, address="10.0.0.1", instance="i", owner="mesh-vm:1"))
    assert E.owner_of(mine) == "mesh-vm:1"
    assert E.with_owner(plain, "mesh-vm:1") == mine and E.with_owner(plain, None) is plain
    assert E.owner_of(plain) is None
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    lease = E.build_lease("g-10.0.0.1", "ns", "i", 40, when, writer="mesh-vm:1")
    assert E.owner_of(lease) == "mesh-vm:1"
    assert "annotations" not in E.build_lease("g-10.0.0.1", "ns", "i", 40, when)["metadata"]
    # Whose an existing entry or lease is, when it is not this writer's.
    assert E.foreign_owner("mesh-vm:2", mine, lease) == "mesh-vm:1"
    assert E.foreign_owner("mesh-vm:1", mine, lease) is None
    assert E.foreign_owner("mesh-vm:2", plain, None) is None   # nothing recorded: not fenced
    assert E.foreign_owner(None, mine) is None                  # the writer is not known
