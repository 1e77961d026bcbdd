"""How fast the app's death and hangs become Unhealthy, and what watching costs at rest.

    python bench/health_detect.py [--kills 50] [--idle 60] [--quick]

Prints:
1. detection latency from SIGKILL of the app to the Unhealthy event, p50/p99/max over --kills kills,
   with pidfds and with the polling fallback (target: p99 <= 250 ms);
2. time from the app hanging (accepting, never answering) to Unhealthy: at the defaults (period 10 s,
   timeout 1 s, failure threshold 3) and with a 1 s period;
3. the cost of one port scan (sock_diag, and /proc/net/tcp{,6} for comparison), of one owner lookup
   (/proc/*/fd), and of psutil.net_connections() for comparison;
4. the CPU time the monitor's threads use over --idle seconds at the defaults, the app healthy.

The app is a small Python HTTP server run as its own process. Flap damping is off while killing
(it never delays Unhealthy, only the return to Healthy between kills, which would only slow the run).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.health.config import FlapConfig, ProbeConfig
from agent.health.listeners import (
    find_owners,
    read_listeners,
    read_listeners_proc,
)
from agent.health.monitor import HealthChanged, Monitor
from agent.health.probe_spec import probe_from_istio
from agent.health.state import Health

NO_DAMPING = FlapConfig(min_dwell=0.0, max_transitions=1000, window=1.0)

APP = r"""
import http.server, os, socket, sys, time
port, status_file = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if os.path.exists(status_file):
            time.sleep(3600)  # hang: accept, never answer
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
s = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
print("up", flush=True)
s.serve_forever()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, hang_file: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", APP, str(port), hang_file], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    return p


def wait_for(q: queue.Queue[object], state: Health, timeout: float) -> HealthChanged:
    end = time.monotonic() + timeout
    while True:
        ev = q.get(timeout=max(0.001, end - time.monotonic()))
        if isinstance(ev, HealthChanged) and ev.state is state:
            return ev


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def bench_kills(kills: int, use_pidfd: bool, hang_file: str) -> list[float]:
    port = free_port()
    q: queue.Queue[object] = queue.Queue()
    app = start_app(port, hang_file)
    m = Monitor(probe_from_istio({"httpGet": {"port": port, "path": "/"}, "periodSeconds": 30}),
                ports=[port], post=q.put, flap=NO_DAMPING, sidecar_ready=True, port_interval=0.2,
                use_pidfd=use_pidfd)
    m.start()
    out = []
    try:
        wait_for(q, Health.HEALTHY, 10)
        for _ in range(kills):
            killed = time.monotonic()
            os.kill(app.pid, signal.SIGKILL)
            ev = wait_for(q, Health.UNHEALTHY, 10)
            out.append(ev.at - killed)
            app.wait()
            app = start_app(port, hang_file)
            wait_for(q, Health.HEALTHY, 10)
    finally:
        m.stop()
        app.kill()
        app.wait()
    return out


def bench_hang(period: int, hang_file: str) -> float:
    port = free_port()
    q: queue.Queue[object] = queue.Queue()
    app = start_app(port, hang_file)
    m = Monitor(probe_from_istio({"httpGet": {"port": port, "path": "/"}, "periodSeconds": period}),
                ports=[port], post=q.put, flap=NO_DAMPING, sidecar_ready=True)
    m.start()
    try:
        wait_for(q, Health.HEALTHY, 10)
        Path(hang_file).touch()
        hung = time.monotonic()
        ev = wait_for(q, Health.UNHEALTHY, 10 * period + 10)
        return ev.at - hung
    finally:
        Path(hang_file).unlink(missing_ok=True)
        m.stop()
        app.kill()
        app.wait()


def cost(fn: object, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / n


def bench_idle(seconds: float, hang_file: str) -> tuple[float, int]:
    port = free_port()
    q: queue.Queue[object] = queue.Queue()
    app = start_app(port, hang_file)
    me = psutil.Process()
    m = Monitor(ProbeConfig(http_get=probe_from_istio({"httpGet": {"port": port}}).http_get),
                ports=[port], post=q.put, sidecar_ready=True)
    try:
        m.start()
        wait_for(q, Health.HEALTHY, 10)
        before = me.cpu_times()
        time.sleep(seconds)  # the main thread sleeps: what is used is the monitor's
        after = me.cpu_times()
        scans = m._portwatch.scans
    finally:
        m.stop()
        app.kill()
        app.wait()
    return (after.user - before.user) + (after.system - before.system), scans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="skip the hang at the defaults (about 30 s)")
    args = ap.parse_args()
    hang_file = os.path.join(tempfile.mkdtemp(prefix="health-bench-"), "hang")

    print(f"kernel {os.uname().release}, {os.cpu_count()} cpus, {len(psutil.pids())} processes")
    for use_pidfd in (True, False):
        lat = bench_kills(args.kills, use_pidfd, hang_file)
        ms = [x * 1000 for x in lat]
        print(f"kill -> Unhealthy ({'pidfd' if use_pidfd else 'polling fallback'}), {len(ms)} kills: "
              f"p50 {statistics.median(ms):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms")

    hang = bench_hang(1, hang_file)
    print(f"hang -> Unhealthy, period 1 s, timeout 1 s, failure threshold 3: {hang:.2f} s")
    if not args.quick:
        print(f"hang -> Unhealthy at the defaults (period 10 s, timeout 1 s, failure threshold 3): "
              f"{bench_hang(10, hang_file):.2f} s")

    port = free_port()
    app = start_app(port, hang_file)
    try:
        inodes = read_listeners([port])[port]
        scan = cost(lambda: read_listeners([port]), 200)
        scan_proc = cost(lambda: read_listeners_proc([port]), 50)
        owners = cost(lambda: find_owners(inodes), 20)
        netconn = cost(lambda: [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                                and c.status == psutil.CONN_LISTEN], 20)
    finally:
        app.kill()
        app.wait()
    sockets = len(Path("/proc/net/tcp").read_text().splitlines()) - 1
    print(f"one port scan: sock_diag {scan * 1e6:.0f} us (reading /proc/net/tcp + tcp6 instead: "
          f"{scan_proc * 1e6:.0f} us, {sockets} IPv4 sockets)")
    print(f"one owner lookup (/proc/*/fd, only when a listener appears): {owners * 1e3:.2f} ms; "
          f"psutil.net_connections('tcp') with owners, for comparison: {netconn * 1e3:.2f} ms")

    cpu, scans = bench_idle(args.idle, hang_file)
    print(f"idle at the defaults for {args.idle:.0f} s: {cpu * 1000:.0f} ms CPU "
          f"({cpu / args.idle * 100:.3f}% of one core), {scans} port scans")


if __name__ == "__main__":
    main()
