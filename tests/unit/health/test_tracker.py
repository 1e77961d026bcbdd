"""The health state machine: thresholds, immediate failures, sidecar readiness, flap damping."""

from __future__ import annotations

import itertools

import pytest

from agent.health.monitor import Schedule
from agent.health.state import Health
from agent.health.tracker import Cause, Damping, Tracker

NO_DAMPING = Damping(min_dwell=0.0, max_transitions=1000, window=1.0)


def tracker(success: int = 1, failure: int = 3, damping: Damping = NO_DAMPING,
            sidecar: bool = True) -> Tracker:
    return Tracker(success_threshold=success, failure_threshold=failure, damping=damping, now=0.0,
                   sidecar_ready=sidecar)


def probe(t: Tracker, ok: bool, now: float, reason: str = "r"):
    return t.probe_result(ok, reason, started=now, now=now)


def test_starts_unknown_and_success_threshold_makes_healthy() -> None:
    t = tracker(success=3)
    assert t.state is Health.UNKNOWN
    assert probe(t, True, 1) is None
    assert probe(t, True, 2) is None
    tr = probe(t, True, 3, "HTTP 200")
    assert tr is not None and tr.previous is Health.UNKNOWN and tr.state is Health.HEALTHY
    assert tr.reason == "HTTP 200" and tr.at == 3 and t.since == 3


def test_successes_must_be_consecutive() -> None:
    t = tracker(success=2)
    probe(t, True, 1)
    probe(t, False, 2)  # first verdict from Unknown: unhealthy
    assert t.state is Health.UNHEALTHY
    assert probe(t, True, 3) is None
    assert probe(t, True, 4).state is Health.HEALTHY


def test_first_failure_from_unknown_is_a_verdict() -> None:
    t = tracker(failure=3)
    tr = probe(t, False, 1, "connection refused")
    assert tr.state is Health.UNHEALTHY and tr.cause is Cause.PROBE_FAILED
    assert tr.reason == "probe failed: connection refused"


def test_failure_threshold_from_healthy() -> None:
    t = tracker(failure=3)
    probe(t, True, 1)
    assert probe(t, False, 2) is None
    assert probe(t, False, 3) is None
    assert t.state is Health.HEALTHY
    tr = probe(t, False, 4, "HTTP 503")
    assert tr.state is Health.UNHEALTHY and tr.reason == "probe failed: HTTP 503"


def test_a_success_resets_the_failure_count() -> None:
    t = tracker(failure=2)
    probe(t, True, 1)
    probe(t, False, 2)
    probe(t, True, 3)
    assert probe(t, False, 4) is None
    assert t.state is Health.HEALTHY


def test_reason_follows_the_latest_failure_while_unhealthy() -> None:
    t = tracker()
    probe(t, False, 1, "connection refused")
    probe(t, False, 2, "timed out")
    assert t.reason == "probe failed: timed out"


def test_process_exit_is_unhealthy_at_once_whatever_the_thresholds() -> None:
    t = tracker(failure=100)
    probe(t, True, 1)
    tr = t.process_exited(42, "app", -9, (8080,), now=2)
    assert tr.state is Health.UNHEALTHY and tr.cause is Cause.PROCESS_EXITED
    assert tr.reason == "process 42 (app) exited: killed by SIGKILL"


def test_probe_started_before_the_exit_is_stale() -> None:
    t = tracker()
    probe(t, True, 1)
    t.process_exited(42, "app", 1, (8080,), now=2.0)
    t.listener_up(8080, now=2.1)
    # This probe was answered by the process that just died.
    assert t.probe_result(True, "ok", started=1.9, now=2.2) is None
    assert t.state is Health.UNHEALTHY
    assert t.probe_result(True, "ok", started=2.3, now=2.4).state is Health.HEALTHY


