"""python -m devkit.kubeapi --port PORT --state-dir DIR [--http]: serve until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from devkit.kubeapi.server import KubeAPI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.kubeapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: loopback, or an address inside a network namespace "
                             "the demo made (the certificate names it too)")
    parser.add_argument("--port", type=int, default=6443, help="0 picks a free port")
    parser.add_argument("--state-dir", required=True, help="where kubeconfig and ca.crt are written")
    parser.add_argument("--http", action="store_true", help="plain HTTP instead of HTTPS")
    parser.add_argument("--crds", help="CRD file (default: $MESH_AGENT_CRDS, else devkit/kubeapi/istio-crds.yaml)")
    parser.add_argument("--namespace", action="append", default=[], help="create this namespace (repeatable)")
    parser.add_argument("--persist", action="store_true",
                        help="keep the CA, keys, admin token and objects in --state-dir across restarts")
    args = parser.parse_args(argv)
    api = KubeAPI(host=args.host, port=args.port, tls=not args.http, state_dir=args.state_dir, crds=args.crds,
                  persist=args.persist)
    api.start()
    for ns in args.namespace:
        if api.get("Namespace", "", ns) is None:
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
