"""The proxy as a process: spawning it with its output, waiting for it, and stopping it.

Output: under systemd the proxy writes straight into the journal under its own identifier (`envoy`
or `istio-proxy`: `journalctl -t envoy`); with log_dir, to <log_dir>/<identifier>.log instead;
outside systemd, to the agent's stderr. Never through a pipe the agent reads, so a proxy that
outlives the agent keeps logging.

Nothing here keeps state between calls: the Supervisor owns the children. The threads started here
(watch) and the restart worker that calls terminate() only wait, signal and post events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from agent import manifest, proc
from agent.paths import Layout
from agent.sidecar import envoy_admin
from agent.sidecar.machine import ProxyExited, ProxyLiveness, ProxyReady
from agent.sidecar.profiles import LaunchSpec

log = logging.getLogger(__name__)

KILL_WAIT = 5.0            # after SIGKILL, how long to wait for the exit to be seen
READY_POLL = 0.005         # readiness is polled often while a start is usually done (Envoy: 60-200 ms) ...
READY_POLL_FAST_FOR = 1.0
READY_POLL_MAX = 0.5       # ... then less and less often, so a slow start costs little
COMMAND_TIMEOUT = 30.0     # each pre-start / post-stop command


class Child:
    """A proxy we spawned (a Popen) or adopted (a psutil.Process, whose exit status we cannot read)."""

    def __init__(self, pid: int, name: str, popen: subprocess.Popen[bytes] | None = None,
                 process: psutil.Process | None = None) -> None:
        self.pid = pid
        self.name = name       # for messages: `process 1234 (envoy) exited ...`
        self.popen = popen
        self.process = process

    @classmethod
    def of_process(cls, process: psutil.Process) -> Child:
        """A proxy we did not start (left by an earlier agent)."""
        name = ""
        with contextlib.suppress(psutil.Error):
            name = process.name()
        return cls(process.pid, name, process=process)

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


def spawn(spec: LaunchSpec, layout: Layout, argv: Sequence[str]) -> Child:
    """Start the proxy in its own process group. Raises as agent.proc.spawn does (KeyError: unknown
    user; OSError: cannot exec)."""
    out_fd, ours = output_for(spec, layout)
    try:
        popen = proc.spawn(argv, env=child_env(spec), user=spec.user, cwd="/",
                           stdout=out_fd, stderr=subprocess.STDOUT)
    finally:
        if ours is not None:
            ours.close()  # the child has its own copy
    return Child(popen.pid, Path(argv[0]).name, popen=popen)


def terminate(child: Child, spec: LaunchSpec, drain: bool, cut_short: threading.Event | None = None) -> None:
    """Drain (if asked), SIGTERM, SIGKILL after stop_grace; returns once the proxy and what it
    started are gone (or KILL_WAIT after SIGKILL passed). Setting `cut_short` ends a drain early."""
    policy = spec.policy
    # Its descendants too (pilot-agent's Envoy): stopping ends when all of them are gone.
    members: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        members = psutil.Process(child.pid).children(recursive=True)
    if drain and spec.drain == "admin":
        envoy_admin.drain(spec, time.monotonic() + policy.drain_timeout,
                          lambda: child.poll() or (cut_short is not None and cut_short.is_set()))
    # pilot-agent drains Envoy on SIGTERM and then stops it: signal the leader only, so Envoy
    # (in the same group) is not stopped behind pilot-agent's back. Plain Envoy: the group.
    if spec.drain == "signal":
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


def watch(child: Child, generation: int, post: Callable[[object], None],
          ready: Callable[[], bool] | None, live: Callable[[], bool] | None = None, period: float = 0.0) -> None:
    """A thread that polls ready() until it holds (posting ProxyReady), then asks live() every `period`
    seconds (posting ProxyLiveness when the count of failures in a row changes) until the exit (posting
    ProxyExited). ready None: an adopted, already ready proxy; live None or period 0: no asking."""
    def run() -> None:
        if ready is not None:
            delay, fast_until = READY_POLL, time.monotonic() + READY_POLL_FAST_FOR
            while not child.poll():
                if ready():
                    post(ProxyReady(generation, child.pid))
                    break
                time.sleep(delay)
                if time.monotonic() > fast_until:
                    delay = min(READY_POLL_MAX, delay * 1.5)
        if live is not None and period > 0:
            keep_asking(child, generation, post, live, period)
        _, code = child.wait()
        post(ProxyExited(generation, child.pid, code))

    threading.Thread(target=run, daemon=True, name=f"sidecar-watch-{generation}").start()


def keep_asking(child: Child, generation: int, post: Callable[[object], None], live: Callable[[], bool],
                period: float) -> None:
    """Ask live() every `period` seconds until the proxy exits. The wait is a poll on a pidfd, so an
    idle proxy costs one wake-up a period and its exit ends the wait at once."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:  # gone already, or no pidfds (Linux < 5.3): only its exit is waited for
        return
    failures = 0
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll(period * 1000):
            if live():
                if failures:
                    failures = 0
                    post(ProxyLiveness(generation, 0))
            else:
                failures += 1
                post(ProxyLiveness(generation, failures))
    finally:
        os.close(pidfd)


def kill_now(child: Child) -> None:
    """SIGKILL the whole group and wait briefly (what is left of an earlier hot-restart epoch)."""
    if not child.poll():
        proc.kill_group(child.pid, signal.SIGKILL)
        child.wait(KILL_WAIT)


def run_commands(spec: LaunchSpec, commands: Sequence[Sequence[str]], what: str) -> bool:
    """The profile's pre-start or post-stop commands (istio-iptables), in order; False at the first
    that fails."""
    for argv in commands:
        result = proc.run(argv, timeout=COMMAND_TIMEOUT, env=dict(spec.env))
        if not result.ok:
            log.error("sidecar %s command %s exited %d: %s", what, " ".join(argv), result.returncode,
                      (result.stderr or result.stdout).strip()[-500:])
            return False
    return True


def output_for(spec: LaunchSpec, layout: Layout) -> tuple[int, IO[Any] | None]:
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


def child_env(spec: LaunchSpec) -> dict[str, str]:
    env = dict(spec.env)
    if spec.user:
        # Like sudo: the target user's HOME, USER and LOGNAME.
        import pwd

        entry = pwd.getpwnam(spec.user)
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    return env


def _under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("NOTIFY_SOCKET"))


def _journal_module() -> Any:
    try:
        from systemd import journal
    except ImportError:
        return None
    return journal


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
