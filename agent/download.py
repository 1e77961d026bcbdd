"""The one way the agent downloads over HTTP(S) (the bundle, the sidecar package): requests, with an
overall deadline and a size cap on top of its per-operation timeouts.

requests' timeouts bound the connect and each gap between bytes, not the whole transfer: a server that
trickles a byte every few seconds keeps a download going forever. A Deadline watches every socket its
session opens (the connection class's `_new_conn`, before TLS), and when the time is up it shuts them
down, so whatever read is blocked (TLS handshake, status line, headers, body) returns at once; the
caller then sees `deadline.expired` and reports that, not the broken read it caused."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


class DownloadTooLarge(Exception):
    """The body is larger than allowed."""


class Deadline:
    """An overall time limit on one fetch (all its attempts). Use as a context manager: its sockets are
    cut when the time is up, and released when it ends."""

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

    def track(self, sock: socket.socket) -> None:
        """Watch a new connection. A duplicate of its descriptor is kept: TLS wraps (and detaches) the
        socket object, but shutting down any descriptor of the connection ends it for all."""
        dup = sock.dup()
        with self._lock:
            if not self.expired:
                self._socks.append(dup)
                return
        _shut(dup)
        dup.close()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for s in socks:
            _shut(s)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def session(deadline: Deadline) -> Any:
    """A requests.Session whose connections the deadline can cut; no proxies or netrc from the
    environment."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def tracked(base: type) -> type:
        class Tracked(base):
            def _new_conn(self) -> socket.socket:
                sock = super()._new_conn()
                deadline.track(sock)
                return sock
        return Tracked

    class Pool(HTTPConnectionPool):
        ConnectionCls = tracked(HTTPConnection)

    class TLSPool(HTTPSConnectionPool):
        ConnectionCls = tracked(HTTPSConnection)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

    s = requests.Session()
    s.trust_env = False
    adapter = Adapter(max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


def body_chunks(resp: Any, max_size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """The response body in chunks, refusing more than max_size bytes (DownloadTooLarge)."""
    size = 0
    for part in resp.iter_content(chunk):
        size += len(part)
        if size > max_size:
            raise DownloadTooLarge(f"the body is larger than {max_size} bytes")
        yield part
