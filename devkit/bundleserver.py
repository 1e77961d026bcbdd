"""A real HTTPS bundle server on loopback, with its own CA (trustme), for fetch tests, the demo and the benchmark.

Paths choose the behaviour: /bundle.tar.gz (200 with ETag and Last-Modified, 304 when they match),
/status/<code>, /flaky (503 with Retry-After, then 200), /slow, /truncated, /oversize, /chunked-oversize,
/redirect, /trickle (a body of 1 MB, one byte every `trickle_every` seconds) and /trickle-headers (the
same with an endless header). With `token` set, every request needs `Authorization: Bearer <token>` (else 401).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme

LAST_MODIFIED = "Wed, 25 Nov 2026 10:00:00 GMT"


@dataclass
class ServerState:
    body: bytes = b""
    etag: str = '"v1"'
    token: str | None = None
    slow_seconds: float = 3.0
    oversize: int = 0
    trickle_every: float = 0.2
    trickled: int = 0  # bytes sent by the trickling paths
    hits: dict[str, int] = field(default_factory=dict)
    headers_seen: list[dict[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        st = self.server.state
        path = self.path.split("?")[0]
        st.hits[path] = st.hits.get(path, 0) + 1
        st.headers_seen.append(dict(self.headers.items()))
        if st.token is not None and self.headers.get("Authorization") != f"Bearer {st.token}":
            return self._send(401, b"no")
        if path == "/bundle.tar.gz":
            inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
            if inm == st.etag or (inm is None and ims == LAST_MODIFIED):
                return self._send(304)
            return self._send(200, st.body, {"ETag": st.etag, "Last-Modified": LAST_MODIFIED,
                                             "Content-Type": "application/gzip"})
        if path.startswith("/status/"):
            return self._send(int(path.rsplit("/", 1)[1]), b"status")
        if path == "/flaky":
            if st.hits[path] == 1:
                return self._send(503, b"busy", {"Retry-After": "0.05"})
            return self._send(200, st.body)
        if path == "/slow":
            time.sleep(st.slow_seconds)
            with contextlib.suppress(OSError):
                self._send(200, st.body)
            return None
        if path == "/truncated":
            self._send(200, st.body[: len(st.body) // 2], length=len(st.body))
            self.close_connection = True
            return None
        if path == "/oversize":
            return self._send(200, b"\x1f\x8b" + b"x" * st.oversize)
        if path == "/chunked-oversize":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(st.oversize // 8192 + 2):
                    self.wfile.write(b"2000\r\n" + b"y" * 8192 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            return None
        if path in ("/trickle", "/trickle-headers"):
            self.send_response(200)
            if path == "/trickle":
                self.send_header("Content-Length", str(1_000_000))
                self.end_headers()
            else:
                self.flush_headers()
                self.wfile.write(b"X-Slow: ")
            with contextlib.suppress(OSError):
                for _ in range(1_000_000):  # until the client hangs up
                    self.wfile.write(b"\x1f" if path == "/trickle" and st.trickled == 0 else b"x")
                    self.wfile.flush()
                    st.trickled += 1
                    time.sleep(st.trickle_every)
            self.close_connection = True
            return None
        if path == "/redirect":
            return self._send(302, b"", {"Location": "http://127.0.0.1:1/bundle.tar.gz"})
        return self._send(404, b"not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out on purpose close their end


class _Server6(_Server):
    address_family = socket.AF_INET6


@dataclass
class BundleServer:
    url: str
    ca_file: Path
    state: ServerState
    ca: trustme.CA
    tmp: Path

    def client_cert_files(self) -> tuple[str, str]:
        leaf = self.ca.issue_cert("mesh-agent-client@example.com")
        cert, key = self.tmp / "client.pem", self.tmp / "client.key"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return str(cert), str(key)


@contextlib.contextmanager
def serve(tmp: Path, *, require_client_cert: bool = False, host: str = "127.0.0.1") -> Iterator[BundleServer]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "::1", "localhost")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    if require_client_cert:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    server = (_Server6 if ":" in host else _Server)((host, 0), _Handler)
    server.state = ServerState()
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    ca_file = tmp / "server-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = server.server_address[1]
    try:
        yield BundleServer(f"https://{host}:{port}", ca_file, server.state, ca, tmp)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
