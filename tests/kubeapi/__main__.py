"""python -m tests.kubeapi --port PORT --state-dir DIR [--http]: serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.kubeapi.server import KubeAPI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kubeapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=6443, help="0 picks a free port")
    parser.add_argument("--state-dir", required=True, help="where kubeconfig and ca.crt are written")
    parser.add_argument("--http", action="store_true", help="plain HTTP instead of HTTPS")
    parser.add_argument("--crds", help="CRD file (default: the Istio CRDs beside the repository)")
    parser.add_argument("--namespace", action="append", default=[], help="create this namespace (repeatable)")
    args = parser.parse_args(argv)
    if not (args.host.startswith("127.") or args.host in ("::1", "localhost")):
        parser.error("--host must be a loopback address")
    api = KubeAPI(host=args.host, port=args.port, tls=not args.http, state_dir=args.state_dir, crds=args.crds)
    api.start()
    for ns in args.namespace:
        api.create_namespace(ns)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"serving {api.url}; kubeconfig: {api.kubeconfig}", flush=True)
    done.wait()
    api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
