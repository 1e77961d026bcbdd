"""A test OIDC issuer and fake metadata services on loopback (devkit.identity)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devkit.identity import TestIssuer
from tests.integration.identity.cloudvm import VM


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as iss:
        yield iss


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore finds the fake instance role's credentials, and nothing from this machine."""
    pytest.importorskip("botocore", reason="identity provider aws needs botocore")
    from devkit.identity import FakeSts

    for k, v in FakeSts.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def vms() -> Iterator[list[VM]]:
    """The VMs a test starts (tests.integration.identity.cloudvm.start_vm), killed at its end."""
    started: list[VM] = []
    yield started
    for vm in started:
        vm.driver.kill()
        vm.refresher.stop()
