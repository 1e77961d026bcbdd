"""Time to fetch a bundle over HTTPS, validate it and install it (the agent's refresh path).

A real TLS server on loopback with its own CA serves a new bundle (a fresh token) each round, so every
round downloads, parses, checks certificates and token, stores the copy and replaces the live files
(fsync included) under a temp root. Prints the median and spread of 20 rounds.

    python bench/bundle_install.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.bundle.update import Updated, update  # noqa: E402
from devkit import bundles as kit  # noqa: E402
from devkit.bundleserver import serve  # noqa: E402
from devkit.roots import make_root  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        layout = make_root(tmp)
        now = time.time()
        bodies = [kit.make_tar(kit.files(now + i, extras=True)) for i in range(args.rounds + 1)]
        with serve(tmp) as srv:
            cfg = kit.config(srv.url + "/bundle.tar.gz", ca_file=str(srv.ca_file))
            times = []
            for i, body in enumerate(bodies):
                srv.state.body, srv.state.etag = body, f'"v{i}"'
                started = time.perf_counter()
                result = update(cfg, layout, user=None)
                elapsed = time.perf_counter() - started
                assert isinstance(result, Updated), result
                if i:  # the first round warms up imports and the TLS context
                    times.append(elapsed * 1000)
    times.sort()
    print(f"bundle fetch+validate+install over HTTPS, {len(times)} rounds, bundle {len(bodies[0])} bytes")
    print(f"  median {statistics.median(times):.1f} ms   min {times[0]:.1f} ms   max {times[-1]:.1f} ms   "
          f"p90 {times[int(len(times) * 0.9) - 1]:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
