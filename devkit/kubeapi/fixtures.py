"""pytest fixtures for suites that talk to the emulator. In a conftest.py:

    from devkit.kubeapi.fixtures import kubeapi, kube_client, kubeapi_factory  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devkit.kubeapi.server import KubeAPI


@pytest.fixture
def kubeapi(tmp_path: Path) -> Iterator[KubeAPI]:
    """A running HTTPS emulator with the Istio CRDs loaded; api.kubeconfig holds an admin token."""
    api = KubeAPI(state_dir=tmp_path / "kubeapi", bookmark_interval=0.5).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def kube_client(kubeapi: KubeAPI) -> Iterator[object]:
    """A kubernetes.client.ApiClient for the admin, from the emulator's kubeconfig."""
    from kubernetes import config

    client = config.new_client_from_config(str(kubeapi.kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def kubeapi_factory(tmp_path: Path) -> Iterator[Callable[..., KubeAPI]]:
    """Start emulators with other options (KubeAPI's keyword arguments); all are stopped afterwards."""
    started: list[KubeAPI] = []

    def start(**options: object) -> KubeAPI:
        options.setdefault("state_dir", tmp_path / f"kubeapi-{len(started)}")
        api = KubeAPI(**options).start()  # type: ignore[arg-type]
        started.append(api)
        return api

    try:
        yield start
    finally:
        for api in started:
            api.stop()
