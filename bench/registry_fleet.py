"""A fleet of registrars against one Kubernetes API emulator: steady-state cost and outage recovery.

    python bench/registry_fleet.py                # 500 agents, a steady window of one resync, 60 s outage
    python bench/registry_fleet.py --quick        # 50 agents, 30 s window, 10 s outage

Each agent is a real Registrar + worker + group watcher (the daemon's registry parts, threads), with
its own client and connections; the agents run in --procs child processes so that they do not share
the emulator's interpreter, with the agent's default timings (agent.config: lease, renew, resync,
backoff, request timeout) unless overridden. Prints:
- API requests per agent per minute at steady state (by verb and resource);
- after an outage of the API server: the time until every agent has renewed its lease again and is
  REGISTERED, the peak request rate (per second) and the requests spent on recovery.
Traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.config import RegistryConfig  # noqa: E402
from agent.health.state import Health  # noqa: E402
from agent.kube.auth import Credentials  # noqa: E402
from agent.kube.client import Kube  # noqa: E402
from agent.registry import entry as E  # noqa: E402
from agent.registry.manifests import AGENT_RULES  # noqa: E402
from agent.registry.states import Settings, State  # noqa: E402
from devkit.kubeapi.auth import Rule  # noqa: E402
from devkit.kubeapi.server import KubeAPI  # noqa: E402
from devkit.registrydriver import Driver  # noqa: E402

NS, GROUP = "fleet", "app"


class Counter:
    """Counts the emulator's requests per second and per kind (wraps its record hook)."""

    def __init__(self, api: KubeAPI) -> None:
        self.lock = threading.Lock()
        self.per_second: collections.Counter[int] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[int] = collections.Counter()
        self.total = 0
        original = api.record

        def record(rec: object) -> None:
            sec = int(time.monotonic())
            path = getattr(rec, "path", "")
            kind = "watch" if "watch=" in getattr(rec, "query", "") else getattr(rec, "method", "?")
            res = "lease" if "/leases" in path else "entry" if "/workloadentries" in path else \
                "group" if "/workloadgroups" in path else "other"
            with self.lock:
                self.per_second[sec] += 1
                self.kinds[f"{kind} {res}"] += 1
                self.codes[getattr(rec, "code", 0)] += 1
                self.total += 1
            original(rec)  # type: ignore[arg-type]
        api.record = record  # type: ignore[method-assign]

    def snapshot(self) -> tuple[int, collections.Counter[str]]:
        with self.lock:
            return self.total, collections.Counter(self.kinds)

    def window(self, since: int, until: int) -> list[int]:
        """Requests in each second from since to until (inclusive)."""
        with self.lock:
            return [self.per_second.get(s, 0) for s in range(since, until + 1)]

    def peak(self, since: float, until: float) -> int:
        with self.lock:
            return max((n for s, n in self.per_second.items() if since <= s <= until), default=0)


