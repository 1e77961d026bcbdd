"""A sample application for the demo and the tests: HTTP on one port, `/healthz` for its probe.

    python -m demo.app --port 18080 [--name billing] [--unhealthy-file PATH]

`/healthz` answers 503 while --unhealthy-file exists, so a test can make it sick without killing it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(name: str, unhealthy_file: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server calls it by this name
            if self.path == "/healthz":
                sick = unhealthy_file is not None and os.path.exists(unhealthy_file)
                self._answer(503 if sick else 200, "unhealthy\n" if sick else "ok\n")
            else:
                self._answer(200, f"hello from {name} (pid {os.getpid()})\n")

        def _answer(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: the demo tells its own story

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="app")
    p.add_argument("--unhealthy-file")
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.name, args.unhealthy_file))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{args.name} listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
