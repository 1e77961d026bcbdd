"""The providers with Debian 12's own libraries (python3-requests 2.28, python3-botocore 1.29, whose STS
model predates GetWebIdentityToken): the agent builds and signs that request itself, so it works there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from devkit.identity import FakeGcp, FakeSts, Instance, TestIssuer

REPO = Path(__file__).resolve().parents[3]
SYSTEM_PYTHON = "/usr/bin/python3"
AUD = "https://kube.mesh.test"


def debian_python(*modules: str) -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", f"import {', '.join(modules)}"], capture_output=True,
                           check=False, env={"PATH": "/usr/bin:/bin"})
    return probe.returncode == 0


def run(code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.subprocess
def test_aws_with_debians_botocore(issuer: TestIssuer) -> None:
    if not debian_python("botocore", "requests"):
        pytest.skip("Debian's python3-botocore is not installed (scripts/setup.sh --system-test installs it)")
    with FakeSts(issuer, Instance("i-0d", zone="eu-west-1")) as sts:
        out = run("from agent.identity.aws import AwsProvider\n"
                  f"t = AwsProvider({AUD!r}, 'eu-west-1', {sts.url!r}, timeout=2).fetch()\n"
                  "print(t.jwt)", FakeSts.env())
    assert out == sts.issued[-1]


@pytest.mark.subprocess
def test_gcp_with_debians_requests(issuer: TestIssuer) -> None:
    if not debian_python("requests"):
        pytest.skip("Debian's python3-requests is not installed")
    with FakeGcp(issuer, Instance("9")) as gcp:
        jwt = run("from agent.identity.gcp import GcpProvider\n"
                  f"print(GcpProvider({AUD!r}, {gcp.url!r}, timeout=2).fetch().jwt)")
    assert jwt == gcp.issued[-1]
