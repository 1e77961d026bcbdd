"""The Istio CRDs kept in the repository, and the script that regenerates them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.kubeapi import openapi

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "devkit" / "kubeapi" / "istio-crds.yaml"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("istio_crds", REPO / "scripts" / "istio-crds.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    out = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{path}[{i}]")
    return out


def test_the_emulator_uses_the_file_in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_AGENT_CRDS", raising=False)
    assert openapi.default_crds_path() == CRDS
    monkeypatch.setenv("MESH_AGENT_CRDS", "/elsewhere/crds.yaml")
    assert openapi.default_crds_path() == Path("/elsewhere/crds.yaml")


def test_every_kind_and_served_version_is_there_with_its_rules() -> None:
    docs = [d for d in yaml.safe_load_all(CRDS.read_text()) if d]
    kinds = {d["spec"]["names"]["kind"]: d for d in docs}
    assert set(kinds) == {"WorkloadEntry", "WorkloadGroup", "ServiceEntry"}
    for doc in docs:
        served = sorted(v["name"] for v in doc["spec"]["versions"] if v["served"])
        assert served == ["v1", "v1alpha3", "v1beta1"]
        rules = [n for p, n in _walk(doc) if p.endswith("x-kubernetes-validations")]
        assert rules, f"{doc['metadata']['name']} lost its CEL rules"
    entry = kinds["WorkloadEntry"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    port = entry["properties"]["spec"]["properties"]["ports"]["additionalProperties"]
    assert port["type"] == "integer"
    assert {"rule": "0 < self && self <= 65535", "message": "port must be between 1-65535"} \
        in port["x-kubernetes-validations"]


def test_no_prose_is_left_and_the_header_names_source_and_license() -> None:
    text = CRDS.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("Derived from Istio release" in line for line in header)
    assert any("crd-all.gen.yaml" in line for line in header)
    assert any("Apache License, Version 2.0" in line for line in header)
    for doc in yaml.safe_load_all(text):
        for path, _ in _walk(doc):
            assert not path.endswith(".description") or ".properties.description" in path, path


def test_regenerating_the_committed_file_changes_nothing() -> None:
    script = _script()
    text = CRDS.read_text()
    release = next(line for line in text.splitlines() if "Derived from Istio release" in line)
    release = release.split("Derived from Istio release ", 1)[1].rstrip(",")
    again = script.render(list(yaml.safe_load_all(text)), release, "manifests/charts/base/files/crd-all.gen.yaml")
    assert again == text


def test_stripping_keeps_fields_named_description_and_every_rule() -> None:
    script = _script()
    schema = {
        "type": "object", "description": "prose",
        "properties": {
            "description": {"type": "string", "description": "a field called description", "maxLength": 9},
            "ports": {"type": "array", "description": "x", "items": {"type": "integer", "description": "y",
                                                                      "minimum": 1, "maximum": 65535}},
            "labels": {"type": "object", "additionalProperties": {"type": "string", "description": "z"},
                       "x-kubernetes-validations": [{"rule": "self.size() < 4", "message": "m"}]},
            "either": {"anyOf": [{"type": "integer", "description": "a"}, {"type": "string"}]},
        },
        "required": ["ports"],
    }
    assert script.strip_schema(schema) == {
        "type": "object",
        "properties": {
            "description": {"type": "string", "maxLength": 9},
            "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"},
                       "x-kubernetes-validations": [{"rule": "self.size() < 4", "message": "m"}]},
            "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["ports"],
    }


def test_an_input_without_the_kinds_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    source = tmp_path / "crds.yaml"
    docs = [d for d in yaml.safe_load_all(CRDS.read_text()) if d["spec"]["names"]["kind"] != "WorkloadGroup"]
    source.write_text(yaml.safe_dump_all(docs))
    assert script.main(["--release", "1.0", str(source)]) == 1
    assert "no CustomResourceDefinition for WorkloadGroup" in capsys.readouterr().err
