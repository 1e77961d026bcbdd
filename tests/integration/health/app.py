"""A small app for the health tests, run as its own process.

    python app.py http|https|tcp|hang|trickle|grpc [--port N] [--status-file F] [--cert F --key F]
                  [--child]

Prints its port on the first line of stdout once it listens. The HTTP status it answers is read from
--status-file on each request ("200", "500", "302", "alternate", "hang"; default 200). `hang`
accepts and never answers; `trickle` answers one byte at a time, too slowly; `grpc` serves
grpc.health.v1 with SERVING unless the status file says NOT_SERVING. With --child it starts a
child that inherits the listening socket (like a pre-forked worker) and prints the child's pid on
the second line.
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

_count = 0


def status_from(path: str | None) -> str:
    if not path:
        return "200"
    try:
        with open(path) as f:
            return f.read().strip() or "200"
    except OSError:
        return "200"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["http", "https", "tcp", "hang", "trickle", "grpc"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--status-file")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()

    if args.mode == "grpc":
        serve_grpc(args)
        return

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(64)
    print(sock.getsockname()[1], flush=True)
    if args.child:
        sock.set_inheritable(True)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 pass_fds=[sock.fileno()])
        print(child.pid, flush=True)

    if args.mode == "hang":
        held = []
        while True:
            conn, _ = sock.accept()
            held.append(conn)  # never answered, never closed
    if args.mode == "trickle":
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()
    if args.mode == "tcp":
        while True:
            conn, _ = sock.accept()
            conn.close()

    status_file = args.status_file

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            global _count
            want = status_from(status_file)
            if want == "alternate":
                _count += 1
                want = "200" if _count % 2 else "500"
            if want == "hang":
                time.sleep(3600)
            if self.headers.get("X-Require") == "probe" and self.headers.get("X-Probe") != "yes":
                want = "403"
            self.send_response(int(want))
            if want.startswith("3"):
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    if args.mode == "https":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(sock, server_side=True)
    server.serve_forever()


def trickle(conn: socket.socket) -> None:
    """Answer, but one byte of a header every 0.2 s: never done within a probe's timeout."""
    try:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(300):
            time.sleep(0.2)
            conn.sendall(b"a")
    except OSError:
        pass
    finally:
        conn.close()


def serve_grpc(args: argparse.Namespace) -> None:
    from concurrent import futures

    import grpc

    def check(request: bytes, context: object) -> bytes:
        return b"\x08\x02" if status_from(args.status_file) == "NOT_SERVING" else b"\x08\x01"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=lambda b: b,
                                                     response_serializer=lambda b: b)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
