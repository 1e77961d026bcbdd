"""Events: written through events.k8s.io/v1 with the API server's validation, read through core/v1 too
(the same objects under the old field names, with the field selectors `kubectl describe` uses), and
shown by the real kubectl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import NS, entry
from tests.integration.kubeapi.test_kubectl import kubectl

EV = ("events.k8s.io", "v1", NS, "events")
WHEN = "2026-01-02T03:04:05.123456Z"


def event(name: str = "billing-10-0-0-1.1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": name, "namespace": NS},
        "eventTime": WHEN, "reportingController": "mesh-agent.io/registry", "reportingInstance": "0123abcd",
        "action": "Withdraw", "reason": "AppExited", "type": "Warning",
        "note": "process 4121 (python3) exited with status 137; entry billing-10-0-0-1 withdrawn",
        "regarding": {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "namespace": NS,
                      "name": "billing-10-0-0-1", "uid": "u-1"}}
    for key, value in over.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def refused(co: client.CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ApiException) as err:
        co.create_namespaced_custom_object(*EV, body)
    assert err.value.status == 422, err.value.body
    return json.loads(err.value.body)


def fields(status: dict[str, Any]) -> set[str]:
    return {c["field"] for c in status["details"]["causes"]}


def test_create_and_series_patch(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    created = co.create_namespaced_custom_object(*EV, event())
    assert created["note"].startswith("process 4121") and "series" not in created
    patched = co.patch_namespaced_custom_object(
        *EV[:3], "events", created["metadata"]["name"],
        {"series": {"count": 2, "lastObservedTime": "2026-01-02T03:05:00.000001Z"}})
    assert patched["series"] == {"count": 2, "lastObservedTime": "2026-01-02T03:05:00.000001Z"}
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])


@pytest.mark.parametrize(("over", "field", "text"), [
    ({"eventTime": None}, "eventTime", "Required value"),
    ({"type": "Bad"}, "type", "has invalid value: Bad"),
    ({"type": None}, "type", "has invalid value"),
    ({"reportingController": None}, "reportingController", "Required value"),
    ({"reportingController": "Mesh Agent"}, "reportingController", "name part must consist"),
    ({"reportingInstance": "x" * 129}, "reportingInstance", "can have at most 128 characters"),
    ({"action": None}, "action", "Required value"),
    ({"reason": None}, "reason", "Required value"),
    ({"reason": "R" * 129}, "reason", "can have at most 128 characters"),
    ({"note": "n" * 1025}, "message", "can have at most 1024 characters"),
    ({"regarding": {"kind": "WorkloadEntry", "name": "x", "namespace": "other"}}, "involvedObject.namespace",
     "does not match event.namespace"),
    ({"series": {"count": 1, "lastObservedTime": WHEN}}, "series.count", "should be at least 2"),
    ({"series": {"count": 3}}, "series.lastObservedTime", "Required value"),
    ({"deprecatedCount": 3}, "count", "needs to be unset"),
    ({"deprecatedSource": {"component": "x"}}, "source", "needs to be unset"),
    ({"deprecatedFirstTimestamp": "2026-01-02T03:04:05Z"}, "firstTimestamp", "needs to be unset"),
])
def test_create_validation(api: KubeAPI, co: client.CustomObjectsApi, over: dict[str, Any], field: str,
                           text: str) -> None:
    status = refused(co, event(**over))
    assert field in fields(status), status
    assert text in status["message"]
    assert api.objects("Event", NS) == []


def test_note_limit_counts_bytes_and_a_full_note_passes(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*EV, event(note="n" * 1024))
    assert "message" in fields(refused(co, event(name="e2", note="é" * 513)))  # 1026 bytes


def test_event_time_is_a_micro_time(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as err:
        co.create_namespaced_custom_object(*EV, event(eventTime="2026-01-02T03:04:05Z"))
    assert err.value.status == 400 and "MicroTime" in json.loads(err.value.body)["message"]


def test_only_the_series_may_change(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    name = co.create_namespaced_custom_object(*EV, event())["metadata"]["name"]
    for change, field in [({"note": "other"}, "message"), ({"reason": "Other"}, "reason"),
                          ({"type": "Normal"}, "type"), ({"action": "Other"}, "action"),
                          ({"regarding": {"kind": "WorkloadGroup", "name": "billing", "namespace": NS}},
                           "involvedObject")]:
        with pytest.raises(ApiException) as err:
            co.patch_namespaced_custom_object(*EV[:3], "events", name, change)
        assert err.value.status == 422 and field in fields(json.loads(err.value.body)), change
    with pytest.raises(ApiException) as err:
        co.patch_namespaced_custom_object(*EV[:3], "events", name, {"series": {"count": 1, "lastObservedTime": WHEN}})
    assert err.value.status == 422


def test_core_view_and_the_describe_field_selector(api: KubeAPI, co: client.CustomObjectsApi,
                                                   kube_client: client.ApiClient) -> None:
    co.create_namespaced_custom_object(*EV, event())
    co.create_namespaced_custom_object(*EV, event(name="other.2", regarding={
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup", "namespace": NS, "name": "billing"}))
    core = client.CoreV1Api(kube_client)
    # What kubectl describe asks: involvedObject name, namespace, kind and uid.
    sel = f"involvedObject.kind=WorkloadEntry,involvedObject.name=billing-10-0-0-1,involvedObject.namespace={NS}," \
          "involvedObject.uid=u-1"
    listed = core.list_namespaced_event(NS, field_selector=sel, limit=500)
    assert [e.reason for e in listed.items] == ["AppExited"]
    ev = listed.items[0]
    assert ev.message.startswith("process 4121") and ev.reporting_component == "mesh-agent.io/registry"
    assert ev.involved_object.uid == "u-1" and ev.type == "Warning"
    assert ev.event_time is not None and ev.count is None
    groups = core.list_namespaced_event(NS, field_selector="involvedObject.kind=WorkloadGroup,type=Warning")
    assert len(groups.items) == 1
    assert core.list_namespaced_event(NS, field_selector="type=Normal").items == []
    assert len(core.list_namespaced_event(NS).items) == 2
    with pytest.raises(ApiException) as err:
        core.create_namespaced_event(NS, client.CoreV1Event(metadata=client.V1ObjectMeta(name="x"),
                                                            involved_object=client.V1ObjectReference()))
    assert err.value.status == 405
    with pytest.raises(ApiException) as err:
        core.list_namespaced_event(NS, field_selector="note=x")
    assert err.value.status == 400


@pytest.mark.subprocess
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_describe_and_get_events(api: KubeAPI, co: client.CustomObjectsApi, tmp_path: Path) -> None:
    we = api.create(entry())
    uid = we["metadata"]["uid"]
    name = co.create_namespaced_custom_object(*EV, event(regarding={
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "namespace": NS,
        "name": "billing-10-0-0-1", "uid": uid}))["metadata"]["name"]
    co.patch_namespaced_custom_object(*EV[:3], "events", name,
                                      {"series": {"count": 4, "lastObservedTime": WHEN}})
    described = kubectl(api, tmp_path, "-n", NS, "describe", "workloadentry", "billing-10-0-0-1").stdout
    events = described.split("Events:", 1)[1]
    assert "AppExited" in events and "(x4 over" in events and "mesh-agent.io/registry" in events
    assert "process 4121 (python3) exited with status 137" in events
    table = kubectl(api, tmp_path, "-n", NS, "get", "events").stdout
    assert table.split()[:5] == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT"]
    assert "workloadentry/billing-10-0-0-1" in table and "AppExited" in table
