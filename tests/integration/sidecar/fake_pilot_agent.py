"""A stand-in for Istio's pilot-agent, installed as /usr/local/bin/pilot-agent by the sidecar tests.

Every call appends {argv, env, uid, gid} as a JSON line to $STANDIN_RECORD. `istio-iptables ...`
only records. `proxy` runs the real Envoy ($STANDIN_ENVOY with $STANDIN_BOOTSTRAP) as its child, as
pilot-agent does, and on SIGTERM stops it and exits (pilot-agent drains first; this stand-in does not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def main() -> int:
    with open(os.environ["STANDIN_RECORD"], "a", encoding="utf-8") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "uid": os.getuid(),
                            "gid": os.getgid(), "groups": os.getgroups()}) + "\n")
    if sys.argv[1:2] != ["proxy"]:
        return 0
    envoy = subprocess.Popen([os.environ["STANDIN_ENVOY"], "-c", os.environ["STANDIN_BOOTSTRAP"],
                              "--base-id", os.environ["STANDIN_BASE_ID"], "-l", "warning"])

    def forward(signum: int, _frame: object) -> None:
        envoy.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    return envoy.wait()


if __name__ == "__main__":
    sys.exit(main())