def test_port_down_blocks_healthy_until_a_listener_is_back() -> None:
    t = tracker()
    probe(t, True, 1)
    tr = t.port_closed(8080, now=2)
    assert tr.state is Health.UNHEALTHY and tr.cause is Cause.PORT_CLOSED
    assert tr.reason == "port 8080 is not listening"
    # An exec probe may still succeed: the port is still closed.
    assert probe(t, True, 3) is None
    assert t.state is Health.UNHEALTHY
    t.listener_up(8080, now=4)
    assert probe(t, True, 5).state is Health.HEALTHY


def test_a_port_no_longer_watched_stops_blocking_healthy() -> None:
    # The bundle named port 8080, the WorkloadGroup read from the API names another: once the ports
    # change, 8080's "not listening" says nothing of the app and must not keep it unhealthy forever.
    t = tracker()
    t.port_closed(8080, now=1)
    assert t.watch_only((8080, 9090), now=2) is None  # still watched: still down
    assert probe(t, True, 3) is None and t.state is Health.UNHEALTHY
    t.watch_only((9090,), now=4)
    assert probe(t, True, 5).state is Health.HEALTHY


def test_process_exit_then_restart_needs_the_success_threshold() -> None:
    t = tracker(success=2)
    probe(t, True, 1)
    probe(t, True, 2)
    t.process_exited(7, "app", 0, (80,), now=3)
    assert t.listener_up(80, now=4) is None
    assert t.reason == "process 7 (app) exited with status 0"
    assert probe(t, True, 5) is None
    assert probe(t, True, 6).state is Health.HEALTHY


def test_sidecar_readiness_is_required_for_healthy() -> None:
    t = tracker(sidecar=False, damping=Damping(min_dwell=5.0, max_transitions=100, window=60.0))
    assert probe(t, True, 1) is None  # a healthy app behind a proxy not up yet: no verdict
    assert t.state is Health.UNKNOWN and t.cause is Cause.SIDECAR_NOT_READY
    tr = t.sidecar(True, now=2)
    assert tr.state is Health.HEALTHY  # at once: the start is not a return from Unhealthy
    tr = t.sidecar(False, now=3)
    assert tr.state is Health.UNHEALTHY and tr.reason == "sidecar not ready"


def test_sidecar_alone_gives_no_verdict() -> None:
    t = tracker(sidecar=False)
    assert t.sidecar(True, now=1) is None
    assert t.state is Health.UNKNOWN


def test_min_dwell_holds_the_return_to_healthy_but_not_the_failure() -> None:
    t = tracker(failure=1, damping=Damping(min_dwell=5.0, max_transitions=100, window=60.0))
    assert probe(t, True, 0.0).state is Health.HEALTHY
    assert probe(t, False, 1.0).state is Health.UNHEALTHY  # not held: failures go at once
    assert probe(t, True, 2.0) is None
    assert t.held(2.0) and t.next_deadline() == 6.0
    assert t.tick(5.9) is None
    tr = t.tick(6.0)
    assert tr.state is Health.HEALTHY and tr.at == 6.0


def test_a_held_return_is_dropped_if_the_app_fails_again() -> None:
    t = tracker(failure=1, damping=Damping(min_dwell=5.0, max_transitions=100, window=60.0))
    probe(t, True, 0.0)
    probe(t, False, 1.0)
    probe(t, True, 2.0)
    probe(t, False, 3.0)
    assert t.next_deadline() is None
    assert t.tick(10.0) is None and t.state is Health.UNHEALTHY


