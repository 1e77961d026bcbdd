"""Registration against the Kubernetes API emulator, through the real kubernetes client."""

from __future__ import annotations

import datetime as dt
import time

from agent.health.state import Health
from agent.kube.auth import Credentials
from agent.kube.client import GROUPS, LEASES
from agent.registry import entry as E
from agent.registry.states import State
from devkit.registrydriver import Driver
from tests.integration.registry.conftest import ENTRY, GROUP, NS, Cluster, group_obj, wait_for


def healthy(d: Driver, value: bool | None = True) -> None:
    health = Health.UNKNOWN if value is None else Health.HEALTHY if value else Health.UNHEALTHY
    d.do(lambda r, now: r.set_health(health, "" if value else "probe failed"))


def state_is(d: Driver, *states: State) -> bool:
    return d.registrar.state in states


def test_register_then_withdraw(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    obj = wait_for(cluster.entry, what="the entry")
    assert obj["spec"]["address"] == "10.0.0.5"
    assert obj["spec"]["labels"] == {"app": GROUP, "version": "v1"}
    assert obj["spec"]["ports"] == {"http": 8080}
    assert obj["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == "inst-a"
    group = cluster.api.get("WorkloadGroup", NS, GROUP)
    assert obj["metadata"]["ownerReferences"][0]["uid"] == group["metadata"]["uid"]
    managers = {m["manager"] for m in obj["metadata"].get("managedFields") or []}
    assert "mesh-agent" in managers
    lease = cluster.lease()
    assert lease["spec"]["holderIdentity"] == "inst-a"
    first_renew = lease["spec"]["renewTime"]
    wait_for(lambda: cluster.lease()["spec"]["renewTime"] != first_renew, what="a lease renewal")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")

    healthy(d, False)
    wait_for(lambda: cluster.entry() is None, what="the entry withdrawn")
    wait_for(lambda: cluster.lease() is None, what="the lease removed")
    wait_for(lambda: state_is(d, State.WITHDRAWN), what="WITHDRAWN")
    assert "unhealthy" in d.registrar.message

    healthy(d)
    wait_for(cluster.entry, what="the entry back")
    assert d.stop(withdraw=True)
    assert cluster.entry() is None and cluster.lease() is None


def test_condition_mode_keeps_entry_and_writes_status(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent(condition_mode=True)
    drivers.append(d)
    healthy(d)
    obj = wait_for(lambda: E.condition_of(cluster.entry()) == "True" and cluster.entry(), what="Healthy=True")
    assert obj["metadata"]["annotations"][E.HEALTH_CHECKS_ANNOTATION] == "true"
    healthy(d, False)
    obj = wait_for(lambda: E.condition_of(cluster.entry()) == "False" and cluster.entry(),
                   what="Healthy=False")
    cond = obj["status"]["conditions"][0]
    assert cond["reason"] == "HealthCheckFailed" and cond["message"] == "probe failed"
    wait_for(lambda: state_is(d, State.UNHEALTHY), what="UNHEALTHY")
    # Shutdown still withdraws, in condition mode too.
    assert d.stop(withdraw=True)
    assert cluster.entry() is None


def test_restart_keeps_the_entry(cluster: Cluster, drivers: list[Driver]) -> None:
    """A stop for an upgrade leaves the entry; the next start adopts it while health is unknown."""
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    uid = wait_for(cluster.entry, what="the entry")["metadata"]["uid"]
    assert d.stop(withdraw=False)
    d2 = cluster.agent()
    drivers.append(d2)
    wait_for(lambda: state_is(d2, State.HELD) and d2.registrar.status().entry, what="HELD with our entry")
    before = cluster.lease()["spec"]["renewTime"]
    wait_for(lambda: cluster.lease()["spec"]["renewTime"] != before, what="the lease kept alive")
    assert cluster.entry()["metadata"]["uid"] == uid


def test_stale_resource_version_is_read_again(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent(renew=0.5)
    drivers.append(d)
    healthy(d)
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")
    # Someone else writes the lease: our next renewal carries a stale resourceVersion.
    cluster.admin.apply(LEASES, {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                 "metadata": {"name": ENTRY, "namespace": NS, "labels": {"touched": "yes"}}},
                        force=False, field_manager="kubectl")
    wait_for(lambda: any(r.code == 409 and "/leases/" in r.path for r in list(cluster.api.requests)),
             what="a 409 on the lease")
    mark = time.time()
    wait_for(lambda: E.parse_time(cluster.lease()["spec"]["renewTime"]).timestamp() > mark,
             what="a renewal after the conflict")
    assert cluster.lease()["spec"]["holderIdentity"] == "inst-a"
    assert cluster.entry() is not None


def _foreign(cluster: Cluster, holder: str, renewed_ago: float, duration: int = 30) -> dict:
    obj = E.build_entry(E.EntryInputs(group=cluster.api.get("WorkloadGroup", NS, GROUP), address="10.0.0.5",
                                      instance=holder))
    created = cluster.api.create(obj, manager="mesh-agent")
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=renewed_ago)
    cluster.api.create(E.build_lease(ENTRY, NS, holder, duration, when))
    return created


def test_live_owner_is_never_touched(cluster: Cluster, drivers: list[Driver]) -> None:
    created = _foreign(cluster, "inst-other", renewed_ago=1)
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    wait_for(lambda: state_is(d, State.CONFLICT), what="CONFLICT")
    assert d.registrar.conflict_holder == "inst-other"
    assert "inst-other" in d.registrar.message
    healthy(d, False)  # not even to withdraw it
    time.sleep(1.0)
    now = cluster.entry()
    assert now["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert cluster.lease()["spec"]["holderIdentity"] == "inst-other"
    writes = [r for r in list(cluster.api.requests)
              if r.method in ("PATCH", "DELETE", "PUT", "POST") and r.user.endswith("billing-vm")]
    assert writes == []


def test_expired_lease_is_taken_over(cluster: Cluster, drivers: list[Driver]) -> None:
    _foreign(cluster, "inst-dead", renewed_ago=120)
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    wait_for(lambda: cluster.lease()["spec"]["holderIdentity"] == "inst-a", what="the lease taken over")
    lease = cluster.lease()
    assert lease["spec"]["leaseTransitions"] == 1
    wait_for(lambda: cluster.entry()["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == "inst-a",
             what="the entry taken over")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")


def test_outage_then_recovery_never_deletes(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent(lease=6.0, renew=0.5)
    drivers.append(d)
    healthy(d)
    uid = wait_for(cluster.entry, what="the entry")["metadata"]["uid"]
    cluster.api.outage(3.0)
    wait_for(lambda: state_is(d, State.RETRYING), what="RETRYING during the outage")
    assert "nothing is deleted" in d.registrar.message
    back = time.time() + 3.0
    wait_for(lambda: E.parse_time(cluster.lease()["spec"]["renewTime"]).timestamp() > back, timeout=15,
             what="renewals after the outage")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED again")
    assert cluster.entry()["metadata"]["uid"] == uid
    assert not [r for r in list(cluster.api.requests) if r.method == "DELETE"]


def test_start_during_outage_converges_after(cluster: Cluster, drivers: list[Driver]) -> None:
    cluster.api.outage(2.0)
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, timeout=15, what="the entry after the outage")


def test_429_storm_is_backed_off(cluster: Cluster, drivers: list[Driver]) -> None:
    cluster.api.faults.status(429, retry_after=1, path="workloadentries|leases", times=4)
    start = time.monotonic()
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, timeout=20, what="the entry after the storm")
    elapsed = time.monotonic() - start
    throttled = [r for r in list(cluster.api.requests) if r.code == 429]
    assert len(throttled) == 4
    assert elapsed >= 3.0  # each 429 said "Retry-After: 1", and it was honoured


def test_token_rotation_without_restart(cluster: Cluster, drivers: list[Driver]) -> None:
    from agent.registry.manifests import AGENT_RULES
    from tests.integration.registry.conftest import role_to_rules  # static tokens: rules bound directly

    token_file = cluster.tmp / "token"
    token_file.write_text("first-token-" + "a" * 20)
    cluster.api.add_token("first-token-" + "a" * 20, "agent-first", role_to_rules(AGENT_RULES, NS))
    cluster.api.add_token("second-token-" + "b" * 20, "agent-second", role_to_rules(AGENT_RULES, NS))
    creds = Credentials(server=cluster.api.url, ca_file=str(cluster.api.ca_path), token_file=str(token_file))
    d = cluster.agent(creds=creds)
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    tmp = cluster.tmp / "token.new"
    tmp.write_text("second-token-" + "b" * 20)
    tmp.replace(token_file)
    cluster.api.cluster.auth.revoke("first-token-" + "a" * 20)
    rotated = time.time()
    wait_for(lambda: any(r.user == "agent-second" and r.code == 200 for r in list(cluster.api.requests)),
             what="requests with the rotated token")
    wait_for(lambda: E.parse_time(cluster.lease()["spec"]["renewTime"]).timestamp() > rotated + 1,
             what="renewals with the rotated token")
    assert d.registrar.state is State.REGISTERED


def test_group_label_change_is_applied(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    cluster.admin.apply(GROUPS, group_obj({"app": GROUP, "tier": "gold"}), field_manager="test")
    wait_for(lambda: cluster.entry()["metadata"]["labels"].get("tier") == "gold", what="the new label")
    assert cluster.entry()["spec"]["labels"]["tier"] == "gold"


def test_group_deleted_withdraws(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent()
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    cluster.admin.delete(GROUPS, NS, GROUP)
    wait_for(lambda: cluster.entry() is None, what="the entry gone")
    wait_for(lambda: state_is(d, State.WITHDRAWN), what="WITHDRAWN")
    assert "was deleted" in d.registrar.message
    time.sleep(0.5)
    assert cluster.entry() is None  # and not recreated


def test_group_watch_survives_compacted_history(cluster: Cluster, drivers: list[Driver]) -> None:
    """The group's own resourceVersion is older than the watch history: watching from it would get
    410 Gone at once, over and over. The watcher starts from the list's resourceVersion instead."""
    for i in range(5):
        cluster.api.create({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": f"noise-{i}", "namespace": NS}, "data": {}})
    cluster.api.compact()
    d = cluster.agent(watch_timeout=30)
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    cluster.admin.apply(GROUPS, group_obj({"app": GROUP, "tier": "gold"}), field_manager="test")
    wait_for(lambda: cluster.entry()["metadata"]["labels"].get("tier") == "gold", what="the new label")
    watches = [r for r in list(cluster.api.requests)
               if "watch=" in r.query and "/workloadgroups" in r.path and r.user.endswith("billing-vm")]
    assert len(watches) == 1


def renewing_often(cluster: Cluster, drivers: list[Driver]) -> Driver:
    """A registered agent that renews its lease every half second and resyncs hardly ever."""
    d = cluster.agent(lease=6.0, renew=0.5, resync=600.0)
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")
    return d


def test_a_renewal_not_answered_costs_one_request_per_try(cluster: Cluster, drivers: list[Driver]) -> None:
    """The lease's writes fail twice (503): each retry is the renewal alone (a PATCH of the lease with its
    resourceVersion), no reads, and the third one renews it."""
    d = renewing_often(cluster, drivers)
    n0 = len(cluster.api.requests)
    cluster.api.faults.status(503, method="PATCH", path="leases", times=2)

    def registry_requests() -> list:
        return [r for r in list(cluster.api.requests)[n0:] if "/workloadentries" in r.path or "/leases" in r.path]
    wait_for(lambda: [r.code for r in registry_requests()][:3] == [503, 503, 200], timeout=15,
             what="two failed renewals and a third that renewed")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED again")
    reqs = registry_requests()
    assert reqs and all(r.method == "PATCH" and r.path.endswith(f"/leases/{ENTRY}") for r in reqs)


def test_a_renewal_that_finds_the_lease_gone_converges(cluster: Cluster, drivers: list[Driver]) -> None:
    """The lease is deleted (as the reaper does first) while renewals fail: the next renewal finds it gone
    (a 404, or the emulator's apply creates it anew, as kube-apiserver may: a new uid) and the registrar
    reads the entry and converges in full."""
    d = renewing_often(cluster, drivers)
    n0 = len(cluster.api.requests)
    cluster.api.faults.status(503, method="PATCH", path="leases", times=1)
    wait_for(lambda: any(r.code == 503 for r in list(cluster.api.requests)[n0:]), what="a failed renewal")
    cluster.api.delete("Lease", NS, ENTRY)
    wait_for(lambda: any(r.method == "GET" and r.path.endswith(f"/workloadentries/{ENTRY}")
                         for r in list(cluster.api.requests)[n0:]), timeout=15, what="a full convergence")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")
    entry = cluster.entry()
    assert entry is not None
    wait_for(lambda: (cluster.lease() or {}).get("metadata", {}).get("ownerReferences", [{}])[0].get("uid")
             == entry["metadata"]["uid"], what="a lease owned by the entry")


def test_a_renewed_lease_whose_entry_was_deleted_brings_the_entry_back(cluster: Cluster,
                                                                        drivers: list[Driver]) -> None:
    """The reaper's order (lease, then entry) while the agent cannot reach the API: when it comes back,
    its renewal does not pass for a registration; the entry is written again."""
    d = renewing_often(cluster, drivers)
    uid = wait_for(cluster.entry, what="the entry")["metadata"]["uid"]
    cluster.api.faults.status(503, method="PATCH", path="leases", times=3)
    wait_for(lambda: state_is(d, State.RETRYING), what="renewals failing")
    cluster.api.delete("Lease", NS, ENTRY)
    cluster.api.delete("WorkloadEntry", NS, ENTRY)
    wait_for(lambda: (cluster.entry() or {}).get("metadata", {}).get("uid") not in (None, uid), timeout=20,
             what="the entry written again")
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")


def group_requests(cluster: Cluster, watch: bool) -> list:
    return [r for r in list(cluster.api.requests) if r.path.endswith(f"/namespaces/{NS}/workloadgroups")
            and r.user.endswith("billing-vm") and ("watch=" in r.query) == watch]


def test_group_watch_resumes_after_an_outage_without_listing(cluster: Cluster, drivers: list[Driver]) -> None:
    """The API goes away under the open group watch; the group changes meanwhile. The watcher watches on
    from the resourceVersion it had (no list) and the change comes through: the entry gets the label."""
    d = cluster.agent(watch_timeout=30)
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    wait_for(lambda: group_requests(cluster, watch=True), what="the group watch")
    assert len(group_requests(cluster, watch=False)) == 1
    cluster.api.outage(1.0)
    relabel_store(cluster, {"app": GROUP, "tier": "gold"})
    wait_for(lambda: (cluster.entry() or {}).get("metadata", {}).get("labels", {}).get("tier") == "gold",
             timeout=20, what="the new label through the resumed watch")
    watches = group_requests(cluster, watch=True)
    assert len(watches) >= 2 and all("resourceVersion=" in r.query for r in watches)
    assert len(group_requests(cluster, watch=False)) == 1  # resumed: no list


def test_group_watch_lists_again_when_its_version_is_gone(cluster: Cluster, drivers: list[Driver]) -> None:
    """While the watch is broken the group changes and the history is compacted: the resumed watch gets
    410 Gone, and the watcher lists again, which brings the change."""
    d = cluster.agent(watch_timeout=30)
    drivers.append(d)
    healthy(d)
    wait_for(cluster.entry, what="the entry")
    wait_for(lambda: group_requests(cluster, watch=True), what="the group watch")
    cluster.api.outage(1.5)
    relabel_store(cluster, {"app": GROUP, "tier": "silver"})
    cluster.api.compact()
    wait_for(lambda: (cluster.entry() or {}).get("metadata", {}).get("labels", {}).get("tier") == "silver",
             timeout=20, what="the new label through a new list")
    assert len(group_requests(cluster, watch=False)) == 2


def relabel_store(cluster: Cluster, labels: dict[str, str]) -> None:
    """Change the group in the emulator's store directly (no request: it works during an outage too)."""
    from devkit.kubeapi.auth import Identity
    from devkit.kubeapi.cluster import Request
    rt = cluster.api.cluster.by_kind("WorkloadGroup")
    obj = cluster.api.get("WorkloadGroup", NS, GROUP)
    assert obj is not None
    obj["spec"]["metadata"]["labels"] = labels
    cluster.api.cluster.update(rt, "v1", NS, GROUP, obj, Request(Identity("admin")))
