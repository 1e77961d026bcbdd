"""The core/v1 calls of the cluster bundle source (ConfigMaps, Services, TokenRequest), through the same
client as a Kube; dicts in, dicts out, failures mapped like every other call."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from agent.kube.client import Kube, watch_one
from agent.kube.errors import NotFound, map_error


class CoreCalls:
    """The core/v1 calls the cluster bundle source makes, through a Kube's client; dicts in, dicts out."""

    def __init__(self, kube: Kube) -> None:
        from kubernetes import client

        self.kube = kube
        self.core = client.CoreV1Api(kube.api_client)

    def _call(self, verb: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        resp = self.kube.request(verb, what, fn, *args, _preload_content=False, **kwargs)
        try:
            return json.loads(resp.data)
        except Exception as exc:  # an unreadable answer is mapped like every other failure
            raise map_error(exc, verb, what) from exc

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", f'configmaps "{name}" in namespace {namespace}',
                              self.core.read_namespaced_config_map, name, namespace)
        except NotFound:
            return None

    def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", f'services "{name}" in namespace {namespace}',
                              self.core.read_namespaced_service, name, namespace)
        except NotFound:
            return None

    def create_token(self, namespace: str, service_account: str, seconds: int,
                     audiences: list[str] | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"expirationSeconds": int(seconds)}
        if audiences:
            spec["audiences"] = audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        return self._call("create", f'serviceaccounts/token "{service_account}" in namespace {namespace}',
                          self.core.create_namespaced_service_account_token, service_account, namespace, body)

    def watch_configmap(self, namespace: str, name: str, resource_version: str | None,
                        timeout_seconds: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yields (type, object) for one ConfigMap until the server ends the watch."""
        return watch_one(self.core.list_namespaced_config_map, (namespace,), name, resource_version,
                         timeout_seconds, self.kube.timeout, f'configmaps "{name}" in namespace {namespace}',
                         self.kube.deadline)
