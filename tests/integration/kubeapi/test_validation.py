"""Istio objects are checked against the CRD schemas (and hand-translated CEL rules) -> 422 Invalid."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from kubernetes import client

from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry, group

WE = (GROUP, VERSION, NS, "workloadentries")


def rejected(co: client.CustomObjectsApi, body: dict, plural: str = "workloadentries") -> list[dict]:
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(GROUP, VERSION, NS, plural, body)
    assert exc.value.status == 422, exc.value.body
    status = json.loads(exc.value.body)
    assert status["reason"] == "Invalid" and status["details"]["kind"] in ("WorkloadEntry", "WorkloadGroup",
                                                                          "ServiceEntry")
    return status["details"]["causes"]


def fields(causes: list[dict]) -> set[str]:
    return {c["field"] for c in causes}


def test_wrong_type_is_invalid(co: client.CustomObjectsApi) -> None:
    causes = rejected(co, entry(address=12))
    assert fields(causes) == {"spec.address"} and "must be of type string" in causes[0]["message"]


def test_entry_needs_address_or_network(co: client.CustomObjectsApi) -> None:
    causes = rejected(co, entry(labels={"app": "x"}))
    assert causes == [{"reason": "FieldValueInvalid", "field": "spec",
                       "message": 'Invalid value: "object": Address is required'}]
    co.create_namespaced_custom_object(*WE, entry(network="net1"))


def test_port_range_and_port_names(co: client.CustomObjectsApi) -> None:
    assert fields(rejected(co, entry(address="10.0.0.1", ports={"http": 0}))) == {"spec.ports.http"}
    assert fields(rejected(co, entry(address="10.0.0.1", ports={"http": 65536}))) == {"spec.ports.http"}
    assert fields(rejected(co, entry(address="10.0.0.1", ports={"-bad": 80}))) == {"spec.ports"}


def test_max_length_and_max_properties(co: client.CustomObjectsApi) -> None:
    causes = rejected(co, entry(address="a" * 257))
    assert causes[0]["reason"] == "FieldValueTooLong" and causes[0]["field"] == "spec.address"
    causes = rejected(co, entry(address="10.0.0.1", ports={f"p{i}": 80 for i in range(129)}))
    assert causes[0]["reason"] == "FieldValueTooMany"


def test_maximum_and_minimum(co: client.CustomObjectsApi) -> None:
    causes = rejected(co, entry(address="10.0.0.1", weight=2**32))
    assert "less than or equal to 4294967295" in causes[0]["message"]
    causes = rejected(co, entry(address="10.0.0.1", weight=-1))
    assert "greater than or equal to 0" in causes[0]["message"]


def test_unix_socket_rules(co: client.CustomObjectsApi) -> None:
    assert "UDS may not be a dir" in rejected(co, entry(address="unix:///run/x/"))[0]["message"]
    assert "UDS may not include ports" in rejected(co, entry(address="unix:///run/x", ports={"a": 1}))[0][
        "message"]


def test_required_fields(co: client.CustomObjectsApi) -> None:
    body = group()
    del body["spec"]["template"]
    assert rejected(co, body, "workloadgroups") == [
        {"reason": "FieldValueRequired", "field": "spec.template", "message": "Required value"}]
    no_spec = entry()
    del no_spec["spec"]
    assert fields(rejected(co, no_spec)) == {"spec"}


def test_probe_is_one_of_and_patterns_and_int32(co: client.CustomObjectsApi) -> None:
    both = group()
    both["spec"]["probe"] = {"httpGet": {"port": 80}, "tcpSocket": {"port": 80}}
    assert fields(rejected(co, both, "workloadgroups")) == {"spec.probe"}
    header = group()
    header["spec"]["probe"] = {"httpGet": {"port": 80, "httpHeaders": [{"name": "bad name", "value": "1"}]}}
    assert fields(rejected(co, header, "workloadgroups")) == {"spec.probe.httpGet.httpHeaders[0].name"}
    big = group()
    big["spec"]["probe"]["periodSeconds"] = 2**31
    assert fields(rejected(co, big, "workloadgroups")) == {"spec.probe.periodSeconds"}
    scheme = group()
    scheme["spec"]["probe"]["httpGet"]["scheme"] = "FTP"
    assert fields(rejected(co, scheme, "workloadgroups")) == {"spec.probe.httpGet.scheme"}


def test_service_entry_enum_min_items_and_cel(co: client.CustomObjectsApi) -> None:
    base = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ServiceEntry", "metadata": {"name": "se"}}
    elsewhere = {"hosts": ["a.example"], "location": "ELSEWHERE"}
    causes = rejected(co, base | {"spec": elsewhere}, "serviceentries")
    assert causes[0]["reason"] == "FieldValueNotSupported"
    assert fields(rejected(co, base | {"spec": {"hosts": []}}, "serviceentries")) == {"spec.hosts"}
    both = {"hosts": ["a.example"], "resolution": "STATIC", "workloadSelector": {"labels": {"app": "x"}},
            "endpoints": [{"address": "10.0.0.1"}]}
    assert "only one of WorkloadSelector or Endpoints" in rejected(co, base | {"spec": both},
                                                                    "serviceentries")[0]["message"]
    ok = {"hosts": ["billing.vm-apps.svc"], "location": "MESH_INTERNAL", "resolution": "STATIC",
          "ports": [{"name": "http", "number": 8080, "protocol": "HTTP"}],
          "workloadSelector": {"labels": {"app": "billing"}}}
    co.create_namespaced_custom_object(GROUP, VERSION, NS, "serviceentries", base | {"spec": ok})


def test_metadata_name_and_labels_are_validated(co: client.CustomObjectsApi) -> None:
    assert fields(rejected(co, entry("Bad_Name"))) == {"metadata.name"}
    body = entry()
    body["metadata"]["labels"] = {"app": "x" * 64}
    assert fields(rejected(co, body)) == {"metadata.labels"}


def test_unknown_fields_are_pruned_with_a_warning(co: client.CustomObjectsApi) -> None:
    body = entry()
    body["spec"]["addres"] = "typo"
    data, _, headers = co.create_namespaced_custom_object_with_http_info(*WE, body)
    assert "addres" not in data["spec"]
    assert 'unknown field \\"spec.addres\\"' in headers.get("Warning", "")


def test_unknown_fields_are_refused_with_strict_field_validation(co: client.CustomObjectsApi) -> None:
    body = entry()
    body["spec"]["addres"] = "typo"
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(*WE, body, field_validation="Strict")
    assert exc.value.status == 400 and 'unknown field "spec.addres"' in json.loads(exc.value.body)["message"]


def test_status_is_validated_on_the_status_subresource(co: client.CustomObjectsApi) -> None:
    co.create_namespaced_custom_object(*WE, entry())
    with pytest.raises(client.ApiException) as exc:
        co.patch_namespaced_custom_object_status(*WE, "billing-10-0-0-1", {"status": {"conditions": [
            {"type": "Healthy", "status": "True", "lastProbeTime": "yesterday"}]}})
    assert exc.value.status == 422
    assert "status.conditions[0].lastProbeTime" in exc.value.body


def test_lease_times_need_six_fractional_digits(kube_client: client.ApiClient, api: object) -> None:
    leases = client.CoordinationV1Api(kube_client)
    whole_second = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    lease = client.V1Lease(metadata=client.V1ObjectMeta(name="l"),
                           spec=client.V1LeaseSpec(holder_identity="vm", renew_time=whole_second))
    with pytest.raises(client.ApiException) as exc:
        leases.create_namespaced_lease(NS, lease)
    assert exc.value.status == 400 and "2006-01-02T15:04:05.000000Z07:00" in exc.value.body
    lease.spec.renew_time = whole_second.replace(microsecond=1)
    lease.spec.lease_duration_seconds = 40
    made = leases.create_namespaced_lease(NS, lease)
    assert made.spec.renew_time == whole_second.replace(microsecond=1)


def test_built_in_types_are_validated_too(kube_client: client.ApiClient, api: object) -> None:
    core = client.CoreV1Api(kube_client)
    with pytest.raises(client.ApiException) as exc:
        core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"),
                                                                 data={"bad key": "v"}))
    assert exc.value.status == 422
    leases = client.CoordinationV1Api(kube_client)
    with pytest.raises(client.ApiException) as exc:
        leases.create_namespaced_lease(NS, client.V1Lease(metadata=client.V1ObjectMeta(name="l"),
                                                          spec=client.V1LeaseSpec(lease_duration_seconds=0)))
    assert exc.value.status == 422 and "spec.leaseDurationSeconds" in json.loads(exc.value.body)["message"]