@pytest.mark.parametrize("max_transitions", [2, 3, 6])
def test_alternating_probe_is_damped_and_settles_right(max_transitions: int) -> None:
    window, period = 300.0, 10.0
    t = tracker(failure=1, damping=Damping(min_dwell=15.0, max_transitions=max_transitions, window=window))
    transitions = []
    now = 0.0
    # Alternate for one window, calling tick() whenever the tracker asks, as the monitor does.
    for i in range(int(window / period)):
        now = i * period
        deadline = t.next_deadline()
        if deadline is not None and deadline <= now:
            transitions += [x for x in [t.tick(deadline)] if x]
        transitions += [x for x in [probe(t, i % 2 == 0, now)] if x]
    assert len(transitions) <= max_transitions
    assert [x.state for x in transitions[:2]] == [Health.HEALTHY, Health.UNHEALTHY]
    assert all(a.state is not b.state for a, b in itertools.pairwise(transitions))
    # The inputs settle on "ok": once damping allows it, the state is Healthy.
    probe(t, True, now + period)
    deadline = t.next_deadline()
    if deadline is not None:
        t.tick(deadline)
    assert t.state is Health.HEALTHY


def test_transitions_in_window_expire() -> None:
    t = tracker(failure=1, damping=Damping(min_dwell=0.0, max_transitions=2, window=10.0))
    probe(t, True, 0.0)
    probe(t, False, 1.0)
    assert t.transitions_in_window(1.0) == 2
    assert probe(t, True, 2.0) is None      # cap reached: held
    assert t.next_deadline() == 11.0        # when the first transition leaves the window
    assert t.tick(11.0).state is Health.HEALTHY


def test_schedule_initial_delay_then_period() -> None:
    s = Schedule(start=100.0, initial_delay=30.0, period=10.0)
    assert s.due == 130.0
    s.now_if_allowed(105.0)  # a listener came up during the initial delay: still wait
    assert s.due == 130.0
    s.started(130.0)
    assert s.due == 140.0
    s.now_if_allowed(133.0)
    assert s.due == 133.0


DAMPED = Damping(min_dwell=5.0, max_transitions=4, window=60.0)


def test_a_sidecar_restart_is_not_damped_nor_counted() -> None:
    t = tracker(damping=DAMPED)
    assert probe(t, True, 0.0).state is Health.HEALTHY
    for crash in range(5):  # more proxy restarts than the window allows app flaps
        at = 1.0 + crash
        tr = t.sidecar(False, now=at)
        assert tr.state is Health.UNHEALTHY and tr.cause is Cause.SIDECAR_NOT_READY
        tr = t.sidecar(True, now=at + 0.1)  # well inside min_dwell: back at once
        assert tr is not None and tr.state is Health.HEALTHY and tr.at == at + 0.1
    assert t.transitions_in_window(6.0) == 1  # only the app's own first verdict
    # An app flap afterwards is damped as before: the proxy's restarts did not use up its room.
    assert probe(t, False, 7.0) is None and t.state is Health.HEALTHY  # failure threshold 3
    probe(t, False, 7.1)
    assert probe(t, False, 7.2).state is Health.UNHEALTHY
    assert probe(t, True, 8.0) is None and t.next_deadline() == 12.2


def test_an_app_that_fails_while_the_proxy_is_down_is_damped() -> None:
    t = tracker(failure=1, damping=DAMPED)
    probe(t, True, 0.0)
    assert t.sidecar(False, now=10.0).cause is Cause.SIDECAR_NOT_READY
    assert t.port_closed(8080, now=10.5) is None and t.cause is Cause.PORT_CLOSED  # already Unhealthy
    t.listener_up(8080, now=11.0)
    assert t.sidecar(True, now=11.0) is None
    assert probe(t, True, 11.2) is None  # the app's own return waits min_dwell from its failure
    assert t.held(11.2) and t.next_deadline() == 15.5
    assert t.tick(15.5).state is Health.HEALTHY


def test_a_proxy_crash_during_a_held_return_keeps_it_held() -> None:
    t = tracker(failure=1, damping=DAMPED)
    probe(t, True, 0.0)
    probe(t, False, 10.0)
    assert probe(t, True, 11.0) is None  # held until 15
    assert t.sidecar(False, now=12.0) is None and t.cause is Cause.SIDECAR_NOT_READY
    assert t.sidecar(True, now=12.5) is None  # the app's flap still holds it
    assert t.next_deadline() == 15.0 and t.tick(15.0).state is Health.HEALTHY
