"""A stand-in daemon for the restart tests: runs one Supervisor from a JSON spec until SIGTERM.

Prints one line per state change (`state <name> pid <pid> <reason>`), flushed, for the test to read.
On SIGUSR1 it re-executes itself (same pid), as the agent does after an upgrade.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
from pathlib import Path

from agent.paths import Layout
from agent.sidecar.machine import SidecarStateChanged
from agent.sidecar.profiles import LaunchSpec, Policy
from agent.sidecar.supervisor import Supervisor


def main() -> int:
    data = json.loads(Path(sys.argv[1]).read_text())
    data["argv"] = tuple(data["argv"])
    data["admin_address"] = tuple(data["admin_address"])
    data["ports"] = tuple(data["ports"])
    data["policy"] = Policy(**data["policy"])
    data["pre_start"] = tuple(tuple(c) for c in data["pre_start"])
    data["post_stop"] = tuple(tuple(c) for c in data["post_stop"])
    spec = LaunchSpec(**data)
    events: queue.Queue[object] = queue.Queue()
    stopping: list[bool] = []
    reexec: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGUSR1, lambda *_: reexec.append(True))
    sup = Supervisor(spec, Layout(root=Path(sys.argv[2])), events.put)
    sup.start()
    while not stopping:
        if reexec:
            print("reexec", flush=True)
            os.execv(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]])
        deadline = sup.tick()
        try:
            event = events.get(timeout=0.05 if deadline is None else 0.02)
        except queue.Empty:
            continue
        if isinstance(event, SidecarStateChanged):
            print(f"state {event.state.value} pid {event.pid} {event.reason}", flush=True)
        sup.handle(event)
    sup.stop(drain=False)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
