"""The supervised sidecar proxy: start, readiness, restart with backoff, crash-loop, drain and stop.

How the daemon uses it (everything runs on the daemon's loop thread; helper threads - one per proxy
polling its readiness and waiting for its exit, one per asked restart - only post events):

    sup = Supervisor(spec, layout, post)      # spec from agent.sidecar.profiles.read_spec()
    sup.start()                               # adopt a healthy proxy left by a killed agent, or spawn
    ...
    # in the loop, for every event read from the queue:
    sup.handle(event)                         # ProxyReady / ProxyExited / RestartStopped -> True
    deadline = sup.tick()                     # drives backoff and the ready timeout; None: no timer
    if sup.state is State.FATAL:              # crash loop or port conflict: sup.reason says why
        exit non-zero
    ...
    sup.restart(drain=True)                   # returns at once: RESTARTING, then STARTING, RUNNING
    sup.hot_restart(new_spec)                 # envoy profile, bootstrap changed: next epoch takes over
    sup.stop(drain=True)                      # blocking: at most drain_timeout + stop_grace + ~5 s,
                                              # plus the istio profile's iptables cleanup

Every state change is also posted as a SidecarStateChanged event, for the status snapshot. The
decisions live in agent.sidecar.machine.Machine (pure); the Supervisor carries them out. A needed
port held by another process -> FATAL at once with the port, pid and process name.

The proxy runs in its own process group (agent.sidecar.child). Its pid is kept in the pid file so
that the next agent adopts or stops it (agent.sidecar.adopt): there are never two proxies.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from agent import proc
from agent.paths import Layout
from agent.retry import Backoff
from agent.sidecar import adopt, ports
from agent.sidecar.child import Child, kill_now, run_commands, spawn, terminate, watch
from agent.sidecar.envoy_admin import expected_ready_body, probe_ready, server_epoch
from agent.sidecar.machine import (
    Action,
    Machine,
    ProxyExited,
    ProxyLiveness,
    ProxyReady,
    RestartStopped,
    SidecarStateChanged,
    State,
)
from agent.sidecar.profiles import LaunchSpec, describe

log = logging.getLogger(__name__)


@dataclass
class _RestartWork:
    """The worker thread of one asked restart."""
    token: int
    spec: LaunchSpec               # the spec the new start is prepared for
    thread: threading.Thread
    stopping: threading.Event      # set by stop(): prepare nothing, stop() takes over
    cut_drain: threading.Event     # set by stop(drain=False): end the old proxy's drain early


@dataclass(frozen=True)
class SidecarSnapshot:
    """The sidecar in status.json."""

    state: str = "stopped"
    pid: int | None = None
    restarts: int = 0  # after crashes
    ready: bool = False
    reason: str = ""
    profile: str | None = None
    requested_restarts: int = 0  # asked by the agent (a changed cluster.env), not crashes
    restart_epoch: int | None = None  # envoy profile: Envoy's --restart-epoch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Supervisor:
    """Runs one proxy per its LaunchSpec. Not thread-safe: call it from the daemon's loop only."""

    def __init__(self, spec: LaunchSpec, layout: Layout, post: Callable[[object], None],
                 clock: Callable[[], float] = time.monotonic, backoff: Backoff | None = None) -> None:
        self.spec = spec
        self.layout = layout
        self._post = post
        self._clock = clock
        self.machine = Machine(spec.policy, backoff or Backoff(spec.policy.backoff_initial,
                                                               spec.policy.backoff_max))
        self._generation = 0
        self._child: Child | None = None
        self._epoch = 0                      # Envoy --restart-epoch of the current child
        self._retiring: list[Child] = []     # earlier epochs, draining after a hot restart
        self._restart_token = 0
        self._restart_work: _RestartWork | None = None

    # -- read-only view
    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def reason(self) -> str:
        return self.machine.reason

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def restarts(self) -> int:
        """Restarts after the proxy exited (crashes); restarts the agent asked for are not counted."""
        return self.machine.restarts

    @property
    def requested_restarts(self) -> int:
        return self.machine.requested_restarts

    @property
    def ready(self) -> bool:
        return self.machine.state is State.RUNNING

    def snapshot(self) -> SidecarSnapshot:
        """For the status file: what runs and how it is doing."""
        return SidecarSnapshot(self.state.value, self.pid, self.restarts, self.ready, self.reason, self.spec.profile,
                               self.requested_restarts, self._epoch if self.spec.profile == "envoy" else None)

    # -- commands
    def start(self) -> None:
        """Adopt our healthy proxy left by a previous agent, stop any other leftover, then spawn."""
        if self.state not in (State.STOPPED, State.FATAL):
            return
        now = self._clock()
        previous = self.state
        if self._adopt_or_clean():
            self.machine.adopted(now)
            self._changed(previous)
            return
        if self.machine.start(now) is Action.SPAWN:
            self._changed(previous)
            self._launch(now)

    def handle(self, event: object) -> bool:
        """Apply a ProxyReady / ProxyExited / RestartStopped event; True if the event was ours."""
        if isinstance(event, RestartStopped):
            self._restart_stopped(event)
            return True
        if not isinstance(event, ProxyReady | ProxyExited | ProxyLiveness):
            return False
        if event.generation != self._generation or self._child is None:
            return True  # about a proxy we already gave up on or stopped
        now = self._clock()
        previous = self.state
        if isinstance(event, ProxyLiveness):
            if self.machine.liveness(now, event.failures) is Action.KILL:
                log.warning("sidecar %s; killing pid %d", self.machine.killed_because, self._child.pid)
                proc.kill_group(self._child.pid, signal.SIGKILL)
            elif event.failures:
                log.warning("sidecar did not answer its readiness check (%d in a row)", event.failures)
            if self.state is not previous:
                log.log(logging.WARNING if self.state is State.UNRESPONSIVE else logging.INFO,
                        "sidecar %s", self.reason)
        elif isinstance(event, ProxyReady):
            self.machine.ready(now)
            if self.state is not previous:
                log.info("sidecar ready (pid %d)", event.pid)
        else:
            what = proc.describe_exit(event.pid, self._child.name, event.returncode)
            self._child = None
            adopt.remove_pidfile(self.layout.sidecar_pidfile)
            proc.kill_group(event.pid, signal.SIGKILL)  # what is left of its group (pilot-agent's Envoy)
            self._end_retiring()   # a new epoch that failed: the next start is a fresh one
            conflicts = ports.conflicts(self.spec.ports)
            if conflicts:
                self.machine.fatal(f"{what}; {ports.describe_conflicts(conflicts)}")
            else:
                self.machine.exited(now, what)
        self._changed(previous)
        return True

    def tick(self, now: float | None = None) -> float | None:
        """Run due timers (restart after backoff, ready timeout); returns the next deadline or None."""
        now = self._clock() if now is None else now
        previous = self.state
        action = self.machine.tick(now)
        if action is Action.SPAWN:
            self._changed(previous)
            self._launch(now)
        elif action is Action.KILL and self._child is not None:
            log.warning("sidecar %s; killing pid %d", self.reason, self._child.pid)
            proc.kill_group(self._child.pid, signal.SIGKILL)
        return self.machine.deadline

    def restart(self, drain: bool = True, *, spec: LaunchSpec | None = None) -> None:
        """Stop the proxy (draining it if asked) and start it again, without blocking: returns at
        once. A worker thread drains, stops (SIGTERM, SIGKILL after stop_grace) and runs the
        post-stop and pre-start commands, then posts RestartStopped; handle() spawns the new proxy.

        The state goes RESTARTING -> STARTING -> RUNNING. Not a crash: `restarts` and the backoff
        are untouched. A restart asked while one runs is folded into it (a newer `spec` is still
        used for the new proxy). Nothing happens when STOPPED, STOPPING or FATAL: start() starts.
        `spec` replaces the launch spec for the new proxy (and later starts)."""
        old_spec = self.spec
        if spec is not None:
            self.spec = spec
            self.machine.policy = spec.policy   # timeouts and crash-loop limits from now on
        previous = self.state
        if not self.machine.restarting(self._clock()):
            if previous is State.RESTARTING:
                log.info("sidecar restart asked while one runs: the running restart covers it")
            else:
                log.info("sidecar restart asked while %s: nothing to restart", previous.value)
            return
        self._generation += 1   # the old proxy's events are stale: its exit is not a crash
        child, self._child = self._child, None
        retiring, self._retiring = self._retiring, []
        self._epoch = 0         # a fresh start, not a hot restart
        self._changed(previous)
        self._begin_restart_work(child, retiring, old_spec, drain)

    def hot_restart(self, spec: LaunchSpec | None = None) -> bool:
        """envoy profile: start the next --restart-epoch beside the running Envoy, which hands over
        its listeners without dropping connections, drains, and exits by itself after
        --parent-shutdown-time-s. Used to apply a changed bootstrap (pass the new spec when its
        ports changed). Returns False when not possible (another profile, not RUNNING, no
        --restart-epoch in the command): then restart() instead."""
        spec = spec or self.spec
        if spec.profile != "envoy" or self.state is not State.RUNNING or self._child is None \
                or "--restart-epoch" not in spec.argv:
            return False
        self.spec = spec
        now = self._clock()
        previous = self.state
        self._retiring = [r for r in self._retiring if not r.poll()]
        self._retiring.append(self._child)
        self._epoch += 1
        self.machine.hot_restarting(now, self._epoch)
        self._changed(previous)
        self._launch(now, hot=True)   # a new generation: the old epoch's exit is not an exit
        return True

    def stop(self, drain: bool = True) -> None:
        """Drain (if asked), SIGTERM, SIGKILL after stop_grace; blocks for at most drain_timeout +
        stop_grace + a few seconds, plus the post-stop commands. During a restart it waits for the
        restart's worker, which stops the old proxy (its drain cut short unless `drain`), and starts
        nothing."""
        previous = self.state
        if previous is State.STOPPED:
            return
        self.machine.stopping()
        self._changed(previous)
        self._generation += 1     # events about the proxy being stopped are stale from now on
        self._restart_token += 1  # and so is a restart's RestartStopped
        work, self._restart_work = self._restart_work, None
        if work is not None:
            work.stopping.set()
            if not drain:
                work.cut_drain.set()
            work.thread.join()    # it stops the old proxy; once it returns, that one is gone
        child, self._child = self._child, None
        if child is not None and not child.poll():
            terminate(child, self.spec, drain)
        for old in self._retiring:
            if not old.poll():
                terminate(old, self.spec, drain=False)
        self._retiring.clear()
        run_commands(self.spec, self.spec.post_stop, "post-stop")
        adopt.remove_pidfile(self.layout.sidecar_pidfile)
        previous = self.state
        self.machine.stopped()
        self._changed(previous)

    # -- internals
    def _changed(self, previous: State) -> None:
        if self.state is previous:
            return
        level = logging.ERROR if self.state is State.FATAL else logging.INFO
        log.log(level, "sidecar %s -> %s: %s", previous.value, self.state.value, self.reason)
        self._post(SidecarStateChanged(self.state, previous, self.reason, self.pid))

    def _begin_restart_work(self, child: Child | None, retiring: list[Child], old_spec: LaunchSpec,
                            drain: bool) -> None:
        """Start the worker that stops `child` (run under old_spec) and prepares self.spec's start.
        It only reads what it is given and posts one RestartStopped."""
        self._restart_token += 1
        token, new_spec, post = self._restart_token, self.spec, self._post
        stopping, cut_drain = threading.Event(), threading.Event()

        def run() -> None:
            try:
                if child is not None and not child.poll():
                    terminate(child, old_spec, drain, cut_drain)
                for old in retiring:
                    if not old.poll():
                        terminate(old, old_spec, drain=False)
                if stopping.is_set():
                    return   # stop() took over: it runs the post-stop commands itself
                run_commands(old_spec, old_spec.post_stop, "post-stop")
                found = ports.conflicts(new_spec.ports)
                if found:
                    post(RestartStopped(token, conflict=ports.describe_conflicts(found)))
                elif not run_commands(new_spec, new_spec.pre_start, "pre-start"):
                    post(RestartStopped(token, failed="pre-start command failed"))
                else:
                    post(RestartStopped(token))
            except Exception as exc:
                # Always answer: without RestartStopped the supervisor would stay RESTARTING.
                log.exception("sidecar restart failed")
                post(RestartStopped(token, failed=f"restart failed: {exc}"))

        thread = threading.Thread(target=run, daemon=True, name=f"sidecar-restart-{token}")
        self._restart_work = _RestartWork(token, new_spec, thread, stopping, cut_drain)
        thread.start()

    def _restart_stopped(self, event: RestartStopped) -> None:
        work = self._restart_work
        if work is None or event.restart != work.token or self.state is not State.RESTARTING:
            return  # a stop (or start over) came since
        self._restart_work = None
        if work.spec is not self.spec:
            # A newer spec came while the old proxy was stopped: prepare its start instead.
            self._begin_restart_work(None, [], work.spec, drain=False)
            return
        now = self._clock()
        if self.machine.restart_stopped(now) is not Action.SPAWN:
            return
        self._changed(State.RESTARTING)
        if event.conflict is not None:
            self.machine.fatal(event.conflict)
        elif event.failed is not None:
            self.machine.spawn_failed(now, event.failed)
        else:
            self._spawn(now)
            return
        self._changed(State.STARTING)

    def _launch(self, now: float, hot: bool = False) -> None:
        """Check the ports, run the pre-start commands and spawn (hot: only spawn the next epoch)."""
        spec = self.spec
        if not hot:
            self._end_retiring()
            self._epoch = 0
            conflicts = ports.conflicts(spec.ports)
            if conflicts:
                self.machine.fatal(ports.describe_conflicts(conflicts))
                self._changed(State.STARTING)
                return
            if not run_commands(spec, spec.pre_start, "pre-start"):
                self.machine.spawn_failed(now, "pre-start command failed")
                self._changed(State.STARTING)
                return
        self._spawn(now)

    def _spawn(self, now: float) -> None:
        spec = self.spec
        self._generation += 1
        gen = self._generation
        argv = adopt.with_epoch(spec.argv, self._epoch)
        try:
            child = spawn(spec, self.layout, argv)
        except (KeyError, PermissionError, FileNotFoundError) as exc:
            # Unknown user, not allowed to switch users, missing binary: retrying will not help.
            what = f"unknown user {spec.user}" if isinstance(exc, KeyError) else str(exc)
            self.machine.fatal(f"cannot start {argv[0]}: {what}")
            self._changed(State.STARTING)
            return
        except OSError as exc:
            self.machine.spawn_failed(now, f"cannot start {argv[0]}: {exc}")
            self._changed(State.STARTING)
            return
        self._child = child
        log.info("sidecar started: pid %d, %s", child.pid, describe(spec))
        adopt.record_process(self.layout.sidecar_pidfile, child.pid, argv, spec.profile)
        self._watch(gen, child, wait_ready=True, epoch=self._epoch)

    def _end_retiring(self) -> None:
        """Stop what is left of earlier hot-restart epochs (they normally exit by themselves)."""
        for old in self._retiring:
            kill_now(old)
        self._retiring.clear()

    def _watch(self, gen: int, child: Child, wait_ready: bool, epoch: int = 0) -> None:
        spec = self.spec
        expect = expected_ready_body(spec)

        def ready() -> bool:
            if not probe_ready(spec.readiness_url, expect):
                return False
            # After a hot restart the admin port may still be the previous epoch's for a moment.
            return epoch == 0 or server_epoch(spec) == epoch

        policy = self.machine.policy

        def live() -> bool:
            return probe_ready(spec.readiness_url, expect, timeout=policy.liveness_timeout)

        watch(child, gen, self._post, ready if wait_ready else None, live, policy.liveness_period)

    def _adopt_or_clean(self) -> bool:
        """Find proxies left by a killed agent: adopt one that is ours and healthy, stop the rest."""
        spec = self.spec
        found = adopt.adopt_or_clean(spec, self.layout.sidecar_pidfile)
        if found is None:
            return False
        self._generation += 1
        self._child = Child.of_process(found)
        with contextlib.suppress(psutil.Error):
            self._epoch = adopt.epoch_of(found.cmdline())
        adopt.record_process(self.layout.sidecar_pidfile, found.pid, adopt.with_epoch(spec.argv, self._epoch),
                             spec.profile)
        log.info("adopted the running sidecar: pid %d", found.pid)
        self._watch(self._generation, self._child, wait_ready=False)
        return True
