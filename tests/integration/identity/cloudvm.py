"""A VM of the identity tests: the agent's registry path with a cloud identity (token -> token file ->
client -> registrar), against the emulator set up from `mesh-agent manifests --identity ...`; and the
fixtures the identity tests share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.health.state import Health
from agent.identity.common import Provider
from agent.identity.refresh import IdentityRefresher, instance_key
from agent.kube.auth import Credentials
from agent.kube.client import Kube
from agent.registry import entry as E
from agent.registry.identity_manifests import authentication_configuration, identity_authenticator, identity_bindings
from agent.registry.manifests import build_manifests
from agent.registry.states import Settings
from devkit.identity import TestIssuer
from devkit.kubeapi.oidc import install
from devkit.kubeapi.server import KubeAPI
from devkit.registrydriver import Driver

NS, GROUP, SA = "vm-apps", "billing", "billing-vm"
AUD = "https://kube.mesh.test"
PROJECT = "mesh-project"


def setup_cluster(api: KubeAPI, issuer: TestIssuer, provider: str, **pins: Any) -> dict[str, Any]:
    """What an admin does: apply the manifests, give the API server the jwt authenticator."""
    api.create_namespace(NS)
    docs = build_manifests(group=GROUP, namespace=NS, service_account=SA, ports=[("http", 8080)], identity=True)
    for doc in docs + identity_bindings(docs, NS, GROUP):
        api.create(doc, manager="kubectl")
    jwt = identity_authenticator(provider=provider, namespace=NS, group=GROUP, audience=AUD, issuer=issuer.url,
                                 issuer_ca=issuer.ca_pem, **pins)
    config = authentication_configuration(jwt)
    install(api, config)
    return config


@dataclass
class VM:
    refresher: IdentityRefresher
    driver: Driver
    instance: str
    token_file: Path
    kube: Kube   # the VM's own client: its credential, as whoever took the VM over holds it


def start_vm(api: KubeAPI, provider: Provider, tmp: Path, *, address: str = "10.0.0.5",
             machine_id: str = "the-golden-image-machine-id", lease: float = 5.0) -> VM:
    """The agent's registry path: identity token -> token file -> client -> registrar."""
    token_file = tmp / f"identity-token-{time.monotonic_ns()}"
    refresher = IdentityRefresher(provider, str(token_file), lambda _e: None)
    token = refresher.refresh_once()
    instance = E.instance_id(instance_key(token, provider.name) or machine_id)
    read_from = str(token_file) if provider.name != "oidc-file" else provider.where
    kube = Kube.from_credentials(Credentials(server=api.url, ca_file=str(api.ca_path), token_file=read_from),
                                 timeout=3.0)
    settings = Settings(namespace=NS, group=GROUP, instance=instance, lease_duration=lease, lease_renew=0.5,
                        resync=5.0, condition_mode=False, backoff_initial=0.2, backoff_max=1.0)

    def build(group: dict[str, Any]) -> dict[str, Any]:
        return E.build_entry(E.EntryInputs(group=group, address=address, instance=instance))

    driver = Driver(kube, settings, build, watch_timeout=5).start()
    driver.do(lambda r, now: r.set_health(Health.HEALTHY, ""))
    return VM(refresher.start(), driver, instance, token_file, kube)


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as iss:
        yield iss


def entry(api: KubeAPI, address: str = "10.0.0.5") -> dict[str, Any] | None:
    return api.get("WorkloadEntry", NS, f"{GROUP}-{address}")


def writers(api: KubeAPI) -> set[str]:
    return {r.user for r in list(api.requests) if r.method in ("PATCH", "POST", "PUT", "DELETE")}
