"""Every client generation (tests/clientgen.py) against one emulated cluster set up with exactly what
`mesh-agent manifests` prints, plus the mesh's root-certificate ConfigMap."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("devkit.kubeapi.server", reason="the Kubernetes API emulator is not in this tree")

from agent.registry.manifests import build_manifests
from devkit.kubeapi.fixtures import kubeapi  # noqa: F401
from devkit.kubeapi.server import KubeAPI
from tests.clientgen import Agent, Generation, gen  # noqa: F401

NS, GROUP, SA = "vm-apps", "billing", "billing-vm"
AGENT_USER = f"system:serviceaccount:{NS}:{SA}"


@dataclass
class Setup:
    api: KubeAPI
    tmp: Path
    gen: Generation
    agents: list[Agent] = field(default_factory=list)

    def agent(self, extra_env: dict[str, str] | None = None) -> Agent:
        a = Agent(self.gen, extra_env)
        self.agents.append(a)
        return a

    def token(self, seconds: int = 3600) -> str:
        """A bound token of the agents' service account (its Role is what `manifests` prints)."""
        return self.api.mint_token(NS, SA, seconds=seconds)


@pytest.fixture
def setup(kubeapi: KubeAPI, tmp_path: Path, gen: Generation) -> Iterator[Setup]:  # noqa: F811
    kubeapi.create_namespace(NS)
    for doc in build_manifests(group=GROUP, namespace=NS, service_account=SA, ports=[("http", 8080)]):
        kubeapi.create(doc, manager="kubectl")
    kubeapi.create({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "istio-ca-root-cert", "namespace": NS},
                    "data": {"root-cert.pem": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"}})
    s = Setup(kubeapi, tmp_path, gen)
    try:
        yield s
    finally:
        for a in s.agents:
            a.close()
