"""The one overall deadline on network work through urllib3: a download (agent.download) or a Kubernetes
API call (agent.kube.client).

A client's timeouts bound the connect and each gap between bytes, not the whole exchange: a server (or
anything in the path) that trickles a byte every few seconds holds a request forever. A Deadline watches
the sockets of the requests made under it, and when the time is up it shuts them down, so whatever read
is blocked (TLS handshake, status line, headers, body) returns at once; the caller then sees `expired`
and reports that, not the broken read it caused.

The sockets are found through urllib3's pool classes (tracked_pools), which every generation of urllib3
the agent runs with has: a new connection's socket is tracked in the connection's `_new_conn` (before
TLS), a pooled one's when the pool hands it out (`_get_conn`), and it is released when the pool takes it
back (`_put_conn`), so a deadline that fires later never cuts a connection another request now uses. Which
deadline a request belongs to is `current()`: the one the thread entered with `scope`, or the one a
session's pools were made for."""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

# The attribute under which a tracked urllib3 connection keeps (its deadline, the tracked descriptor).
_HANDLE = "_mesh_agent_deadline"


class Deadline:
    """An overall time limit on one piece of work (all its requests and attempts). Use as a context
    manager: its sockets are cut when the time is up, and released when it ends."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def track(self, sock: Any) -> socket.socket | None:
        """Watch a connection's socket; the handle to release it with (None when it could not be watched).
        A duplicate of its descriptor is kept: TLS wraps (and detaches) the socket object, but shutting
        down any descriptor of the connection ends it for all. Cut at once when the time is already up."""
        try:
            dup = socket.socket(fileno=_dup_fd(sock))
        except (OSError, ValueError, AttributeError):
            return None
        with self._lock:
            if not self.expired:
                self._socks.append(dup)
                return dup
            _shut(dup)
        dup.close()
        return None

    def release(self, handle: socket.socket) -> None:
        """Stop watching a connection (it went back to its pool, for another request)."""
        with self._lock:
            if handle not in self._socks:
                return
            self._socks.remove(handle)
            handle.close()  # under the lock: never while _expire shuts it down

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                _shut(s)  # under the lock: a descriptor released meanwhile is never reused here


def _dup_fd(sock: Any) -> int:
    import os

    return os.dup(sock.fileno())


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- which deadline a request runs under ------------------------------------------------------------

_local = threading.local()


def current() -> Deadline | None:
    """The deadline this thread's requests run under now (scope), or None."""
    return getattr(_local, "deadline", None)


@contextlib.contextmanager
def scope(deadline: Deadline) -> Iterator[Deadline]:
    """Requests this thread makes inside are cut by `deadline` (nested scopes: the innermost)."""
    previous = current()
    _local.deadline = deadline
    try:
        yield deadline
    finally:
        _local.deadline = previous


# --- urllib3's pools, tracked -----------------------------------------------------------------------

def _track(conn: Any, sock: Any, pick: Callable[[], Deadline | None]) -> None:
    _untrack(conn)
    deadline = pick()
    if deadline is None or sock is None:
        return
    handle = deadline.track(sock)
    if handle is not None:
        setattr(conn, _HANDLE, (deadline, handle))


def _untrack(conn: Any) -> None:
    held = getattr(conn, _HANDLE, None)
    if held is not None:
        setattr(conn, _HANDLE, None)
        held[0].release(held[1])


def tracked_pools(pools: Mapping[str, type], pick: Callable[[], Deadline | None] = current) -> dict[str, type]:
    """urllib3 pool classes (scheme -> class, as a PoolManager's `pool_classes_by_scheme`) whose
    connections are watched by the deadline `pick()` names when a request takes them. Subclasses of the
    pools given, so whatever they are (plain, SOCKS) they stay."""

    def connection(base: type) -> type:
        class Tracked(base):
            def _new_conn(self) -> Any:
                sock = super()._new_conn()
                _track(self, sock, pick)
                return sock
        Tracked.__name__ = f"Tracked{base.__name__}"
        return Tracked

    def pool(base: type) -> type:
        class TrackedPool(base):
            ConnectionCls = connection(base.ConnectionCls)  # type: ignore[attr-defined]

            def _get_conn(self, *args: Any, **kwargs: Any) -> Any:
                conn = super()._get_conn(*args, **kwargs)
                if conn is not None and getattr(conn, "sock", None) is not None:  # a pooled connection
                    _track(conn, conn.sock, pick)
                return conn

            def _put_conn(self, conn: Any) -> None:
                if conn is not None:
                    _untrack(conn)
                super()._put_conn(conn)
        TrackedPool.__name__ = f"Tracked{base.__name__}"
        return TrackedPool

    return {scheme: pool(cls) for scheme, cls in pools.items()}


def track_pool_manager(pool_manager: Any, pick: Callable[[], Deadline | None] = current) -> None:
    """Make a urllib3 PoolManager's future pools tracked (its existing ones are dropped: none yet)."""
    pool_manager.clear()
    pool_manager.pool_classes_by_scheme = tracked_pools(pool_manager.pool_classes_by_scheme, pick)


def retry(**kwargs: Any) -> Any:
    """A urllib3 Retry (these arguments) that gives up at once when the request's deadline has cut it:
    a retry then could only fail again, after a needless warning in the log."""
    return _retry_class()(**kwargs)


@functools.cache
def _retry_class() -> type:
    from urllib3.exceptions import MaxRetryError
    from urllib3.util.retry import Retry

    class DeadlineRetry(Retry):
        def increment(self, method: Any = None, url: Any = None, response: Any = None, error: Any = None,
                      _pool: Any = None, _stacktrace: Any = None) -> Any:
            deadline = current()
            if deadline is not None and deadline.expired:
                raise MaxRetryError(_pool, url, error) from error
            return super().increment(method, url, response, error, _pool, _stacktrace)

    return DeadlineRetry
