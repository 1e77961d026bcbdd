"""What the agent does not use it does not load: prometheus_client only with metrics on, and the
kubernetes client only when the registry builds its first client."""

from __future__ import annotations

import subprocess
import sys
import time
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



@pytest.mark.subprocess
def test_a_local_bundle_is_checked_without_cryptography_or_the_cluster_source(tmp_path: Path) -> None:
    """The daemon's start with a bundle from a directory: the daemon imported, the bundle read and
    validated (root-cert.pem included), the bundle part handed an event. Neither cryptography (about
    7 MiB) nor the cluster bundle source is loaded, nor the kubernetes client (the registry loads it
    when it starts)."""
    from devkit import bundles as kit  # uses cryptography itself to make the certificate: not in the child

    for name, data in kit.files(time.time()).items():
        (tmp_path / name).write_bytes(data)
    out = _run("import sys, time\n"
               "import agent.daemon\n"
               "from agent.bundle import model, source\n"
               "from agent.bundle.part import BundlePart\n"
               "from agent.config import BundleConfig\n"
               f"cfg = BundleConfig(source={str(tmp_path)!r})\n"
               "files = source.fetch(cfg).files\n"
               "b = model.parse_bundle(files, time.time(), cfg)\n"
               "BundlePart.handle(object.__new__(BundlePart), object(), 0.0)\n"
               "print(b.cert_expiry is not None, sorted({m.split('.')[0] for m in sys.modules if m.startswith(\n"
               "      ('cryptography', 'kubernetes', 'agent.bundle.cluster_source'))}))")
    assert out == "True []"