def main() -> int:
    reg = RegistryConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=500)
    p.add_argument("--steady", type=float, default=None,
                   help="steady-state window, seconds (default: the longer of 300 s and --resync)")
    p.add_argument("--outage", type=float, default=60.0, help="API outage, seconds")
    p.add_argument("--lease", type=float, default=float(reg.lease.duration), help="registry.lease.duration")
    p.add_argument("--renew", type=float, default=float(reg.lease.renew), help="registry.lease.renew")
    p.add_argument("--resync", type=float, default=float(reg.resync), help="registry.resync")
    p.add_argument("--backoff-initial", type=float, default=float(reg.backoff.initial))
    p.add_argument("--backoff-max", type=float, default=float(reg.backoff.max))
    p.add_argument("--timeout", type=float, default=float(reg.timeout), help="registry.timeout (per request)")
    p.add_argument("--ramp", type=float, default=20.0, help="spread the agents' starts over this long")
    p.add_argument("--quick", action="store_true", help="50 agents, 30 s window, 10 s outage")
    p.add_argument("--procs", type=int, default=4,
                   help="processes the agents run in (their own interpreters, apart from the emulator's)")
    p.add_argument("--child", nargs=2, type=int, metavar=("FIRST", "COUNT"), help=argparse.SUPPRESS)
    p.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.agents, args.steady, args.outage, args.ramp = 50, 30.0, 10.0, 5.0
    if args.steady is None:
        args.steady = max(300.0, args.resync)
    if args.child:
        return child(args)

    import logging
    logging.basicConfig(level=logging.ERROR)
    api = KubeAPI(bookmark_interval=30.0).start()
    counter = Counter(api)
    api.create_namespace(NS)
    api.create({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                "metadata": {"name": GROUP, "namespace": NS},
                "spec": {"metadata": {"labels": {"app": GROUP}},
                         "template": {"serviceAccount": "fleet-vm", "ports": {"http": 8080}}}})
    rules = [Rule(tuple(r["verbs"]), tuple(r["apiGroups"]), tuple(r["resources"]), (NS,))
             for r in AGENT_RULES]
    api.add_token("fleet-token-" + "f" * 24, f"system:serviceaccount:{NS}:fleet-vm", rules)
    kc = api.write_kubeconfig(Path(api.state_dir or "/tmp") / "fleet.kubeconfig", "fleet-token-" + "f" * 24)

    la = os.getloadavg()
    load0 = f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    print(f"load average {load0}")
    t0 = time.monotonic()
    print(f"starting {args.agents} agents in {args.procs} processes over {args.ramp:.0f}s (lease "
          f"{args.lease:g}s, renew {args.renew:g}s, resync {args.resync:g}s, backoff {args.backoff_initial:g}s.."
          f"{args.backoff_max:g}s, request timeout {args.timeout:g}s; steady window {args.steady:g}s)", flush=True)
    fleet = Fleet(args, str(kc))

    def all_registered() -> bool:
        return fleet.registered() >= args.agents

    deadline = time.monotonic() + 120 + args.agents * 0.3
    while not all_registered() and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"registered {fleet.registered()}/{args.agents} in {time.monotonic() - t0:.1f}s", flush=True)

    # Steady state: let the start-up settle for one renewal period, then count.
    time.sleep(args.renew)
    n0, k0 = counter.snapshot()
    s0 = time.monotonic()
    time.sleep(args.steady)
    n1, k1 = counter.snapshot()
    minutes = (time.monotonic() - s0) / 60.0
    rate = (n1 - n0) / args.agents / minutes
    print(f"\nsteady state over {args.steady:.0f}s: {rate:.2f} API requests per agent per minute "
          f"({(n1 - n0) / (minutes * 60):.1f} req/s for the fleet)")
    window = counter.window(int(s0) + 1, int(s0 + args.steady))
    if window:
        mean = sum(window) / len(window)
        print(f"spread (1 s buckets): max {max(window)} / mean {mean:.1f} = {max(window) / max(mean, 1e-9):.2f}")
    for kind, n in sorted((k1 - k0).items(), key=lambda kv: -kv[1]):
        print(f"  {kind:18s} {n / args.agents / minutes:6.2f} /agent/min")

    # Outage and recovery.
    print(f"\nAPI outage of {args.outage:.0f}s ...", flush=True)
    n2, _ = counter.snapshot()
    api.outage(args.outage)
    time.sleep(args.outage)
    back_mono, back_wall = time.monotonic(), dt.datetime.now(dt.UTC)
    n3, _ = counter.snapshot()

    def renewed_after_recovery() -> int:
        count = 0
        for lease in api.objects("Lease", NS):
            renewed = E.parse_time((lease.get("spec") or {}).get("renewTime"))
            count += bool(renewed and renewed > back_wall)
        return count

    every_lease = every_state = None
    limit = time.monotonic() + 180
    while time.monotonic() < limit and (every_lease is None or every_state is None):
        if every_lease is None and renewed_after_recovery() >= args.agents and \
                len(api.objects("WorkloadEntry", NS)) >= args.agents:
            every_lease = time.monotonic() - back_mono
        if every_state is None and all_registered():
            every_state = time.monotonic() - back_mono
        time.sleep(0.2)
    n4, _ = counter.snapshot()
    peak = counter.peak(int(back_mono), int(time.monotonic()))
    steady_per_s = (n1 - n0) / (minutes * 60)
    print(f"requests during the outage (answered by nobody): {n3 - n2}")
    def secs(v: float | None) -> str:
        return f"{v:.1f}s" if v is not None else "not within 180s"
    print(f"every entry present and its lease renewed after recovery: {secs(every_lease)}")
    print(f"every agent REGISTERED again: {secs(every_state)}")
    print(f"peak request rate after recovery: {peak} req/s (steady state {steady_per_s:.1f} req/s)")
    print(f"requests from recovery until converged: {n4 - n3}")
    deletes = sum(n for k, n in counter.kinds.items() if k.startswith("DELETE"))
    print(f"deletes during the whole run: {deletes}")
    series = counter.window(int(back_mono), int(time.monotonic()))
    print("requests per second after recovery, 5 s buckets (mean / max of 1 s):")
    for i in range(0, len(series), 5):
        chunk = series[i:i + 5]
        print(f"  +{i:3d}s {sum(chunk) / len(chunk):7.1f} / {max(chunk):4d}")
    la = os.getloadavg()
    print(f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (at the start: {load0})")

    fleet.stop()
    api.stop()
    return 0


class Fleet:
    """The agents, in child processes that report how many are REGISTERED once a second."""

    def __init__(self, args: argparse.Namespace, kubeconfig: str) -> None:
        import subprocess

        self.counts: dict[int, int] = {}
        self.procs = []
        per = -(-args.agents // args.procs)
        for k, first in enumerate(range(0, args.agents, per)):
            count = min(per, args.agents - first)
            cmd = [sys.executable, __file__, "--child", str(first), str(count), "--kubeconfig", kubeconfig,
                   "--lease", str(args.lease), "--renew", str(args.renew), "--resync", str(args.resync),
                   "--backoff-initial", str(args.backoff_initial), "--backoff-max", str(args.backoff_max),
                   "--timeout", str(args.timeout), "--ramp", str(args.ramp)]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(k, proc), daemon=True).start()

    def _read(self, k: int, proc: object) -> None:
        for line in proc.stdout:  # type: ignore[attr-defined]
            if line.startswith("registered "):
                self.counts[k] = int(line.split()[1])

    def registered(self) -> int:
        return sum(self.counts.values())

    def stop(self) -> None:
        for proc in self.procs:
            proc.stdin.close()  # type: ignore[union-attr]
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except Exception:
                proc.kill()


def child(args: argparse.Namespace) -> int:
    import logging
    logging.basicConfig(level=logging.CRITICAL)
    first, count = args.child
    drivers: list[Driver] = []
    for i in range(first, first + count):
        n = i + 1
        address = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        instance = f"vm-{i:05d}"

        def build(group: dict, address: str = address, instance: str = instance) -> dict:
            return E.build_entry(E.EntryInputs(group=group, address=address, instance=instance))
        kube = Kube.from_credentials(Credentials(kubeconfig=args.kubeconfig), timeout=args.timeout)
        settings = Settings(NS, GROUP, instance, args.lease, args.renew, args.resync,
                            backoff_initial=args.backoff_initial, backoff_max=args.backoff_max)
        d = Driver(kube, settings, build).start()
        d.do(lambda r, now: r.set_health(Health.HEALTHY))
        drivers.append(d)
        time.sleep(args.ramp / max(1, count))
    done = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        done.set()
    threading.Thread(target=wait_stdin, daemon=True).start()
    while not done.wait(1.0):
        print(f"registered {sum(d.registrar.state is State.REGISTERED for d in drivers)}", flush=True)
    return 0  # every thread is a daemon: leaving ends them all at once


if __name__ == "__main__":
    sys.exit(main())
