"""The registry's Kubernetes Events: which change of the registrar gives which reason (pure), and the
aggregation into series with the spam filter, as Kubernetes' own recorders do."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from agent.health.state import Health
from agent.registry import entry as E
from agent.registry import events as EV
from agent.registry.converge import Outcome, Want
from agent.registry.group import GroupGone, GroupSeen
from agent.registry.registrar import Registrar
from agent.registry.states import Change, Settings, State
from agent.registry.worker import RegistryResult

GROUP = {"metadata": {"name": "g", "namespace": "ns", "uid": "group-uid"},
         "spec": {"template": {"ports": {"http": 80}}}}
LEASE = E.build_lease("g-10.0.0.1", "ns", "me", 40, E.parse_time("2026-01-01T00:00:00Z"))  # type: ignore[arg-type]
EXITED = "process 4121 (python3) exited with status 137"
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def make(**kw: Any) -> Registrar:
    s = Settings(namespace="ns", group="g", instance="me", **kw)

    def build(group: dict[str, Any]) -> dict[str, Any]:
        return E.build_entry(E.EntryInputs(group=group, address="10.0.0.1", instance="me"))
    return Registrar(s, build, lambda seq, op: None, random.Random(1))


def answer(r: Registrar, now: float, **kw: Any) -> list[EV.Notice]:
    """Run the pending operation with this outcome; the notices of what changed."""
    r.tick(now)
    r.handle(RegistryResult(r._in_flight, Outcome(**kw)), now)  # type: ignore[arg-type]
    return [n for n in map(EV.notice, r.take_changes()) if n is not None]


def registered(**kw: Any) -> Registrar:
    r = make(**kw)
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY, "probe succeeded", "probe-succeeded")
    [n] = answer(r, 0, present=True, lease=LEASE, wrote=("lease", "entry"), entry_uid="entry-uid")
    assert (n.reason, n.type, n.action) == ("Registered", "Normal", "Register")
    assert n.regarding == EV.Ref("WorkloadEntry", "ns", "g-10.0.0.1", "entry-uid")
    assert "10.0.0.1" in n.note and "instance me" in n.note
    return r


def test_app_exit_withdraws_with_the_exit_text_on_the_group() -> None:
    r = registered()
    r.set_health(Health.UNHEALTHY, EXITED, "process-exited")
    [n] = answer(r, 1, present=False, wrote=("delete entry", "delete lease"))
    assert (n.reason, n.type, n.action) == ("AppExited", "Warning", "Withdraw")
    assert n.note == f"{EXITED}; entry g-10.0.0.1 withdrawn"
    assert n.regarding == EV.Ref("WorkloadGroup", "ns", "g", "group-uid")  # the entry is gone
    r.set_health(Health.HEALTHY, "probe succeeded", "probe-succeeded")
    [back] = answer(r, 2, present=True, lease=LEASE, wrote=("lease", "entry"), entry_uid="uid-2")
    assert back.reason == "Registered" and back.regarding.uid == "uid-2"


def test_each_health_cause_has_its_reason() -> None:
    for cause, reason in [("port-closed", "AppPortClosed"), ("probe-failed", "AppProbeFailed"),
                          ("sidecar-not-ready", "SidecarNotReady"), ("", "AppUnhealthy")]:
        r = registered()
        r.set_health(Health.UNHEALTHY, "why", cause)
        [n] = answer(r, 1, present=False, wrote=("delete entry",))
        assert (n.reason, n.note) == (reason, "why; entry g-10.0.0.1 withdrawn"), cause


def test_maintenance_on_and_off() -> None:
    r = registered()
    r.set_maintenance(True)
    [on] = [EV.notice(c) for c in r.take_changes()]
    assert on is not None and (on.reason, on.type) == ("MaintenanceStarted", "Normal")
    assert on.regarding.kind == "WorkloadEntry"  # still there when maintenance starts
    [gone] = answer(r, 1, present=False, wrote=("delete entry",))
    assert (gone.reason, gone.action, gone.type) == ("Maintenance", "Withdraw", "Normal")
    assert gone.note.startswith("maintenance (mesh-agent deregister)")
    r.set_maintenance(False)
    [off] = [EV.notice(c) for c in r.take_changes()]
    assert off is not None and off.reason == "MaintenanceEnded" and off.regarding.kind == "WorkloadGroup"


def test_maintenance_found_at_start_is_no_switch() -> None:
    r = make()
    r.set_maintenance(True)
    assert r.take_changes() == []


def test_group_deleted_and_shutdown() -> None:
    r = registered()
    r.handle(GroupGone("ns", "g"), 1)
    [n] = answer(r, 1, present=False, wrote=("delete entry",))
    assert (n.reason, n.type) == ("GroupDeleted", "Warning") and "ns/g was deleted" in n.note
    r = registered()
    r.shutdown(5, timeout=10)
    [n] = answer(r, 5, present=False, wrote=("delete entry", "delete lease"))
    assert (n.reason, n.type, n.action) == ("Shutdown", "Normal", "Withdraw")


def test_conflict_is_a_warning_once() -> None:
    r = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    until = dt.datetime(2026, 1, 1, 0, 0, 40, tzinfo=dt.UTC)
    [n] = answer(r, 0, present=False, conflict_holder="other", conflict_until=until, entry_uid="theirs")
    assert (n.reason, n.type, n.action) == ("EntryHeldByAnotherInstance", "Warning", "Refuse")
    assert "instance other" in n.note and "2026-01-01T00:00:40Z" in n.note and n.regarding.uid == "theirs"
    r._next_converge = 0
    assert answer(r, 1, present=False, conflict_holder="other") == []  # still held: nothing new


def test_a_fenced_conflict_says_the_api_server_refused_and_names_the_owner() -> None:
    r = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_health(Health.HEALTHY)
    past = dt.datetime(2026, 1, 1, 0, 0, 40, tzinfo=dt.UTC)
    [n] = answer(r, 0, present=False, conflict_holder="mesh-vm:4001", conflict_until=past, entry_uid="theirs",
                 fenced="WorkloadEntry g-10.0.0.1 belongs to mesh-vm:4001; this credential is mesh-vm:4002")
    assert (n.reason, n.type, n.action) == ("EntryHeldByAnotherInstance", "Warning", "Refuse")
    assert "belongs to mesh-vm:4001" in n.note and "refuses" in n.note and "reaper" in n.note
    assert "lease is live" not in n.note


def test_adoption() -> None:
    # A restart finds the entry its previous run left: kept while health is unknown, and said so.
    r = make()
    r.handle(GroupSeen(GROUP), 0)
    [n] = answer(r, 0, present=True, lease=LEASE, wrote=("lease",), adopted_from="me", entry_uid="e")
    assert (n.reason, n.action) == ("Adopted", "Adopt") and "left by its previous run" in n.note
    r.set_health(Health.HEALTHY)
    assert answer(r, 1, present=True, lease=LEASE, wrote=(), adopted_from="me") == []  # no change
    # Another instance's entry whose lease expired, and one written by hand.
    for owner, text in [("old-vm", "from instance old-vm"), ("", "written by someone else")]:
        r = make()
        r.handle(GroupSeen(GROUP), 0)
        r.set_health(Health.HEALTHY)
        [n] = answer(r, 0, present=True, lease=LEASE, wrote=("lease", "entry"), adopted_from=owner)
        assert n.reason == "Adopted" and text in n.note


def test_nothing_to_say_when_nothing_was_there() -> None:
    r = make()
    r.handle(GroupSeen(GROUP), 0)
    r.set_maintenance(True)
    assert answer(r, 0, present=False) == []
    # Another instance held the entry, then let it go while this app is unhealthy: nothing withdrawn here.
    c = Change(State.CONFLICT, State.WITHDRAWN, Want.WITHDRAW, "ns", "g", "me", health_cause="probe-failed")
    assert EV.notice(c) is None
    # The entry vanished without us (the group's deletion took it along): still worth saying why.
    gone = Change(State.REGISTERED, State.WITHDRAWN, Want.WITHDRAW, "ns", "g", "me", group_deleted=True)
    n = EV.notice(gone)
    assert n is not None and n.reason == "GroupDeleted"


def test_condition_mode_marks_and_heals() -> None:
    r = registered(condition_mode=True)
    r.set_health(Health.UNHEALTHY, "probe failed: 503", "probe-failed")
    [n] = answer(r, 1, present=True, healthy=False, lease=LEASE, wrote=("lease", "status"))
    assert (n.reason, n.action, n.type) == ("AppProbeFailed", "MarkUnhealthy", "Warning")
    assert n.note == "probe failed: 503; entry kept with Healthy=False" and n.regarding.kind == "WorkloadEntry"
    r.set_health(Health.HEALTHY)
    [h] = answer(r, 2, present=True, healthy=True, lease=LEASE, wrote=("lease", "status"))
    assert h.reason == "Healthy"


def test_notice_from_a_change_alone() -> None:
    c = Change(State.REGISTERED, State.WITHDRAWN, Want.WITHDRAW, "ns", "g", "me", entry="g-1",
               health_cause="process-exited", health_reason=EXITED, deleted=True)
    n = EV.notice(c)
    assert n is not None and n.reason == "AppExited" and n.regarding == EV.Ref("WorkloadGroup", "ns", "g")


# --- the event body and aggregation -------------------------------------------------------------------

NOTICE = EV.Notice(EV.Ref("WorkloadGroup", "ns", "g", "group-uid"), "AppExited", "Withdraw", EXITED, "Warning")


def test_event_body_is_a_valid_events_v1_event() -> None:
    body = EV.event_body(NOTICE, EV.event_name("g", T0), "me", T0)
    assert body["metadata"] == {"name": "g.1886caf223f1fc00", "namespace": "ns"}
    assert body["eventTime"] == "2026-01-02T03:04:05.123456Z"
    assert body["reportingController"] == "mesh-agent.io/registry" and body["reportingInstance"] == "me"
    assert body["regarding"] == {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                                 "namespace": "ns", "name": "g", "uid": "group-uid"}
    assert (body["reason"], body["action"], body["type"], body["note"]) == ("AppExited", "Withdraw", "Warning",
                                                                            EXITED)


def test_note_is_cut_to_the_byte_limit() -> None:
    assert EV.truncate_note("x" * 1024) == "x" * 1024
    cut = EV.truncate_note("é" * 600)
    assert len(cut.encode()) <= 1024 and cut.endswith("...")


def test_repeats_become_one_series() -> None:
    agg = EV.Aggregator("me")
    first = agg.record(NOTICE, T0)
    assert first is not None and first.op == "create" and "series" not in first.body
    # The same reason about the same object: the next of the series, even with another note (a new pid).
    other = EV.Notice(NOTICE.regarding, "AppExited", "Withdraw", "process 4200 (python3) exited", "Warning")
    for i, n in enumerate([NOTICE, other, NOTICE], start=2):
        w = agg.record(n, T0 + dt.timedelta(seconds=10 * i))
        assert w is not None and w.op == "patch" and w.name == first.name
        assert w.series_patch() == {"series": {"count": i, "lastObservedTime": E.format_micro_time(
            T0 + dt.timedelta(seconds=10 * i))}}
        assert w.body["note"] == EXITED  # the first note stays, as the API keeps it immutable
    # Another reason, or another object: a new event.
    registered_again = EV.Notice(NOTICE.regarding, "Registered", "Register", "back")
    w = agg.record(registered_again, T0 + dt.timedelta(seconds=50))
    assert w is not None and w.op == "create"


def test_a_series_ends_after_the_window() -> None:
    agg = EV.Aggregator("me")
    first = agg.record(NOTICE, T0)
    later = agg.record(NOTICE, T0 + dt.timedelta(seconds=EV.SERIES_WINDOW + 1))
    assert first is not None and later is not None
    assert later.op == "create" and later.name != first.name


def test_spam_filter_per_object() -> None:
    agg = EV.Aggregator("me", burst=3, refill=60.0)
    writes = [agg.record(NOTICE, T0 + dt.timedelta(seconds=i)) for i in range(5)]
    assert [w is not None for w in writes] == [True, True, True, False, False] and agg.filtered == 2
    # Another object has its own bucket; the first refills with time.
    other = EV.Notice(EV.Ref("WorkloadEntry", "ns", "g-1"), "Registered", "Register", "up")
    assert agg.record(other, T0 + dt.timedelta(seconds=5)) is not None
    assert agg.record(NOTICE, T0 + dt.timedelta(seconds=70)) is not None


def test_changes_nobody_takes_stay_bounded() -> None:
    r = registered()
    for i in range(100):
        r.set_maintenance(i % 2 == 0)
    changes = r.take_changes()
    assert len(changes) == 64 and changes[-1].maintenance_changed is False  # the newest are kept
    assert r.take_changes() == []
