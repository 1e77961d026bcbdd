"""The registry's Events against the emulator, through the agents' own RBAC (what `mesh-agent manifests`
prints): fencing and adoption as the registrar sees them, and a writer that never gets in the way."""

from __future__ import annotations

import collections
import threading
from typing import Any

from agent.kube.auth import Credentials
from agent.kube.client import Kube
from agent.registry.converge import Want
from agent.registry.recorder import Recorder
from agent.registry.states import Change, State
from devkit.registrydriver import Driver
from tests.integration.registry.conftest import ENTRY, GROUP, NS, Cluster, wait_for
from tests.integration.registry.test_registration import _foreign, healthy, state_is


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: collections.Counter[str] = collections.Counter()

    def __call__(self, result: str) -> None:
        with self.lock:
            self.c[result] += 1

    def __getitem__(self, result: str) -> int:
        with self.lock:
            return self.c[result]


def recording(cluster: Cluster, instance: str) -> tuple[Recorder, Counts]:
    counts = Counts()
    kube = Kube.from_credentials(Credentials(kubeconfig=str(cluster.agent_kubeconfig)), timeout=3.0)
    return Recorder(kube, instance, counts), counts


def report(d: Driver, rec: Recorder) -> None:
    d.do(lambda r, now: rec.record(r.take_changes()))


def events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.api.objects("Event", NS) if e["reason"] == reason]


def test_fencing_then_adoption(cluster: Cluster, drivers: list[Driver]) -> None:
    foreign = _foreign(cluster, "inst-other", renewed_ago=27, duration=30)  # its lease runs out in ~3 s
    d = cluster.agent("inst-a")
    drivers.append(d)
    rec, counts = recording(cluster, "inst-a")
    healthy(d)
    wait_for(lambda: state_is(d, State.CONFLICT), what="CONFLICT")
    report(d, rec)
    wait_for(lambda: events(cluster, "EntryHeldByAnotherInstance"), what="the fencing event")
    [held] = events(cluster, "EntryHeldByAnotherInstance")
    assert held["type"] == "Warning" and held["action"] == "Refuse"
    assert held["regarding"] == {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                                 "namespace": NS, "name": ENTRY, "uid": foreign["metadata"]["uid"]}
    assert "instance inst-other" in held["note"] and held["reportingInstance"] == "inst-a"
    # The lease expires: the entry is taken over, and the event says from whom.
    wait_for(lambda: state_is(d, State.REGISTERED), timeout=20, what="the takeover")
    report(d, rec)
    wait_for(lambda: events(cluster, "Adopted"), what="the Adopted event")
    [adopted] = events(cluster, "Adopted")
    assert "from instance inst-other" in adopted["note"] and adopted["type"] == "Normal"
    assert counts["created"] == 2 and counts["failed"] == 0
    rec.stop()
    rec.kube.close()


def test_a_refused_write_is_counted_and_not_retried(cluster: Cluster) -> None:
    cluster.api.add_token("no-events", "someone", [])
    kc = cluster.api.write_kubeconfig(cluster.tmp / "nobody.kubeconfig", "no-events", user="nobody")
    counts = Counts()
    rec = Recorder(Kube.from_credentials(Credentials(kubeconfig=str(kc)), timeout=3.0), "inst-a", counts)
    rec.record([_withdrawal(GROUP)])
    wait_for(lambda: counts["failed"] == 1, what="the failure to be counted")
    rec.stop()
    rec.kube.close()
    posts = [r for r in cluster.api.requests if r.method == "POST" and "/events" in r.path]
    assert [r.code for r in posts] == [403]
    assert cluster.api.objects("Event", NS) == []


def test_a_slow_api_drops_the_oldest_writes(cluster: Cluster) -> None:
    cluster.api.faults.latency(1.0, path="/events")
    counts = Counts()
    kube = Kube.from_credentials(Credentials(kubeconfig=str(cluster.agent_kubeconfig)), timeout=5.0)
    rec = Recorder(kube, "inst-a", counts, size=4)
    # Ten objects (the spam filter is per object): one write in flight, four queued, the rest dropped.
    rec.record([_withdrawal(f"g{i}") for i in range(10)])
    assert counts["dropped"] == rec.dropped >= 5
    rec.stop(timeout=10.0)
    kube.close()
    written = {e["regarding"]["name"] for e in cluster.api.objects("Event", NS)}
    assert "g9" in written and len(written) == 10 - rec.dropped  # the newest are kept


def _withdrawal(group: str) -> Change:
    return Change(State.REGISTERED, State.WITHDRAWN, Want.WITHDRAW, NS, group, "inst-a", entry=f"{group}-1",
                  health_cause="process-exited", health_reason="process 7 (app) exited with status 1",
                  deleted=True)

