"""The emulator's schema validator, which other suites also use to check the objects they build."""

from __future__ import annotations

import pytest

from devkit.kubeapi import fieldmanager, openapi


@pytest.fixture(scope="module")
def we_schema() -> dict:
    return openapi.crd_schema("WorkloadEntry", "v1")


def test_every_cel_rule_of_the_istio_crds_is_translated() -> None:
    for crd in openapi.load_crds():
        for version in crd.versions:
            assert openapi.untranslated_rules(version.schema) == [], (crd.kind, version.name)


def test_all_three_kinds_and_versions_are_loaded() -> None:
    kinds = {crd.kind: [v.name for v in crd.versions if v.served] for crd in openapi.load_crds()}
    versions = ["v1", "v1alpha3", "v1beta1"]
    assert kinds == {k: versions for k in ("ServiceEntry", "WorkloadEntry", "WorkloadGroup")}


def test_a_good_entry_has_no_errors() -> None:
    obj = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "x"},
           "spec": {"address": "fd00::1", "ports": {"http": 8080}, "labels": {"app": "a"},
                    "serviceAccount": "sa", "network": "n1", "locality": "r/z/s", "weight": 1}}
    assert openapi.validate_object(obj) == []


def test_errors_name_field_paths(we_schema: dict) -> None:
    body = {"spec": {"address": "x" * 300, "ports": {"http": 0}, "weight": "heavy"}}
    assert sorted(openapi.validate(we_schema, body)) == [
        "spec.address: Too long: may not be more than 256 bytes",
        'spec.ports.http: Invalid value: 0: port must be between 1-65535',
        'spec.weight: Invalid value: "string": spec.weight in body must be of type integer: "string"',
    ]


def test_cel_rule_on_the_spec(we_schema: dict) -> None:
    assert openapi.validate(we_schema, {"spec": {"labels": {}}}) == [
        'spec: Invalid value: "object": Address is required']


def test_required_spec(we_schema: dict) -> None:
    assert openapi.validate(we_schema, {}) == ["spec: Required value"]


def test_unknown_fields_are_errors_unless_asked_otherwise(we_schema: dict) -> None:
    body = {"spec": {"address": "10.0.0.1", "adress": "typo"}, "status": {"anything": 1}}
    assert openapi.validate(we_schema, body) == ["spec.adress: field not declared in schema"]
    assert openapi.validate(we_schema, body, unknown_fields=False) == []
    assert openapi.prune(we_schema, body) == {"spec": {"address": "10.0.0.1"}, "status": {"anything": 1}}


def test_workload_group_probe_one_of() -> None:
    schema = openapi.crd_schema("WorkloadGroup", "v1beta1")
    ok = {"spec": {"template": {}, "probe": {"tcpSocket": {"port": 1}}}}
    assert openapi.validate(schema, ok) == []
    assert openapi.validate(schema, {"spec": {"template": {}, "probe": {"periodSeconds": 5}}}) == []
    both = {"spec": {"template": {}, "probe": {"tcpSocket": {"port": 1}, "exec": {"command": ["true"]}}}}
    assert [e.split(":")[0] for e in openapi.validate(schema, both)] == ["spec.probe"]


def test_int_or_string_and_date_time() -> None:
    schema = openapi.crd_schema("WorkloadEntry", "v1")
    status = {"spec": {"address": "a"}, "status": {"observedGeneration": "3", "conditions": [
        {"type": "Healthy", "status": "True", "lastProbeTime": "2026-01-01T00:00:00Z"}]}}
    assert openapi.validate(schema, status) == []
    status["status"]["observedGeneration"] = 1.5
    status["status"]["conditions"][0]["lastProbeTime"] = "now"
    assert len(openapi.validate(schema, status)) == 2


def test_field_sets_use_the_managed_fields_spelling() -> None:
    schema = fieldmanager.object_schema({"properties": {"spec": {"properties": {"ports": {
        "type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object",
                  "properties": {"name": {"type": "string"}, "number": {"type": "integer"}}}}}}}})
    obj = {"metadata": {"name": "x", "labels": {"a": "b"}, "finalizers": ["f/x"]},
           "spec": {"ports": [{"name": "http", "number": 80}], "hosts": ["a"]}}
    paths = set(fieldmanager.flatten(obj, schema))
    assert fieldmanager.to_fields_v1(paths) == {
        "f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {'v:"f/x"': {}}},
        "f:spec": {"f:hosts": {}, "f:ports": {'k:{"name":"http"}': {".": {}, "f:name": {}, "f:number": {}}}}}
    assert fieldmanager.from_fields_v1(fieldmanager.to_fields_v1(paths)) == paths


def test_validate_object_checks_metadata_too() -> None:
    obj = {"apiVersion": "networking.istio.io/v1beta1", "kind": "WorkloadEntry",
           "metadata": {"name": "Billing_VM", "labels": {"app": "-x"}}, "spec": {"address": "10.0.0.1"}}
    assert [e.split(":")[0] for e in openapi.validate_object(obj)] == ["metadata.name", "metadata.labels"]
    [error] = openapi.validate_object({**obj, "apiVersion": "networking.istio.io/v2"})
    assert error.startswith("apiVersion")
