"""Which app ports are listening, which processes own them, and the moment an owner dies.

Cheap at rest: once per `interval` (1 s) while every port listens (`watched_interval`, by default the
same 1 s, while moreover every listening port's owners are watched through pidfds: their exit wakes the
watcher at once, so the scan then only has to catch a port closed by a process that lives on, or a
socket replaced; the agent keeps that within a second), it asks the kernel for the listening TCP
sockets (sock_diag over netlink, about 0.1 ms; reading /proc/net/tcp{,6} instead, the fallback, walks
every socket and costs milliseconds on a busy host) to learn their inodes. While a
watched port is not listening it asks every `down_interval` (50 ms) instead, so an app that comes
back is seen at once; that cost (about 0.5 % of a core) is paid only while the app is down, and only
for its first minute down (then every 250 ms; on the /proc fallback always 250 ms).
Only when a new listening inode appears does it look for its owners in /proc/*/fd, the costly step,
which it then skips until the listener changes. It waits on each owner's exit with a pidfd
(os.pidfd_open + poll, where the kernel has it), so a dead app is reported within milliseconds, not
at the next scan; where pidfds are not available it checks the owners' /proc entries every
`fallback_interval` instead.

An owner's exit is reported (OwnerExited) only when the port stopped listening with it: a worker
that dies while its siblings keep the shared socket is not the app's death.

Events, posted through `post` from the watcher's thread: ListenerUp, ListenerDown, OwnerExited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.health import listeners
from agent.health.listeners import find_owners, pidfd_exit_status, pidfd_supported, read_listeners, read_stat

log = logging.getLogger(__name__)

_MAX_OWNERS = 64  # pidfds kept per listener (e.g. pre-forked workers sharing one socket)
_SLOW_DOWN_INTERVAL = 0.25  # the down pace on the /proc fallback, and after a minute down
_FAST_FOR = 60.0  # how long after a port went down it is looked at every down_interval


@dataclass(frozen=True)
class ListenerUp:
    port: int
    pids: tuple[int, ...]  # its owners, () when they cannot be seen
    at: float


@dataclass(frozen=True)
class ListenerDown:
    port: int
    at: float


@dataclass(frozen=True)
class OwnerExited:
    pid: int
    name: str
    returncode: int | None  # as Popen's: exit status, or -N when killed by signal N; None: unknown
    ports: tuple[int, ...]  # the ports that stopped listening with it
    at: float


# --- the watcher ------------------------------------------------------------------------------------

@dataclass
class _Owner:
    pid: int
    name: str
    start_ticks: int
    pidfd: int | None
    ports: set[int] = field(default_factory=set)


@dataclass
class _Port:
    listening: bool | None = None  # None: not scanned yet
    inodes: frozenset[int] = frozenset()
    pids: set[int] = field(default_factory=set)
    owners_looked_at: float = float("-inf")


class PortWatch:
    """Watches ports and their owners in one thread; `post` gets the events."""

    def __init__(self, ports: Iterable[int], post: Callable[[object], None], *, interval: float = 1.0,
                 down_interval: float = 0.05, watch_process: bool = True, fallback_interval: float = 0.05,
                 owner_retry: float = 30.0, use_pidfd: bool | None = None,
                 watched_interval: float = 1.0) -> None:
        self._post = post
        self.interval = interval
        self.watched_interval = max(interval, watched_interval)
        self.down_interval = min(down_interval, interval)
        self._down_since: float | None = None  # since when a watched port has not been listening
        self.watch_process = watch_process
        self.fallback_interval = fallback_interval
        self.owner_retry = owner_retry
        self.use_pidfd = pidfd_supported() if use_pidfd is None else use_pidfd
        self._lock = threading.Lock()
        self._ports: dict[int, _Port] = {p: _Port() for p in dict.fromkeys(ports)}
        self._owners: dict[int, _Owner] = {}
        self._fd_to_pid: dict[int, int] = {}
        self._poller = select.poll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poller.register(self._wake_r, select.POLLIN)
        self._stop = threading.Event()
        self._rescan = False
        self._thread: threading.Thread | None = None
        self.scans = 0  # listener scans done (for the benchmark and status)
        self.owner_scans = 0

    # --- control (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        """Scan once (so the first events are posted before this returns), then watch in a thread."""
        self._scan()
        self._thread = threading.Thread(target=self._run, name="portwatch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for owner in list(self._owners.values()):
                self._unwatch(owner.pid)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def set_ports(self, ports: Iterable[int]) -> None:
        """Watch these ports from now on; new ones are reported at the next (immediate) scan."""
        with self._lock:
            wanted = list(dict.fromkeys(ports))
            for port in list(self._ports):
                if port not in wanted:
                    self._drop_port(port)
            for port in wanted:
                self._ports.setdefault(port, _Port())
            self._rescan = True
        self._wake()

    def snapshot(self) -> dict[int, dict[str, object]]:
        with self._lock:
            return {p: {"listening": s.listening, "pids": sorted(s.pids)} for p, s in self._ports.items()}

    # --- the thread -----------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        next_scan = time.monotonic() + self.interval
        while not self._stop.is_set():
            try:
                next_scan = self._step(next_scan)
            except Exception:  # keep watching whatever one bad read did
                log.exception("port watch failed; going on")
                self._stop.wait(self.interval)

    def _step(self, next_scan: float) -> float:
        """One round: scan if due, then wait for an owner's exit, a wake-up or the next scan."""
        now = time.monotonic()
        with self._lock:
            if self._rescan:
                self._rescan, next_scan = False, now
        if now >= next_scan:
            self._scan()
            next_scan = now + self._interval_now()
        with self._lock:
            polling = not self.use_pidfd and bool(self._owners)
        wait = max(0.0, next_scan - time.monotonic())
        if polling:
            wait = min(wait, self.fallback_interval)
        for fd, _ in self._poller.poll(wait * 1000):
            if fd == self._wake_r:
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 512):
                        pass
                continue
            with self._lock:
                pid = self._fd_to_pid.get(fd)
                if pid is not None:
                    self._owner_gone(pid)
        if polling:
            with self._lock:
                for owner in list(self._owners.values()):
                    st = read_stat(owner.pid)
                    if st is None or st.state == "Z" or st.start_ticks != owner.start_ticks:
                        self._owner_gone(owner.pid)
        # A port that went down with its owner is looked at again at the down pace from here on.
        return min(next_scan, time.monotonic() + self._interval_now())

    def _interval_now(self) -> float:
        """Until the next scan: short while a watched port is down (its return is awaited), else long.
        A port down for more than a minute (an app stopped on purpose) is looked at every 250 ms."""
        with self._lock:
            down = any(state.listening is not True for state in self._ports.values())
        now = time.monotonic()
        if not down:
            self._down_since = None
            return self.watched_interval if self._owners_watched() else self.interval
        if self._down_since is None:
            self._down_since = now
        fast = listeners.sock_diag_in_use() and now - self._down_since < _FAST_FOR
        return self.down_interval if fast else min(self.interval, max(self.down_interval, _SLOW_DOWN_INTERVAL))

    def _owners_watched(self) -> bool:
        """Every port's owners are known and each waited on with a pidfd: their exit wakes us."""
        if not (self.use_pidfd and self.watch_process):
            return False
        with self._lock:
            return all(state.pids and all(self._owners.get(pid) is not None
                                          and self._owners[pid].pidfd is not None for pid in state.pids)
                       for state in self._ports.values())

    def _scan(self) -> None:
        with self._lock:
            if not self._ports:
                return
            self.scans += 1
            now = time.monotonic()
            listeners = read_listeners(self._ports)
            for port, state in self._ports.items():
                inodes = frozenset(listeners.get(port, ()))
                if not inodes and state.pids:
                    # Closed as its owner dies (the scan came before the pidfd, or between two
                    # polls): report the exit, not just the port.
                    for pid in list(state.pids):
                        st = read_stat(pid)
                        if st is None or st.exiting:
                            self._owner_gone(pid)
                if not inodes:
                    if state.listening is not False:
                        self._set_down(port, state)
                        self._post(ListenerDown(port, now))
                    continue
                changed = inodes != state.inodes or state.listening is not True
                retry = (not state.pids and self.watch_process
                         and now - state.owners_looked_at >= self.owner_retry)
                if changed or retry:
                    was_up = state.listening is True and inodes == state.inodes
                    state.listening, state.inodes = True, inodes
                    self._resolve_owners(port, state, now)
                    if not was_up:
                        self._post(ListenerUp(port, tuple(sorted(state.pids)), now))

    def _resolve_owners(self, port: int, state: _Port, now: float) -> None:
        if not self.watch_process:
            return
        state.owners_looked_at = now
        self.owner_scans += 1
        found: set[int] = set()
        for pids in find_owners(set(state.inodes)).values():
            found |= pids
        for pid in state.pids - found:
            self._release(pid, port)
        state.pids = set(sorted(found)[:_MAX_OWNERS])
        for pid in state.pids:
            self._watch(pid, port)

    def _watch(self, pid: int, port: int) -> None:
        owner = self._owners.get(pid)
        if owner is None:
            st = read_stat(pid)
            if st is None:
                return
            pidfd = None
            if self.use_pidfd:
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    return  # gone already: the next scan sees its port closed
                except OSError as exc:
                    log.info("cannot open a pidfd for %d (%s); polling it instead", pid, exc.strerror)
                    self.use_pidfd = False
            owner = _Owner(pid, st.name, st.start_ticks, pidfd)
            self._owners[pid] = owner
            if pidfd is not None:
                self._fd_to_pid[pidfd] = pid
                self._poller.register(pidfd, select.POLLIN)
        owner.ports.add(port)

    def _release(self, pid: int, port: int) -> None:
        owner = self._owners.get(pid)
        if owner is not None:
            owner.ports.discard(port)
            if not owner.ports:
                self._unwatch(pid)

    def _unwatch(self, pid: int) -> None:
        owner = self._owners.pop(pid, None)
        if owner is not None and owner.pidfd is not None:
            self._fd_to_pid.pop(owner.pidfd, None)
            with contextlib.suppress(KeyError):
                self._poller.unregister(owner.pidfd)
            os.close(owner.pidfd)

    def _drop_port(self, port: int) -> None:
        state = self._ports.pop(port)
        for pid in list(state.pids):
            self._release(pid, port)

    def _set_down(self, port: int, state: _Port) -> None:
        for pid in list(state.pids):
            self._release(pid, port)
        state.listening, state.inodes, state.pids = False, frozenset(), set()

    def _owner_gone(self, pid: int) -> None:
        """An owner exited: the app died if a port it held is no longer listening."""
        owner = self._owners.get(pid)
        if owner is None:
            return
        returncode = self._exit_code(owner)
        self._unwatch(pid)
        now = time.monotonic()
        listeners = read_listeners(owner.ports)
        closed: list[int] = []
        for port in sorted(owner.ports):
            state = self._ports.get(port)
            if state is None:
                continue
            state.pids.discard(pid)
            inodes = frozenset(listeners.get(port, ()))
            if not inodes:
                self._set_down(port, state)
                closed.append(port)
            elif not state.pids or inodes != state.inodes:
                # Someone else still holds the socket (an inherited fd, a new listener): find them.
                state.inodes = inodes
                self._resolve_owners(port, state, now)
        if closed:
            self._post(OwnerExited(pid, owner.name, returncode, tuple(closed), now))
        else:
            log.debug("process %d (%s) exited; its ports are still listening", pid, owner.name)

    @staticmethod
    def _exit_code(owner: _Owner) -> int | None:
        """The exit status: from /proc while the process awaits its parent, else (Linux >= 6.15)
        from the pidfd once the parent has reaped it; None when neither can tell."""
        st = read_stat(owner.pid)
        if (st is not None and st.state == "Z" and st.start_ticks == owner.start_ticks
                and st.exit_status is not None):
            return os.waitstatus_to_exitcode(st.exit_status)
        if owner.pidfd is not None:
            status = pidfd_exit_status(owner.pidfd)
            if status is not None:
                return os.waitstatus_to_exitcode(status)
        return None
