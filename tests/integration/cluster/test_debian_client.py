"""The cluster source and the own-token renewal through Debian 12's python3-kubernetes (22.6), which the
.deb depends on. Skipped where that client is absent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.debianclient import SYSTEM_PYTHON, has_debian_client
from tests.integration.cluster.conftest import CASE, FIXTURES, World

REPO = Path(__file__).resolve().parents[3]

CHILD = r"""
import json, sys
import kubernetes
from agent.bundle.cluster_source import ClusterSource, Settings
from agent.registry.credentials import renew_own_token
from agent.registry.kube import Credentials, Kube
server, ca, token_file = sys.argv[1:4]
kube = Kube.from_credentials(Credentials(server=server, ca_file=ca, token_file=token_file), timeout=5)
src = ClusterSource(kube, Settings(namespace="vm-apps", group="billing"))
got = src.fetch()
out = {"version": kubernetes.__version__, "files": {k: v.decode() for k, v in got.files.items()},
       "expiry": got.token_expiry, "root_cert_version": got.root_cert_version}
events = [t for t, _ in src.core.watch_configmap("vm-apps", "istio-ca-root-cert", got.root_cert_version, 1)]
out["watch_ok"] = True
out["renewed_expiry"] = renew_own_token(kube.api_client, token_file).expiry
print(json.dumps(out))
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not has_debian_client(), reason="Debian's python3-kubernetes (22.x-26.x) is not installed")
def test_old_debian_client_builds_the_bundle_and_renews(world: World) -> None:
    from tests.kubeapi.auth import Rule

    # The emulator authorises a one-name watch only without resourceNames (see the rotation test), and
    # takes the old client's `watch=True` (capital T, which the API server's ParseBool accepts) for a list.
    world.api.cluster.auth.grant("system:serviceaccount:vm-apps:billing-vm",
                                 [Rule(("watch", "list"), ("",), ("configmaps",), ("vm-apps",))])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([SYSTEM_PYTHON, "-c", CHILD, world.api.url, str(world.api.ca_path),
                           str(world.token_file)], capture_output=True, text=True, timeout=60, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("22.")
    for name in ("cluster.env", "mesh.yaml", "hosts"):
        assert out["files"][name] == (FIXTURES / CASE / name).read_text(), name
    assert out["watch_ok"] and out["renewed_expiry"] > 0
