"""Watches: chunked event streams from a resourceVersion, bookmarks, 410 Gone when too old."""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest
from kubernetes import client, config, dynamic, watch

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry

WE = (GROUP, VERSION, NS, "workloadentries")


def collect(co: client.CustomObjectsApi, count: int, **kw: object) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    w = watch.Watch()
    for ev in w.stream(co.list_namespaced_custom_object, *WE, timeout_seconds=20, **kw):
        seen.append((ev["type"], ev["object"]["metadata"]["name"]))
        if len(seen) >= count:
            w.stop()
    return seen


def test_watch_without_version_lists_then_streams(co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*WE, entry("a"))

    def later() -> None:
        co.create_namespaced_custom_object(*WE, entry("b"))
        co.patch_namespaced_custom_object(*WE, "b", {"spec": {"weight": 2}})
        co.delete_namespaced_custom_object(*WE, "a")

    timer = threading.Timer(0.3, later)
    timer.start()
    try:
        events = collect(co, 4)
    finally:
        timer.join()
    assert events == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a")]


def test_watch_from_a_resource_version_replays_later_events(co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry("a"))
    co.patch_namespaced_custom_object(*WE, "a", {"spec": {"weight": 2}})
    co.create_namespaced_custom_object(*WE, entry("b"))
    events = collect(co, 2, resource_version=made["metadata"]["resourceVersion"])
    assert events == [("MODIFIED", "a"), ("ADDED", "b")]


def test_label_selector_changes_turn_into_added_and_deleted(co: client.CustomObjectsApi) -> None:
    listed = co.list_namespaced_custom_object(*WE)
    co.create_namespaced_custom_object(*WE, entry("a"))
    co.patch_namespaced_custom_object(*WE, "a", {"metadata": {"labels": {"live": "yes"}}})
    co.patch_namespaced_custom_object(*WE, "a", {"metadata": {"labels": {"live": "no"}}})
    events = collect(co, 2, resource_version=listed["metadata"]["resourceVersion"], label_selector="live=yes")
    assert events == [("ADDED", "a"), ("DELETED", "a")]


def test_too_old_resource_version_is_410_gone(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    made = co.create_namespaced_custom_object(*WE, entry("a"))
    co.patch_namespaced_custom_object(*WE, "a", {"spec": {"weight": 2}})
    api.compact()
    with pytest.raises(client.ApiException) as exc:
        collect(co, 1, resource_version=made["metadata"]["resourceVersion"])
    assert exc.value.status == 410


def test_bookmarks_carry_the_current_resource_version(api: KubeAPI, kube_client: client.ApiClient) -> None:
    listed = client.CustomObjectsApi(kube_client).list_namespaced_custom_object(*WE)
    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    req = urllib.request.Request(
        f"{api.url}/apis/{GROUP}/{VERSION}/namespaces/{NS}/workloadentries?watch=1&allowWatchBookmarks=true"
        f"&timeoutSeconds=10&resourceVersion={listed['metadata']['resourceVersion']}",
        headers={"Authorization": f"Bearer {api.admin_token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=20) as stream:
        assert stream.headers["Transfer-Encoding"] == "chunked"
        first = json.loads(stream.readline())
    assert first["type"] == "BOOKMARK" and first["object"]["kind"] == "WorkloadEntry"
    assert int(first["object"]["metadata"]["resourceVersion"]) >= int(listed["metadata"]["resourceVersion"])


def test_watch_one_object_by_field_selector(co: client.CustomObjectsApi) -> None:
    listed = co.list_namespaced_custom_object(*WE)
    co.create_namespaced_custom_object(*WE, entry("a"))
    co.create_namespaced_custom_object(*WE, entry("b"))
    events = collect(co, 1, resource_version=listed["metadata"]["resourceVersion"],
                     field_selector="metadata.name=b")
    assert events == [("ADDED", "b")]


def test_an_outage_ends_open_watches(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    threading.Timer(0.3, api.outage, args=(0.2,)).start()
    start = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - urllib3 reports the dropped stream in several ways
        collect(co, 10)
    assert time.monotonic() - start < 15


def test_dynamic_client_watch_sees_leases(api: KubeAPI, kube_client: client.ApiClient) -> None:
    dyn = dynamic.DynamicClient(kube_client)
    leases = dyn.resources.get(api_version="coordination.k8s.io/v1", kind="Lease")
    threading.Timer(0.2, lambda: dyn.create(leases, namespace=NS, body={
        "metadata": {"name": "vm"}, "spec": {"holderIdentity": "vm-1"}})).start()
    for event in dyn.watch(leases, namespace=NS, timeout=20):
        assert event["type"] == "ADDED" and event["object"].spec.holderIdentity == "vm-1"
        break
    else:
        pytest.fail("no event")


def test_watch_history_is_kept_per_resource(kubeapi_factory: Callable[..., KubeAPI]) -> None:
    api = kubeapi_factory(history=5)
    api.create_namespace(NS)
    kc = config.new_client_from_config(str(api.kubeconfig))
    co = client.CustomObjectsApi(kc)
    start = co.list_namespaced_custom_object(*WE)["metadata"]["resourceVersion"]
    co.create_namespaced_custom_object(*WE, entry("a"))
    for i in range(10):  # many writes of another resource
        api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": NS}})
    assert collect(co, 1, resource_version=start) == [("ADDED", "a")]
    core = client.CoreV1Api(kc)
    with pytest.raises(client.ApiException) as exc:
        for _ in watch.Watch().stream(core.list_namespaced_config_map, NS, resource_version=start,
                                      timeout_seconds=20):
            pass
    assert exc.value.status == 410
    kc.close()
