"""A trickling API server (the emulator's trickle fault: a byte a second, which never trips the read
timeout) against the registrar, through the real kubernetes client: each operation is cut at the
request deadline, the registrar retries with backoff and says so, nothing is deleted meanwhile, and it
registers once the server answers again; a group watch the server never ends is cut and re-established."""

from __future__ import annotations

import logging
import time

import pytest

from agent.kube.client import GROUPS
from agent.registry.states import State
from devkit.registrydriver import Driver
from tests.integration.registry.conftest import GROUP, Cluster, group_obj, wait_for
from tests.integration.registry.test_registration import healthy, state_is

DEADLINE = 2.0
READS = "workloadentries|leases"


def cut_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The log lines about cuts: each one line from the registrar, never a traceback."""
    lines = [r for r in caplog.records if "deadline" in r.getMessage() and r.levelno >= logging.INFO]
    for r in lines:
        assert r.name == "agent.registry.registrar" and r.exc_info is None and "\n" not in r.getMessage()
    return lines


def test_registration_waits_out_a_trickling_server_then_registers(cluster: Cluster, drivers: list[Driver],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # The registrar's reads answer a byte a second: it never gets as far as writing anything.
    cluster.api.faults.trickle(1.0, method="GET", path=READS)
    started = time.monotonic()
    d = cluster.agent(deadline=DEADLINE)
    drivers.append(d)
    healthy(d)
    wait_for(lambda: state_is(d, State.RETRYING) and "deadline" in d.registrar.message, timeout=20,
             what="RETRYING after a cut read")
    assert time.monotonic() - started < 20  # one trickled read alone would take minutes
    status = d.registrar.status()
    assert status.unknown_since is not None
    assert "nothing is deleted" in status.message and f"{DEADLINE:g}s deadline" in status.message
    # Retried (with backoff) and cut again: each cut is one line naming the call, no traceback.
    wait_for(lambda: len(cut_lines(caplog)) >= 2, timeout=20, what="a second cut read")
    assert all("-> retrying: get " in r.getMessage() for r in cut_lines(caplog))
    assert cluster.entry() is None

    cluster.api.faults.clear()
    wait_for(lambda: state_is(d, State.REGISTERED), timeout=20, what="REGISTERED once the server answers")
    assert cluster.entry() is not None and d.registrar.status().unknown_since is None


def test_a_registered_entry_outlives_a_trickling_server(cluster: Cluster, drivers: list[Driver]) -> None:
    d = cluster.agent(deadline=DEADLINE, renew=0.5, lease=30.0)
    drivers.append(d)
    healthy(d)
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")
    uid = cluster.entry()["metadata"]["uid"]
    # Every call now trickles (the lease renewals, the reads, the writes).
    cluster.api.faults.trickle(1.0, path=READS)
    wait_for(lambda: state_is(d, State.RETRYING) and "deadline" in d.registrar.message, timeout=20,
             what="RETRYING after a cut renewal")
    time.sleep(2 * DEADLINE)  # more cuts, more retries
    assert cluster.entry()["metadata"]["uid"] == uid
    cluster.api.faults.clear()
    wait_for(lambda: state_is(d, State.REGISTERED), timeout=20, what="REGISTERED again")
    assert cluster.entry()["metadata"]["uid"] == uid
    assert not [r for r in list(cluster.api.requests) if r.method == "DELETE"]


def test_a_group_watch_the_server_never_ends_is_cut_and_watched_again(
        cluster: Cluster, drivers: list[Driver], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    d = cluster.agent(deadline=DEADLINE, watch_timeout=1)
    drivers.append(d)
    healthy(d)
    wait_for(lambda: state_is(d, State.REGISTERED), what="REGISTERED")

    def watches() -> int:
        return len([r for r in list(cluster.api.requests)
                    if r.path.endswith("/workloadgroups") and "watch=" in r.query])

    # Watches trickle newlines and never end; the reads (lists) stay prompt.
    cluster.api.faults.trickle(0.5, path="workloadgroups", query="watch=")
    started, before = time.monotonic(), watches()
    # Each watch asks the server to end it after 1s; it is cut 1s + the deadline after it began.
    wait_for(lambda: watches() >= before + 2, timeout=20, what="the trickled watch cut and made again")
    assert time.monotonic() - started < 20
    wait_for(lambda: any("cannot read the WorkloadGroup: watch" in r.getMessage() and "not ended" in r.getMessage()
                         for r in cut_lines(caplog)), timeout=10, what="the cut watch logged")
    assert state_is(d, State.REGISTERED)  # the entry is not the watch's business

    cluster.api.faults.clear()
    # Watched again, and the watches end at their timeout as asked: no more cuts but the one that
    # was under way when the fault went.
    cuts, now = len(cut_lines(caplog)), watches()
    wait_for(lambda: watches() >= now + 3, timeout=30, what="watches made again")
    assert len(cut_lines(caplog)) <= cuts + 1
    cluster.admin.apply(GROUPS, group_obj({"app": GROUP, "tier": "gold"}), field_manager="test")
    wait_for(lambda: cluster.entry()["metadata"]["labels"].get("tier") == "gold", timeout=30,
             what="the group's change")
