"""The contract suite of the Kubernetes API emulator: real clients against it, one test per rule."""

from __future__ import annotations

import pytest
from kubernetes import client

from devkit.kubeapi import KubeAPI
from devkit.kubeapi.fixtures import kube_client, kubeapi, kubeapi_factory  # noqa: F401

NS = "vm-apps"
GROUP, VERSION = "networking.istio.io", "v1"


@pytest.fixture
def api(kubeapi: KubeAPI) -> KubeAPI:  # noqa: F811
    kubeapi.create_namespace(NS)
    return kubeapi


@pytest.fixture
def co(api: KubeAPI, kube_client: client.ApiClient) -> client.CustomObjectsApi:  # noqa: F811
    return client.CustomObjectsApi(kube_client)


def entry(name: str = "billing-10-0-0-1", **spec: object) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec or {"address": "10.0.0.1", "ports": {"http": 8080}, "labels": {"app": "billing"}}}


def group(name: str = "billing") -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadGroup",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"metadata": {"labels": {"app": name}}, "template": {"serviceAccount": f"{name}-vm"},
                     "probe": {"httpGet": {"port": 8080, "path": "/ready"}}}}
