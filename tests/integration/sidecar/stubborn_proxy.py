"""A stand-in proxy that is slow to stop: `stubborn_proxy.py PORT LINGER RECORD`.

Answers 200 `LIVE` on every path of 127.0.0.1:PORT. On SIGTERM it keeps serving for LINGER seconds,
then exits 0. Appends `start <pid>`, `sigterm <pid>` and `exit <pid>` lines to RECORD.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    port, linger, record = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

    def note(word: str) -> None:
        with open(record, "a", encoding="utf-8") as f:
            f.write(f"{word} {os.getpid()}\n")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"LIVE\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    note("start")   # before serving: once it answers, the record already says so
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not terminated.wait(0.05):
        pass
    note("sigterm")
    time.sleep(linger)
    server.shutdown()
    server.server_close()
    note("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
