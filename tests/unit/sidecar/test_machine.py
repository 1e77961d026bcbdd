"""The supervisor's state machine, driven by hand with a fake clock."""

from __future__ import annotations

import random

from agent.retry import Backoff
from agent.sidecar.machine import Action, Machine, State
from agent.sidecar.profiles import Policy


def machine(**policy: float) -> Machine:
    values = dict(ready_timeout=10.0, backoff_initial=0.2, backoff_max=30.0, max_exits=5, window=120.0)
    values.update(policy)
    return Machine(Policy(**values), Backoff(0.2, 30.0, random.Random(1)))  # type: ignore[arg-type]


def test_start_ready_exit_backoff_restart() -> None:
    m = machine()
    assert m.start(0.0) is Action.SPAWN
    assert m.state is State.STARTING and m.deadline == 10.0
    assert m.start(0.1) is Action.NONE  # already starting
    m.ready(0.5)
    assert m.state is State.RUNNING and m.deadline is None
    m.exited(2.0, "proxy pid 1 killed by SIGKILL")
    assert m.state is State.BACKOFF
    assert m.deadline is not None and 2.0 <= m.deadline <= 2.2   # first delay: uniform(0, 200 ms)
    assert "SIGKILL" in m.reason
    assert m.tick(m.deadline - 0.001) is Action.NONE
    assert m.tick(m.deadline) is Action.SPAWN
    assert m.state is State.STARTING and m.restarts == 1


def test_backoff_grows_and_is_capped() -> None:
    m = machine(max_exits=1000, window=1e9)
    now = 0.0
    m.start(now)
    ceilings = []
    for _ in range(12):
        ceilings.append(m.backoff.ceiling())
        m.exited(now, "exit")
        assert m.deadline is not None and m.deadline - now <= ceilings[-1]
        now = m.deadline
        assert m.tick(now) is Action.SPAWN
    assert ceilings[:4] == [0.2, 0.4, 0.8, 1.6]
    assert ceilings[-1] == 30.0


def test_crash_loop_is_fatal_only_beyond_max_exits_within_the_window() -> None:
    m = machine(max_exits=3, window=60.0)
    m.start(0.0)
    now = 0.0
    for _ in range(3):
        m.exited(now, "exit")
        assert m.state is State.BACKOFF
        now = m.deadline or now
        m.tick(now)
    m.exited(now, "proxy pid 9 exited with status 1")
    assert m.state is State.FATAL
    assert "4 exits within 60s" in m.reason and "status 1" in m.reason
    assert m.tick(now + 1000) is Action.NONE   # no restart from FATAL


def test_exits_spread_over_more_than_the_window_are_not_a_crash_loop() -> None:
    m = machine(max_exits=2, window=10.0)
    m.start(0.0)
    now = 0.0
    for _ in range(6):
        now += 11.0
        m.exited(now, "exit")
        assert m.state is State.BACKOFF
        m.tick(m.deadline or now)


def test_not_ready_in_time_kills_and_the_exit_says_why() -> None:
    m = machine(ready_timeout=5.0)
    m.start(0.0)
    assert m.tick(4.9) is Action.NONE
    assert m.tick(5.0) is Action.KILL
    assert m.state is State.STARTING and m.deadline is None
    assert m.tick(100.0) is Action.NONE   # killed once; waiting for its exit
    m.exited(5.1, "proxy pid 3 killed by SIGKILL")
    assert m.state is State.BACKOFF
    assert m.reason.startswith("not ready within 5s: proxy pid 3 killed by SIGKILL")


def test_a_stable_run_resets_the_backoff() -> None:
    m = machine(max_exits=10)
    m.start(0.0)
    for i in range(4):
        m.exited(float(i), "exit")
        m.tick(m.deadline or 0.0)
    assert m.backoff.attempts == 4
    m.ready(10.0)
    m.exited(25.0, "exit")           # ran ready for 15 s: restarted at once, the backoff from the bottom
    assert m.state is State.BACKOFF and m.deadline == 25.0 and m.backoff.attempts == 0
    assert m.tick(25.0) is Action.SPAWN
    m.ready(25.1)
    m.exited(25.5, "exit")           # the next exit soon after: the first backoff step again
    assert m.backoff.attempts == 1 and m.deadline is not None and 25.5 <= m.deadline <= 25.7


