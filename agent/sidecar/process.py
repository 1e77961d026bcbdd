"""The supervised sidecar proxy: start, readiness, restart with backoff, crash-loop, drain and stop.

How the daemon uses it (everything runs on the daemon's loop thread; one helper thread per proxy
polls its readiness and waits for its exit, and only posts events):

    sup = Supervisor(spec, layout, post)      # spec from agent.sidecar.profiles.read_spec()
    sup.start()                               # adopt a healthy proxy left by a killed agent, or spawn
    ...
    # in the loop, for every event read from the queue:
    sup.handle(event)                         # ProxyReady / ProxyExited -> True; anything else -> False
    deadline = sup.tick()                     # drives backoff and the ready timeout; None: no timer
    if sup.state is State.FATAL:              # crash loop or port conflict: sup.reason says why
        exit non-zero
    ...
    sup.hot_restart(new_spec)                 # envoy profile, bootstrap changed: next epoch takes over
    sup.stop(drain=True)                      # blocking: at most drain_timeout + stop_grace + ~5 s,
                                              # plus the istio profile's iptables cleanup

Every state change is also posted as a SidecarStateChanged event, for the status snapshot.

States: STOPPED -> STARTING -> RUNNING (ready); an exit -> BACKOFF (exponential with full jitter,
agent.retry.Backoff) -> STARTING; more than `max_exits` exits within `window` -> FATAL; not ready
within `ready_timeout` -> the proxy is killed, which counts as an exit. A needed port held by another
process -> FATAL at once with the port, pid and process name (restarting cannot fix it).
The decisions live in Machine (pure); Supervisor carries them out.

The proxy runs in its own process group. Its pid, start time and command line are kept in
Layout.sidecar_pidfile, so that the next agent finds a proxy left by a killed (or re-executed) agent:
it adopts it when it runs our command and is healthy, and stops it otherwise, so there are never two
proxies. A recycled pid (other start time) is never signalled.

Output: under systemd the proxy writes straight into the journal under its own identifier (`envoy`
or `istio-proxy`: `journalctl -t envoy`); with log_dir, to <log_dir>/<identifier>.log instead;
outside systemd, to the agent's stderr. Never through a pipe the agent reads, so a proxy that
outlives the agent keeps logging.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import psutil

from agent import manifest, proc
from agent.fsutil import atomic_write
from agent.paths import Layout
from agent.retry import Backoff
from agent.sidecar.profiles import MARKER_ENV, LaunchSpec, Policy, describe

log = logging.getLogger(__name__)
proxy_log = logging.getLogger("agent.sidecar.proxy")

# A proxy that stayed ready this long has recovered: its next exit starts the backoff from the bottom.
STABLE_AFTER = 10.0
READY_POLL = 0.02          # readiness is polled often while a start is usually done (Envoy: ~0.2 s) ...
READY_POLL_FAST_FOR = 2.0
READY_POLL_MAX = 0.5       # ... then less and less often, so a slow start costs little
PROBE_TIMEOUT = 1.0
KILL_WAIT = 5.0            # after SIGKILL, how long to wait for the exit to be seen
PORT_SETTLE = 1.0          # how long a port may stay held by a dying process before it is a conflict


# --- events (posted to the daemon's queue) ---------------------------------------------------------

@dataclass(frozen=True)
class ProxyReady:
    generation: int
    pid: int


@dataclass(frozen=True)
class ProxyExited:
    generation: int
    pid: int
    returncode: int | None     # None: an adopted proxy, whose status we cannot read


@dataclass(frozen=True)
class SidecarStateChanged:
    state: State
    previous: State
    reason: str
    pid: int | None


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


class Action(enum.Enum):
    NONE = "none"
    SPAWN = "spawn"
    KILL = "kill"


# --- the state machine (pure) --------------------------------------------------------------------

@dataclass
class Machine:
    """The supervision decisions, without any I/O: every transition is a method here."""
    policy: Policy
    backoff: Backoff
    state: State = State.STOPPED
    deadline: float | None = None    # BACKOFF: when to spawn; STARTING: when to give up waiting
    restarts: int = 0
    reason: str = ""
    ready_since: float | None = None
    exits: deque[float] = field(default_factory=deque)
    killed_because: str | None = None   # why we killed the proxy, told again when its exit arrives

    def _go(self, state: State, reason: str = "", deadline: float | None = None) -> None:
        self.state, self.reason, self.deadline = state, reason, deadline

    def start(self, now: float) -> Action:
        if self.state not in (State.STOPPED, State.FATAL):
            return Action.NONE
        self.exits.clear()
        self.backoff.reset()
        self._go(State.STARTING, "starting", now + self.policy.ready_timeout)
        return Action.SPAWN

    def adopted(self, now: float) -> None:
        self.ready_since = now
        self._go(State.RUNNING, "adopted the running proxy")

    def ready(self, now: float) -> None:
        if self.state is State.STARTING and self.killed_because is None:   # not one we just killed
            self.ready_since = now
            self._go(State.RUNNING, "ready")

    def exited(self, now: float, what: str) -> Action:
        if self.state not in (State.STARTING, State.RUNNING):
            return Action.NONE
        if self.killed_because:
            what, self.killed_because = f"{self.killed_because}: {what}", None
        if self.ready_since is not None and now - self.ready_since >= STABLE_AFTER:
            self.backoff.reset()
        self.ready_since = None
        self.exits.append(now)
        while self.exits and self.exits[0] < now - self.policy.window:
            self.exits.popleft()
        if len(self.exits) > self.policy.max_exits:
            self._go(State.FATAL, f"{what}; {len(self.exits)} exits within {self.policy.window:g}s "
                                  "(crash loop), giving up")
            return Action.NONE
        delay = self.backoff.next_delay()
        self._go(State.BACKOFF, f"{what}; restarting in {delay:.2f}s", now + delay)
        return Action.NONE

    def tick(self, now: float) -> Action:
        if self.deadline is None or now < self.deadline:
            return Action.NONE
        if self.state is State.BACKOFF:
            self.restarts += 1
            self._go(State.STARTING, f"restart {self.restarts}", now + self.policy.ready_timeout)
            return Action.SPAWN
        if self.state is State.STARTING:
            # The kill makes the proxy exit; that exit counts towards the crash loop.
            self.killed_because = f"not ready within {self.policy.ready_timeout:g}s"
            self._go(State.STARTING, self.killed_because)
            return Action.KILL
        return Action.NONE

    def hot_restarting(self, now: float, epoch: int) -> None:
        """RUNNING -> STARTING: the next Envoy epoch takes over from the running one."""
        self.ready_since = None
        self._go(State.STARTING, f"hot restart to epoch {epoch}", now + self.policy.ready_timeout)

    def spawn_failed(self, now: float, what: str) -> Action:
        """A start that failed before a process existed (pre-start command, exec error): an exit."""
        return self.exited(now, what)

    def fatal(self, reason: str) -> None:
        self._go(State.FATAL, reason)

    def stopping(self) -> None:
        self._go(State.STOPPING, "stopping")

    def stopped(self) -> None:
        self.ready_since = None
        self._go(State.STOPPED, "stopped")


# --- helpers: ports, pid file, readiness -----------------------------------------------------------

@dataclass(frozen=True)
class PortHolder:
    port: int
    pid: int | None
    name: str

    def __str__(self) -> str:
        who = f"pid {self.pid} ({self.name})" if self.pid else "a process the agent cannot see"
        return f"port {self.port} is already in use by {who}"


def busy_ports(ports: Sequence[int]) -> list[int]:
    """Ports someone listens on, by trying to bind them on the wildcard address (fast, no pids)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT does not count
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(port)
    return busy


