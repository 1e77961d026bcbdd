"""The follower of one named object (agent.kube.follow) against the Kubernetes API emulator, through the
real client: what it reports, and how it reads and watches again after 410 Gone, a dropped watch and an
outage."""

from __future__ import annotations

import logging
import queue
import random
from collections.abc import Iterator
from typing import Any

import pytest

from agent.kube.auth import Credentials
from agent.kube.client import GROUPS, Kube
from agent.kube.errors import ApiError, Unavailable
from agent.kube.follow import Follower, custom_object
from agent.retry import Backoff
from devkit.kubeapi.auth import Identity
from devkit.kubeapi.cluster import Request
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.server import KubeAPI
from devkit.waiting import wait_for

NS, NAME = "vm-apps", "billing"


def group(labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"metadata": {"labels": labels}, "template": {"serviceAccount": "billing-vm"}}}


def relabel(api: KubeAPI, labels: dict[str, str]) -> None:
    """Change the group in the emulator's store directly (no request: it works during an outage too)."""
    rt = api.cluster.by_kind("WorkloadGroup")
    obj = api.get("WorkloadGroup", NS, NAME)
    assert obj is not None
    obj["spec"]["metadata"]["labels"] = labels
    api.cluster.update(rt, "v1", NS, NAME, obj, Request(Identity("admin")))


class Seen:
    """What a follower reported, in order: ("seen", labels) / ("gone", None) / ("failed", error)."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.failures: list[ApiError] = []

    def seen(self, obj: dict[str, Any]) -> None:
        self.q.put(("seen", obj["spec"]["metadata"]["labels"]))

    def gone(self) -> None:
        self.q.put(("gone", None))

    def failed(self, error: ApiError) -> None:
        self.failures.append(error)
        self.q.put(("failed", error))

    def next(self, timeout: float = 15.0, skip_failures: bool = True) -> tuple[str, Any]:
        while True:
            kind, value = self.q.get(timeout=timeout)
            if kind != "failed" or not skip_failures:
                return kind, value


def requests(api: KubeAPI, watch: bool) -> list[Any]:
    return [r for r in list(api.requests)
            if r.path.endswith(f"/namespaces/{NS}/workloadgroups") and ("watch=" in r.query) == watch]


@pytest.fixture
def api(kubeapi: KubeAPI) -> KubeAPI:  # noqa: F811
    kubeapi.create_namespace(NS)
    kubeapi.create(group({"app": "billing"}))
    return kubeapi


@pytest.fixture
def follow(api: KubeAPI) -> Iterator[Any]:
    started: list[Follower] = []
    kube = Kube.from_credentials(Credentials(kubeconfig=str(api.kubeconfig)), timeout=3.0)

    def start(seen: Seen, **kw: Any) -> Follower:
        kw.setdefault("backoff", Backoff(0.1, 1.0, random.Random(1)))
        f = Follower(custom_object(kube, GROUPS, NS, NAME), seen=seen.seen, gone=seen.gone, failed=seen.failed,
                     **kw).start()
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop(timeout=5.0)
    kube.close()


def test_reads_then_reports_each_change_and_the_deletion(api: KubeAPI, follow: Any) -> None:
    s = Seen()
    follow(s, watch_timeout=30)
    assert s.next() == ("seen", {"app": "billing"})
    wait_for(lambda: requests(api, watch=True), what="the watch")
    relabel(api, {"app": "billing", "tier": "gold"})
    assert s.next() == ("seen", {"app": "billing", "tier": "gold"})
    api.delete("WorkloadGroup", NS, NAME)
    assert s.next() == ("gone", None)
    api.create(group({"app": "again"}))
    assert s.next() == ("seen", {"app": "again"})
    assert not s.failures
    assert len(requests(api, watch=False)) == 1  # one list; everything else came through the one watch


def test_a_missing_object_is_reported_gone_and_then_seen_when_created(api: KubeAPI, follow: Any) -> None:
    api.delete("WorkloadGroup", NS, NAME)
    s = Seen()
    follow(s, watch_timeout=30)
    assert s.next() == ("gone", None)
    api.create(group({"app": "new"}))
    assert s.next() == ("seen", {"app": "new"})


def test_410_gone_reads_again_and_misses_nothing(api: KubeAPI, follow: Any) -> None:
    """The history the open watch stands on is compacted away: the server ends the watch with 410 Gone;
    the follower lists again (no failure reported) and reports the change it could not watch."""
    s = Seen()
    follow(s, watch_timeout=30)
    assert s.next() == ("seen", {"app": "billing"})
    wait_for(lambda: requests(api, watch=True), what="the watch")
    store = api.cluster.store
    with store.lock:  # the watch cannot see the change before the compaction takes its history
        relabel(api, {"app": "billing", "tier": "gold"})
        api.compact()
    assert s.next() == ("seen", {"app": "billing", "tier": "gold"})
    assert len(requests(api, watch=False)) == 2
    wait_for(lambda: len(requests(api, watch=True)) == 2, what="a new watch")
    relabel(api, {"app": "billing", "tier": "silver"})
    assert s.next() == ("seen", {"app": "billing", "tier": "silver"})
    assert not s.failures


def test_a_watch_the_server_ends_is_followed_by_a_new_list_and_watch(api: KubeAPI, follow: Any) -> None:
    """The registry's way: every watch period begins with a list."""
    s = Seen()
    follow(s, watch_timeout=1)
    wait_for(lambda: len(requests(api, watch=False)) >= 3, what="a list after each watch")
    relabel(api, {"app": "billing", "tier": "gold"})
    while s.next() != ("seen", {"app": "billing", "tier": "gold"}):
        pass
    assert not s.failures


