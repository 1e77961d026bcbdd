"""The overall deadline (agent.deadline) on urllib3's own pools against a loopback HTTP server that
answers at once or trickles: a trickle is cut whether the connection is new or pooled, a connection
that went back to its pool is never cut by the deadline it served, and a cut request is not retried."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from agent import deadline as D

BODY = b"x" * 60  # trickled at a byte a second: a minute


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.connections += 1
        while True:
            line = self.rfile.readline()
            if not line:
                return
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            trickle = self.server.modes.pop(0) if self.server.modes else False
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
            try:
                if not trickle:
                    self.wfile.write(head + BODY)
                    continue
                self.wfile.write(head)
                for i in range(len(BODY)):
                    if self.server.stopping.wait(1.0):
                        return
                    self.wfile.write(BODY[i:i + 1])
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.modes: list[bool] = []   # per request, in order: True trickles it
        self.connections = 0
        self.stopping = threading.Event()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    try:
        yield s
    finally:
        s.stopping.set()
        s.shutdown()
        s.server_close()


def _pool(**kwargs: Any) -> urllib3.PoolManager:
    pm = urllib3.PoolManager(**kwargs)
    D.track_pool_manager(pm)
    return pm


def _get(pm: urllib3.PoolManager, server: _Server, seconds: float) -> tuple[Any, D.Deadline]:
    """One GET under a deadline of `seconds`; (the response or the exception, the deadline)."""
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with D.Deadline(seconds) as deadline, D.scope(deadline):
        try:
            return pm.request("GET", url, timeout=urllib3.Timeout(connect=5, read=5), retries=False), deadline
        except Exception as exc:  # what the cut looks like to the caller
            return exc, deadline


def test_a_trickle_on_a_new_connection_is_cut(server: _Server) -> None:
    pm = _pool()
    server.modes = [True]
    started = time.monotonic()
    out, deadline = _get(pm, server, 1.0)
    assert time.monotonic() - started < 20  # the trickle alone would take a minute
    assert isinstance(out, Exception) and deadline.expired


def test_a_trickle_on_a_pooled_connection_is_cut(server: _Server) -> None:
    pm = _pool()
    server.modes = [False, True]
    first, _ = _get(pm, server, 10.0)
    assert first.status == 200 and first.data == BODY
    started = time.monotonic()
    out, deadline = _get(pm, server, 1.0)
    assert time.monotonic() - started < 20
    assert isinstance(out, Exception) and deadline.expired
    assert server.connections == 1  # it was the pooled connection that the deadline cut


def test_a_deadline_that_fires_after_its_request_leaves_the_pooled_connection_alone(server: _Server) -> None:
    pm = _pool()
    server.modes = [False, False]
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with D.Deadline(0.3) as deadline, D.scope(deadline):
        assert pm.request("GET", url, retries=False).data == BODY
        end = time.monotonic() + 10  # the deadline fires here, with the connection back in the pool
        while not deadline.expired and time.monotonic() < end:
            time.sleep(0.05)
        assert deadline.expired
    second, later = _get(pm, server, 10.0)
    assert second.status == 200 and second.data == BODY and not later.expired
    assert server.connections == 1  # the same connection served both: nothing was cut or dropped


def test_a_cut_request_is_not_retried(server: _Server) -> None:
    pm = _pool(retries=D.retry(total=1, connect=1, read=1, status=0, redirect=0, other=0))
    server.modes = [True, True]
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with D.Deadline(1.0) as deadline, D.scope(deadline), pytest.raises(urllib3.exceptions.HTTPError):
        pm.request("GET", url, timeout=urllib3.Timeout(connect=5, read=5))
    assert deadline.expired and server.connections == 1


def test_a_request_outside_any_scope_is_not_tracked(server: _Server) -> None:
    pm = _pool()
    server.modes = [False]
    resp = pm.request("GET", f"http://127.0.0.1:{server.server_address[1]}/", retries=False)
    assert resp.data == BODY
    assert D.current() is None


def test_scopes_nest_and_restore() -> None:
    outer, inner = D.Deadline(60), D.Deadline(60)
    assert D.current() is None
    with D.scope(outer):
        with D.scope(inner):
            assert D.current() is inner
        assert D.current() is outer
    assert D.current() is None


def test_expiry_shuts_tracked_sockets_and_release_keeps_them() -> None:
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    with D.Deadline(0.2) as deadline:
        kept = deadline.track(a)
        cut = deadline.track(b)
        assert kept is not None and cut is not None
        deadline.release(kept)
        end = time.monotonic() + 10
        while not deadline.expired and time.monotonic() < end:
            time.sleep(0.05)
        assert deadline.expired
        assert b_peer.recv(1) == b""      # the peer sees the connection end
        a.sendall(b"!")                   # the released one still works
        assert a_peer.recv(1) == b"!"
        late, late_peer = socket.socketpair()
        assert deadline.track(late) is None  # tracked after expiry: cut at once
        assert late_peer.recv(1) == b""
    for s in (a, a_peer, b, b_peer, late, late_peer):
        s.close()