def test_a_first_crash_after_a_stable_run_restarts_at_once_but_a_crash_loop_still_backs_off_and_is_fatal() -> None:
    m = machine(max_exits=4, window=60.0)
    m.start(0.0)
    m.ready(0.1)
    m.exited(100.0, "proxy pid 1 killed by SIGKILL")
    assert m.state is State.BACKOFF and m.deadline == 100.0
    assert "restarting in 0.00s" in m.reason
    assert m.tick(100.0) is Action.SPAWN and m.restarts == 1
    # Now it crashes again and again without ever getting ready: growing waits, then FATAL.
    now, delays = 100.0, []
    for _ in range(3):
        m.exited(now, "proxy pid 2 exited with status 1")
        assert m.state is State.BACKOFF and m.deadline is not None
        delays.append(m.deadline - now)
        now = m.deadline
        assert m.tick(now) is Action.SPAWN
    assert m.backoff.attempts == 3 and all(d <= c for d, c in zip(delays, [0.2, 0.4, 0.8], strict=True))
    m.exited(now, "proxy pid 3 exited with status 1")
    assert m.state is State.FATAL and "5 exits within 60s" in m.reason


def test_stop_and_fatal_ignore_late_exits_and_start_again_from_fatal() -> None:
    m = machine()
    m.start(0.0)
    m.stopping()
    assert m.exited(1.0, "exit") is Action.NONE and m.state is State.STOPPING
    m.stopped()
    assert m.state is State.STOPPED
    m.fatal("port 15000 is already in use by pid 1 (x)")
    assert m.state is State.FATAL and m.exited(2.0, "x") is Action.NONE
    assert m.start(3.0) is Action.SPAWN and m.state is State.STARTING


def test_adopted_proxy_is_running() -> None:
    m = machine()
    m.adopted(0.0)
    assert m.state is State.RUNNING
    m.exited(1.0, "proxy pid 5 exited")
    assert m.state is State.BACKOFF


def test_hot_restart_goes_back_to_starting_with_a_ready_deadline() -> None:
    m = machine(ready_timeout=5.0)
    m.start(0.0)
    m.ready(1.0)
    m.hot_restarting(2.0, 1)
    assert m.state is State.STARTING and m.deadline == 7.0 and m.reason == "hot restart to epoch 1"
    m.ready(2.5)
    assert m.state is State.RUNNING


def test_command_matching_ignores_the_restart_epoch_and_allows_an_interpreter() -> None:
    from agent.sidecar.adopt import epoch_of, same_command, with_epoch

    argv = ("/usr/local/bin/envoy", "-c", "/b.json", "--base-id", "3", "--restart-epoch", "0")
    assert with_epoch(argv, 4)[-1] == "4" and epoch_of(with_epoch(argv, 4)) == 4
    assert same_command(with_epoch(argv, 2), argv)
    assert same_command(["/usr/bin/python3", *argv], argv)
    assert not same_command([*argv, "--extra"], argv)
    assert not same_command(["/usr/local/bin/envoy", "-c", "/other.json", "--base-id", "3",
                             "--restart-epoch", "0"], argv)
    assert epoch_of(("pilot-agent", "proxy")) == 0 and with_epoch(("a",), 1) == ("a",)


def test_an_asked_restart_is_not_a_crash() -> None:
    m = machine(ready_timeout=5.0)
    m.start(0.0)
    m.ready(1.0)
    assert m.restarting(2.0)
    assert m.state is State.RESTARTING and m.deadline is None and m.reason == "restarting (asked)"
    assert m.tick(1000.0) is Action.NONE                   # no timer while the old proxy stops
    assert m.exited(3.0, "process 1 (envoy) exited with status 0") is Action.NONE   # the old proxy
    assert m.state is State.RESTARTING and not m.exits
    assert m.restart_stopped(4.0) is Action.SPAWN
    assert m.state is State.STARTING and m.deadline == 9.0
    m.ready(4.5)
    assert m.state is State.RUNNING
    assert (m.restarts, m.requested_restarts, m.backoff.attempts) == (0, 1, 0)


def test_a_second_restart_while_one_runs_is_folded_into_it() -> None:
    m = machine()
    m.start(0.0)
    m.ready(0.1)
    assert m.restarting(1.0)
    assert not m.restarting(1.1)
    assert m.state is State.RESTARTING and m.requested_restarts == 1
    assert m.restart_stopped(2.0) is Action.SPAWN
    assert m.restart_stopped(2.1) is Action.NONE          # the one restart starts one proxy
    assert m.state is State.STARTING