def test_resume_watches_on_from_the_last_version_without_listing(api: KubeAPI, follow: Any) -> None:
    s = Seen()
    follow(s, watch_timeout=1, resume=True)
    assert s.next() == ("seen", {"app": "billing"})
    wait_for(lambda: len(requests(api, watch=True)) >= 3, what="watches after the server ended them")
    relabel(api, {"app": "billing", "tier": "gold"})
    assert s.next() == ("seen", {"app": "billing", "tier": "gold"})
    assert len(requests(api, watch=False)) == 1
    first = requests(api, watch=False)[0]
    assert all("resourceVersion=" in r.query for r in requests(api, watch=True))
    assert first.code == 200 and not s.failures


def test_a_dropped_watch_resumes_and_reports_what_changed_meanwhile(api: KubeAPI, follow: Any) -> None:
    """The connection under an open watch is cut (the server goes away for a moment); the group changes
    while nobody watches. The follower reports the failure, backs off, watches again from the version
    it had, and the change comes through that watch."""
    s = Seen()
    f = follow(s, watch_timeout=30, resume=True)
    assert s.next() == ("seen", {"app": "billing"})
    wait_for(lambda: requests(api, watch=True), what="the watch")
    api.outage(1.0)
    relabel(api, {"app": "billing", "tier": "gold"})
    kind, error = s.next(skip_failures=False)
    assert kind == "failed" and isinstance(error, Unavailable)
    assert s.next() == ("seen", {"app": "billing", "tier": "gold"})
    assert len(requests(api, watch=False)) == 1  # resumed: no list
    assert f.version == api.get("WorkloadGroup", NS, NAME)["metadata"]["resourceVersion"]


def test_an_outage_is_backed_off_and_followed_by_a_new_list(api: KubeAPI, follow: Any) -> None:
    """Every failure during an outage is reported and waited out with the backoff; afterwards the
    follower lists again and goes on watching."""
    s = Seen()
    f = follow(s, watch_timeout=30)
    assert s.next() == ("seen", {"app": "billing"})
    wait_for(lambda: requests(api, watch=True), what="the watch")
    api.outage(2.0)
    wait_for(lambda: len(s.failures) >= 2, what="failures while the API is down")
    assert all(isinstance(e, Unavailable) for e in s.failures)
    relabel(api, {"app": "billing", "tier": "gold"})
    while s.next() != ("seen", {"app": "billing", "tier": "gold"}):
        pass
    wait_for(lambda: len(requests(api, watch=True)) >= 2, what="a new watch")
    assert len(requests(api, watch=False)) >= 2
    assert f.backoff.attempts == len(s.failures)  # each failure waited its backoff; no watch ended since
    relabel(api, {"app": "billing", "tier": "silver"})
    assert s.next() == ("seen", {"app": "billing", "tier": "silver"})


def test_stop_ends_the_thread_while_it_waits(api: KubeAPI, follow: Any) -> None:
    s = Seen()
    f = follow(s, watch_timeout=30, backoff=Backoff(30.0, 30.0))
    assert s.next() == ("seen", {"app": "billing"})
    api.outage(5.0)
    s.next(skip_failures=False)
    f.stop(timeout=2.0)
    assert f.stopped and not f._thread.is_alive()


def test_a_watch_the_server_never_ends_is_cut_said_once_and_followed_again(
        api: KubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    """With no caller reporting failures (the cluster bundle source's followers), the follower itself
    says each cut in one line, and follows on: changes are seen once the server behaves."""
    caplog.set_level(logging.INFO)
    kube = Kube.from_credentials(Credentials(kubeconfig=str(api.kubeconfig)), timeout=3.0, deadline=1.0)
    s = Seen()
    f = Follower(custom_object(kube, GROUPS, NS, NAME), seen=s.seen, gone=s.gone, watch_timeout=1,
                 backoff=Backoff(0.1, 1.0, random.Random(1))).start()
    try:
        assert s.next() == ("seen", {"app": "billing"})
        api.faults.trickle(0.5, path="workloadgroups", query="watch=")
        before = len(requests(api, watch=True))
        wait_for(lambda: len(requests(api, watch=True)) >= before + 2, timeout=20, what="a cut watch made again")
        cuts = [r for r in caplog.records if r.name == "agent.kube.follow" and "deadline" in r.getMessage()]
        assert cuts and all(r.levelno == logging.WARNING and r.exc_info is None for r in cuts)
        api.faults.clear()
        relabel(api, {"app": "billing", "tier": "gold"})
        wait_for(lambda: ("seen", {"app": "billing", "tier": "gold"}) in list(s.q.queue), timeout=20,
                 what="the change, once the server behaves")
    finally:
        f.stop(timeout=5.0)
        kube.close()
