"""A new address moves the entry: the one at the new address is applied, then the one at the old address
is withdrawn with its lease; an old entry another instance now holds is left alone. Against the API
emulator, through the real kubernetes client."""

from __future__ import annotations

import datetime as dt
from typing import Any

from agent.health.state import Health
from agent.registry import entry as E
from agent.registry.states import State
from devkit.registrydriver import Driver
from tests.integration.registry.conftest import ENTRY, GROUP, NS, Cluster, wait_for

NEW_ADDRESS = "10.0.0.6"  # only data in the entry: no traffic goes there
NEW_ENTRY = f"{GROUP}-{NEW_ADDRESS}"


def build_at(address: str, instance: str = "inst-a"):  # type: ignore[no-untyped-def]
    def build(group: dict[str, Any]) -> dict[str, Any]:
        return E.build_entry(E.EntryInputs(group=group, address=address, instance=instance,
                                           workload_labels={"version": "v1"}))
    return build


def registered(cluster: Cluster, d: Driver, name: str = ENTRY) -> None:
    d.do(lambda r, now: r.set_health(Health.HEALTHY))
    wait_for(lambda: cluster.entry(name), what=f"the entry {name}")
    wait_for(lambda: d.registrar.state is State.REGISTERED, what="REGISTERED")


def writes_on(cluster: Cluster, name: str) -> list[tuple[int, str]]:
    return [(i, r.method) for i, r in enumerate(list(cluster.api.requests))
            if r.method in ("PATCH", "DELETE", "PUT", "POST") and r.path.rstrip("/").endswith("/" + name)]


def test_move_applies_the_new_entry_then_withdraws_the_old(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent()
    drivers.append(d)
    registered(cluster, d)
    d.do(lambda r, now: r.move(build_at(NEW_ADDRESS)))
    new = wait_for(lambda: cluster.entry(NEW_ENTRY), what="the entry at the new address")
    assert new["spec"]["address"] == NEW_ADDRESS
    assert new["metadata"]["annotations"][E.INSTANCE_ANNOTATION] == "inst-a"
    wait_for(lambda: cluster.entry(ENTRY) is None and cluster.lease(ENTRY) is None,
             what="the old entry and its lease withdrawn")
    # Make before break: the new entry was written before the old one was deleted.
    first_new = min(i for i, m in writes_on(cluster, NEW_ENTRY) if m in ("PATCH", "POST", "PUT"))
    old_delete = min(i for i, m in writes_on(cluster, ENTRY) if m == "DELETE")
    assert first_new < old_delete
    # The new entry's lease is ours and kept renewed; the registrar reports the new entry.
    lease = wait_for(lambda: cluster.lease(NEW_ENTRY), what="the new lease")
    assert lease["spec"]["holderIdentity"] == "inst-a"
    renewed = lease["spec"]["renewTime"]
    wait_for(lambda: cluster.lease(NEW_ENTRY)["spec"]["renewTime"] != renewed, what="a renewal of the new lease")
    assert d.registrar.status().entry == NEW_ENTRY and d.registrar.state is State.REGISTERED
    assert cluster.entry(ENTRY) is None  # the old lease is never renewed back to life
    assert d.stop(withdraw=True)
    assert cluster.entry(NEW_ENTRY) is None and cluster.lease(NEW_ENTRY) is None


def test_old_entry_another_instance_holds_is_left_alone(cluster: Cluster, drivers: list[Driver]) -> None:
    """The old address went to another VM, which registered it: its entry is not ours to delete."""
    d = cluster.agent()
    drivers.append(d)
    registered(cluster, d)
    d.kill()  # this VM's agent is gone a while (its lease runs out) ...
    cluster.api.delete("WorkloadEntry", NS, ENTRY)
    cluster.api.delete("Lease", NS, ENTRY)
    other = E.build_entry(E.EntryInputs(group=cluster.api.get("WorkloadGroup", NS, GROUP), address="10.0.0.5",
                                        instance="inst-other"))
    created = cluster.api.create(other, manager="mesh-agent")
    cluster.api.create(E.build_lease(ENTRY, NS, "inst-other", 60, dt.datetime.now(dt.UTC)))
    # ... and comes back at the old address, learning of the new one after its first convergence.
    d2 = cluster.agent()
    drivers.append(d2)
    d2.do(lambda r, now: r.set_health(Health.HEALTHY))
    wait_for(lambda: d2.registrar.state is State.CONFLICT, what="CONFLICT on the old address")
    d2.do(lambda r, now: r.move(build_at(NEW_ADDRESS)))
    wait_for(lambda: cluster.entry(NEW_ENTRY), what="the entry at the new address")
    wait_for(lambda: d2.registrar.state is State.REGISTERED and not d2.registrar._retiring,
             what="the move finished")
    still = cluster.entry(ENTRY)
    assert still is not None and still["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert cluster.lease(ENTRY)["spec"]["holderIdentity"] == "inst-other"


def test_stop_right_after_a_move_withdraws_both(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent()
    drivers.append(d)
    registered(cluster, d)

    def move_and_stop(r: Any, now: float) -> None:
        r.move(build_at(NEW_ADDRESS))
        r.shutdown(now, 15.0)
    d.do(move_and_stop)
    wait_for(lambda: d.registrar.finished, what="the stop finished")
    assert cluster.entry(ENTRY) is None and cluster.lease(ENTRY) is None
    assert cluster.entry(NEW_ENTRY) is None and cluster.lease(NEW_ENTRY) is None
    d.kill()


def test_moves_in_a_row_leave_only_the_last_entry(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent()
    drivers.append(d)
    registered(cluster, d)
    d.do(lambda r, now: r.move(build_at(NEW_ADDRESS)))
    wait_for(lambda: cluster.entry(NEW_ENTRY), what="the entry at the second address")
    last = f"{GROUP}-10.0.0.7"

    def twice(r: Any, now: float) -> None:  # two changes before the API has seen either
        r.move(build_at("10.0.0.7"))
        r.move(build_at("10.0.0.8"))
        r.move(build_at("10.0.0.7"))  # and back: that one is wanted again
    d.do(twice)
    wait_for(lambda: cluster.entry(last) and d.registrar.state is State.REGISTERED and not d.registrar._retiring,
             what="the moves finished")
    names = sorted(e["metadata"]["name"] for e in cluster.api.objects("WorkloadEntry", NS))
    assert names == [last]
    assert sorted(x["metadata"]["name"] for x in cluster.api.objects("Lease", NS)) == [last]
    assert d.stop(withdraw=True)
