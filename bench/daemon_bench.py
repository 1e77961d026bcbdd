"""The whole agent, measured: start to registered (and its steps), app death to entry deleted
(p50/p99), and the agent's RSS and CPU while idle (Envoy excluded). Prints numbers; not a test.

    .venv/bin/python bench/daemon_bench.py [--kills 20] [--idle 60]

Runs on loopback with the API emulator, a directory bundle, a real Envoy and a sample app (devkit/rig.py).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.rig import rig
from devkit.waiting import wait_for

STEPS = [("config loaded", r"mesh-agent .* starting"), ("sidecar started", r"sidecar: envoy"),
         ("sidecar ready", r"sidecar ready"), ("app healthy", r"app healthy"),
         ("entry applied", r"-> registered|status: registered")]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--idle", type=float, default=60.0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-agent-bench-"))
    # Damping off: the benchmark kills the app on purpose, many times in a row.
    # Production timings (probe every 10 s, lease 40 s renewed every 10 s), so the idle numbers are the
    # defaults'; the app's death is seen through its process, not the probe.
    app = {"flap": {"max_transitions": 1000, "window": "1s"},
           "probe": {"period": "10s", "timeout": "1s", "failure_threshold": 3}}
    with rig(tmp, logging={"level": "info"}, app=app, registry={"lease": {"duration": "40s", "renew": "10s"}},
             metrics={"enabled": True}) as r:
        r.prepare()
        r.start_app()
        t0 = time.monotonic()
        r.start_agent()
        wait_for(r.entry, 120, "registration")
        total = time.monotonic() - t0
        print(f"start to entry registered: {total * 1000:.0f} ms (bundle local, app healthy)")
        # The entry is visible at the API a moment before the agent has read the answer and logged it.
        wait_for(lambda: re.search(STEPS[-1][1], r.log_text()), 10, "the agent to log its registration")
        log = r.log_text()
        stamps = _stamps(log)
        first = stamps[0][0] if stamps else 0.0
        for name, pattern in STEPS:
            at = next((t for t, line in stamps if re.search(pattern, line)), None)
            print(f"  {name:16} {'?' if at is None else f'+{(at - first) * 1000:.0f} ms'} after the first log line")
        latencies = []
        for _ in range(args.kills):
            killed = time.monotonic()
            r.kill_app()
            wait_for(lambda: r.entry() is None, 30, "withdrawal")
            latencies.append(time.monotonic() - killed)
            r.start_app()
            wait_for(r.entry, 30, "registration")
        ms = [x * 1000 for x in latencies]
        print(f"app death to entry deleted over {len(ms)} kills: p50 {pct(ms, 0.5):.0f} ms, "
              f"p99 {pct(ms, 0.99):.0f} ms, max {max(ms):.0f} ms, mean {statistics.mean(ms):.0f} ms")
        assert r.agent is not None
        agent = psutil.Process(r.agent.pid)
        time.sleep(2)
        c0 = agent.cpu_times()
        w0 = time.monotonic()
        time.sleep(args.idle)
        c1 = agent.cpu_times()
        wall = time.monotonic() - w0
        cpu = (c1.user + c1.system - c0.user - c0.system) / wall * 100
        rss = agent.memory_info().rss / 2**20
        print(f"idle {wall:.0f} s: agent CPU {cpu:.3f}% of one core, RSS {rss:.1f} MiB "
              f"(Envoy and the app not counted; metrics server on)")
        r.stop_agent()
    return 0


def _stamps(log: str) -> list[tuple[float, str]]:
    out = []
    for line in log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3}) ", line)
        if m:
            out.append((time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000, line))
    return out


if __name__ == "__main__":
    sys.exit(main())