def test_restart_from_backoff_keeps_the_crash_accounting() -> None:
    m = machine(max_exits=3, window=60.0)
    m.start(0.0)
    m.exited(1.0, "exit")
    m.tick(m.deadline or 0.0)
    m.exited(2.0, "exit")
    assert m.state is State.BACKOFF and m.backoff.attempts == 2
    backoff_deadline = m.deadline
    assert m.restarting(2.01)
    assert m.tick(backoff_deadline or 0.0) is Action.NONE   # the backoff timer is gone: no spawn
    assert m.restart_stopped(3.0) is Action.SPAWN
    assert m.restarts == 1                                  # only the crash restart
    m.exited(4.0, "exit")                                   # exits before the restart still count
    assert m.state is State.BACKOFF and m.backoff.attempts == 3 and len(m.exits) == 3
    m.tick(m.deadline or 0.0)
    m.exited(5.0, "process 7 (envoy) exited with status 1")
    assert m.state is State.FATAL and "4 exits within 60s" in m.reason


def test_restart_replaces_a_proxy_killed_for_being_slow() -> None:
    m = machine(ready_timeout=5.0)
    m.start(0.0)
    assert m.tick(5.0) is Action.KILL
    assert m.restarting(5.1)
    m.exited(5.2, "process 3 (envoy) exited: killed by SIGKILL")   # the killed one: not counted
    assert not m.exits and m.state is State.RESTARTING
    m.restart_stopped(6.0)
    m.ready(6.5)                                                    # the new one may become ready
    assert m.state is State.RUNNING


def test_nothing_to_restart_when_stopped_stopping_or_fatal() -> None:
    m = machine()
    assert not m.restarting(0.0) and m.state is State.STOPPED
    m.fatal("port 15000 is already in use by pid 1 (x)")
    assert not m.restarting(1.0) and m.state is State.FATAL
    m.start(2.0)
    m.stopping()
    assert not m.restarting(3.0) and m.state is State.STOPPING
    assert m.requested_restarts == 0


def test_a_stop_during_a_restart_wins() -> None:
    m = machine()
    m.start(0.0)
    m.ready(0.5)
    assert m.restarting(1.0)
    m.stopping()
    assert m.restart_stopped(2.0) is Action.NONE and m.state is State.STOPPING
    m.stopped()
    assert m.state is State.STOPPED
    assert m.start(3.0) is Action.SPAWN


def test_a_ready_proxy_that_stops_answering_is_taken_out_then_back_or_killed() -> None:
    m = machine(failure_threshold=3, restart_threshold=5)
    m.start(0.0)
    m.ready(0.5)
    # Fewer failures than the threshold: still ready.
    assert m.liveness(10.0, 1) is Action.NONE and m.liveness(20.0, 2) is Action.NONE
    assert m.state is State.RUNNING
    assert m.liveness(30.0, 3) is Action.NONE
    assert m.state is State.UNRESPONSIVE and "3 times in a row" in m.reason
    # It answers again: ready again, nothing counted.
    assert m.liveness(40.0, 0) is Action.NONE and m.state is State.RUNNING and m.restarts == 0
    # Hung for good: out at 3, killed at 5 (once), and its exit is a crash with the reason told.
    for n in (1, 2, 3, 4):
        assert m.liveness(50.0 + n, n) is Action.NONE
    assert m.state is State.UNRESPONSIVE
    assert m.liveness(55.0, 5) is Action.KILL
    assert m.liveness(56.0, 6) is Action.NONE  # the kill is under way
    m.exited(56.5, "process 7 (envoy) killed by SIGKILL")
    assert m.state is State.BACKOFF and "not answering its readiness check 5 times in a row" in m.reason
    assert len(m.exits) == 1


def test_without_a_restart_threshold_an_unresponsive_proxy_is_only_taken_out() -> None:
    m = machine(failure_threshold=2, restart_threshold=0)
    m.start(0.0)
    m.ready(0.5)
    assert all(m.liveness(10.0 * n, n) is Action.NONE for n in range(1, 50))
    assert m.state is State.UNRESPONSIVE
    assert m.restarting(600.0, "asked")  # a restart the agent asks for still works from here
    assert m.state is State.RESTARTING