def port_holders(ports: Sequence[int], exclude: Collection[int] = ()) -> list[PortHolder]:
    """Processes (other than `exclude`) listening on any of `ports` (TCP, any address)."""
    wanted = set(busy_ports(ports))
    if not wanted:
        return []   # the quick test found every port free: no need for the costlier socket scan
    found: dict[int, PortHolder] = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port not in wanted:
            continue
        if conn.pid is not None and conn.pid in exclude:
            continue
        name = "?"
        if conn.pid is not None:
            with contextlib.suppress(psutil.Error):
                name = psutil.Process(conn.pid).name()
        found.setdefault(conn.laddr.port, PortHolder(conn.laddr.port, conn.pid, name))
    return [found[p] for p in sorted(found)]


@dataclass(frozen=True)
class PidRecord:
    pid: int
    create_time: float
    argv: tuple[str, ...]
    profile: str


def write_pidfile(path: Path, record: PidRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({"pid": record.pid, "create_time": record.create_time,
                                    "argv": list(record.argv), "profile": record.profile}) + "\n").encode(), 0o644)


def read_pidfile(path: Path) -> PidRecord | None:
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), float(data["create_time"]), tuple(data["argv"]),
                         str(data["profile"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable sidecar pid file %s: %s", path, exc)
        return None


def probe_ready(url: str, expect_body: str | None = None, timeout: float = PROBE_TIMEOUT) -> bool:
    """One readiness GET: 200 (and, for Envoy's /ready, the body LIVE)."""
    parts = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        body = resp.read(256).decode(errors="replace").strip()
        return resp.status == 200 and (expect_body is None or body == expect_body)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def admin_request(spec: LaunchSpec, method: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
    host, port = spec.admin_address
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def active_requests(spec: LaunchSpec) -> int | None:
    """Sum of http.*.downstream_rq_active from Envoy's stats; None if the admin API did not answer."""
    try:
        status, text = admin_request(spec, "GET", "/stats?filter=downstream_rq_active$")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    total = 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        # http.admin.* counts this very stats request: only the proxy's own listeners matter.
        if name.startswith("http.") and not name.startswith("http.admin.") \
                and name.endswith(".downstream_rq_active"):
            with contextlib.suppress(ValueError):
                total += int(value.strip())
    return total


# --- the child process ---------------------------------------------------------------------------

class _Child:
    """A proxy we spawned (a Popen) or adopted (a psutil.Process, whose exit status we cannot read)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None,
                 process: psutil.Process | None = None) -> None:
        self.pid = pid
        self.popen = popen
        self.process = process

    def poll(self) -> bool:
        """True when the process has exited."""
        if self.popen is not None:
            return self.popen.poll() is not None
        assert self.process is not None
        try:
            return not self.process.is_running() or self.process.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def wait(self, timeout: float | None = None) -> tuple[bool, int | None]:
        """(exited, returncode) after waiting up to timeout seconds (None: forever)."""
        if self.popen is not None:
            try:
                return True, self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False, None
        # Not our child (adopted): its exit status is not ours to read, and whoever reaps it may be
        # slow, so a zombie counts as exited.
        end = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while not self.poll():
            if end is not None and time.monotonic() >= end:
                return False, None
            time.sleep(delay)
            delay = min(0.1, delay * 2)
        return True, None


def _output_for(spec: LaunchSpec, layout: Layout) -> tuple[int, IO[Any] | None]:
    """The proxy's stdout/stderr: (fd for the child, our copy to close after spawning).

    Never a pipe read by the agent: a proxy that outlives the agent (pilot-agent does; a plain
    Envoy does not, it asks for SIGTERM when its parent dies) must keep logging. So:
    <log_dir>/<identifier>.log when asked (appended, as istio-start.sh did); else, under systemd,
    a journal stream of its own identifier; else the agent's own stderr.
    """
    if spec.log_dir:
        try:
            target = Path(spec.log_dir) / f"{spec.identifier}.log"
            if not target.exists():  # the agent's own log: purge removes it (agent.manifest)
                try:
                    manifest.record(layout, dirs=manifest.missing_dirs(target.parent), logs=[target])
                except OSError as exc:
                    log.warning("cannot record %s for removal on purge: %s", target, exc)
            target.parent.mkdir(parents=True, exist_ok=True)
            f = open(target, "ab")  # noqa: SIM115
            return f.fileno(), f
        except OSError as exc:
            log.warning("cannot write the proxy's log under %s: %s", spec.log_dir, exc)
    journal = _journal_module() if _under_systemd() else None
    if journal is not None:
        try:
            stream = journal.stream(spec.identifier)
            return stream.fileno(), stream
        except OSError as exc:
            log.warning("cannot open a journal stream for the proxy: %s", exc)
    return 2, None   # the agent's stderr (not its stdout, which may be a pipe to its caller)


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("NOTIFY_SOCKET"))


def _journal_module() -> Any:
    try:
        from systemd import journal
    except ImportError:
        return None
    return journal


# --- the supervisor ------------------------------------------------------------------------------

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
        self._child: _Child | None = None
        self._epoch = 0                      # Envoy --restart-epoch of the current child
        self._retiring: list[_Child] = []    # earlier epochs, draining after a hot restart

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
        return self.machine.restarts

    @property
    def ready(self) -> bool:
        return self.machine.state is State.RUNNING

    def snapshot(self) -> dict[str, object]:
        """For the status file: what runs and how it is doing."""
        return {"profile": self.spec.profile, "state": self.state.value, "ready": self.ready,
                "pid": self.pid, "restarts": self.restarts, "reason": self.reason,
                "restart_epoch": self._epoch if self.spec.profile == "envoy" else None}

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
        """Apply a ProxyReady/ProxyExited event; True if the event was the supervisor's."""
        if not isinstance(event, ProxyReady | ProxyExited):
            return False
        if event.generation != self._generation or self._child is None:
            return True  # about a proxy we already gave up on or stopped
        now = self._clock()
        previous = self.state
        if isinstance(event, ProxyReady):
            self.machine.ready(now)
            if self.state is not previous:
                log.info("sidecar ready (pid %d)", event.pid)
        else:
            self._child = None
            self._remove_pidfile()
            proc.kill_group(event.pid, signal.SIGKILL)  # what is left of its group (pilot-agent's Envoy)
            self._end_retiring()   # a new epoch that failed: the next start is a fresh one
            what = _exit_text(event.pid, event.returncode)
            conflicts = self._port_conflicts()
            if conflicts:
                self.machine.fatal(f"{what}; {'; '.join(map(str, conflicts))}: free the port or "
                                   "change the proxy's ports")
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

    def hot_restart(self, spec: LaunchSpec | None = None) -> bool:
        """envoy profile: start the next --restart-epoch beside the running Envoy, which hands over
        its listeners without dropping connections, drains, and exits by itself after
        --parent-shutdown-time-s. Used to apply a changed bootstrap (pass the new spec when its
        ports changed). Returns False when not possible (another profile, not RUNNING, no
        --restart-epoch in the command): then stop() and start() instead."""
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
        """Drain (if asked), SIGTERM, SIGKILL after stop_grace; blocks for at most
        drain_timeout + stop_grace + KILL_WAIT, plus the post-stop commands."""
        previous = self.state
        if previous is State.STOPPED:
            return
        self.machine.stopping()
        self._changed(previous)
        self._generation += 1   # events about the proxy being stopped are stale from now on
        child, self._child = self._child, None
        if child is not None and not child.poll():
            self._terminate(child, drain)
        for old in self._retiring:
            if not old.poll():
                self._terminate(old, drain=False)
        self._retiring.clear()
        self._run_commands(self.spec.post_stop, "post-stop")
        self._remove_pidfile()
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

    def _launch(self, now: float, hot: bool = False) -> None:
        spec = self.spec
        if not hot:
            self._end_retiring()
            self._epoch = 0
            conflicts = self._port_conflicts()
            if conflicts:
                self.machine.fatal("; ".join(map(str, conflicts)) +
                                   ": free the port or change the proxy's ports")
                self._changed(State.STARTING)
                return
            if not self._run_commands(spec.pre_start, "pre-start"):
                self.machine.spawn_failed(now, "pre-start command failed")
                self._changed(State.STARTING)
                return
        self._generation += 1
        gen = self._generation
        argv = with_epoch(spec.argv, self._epoch)
        out_fd, ours = _output_for(spec, self.layout)
        try:
            popen = proc.spawn(argv, env=_child_env(spec), user=spec.user, cwd="/",
                               stdout=out_fd, stderr=subprocess.STDOUT)
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
        finally:
            if ours is not None:
                ours.close()  # the child has its own copy
        child = _Child(popen.pid, popen=popen)
        self._child = child
        log.info("sidecar started: pid %d, %s", popen.pid, describe(spec))
        with contextlib.suppress(psutil.Error, OSError):
            write_pidfile(self.layout.sidecar_pidfile, PidRecord(
                popen.pid, psutil.Process(popen.pid).create_time(), argv, spec.profile))
        self._watch(gen, child, wait_ready=True, epoch=self._epoch)

    def _end_retiring(self) -> None:
        """Stop what is left of earlier hot-restart epochs (they normally exit by themselves)."""
        for old in self._retiring:
            if not old.poll():
                proc.kill_group(old.pid, signal.SIGKILL)
                old.wait(KILL_WAIT)
        self._retiring.clear()

    def _port_conflicts(self) -> list[PortHolder]:
        """Other processes on our ports. A proxy that was just killed may hold its sockets for a
        moment while it is torn down: give that a second before calling it a conflict."""
        end = time.monotonic() + PORT_SETTLE
        while True:
            conflicts = port_holders(self.spec.ports)
            if not conflicts or time.monotonic() >= end:
                return conflicts
            time.sleep(0.05)

    def _watch(self, gen: int, child: _Child, wait_ready: bool, epoch: int = 0) -> None:
        spec = self.spec
        expect = "LIVE" if spec.profile == "envoy" and spec.readiness_url.endswith("/ready") else None

        def ready() -> bool:
            if not probe_ready(spec.readiness_url, expect):
                return False
            # After a hot restart the admin port may still be the previous epoch's for a moment.
            return epoch == 0 or server_epoch(spec) == epoch

        def run() -> None:
            if wait_ready:
                delay, fast_until = READY_POLL, time.monotonic() + READY_POLL_FAST_FOR
                while not child.poll():
                    if ready():
                        self._post(ProxyReady(gen, child.pid))
                        break
                    time.sleep(delay)
                    if time.monotonic() > fast_until:
                        delay = min(READY_POLL_MAX, delay * 1.5)
            _, code = child.wait()
            self._post(ProxyExited(gen, child.pid, code))

        threading.Thread(target=run, daemon=True, name=f"sidecar-watch-{gen}").start()

    def _adopt_or_clean(self) -> bool:
        """Find proxies left by a killed agent: adopt one that is ours and healthy, stop the rest."""
        spec = self.spec
        leftovers: list[psutil.Process] = []
        record = read_pidfile(self.layout.sidecar_pidfile)
        if record is not None:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(record.pid)
                # The start time guards against a recycled pid: never signal a stranger.
                if abs(p.create_time() - record.create_time) < 1.0 and _is_ours(p, record.argv):
                    leftovers.append(p)
        # Without a pid file (deleted, or never written), look for our command line, but only when
        # our ports are taken: a proxy that holds none of them is not serving anything.
        scan = psutil.process_iter(["cmdline"]) if busy_ports(spec.ports) else ()
        for p in scan:
            if same_command(p.info["cmdline"] or [], spec.argv) and p.pid != os.getpid() \
                    and all(p.pid != q.pid for q in leftovers):
                leftovers.append(p)
        adopted: psutil.Process | None = None
        # After a hot restart two epochs may be left: the newest is the one to keep.
        leftovers.sort(key=lambda p: -_epoch_of_process(p))
        expect = "LIVE" if spec.profile == "envoy" and spec.readiness_url.endswith("/ready") else None
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                if adopted is None and same_command(p.cmdline(), spec.argv) and _same_env(p, spec) \
                        and probe_ready(spec.readiness_url, expect):
                    adopted = p
                    continue
                log.warning("stopping a sidecar left by a previous run: pid %d (%s)", p.pid,
                            " ".join(p.cmdline())[:200])
                self._terminate(_Child(p.pid, process=p), drain=False)
        if adopted is None:
            self._remove_pidfile()
            return False
        self._generation += 1
        self._child = _Child(adopted.pid, process=adopted)
        with contextlib.suppress(psutil.Error):
            self._epoch = epoch_of(adopted.cmdline())
        with contextlib.suppress(psutil.Error, OSError):
            write_pidfile(self.layout.sidecar_pidfile, PidRecord(
                adopted.pid, adopted.create_time(), with_epoch(spec.argv, self._epoch), spec.profile))
        log.info("adopted the running sidecar: pid %d", adopted.pid)
        self._watch(self._generation, self._child, wait_ready=False)
        return True

    def _terminate(self, child: _Child, drain: bool) -> None:
        policy = self.spec.policy
        # Its descendants too (pilot-agent's Envoy): stopping ends when all of them are gone.
        members: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            members = psutil.Process(child.pid).children(recursive=True)
        if drain and self.spec.drain == "admin":
            self._drain_admin(self._clock() + policy.drain_timeout, child)
        # pilot-agent drains Envoy on SIGTERM and then stops it: signal the leader only, so Envoy
        # (in the same group) is not stopped behind pilot-agent's back. Plain Envoy: the group.
        if self.spec.drain == "signal":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child.pid, signal.SIGTERM)
        else:
            proc.kill_group(child.pid, signal.SIGTERM)
        exited, _ = child.wait(policy.stop_grace)
        if not exited:
            log.warning("sidecar pid %d still running %gs after SIGTERM; killing it", child.pid,
                        policy.stop_grace)
        # Kill whatever is left of the group (e.g. an Envoy whose pilot-agent died).
        proc.kill_group(child.pid, signal.SIGKILL)
        if not exited:
            child.wait(KILL_WAIT)
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()   # one that left the group
        end = time.monotonic() + KILL_WAIT
        while (still := [p for p in members if _alive(p)]) and time.monotonic() < end:
            time.sleep(0.02)
        if still:
            log.warning("sidecar processes still running after SIGKILL: %s", [p.pid for p in still])

    def _drain_admin(self, deadline: float, child: _Child) -> None:
        """Envoy: fail health checks, drain inbound listeners, wait for in-flight requests."""
        for path in ("/healthcheck/fail", "/drain_listeners?graceful&inboundonly"):
            try:
                status, body = admin_request(self.spec, "POST", path)
                if status != 200:
                    log.warning("sidecar drain: POST %s answered %d: %s", path, status, body.strip()[:200])
            except (OSError, http.client.HTTPException) as exc:
                log.warning("sidecar drain: POST %s failed: %s", path, exc)
                return
        while self._clock() < deadline and not child.poll():
            active = active_requests(self.spec)
            if active is None or active == 0:
                log.info("sidecar drained")
                return
            time.sleep(0.05)
        log.warning("sidecar drain timed out after %gs; stopping it anyway", self.spec.policy.drain_timeout)

    def _run_commands(self, commands: Sequence[Sequence[str]], what: str) -> bool:
        for argv in commands:
            result = proc.run(argv, timeout=30.0, env=_command_env(self.spec))
            if not result.ok:
                log.error("sidecar %s command %s exited %d: %s", what, " ".join(argv), result.returncode,
                          (result.stderr or result.stdout).strip()[-500:])
                return False
        return True

    def _remove_pidfile(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.layout.sidecar_pidfile.unlink()


def same_command(cmdline: Sequence[str], argv: Sequence[str]) -> bool:
    """A process's command line is argv (whatever its --restart-epoch), or an interpreter running
    argv (a `#!` script)."""
    cmdline, argv = list(with_epoch(cmdline, 0)), list(with_epoch(argv, 0))
    return cmdline == argv or (len(cmdline) == len(argv) + 1 and cmdline[1:] == argv)


def with_epoch(argv: Sequence[str], epoch: int) -> tuple[str, ...]:
    """argv with its --restart-epoch value replaced (unchanged without one)."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word == "--restart-epoch":
            out[i + 1] = str(epoch)
    return tuple(out)


def epoch_of(argv: Sequence[str]) -> int:
    words = list(argv)
    for i, word in enumerate(words[:-1]):
        if word == "--restart-epoch":
            with contextlib.suppress(ValueError):
                return int(words[i + 1])
    return 0


def server_epoch(spec: LaunchSpec) -> int | None:
    """The --restart-epoch of the Envoy answering on the admin port (GET /server_info)."""
    try:
        status, text = admin_request(spec, "GET", "/server_info")
        if status != 200:
            return None
        return int(json.loads(text)["command_line_options"]["restart_epoch"])
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return None


def _is_ours(p: psutil.Process, recorded_argv: Sequence[str]) -> bool:
    with contextlib.suppress(psutil.Error):
        if same_command(p.cmdline(), recorded_argv):
            return True
    with contextlib.suppress(psutil.Error):
        return MARKER_ENV in p.environ()
    return False


def _same_env(p: psutil.Process, spec: LaunchSpec) -> bool:
    """The process runs with the environment the spec would give it (e.g. cluster.env unchanged)."""
    try:
        env = p.environ()
    except psutil.AccessDenied:
        return True   # cannot tell (the agent is not root): the command line has to do
    except psutil.Error:
        return False
    return all(env.get(key) == value for key, value in spec.env.items())


def _epoch_of_process(p: psutil.Process) -> int:
    try:
        return epoch_of(p.cmdline())
    except psutil.Error:
        return -1


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _child_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(spec.env)
    if spec.user:
        # Like sudo: the target user's HOME, USER and LOGNAME.
        import pwd

        entry = pwd.getpwnam(spec.user)
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return env


def _command_env(spec: LaunchSpec) -> dict[str, str]:
    return dict(spec.env)


def _exit_text(pid: int, code: int | None) -> str:
    if code is None:
        return f"proxy pid {pid} exited"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"proxy pid {pid} killed by {signal.Signals(-code).name}"
    return f"proxy pid {pid} exited with status {code}"
