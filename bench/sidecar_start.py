"""Sidecar start-up and recovery times with the real Envoy (not a test: prints numbers).

    .venv/bin/python bench/sidecar_start.py [--runs 20]

1. start to ready: Supervisor.start() until RUNNING (adoption scan, port check, spawn, readiness
   polling), against Envoy alone (spawn, then poll /ready every 10 ms) as the floor; the ratio.
2. SIGKILL to ready: Envoy killed, until the supervisor has it RUNNING again. Each kill follows what
   the machine takes for a stable run (ready for STABLE_AFTER, 10 s), so it is restarted at once, with
   no backoff step; printed beside it: from the kill to the supervisor's decision to restart (the exit
   noticed, plus any backoff).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import BackoffConfig, CrashLoopConfig
from agent.paths import Layout
from agent.sidecar import profiles
from agent.sidecar.envoy_admin import probe_ready
from agent.sidecar.machine import STABLE_AFTER, State
from agent.sidecar.supervisor import Supervisor
from devkit.envoy import bootstrap, sidecar_config
from devkit.ports import free_port


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run_loop(sup: Supervisor, events: queue.Queue[object], done, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not done():
        if time.monotonic() > end:
            raise SystemExit(f"timed out: {sup.state} {sup.reason}")
        deadline = sup.tick()
        wait = 0.005 if deadline is None else max(0.0, min(0.005, deadline - time.monotonic()))
        with contextlib.suppress(queue.Empty):
            sup.handle(events.get(timeout=wait))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    try:
        measure(tmp, args.runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(tmp: Path, runs: int) -> None:
    admin = free_port()
    (tmp / "bootstrap.json").write_text(bootstrap(admin))
    cfg = sidecar_config(tmp, admin, crash_loop=CrashLoopConfig(1000, 60.0), backoff=BackoffConfig())
    spec = profiles.envoy_profile(cfg, (tmp / "bootstrap.json").read_text())
    layout = Layout(root=tmp / "root")

    # Interleaved, so both see the same machine load and caches.
    alone: list[float] = []
    supervised: list[float] = []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.Popen(spec.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not probe_ready(spec.readiness_url, "LIVE"):
            time.sleep(0.01)
        alone.append(time.monotonic() - t0)
        p.kill()
        p.wait()

        events: queue.Queue[object] = queue.Queue()
        sup = Supervisor(spec, layout, events.put)
        t0 = time.monotonic()
        sup.start()
        run_loop(sup, events, lambda s=sup: s.state is State.RUNNING)
        supervised.append(time.monotonic() - t0)
        sup.stop(drain=False)

    recover: list[float] = []
    delays: list[float] = []
    events = queue.Queue()
    sup = Supervisor(spec, layout, events.put)
    sup.start()
    run_loop(sup, events, lambda: sup.state is State.RUNNING)
    for _ in range(runs):
        sup.machine.ready_since = time.monotonic() - STABLE_AFTER   # as after a long healthy run
        old = sup.pid
        assert old is not None
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        run_loop(sup, events, lambda: sup.state is State.BACKOFF)
        delays.append((sup.machine.deadline or t0) - t0)
        run_loop(sup, events, lambda o=old: sup.state is State.RUNNING and sup.pid != o)
        recover.append(time.monotonic() - t0)
    sup.stop(drain=False)

    ms = 1000.0
    print(f"runs: {runs}; Envoy {spec.argv[0]}")
    print(f"Envoy alone, spawn to /ready LIVE:   p50 {statistics.median(alone) * ms:6.1f} ms  "
          f"p95 {pct(alone, 95) * ms:6.1f} ms")
    print(f"supervised, start() to RUNNING:      p50 {statistics.median(supervised) * ms:6.1f} ms  "
          f"p95 {pct(supervised, 95) * ms:6.1f} ms  "
          f"ratio {statistics.median(supervised) / statistics.median(alone):.2f}")
    print(f"SIGKILL to RUNNING again:            p50 {statistics.median(recover) * ms:6.1f} ms  "
          f"p95 {pct(recover, 95) * ms:6.1f} ms  (kill to restart decided: "
          f"mean {statistics.mean(delays) * ms:.1f} ms)")


if __name__ == "__main__":
    main()
