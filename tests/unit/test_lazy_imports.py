"""What the agent does not use it does not load: prometheus_client only with metrics on, and the
kubernetes client only when the registry builds its first client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1].parent


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True)
    return out.stdout.strip()


@pytest.mark.subprocess
def test_metrics_off_does_not_import_prometheus_client() -> None:
    out = _run("import sys\n"
               "import agent.daemon\n"
               "from agent.metrics import Metrics\n"
               "m = Metrics(on=False)\n"
               "m.set('app_healthy', 1, 'billing'); m.inc('errors', 'x'); m.set_phase('running')\n"
               "print(m.enabled, m.render(), 'prometheus_client' in sys.modules, 'kubernetes' in sys.modules)")
    assert out == "False b'' False False"


@pytest.mark.subprocess
def test_metrics_on_imports_it_and_renders() -> None:
    pytest.importorskip("prometheus_client")
    out = _run("from agent.metrics import Metrics\n"
               "m = Metrics(on=True)\n"
               "m.set('app_healthy', 1, 'billing')\n"
               "print(m.enabled, b'mesh_agent_app_healthy{app=\"billing\"} 1.0' in m.render())")
    assert out == "True True"
