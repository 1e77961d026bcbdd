"""How fast the Kubernetes API emulator answers, so fleet benchmarks know it is not their bottleneck.

    python bench/kubeapi_emulator.py [--watchers 200] [--writes 500] [--clients 8] [--watch workloadgroups]

Starts one HTTPS emulator, opens `watchers` watches (raw HTTP streams, one thread each) on
WorkloadEntries, or on another resource with --watch (as a fleet's group watchers do), then `clients`
threads do `writes` server-side applies of WorkloadEntries in all through the kubernetes client.
Prints apply latency (p50/p90/p99), writes per second, and (when the watches see the writes) the
delay from a write's answer to its event (p50/p99). Traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import client, config  # noqa: E402

from devkit.kubeapi.server import KubeAPI  # noqa: E402

NS = "bench"
PATH = f"/apis/networking.istio.io/v1/namespaces/{NS}/workloadentries"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--watch", default="workloadentries", help="resource the watchers watch")
    args = parser.parse_args()

    api = KubeAPI(bookmark_interval=30.0).start()
    api.create_namespace(NS)
    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    seen: dict[str, float] = {}
    lock = threading.Lock()
    ready = threading.Barrier(args.watchers + 1)

    def watch(index: int) -> None:
        path = PATH.replace("workloadentries", args.watch)
        req = urllib.request.Request(f"{api.url}{path}?watch=1&timeoutSeconds=600",
                                     headers={"Authorization": f"Bearer {api.admin_token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=600) as stream:
            ready.wait()
            for line in stream:
                event = json.loads(line)
                if index == 0:  # one watcher timestamps; all of them receive
                    with lock:
                        seen.setdefault(event["object"]["metadata"]["resourceVersion"], time.monotonic())

    for i in range(args.watchers):
        threading.Thread(target=watch, args=(i,), daemon=True).start()
    ready.wait()

    latencies: list[float] = []
    answered: dict[str, float] = {}
    per_client = args.writes // args.clients

    def writer(n: int) -> None:
        co = client.CustomObjectsApi(config.new_client_from_config(str(api.kubeconfig)))
        for i in range(per_client):
            body = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                    "metadata": {"name": f"vm-{n}"}, "spec": {"address": f"10.0.{n}.{i % 250 + 1}"}}
            start = time.monotonic()
            co.patch_namespaced_custom_object("networking.istio.io", "v1", NS, "workloadentries", f"vm-{n}",
                                              body, field_manager="bench",
                                              _content_type="application/apply-patch+yaml")
            end = time.monotonic()
            latencies.append(end - start)
            obj = api.get("WorkloadEntry", NS, f"vm-{n}")
            if obj:
                answered[obj["metadata"]["resourceVersion"]] = end

    start = time.monotonic()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    time.sleep(1.0)
    delays = [seen[rv] - t for rv, t in answered.items() if rv in seen]
    api.stop()
    ms = 1000
    print(f"watchers={args.watchers} on {args.watch}, clients={args.clients} writes={len(latencies)}")
    print(f"apply latency ms: p50={pct(latencies, 50) * ms:.1f} p90={pct(latencies, 90) * ms:.1f} "
          f"p99={pct(latencies, 99) * ms:.1f}; throughput {len(latencies) / elapsed:.0f} writes/s")
    if delays:
        print(f"answer-to-event delay ms: p50={statistics.median(delays) * ms:.1f} "
              f"p99={pct(delays, 99) * ms:.1f} (n={len(delays)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
