"""A proxy that stops answering takes the VM out of the mesh: the real Envoy frozen with SIGSTOP under
the whole agent. Its entry is withdrawn once the readiness checks fail, and comes back when the proxy
answers again, with the same proxy (nothing restarted)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.rig import Rig, app_rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    live = {"period": "200ms", "timeout": "200ms", "failure_threshold": 2, "restart_threshold": 0}
    with app_rig(tmp_path, sidecar={"liveness": live}) as rg:
        yield rg


def test_a_frozen_proxy_withdraws_the_entry_until_it_answers_again(r: Rig) -> None:
    r.start_agent()
    first = wait_for(r.entry, 60, "registration")
    envoy = json.loads((r.root / "run/mesh-agent/sidecar.pid").read_text())["pid"]
    os.kill(envoy, signal.SIGSTOP)
    try:
        wait_for(lambda: r.entry() is None, 30, "the entry withdrawn while the proxy does not answer")
        status = json.loads(r.status_file.read_text())
        assert status["sidecar"]["state"] == "unresponsive" and not status["sidecar"]["ready"]
        assert "not answering its readiness check" in r.log_text()
    finally:
        os.kill(envoy, signal.SIGCONT)
    back = wait_for(r.entry, 30, "the entry back once the proxy answers")
    assert back["spec"]["address"] == first["spec"]["address"]
    status = json.loads(r.status_file.read_text())
    assert status["sidecar"]["pid"] == envoy and status["sidecar"]["restarts"] == 0
    assert r.stop_agent() == 0
