"""The same calls through Debian 12's own python3-kubernetes (22.6), which the .deb depends on.

The old client has no `_content_type` and answers differently; this runs kube.Kube under
/usr/bin/python3 with Debian's packages against the emulator. Skipped where that client is absent.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.debianclient import SYSTEM_PYTHON, has_debian_client
from tests.integration.registry.conftest import ENTRY, NS, Cluster

REPO = Path(__file__).resolve().parents[3]

CHILD = r"""
import datetime as dt, json, sys
import kubernetes
from agent.registry import entry as E
from agent.registry.kube import ENTRIES, GROUPS, LEASES, Credentials, Kube, Conflict, NotFound
kube = Kube.from_credentials(Credentials(kubeconfig=sys.argv[1]), timeout=5)
ns = sys.argv[2]
group = kube.get(GROUPS, ns, "billing")
obj = E.build_entry(E.EntryInputs(group=group, address="10.0.0.5", instance="old-client",
                                  condition_mode=True))
out = {"version": kubernetes.__version__}
created = kube.apply(ENTRIES, obj)
out["created_rv"] = created["metadata"]["resourceVersion"]
again = kube.apply(ENTRIES, {**obj, "metadata": {**obj["metadata"], "resourceVersion": out["created_rv"]}})
out["same"] = again["metadata"]["resourceVersion"] == out["created_rv"]
st = kube.apply(ENTRIES, E.status_patch(obj, E.healthy_condition(True, dt.datetime.now(dt.UTC))),
                subresource="status")
out["condition"] = E.condition_of(st)
lease = kube.create(LEASES, E.build_lease(obj["metadata"]["name"], ns, "old-client", 40,
                                          dt.datetime.now(dt.UTC)))
try:
    kube.create(LEASES, E.build_lease(obj["metadata"]["name"], ns, "other", 40, dt.datetime.now(dt.UTC)))
    out["second_create"] = "accepted"
except Conflict:
    out["second_create"] = "409"
out["lease_holder"] = lease["spec"]["holderIdentity"]
try:
    stale = {**lease, "metadata": {**lease["metadata"], "resourceVersion": "1"}}
    kube.apply(LEASES, E.build_lease(obj["metadata"]["name"], ns, "old-client", 40, dt.datetime.now(dt.UTC),
                                     previous=stale))
    out["stale"] = "accepted"
except Conflict:
    out["stale"] = "409"
events = [t for t, _ in kube.watch(GROUPS, ns, "billing", group["metadata"]["resourceVersion"], 1)]
out["watch_ok"] = True
out["deleted"] = kube.delete(ENTRIES, ns, obj["metadata"]["name"], uid=created["metadata"]["uid"])
out["gone"] = kube.get(ENTRIES, ns, obj["metadata"]["name"]) is None
print(json.dumps(out))
"""


@pytest.mark.subprocess
@pytest.mark.skipif(not has_debian_client(),
                    reason="Debian's python3-kubernetes (22.x-26.x) is not installed")
def test_old_debian_client_applies_deletes_and_watches(cluster: Cluster) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([SYSTEM_PYTHON, "-c", CHILD, str(cluster.api.kubeconfig), NS], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["created_rv"] and out["same"]
    assert out["condition"] == "True"
    assert out["lease_holder"] == "old-client"
    assert out["stale"] == "409"
    assert out["second_create"] == "409"
    assert out["deleted"] and out["gone"]
    assert cluster.api.get("WorkloadEntry", NS, ENTRY) is None
