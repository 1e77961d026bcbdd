#!/usr/bin/env python3
"""Regenerate devkit/kubeapi/istio-crds.yaml, the Istio CRDs the Kubernetes API emulator enforces.

Reads an Istio CRD file (e.g. manifests/charts/base/files/crd-all.gen.yaml from an Istio release, or
the output of `istioctl manifest generate`), keeps WorkloadEntry, WorkloadGroup and ServiceEntry with
every served version, and drops the prose: `description` of every schema node and printer column.
What validation needs stays: types, required fields, enums, formats, patterns, bounds, defaults and
the CEL rules (x-kubernetes-validations), so the emulator refuses what Istio's API server refuses.

    scripts/istio-crds.py --release 1.27.3 --source manifests/charts/base/files/crd-all.gen.yaml \
        crd-all.gen.yaml > devkit/kubeapi/istio-crds.yaml
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

KINDS = ("ServiceEntry", "WorkloadEntry", "WorkloadGroup")

# Schema keywords whose values are maps of names to schemas: their keys are field names, not keywords,
# so a field that happens to be called `description` is kept.
NAMED_SCHEMAS = ("properties", "patternProperties", "definitions", "dependencies")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMA_VALUES = ("items", "additionalProperties", "not")

HEADER = """\
# Istio's CustomResourceDefinitions for WorkloadEntry, WorkloadGroup and ServiceEntry, as structural
# schemas: every served version with its types, required fields, enums, formats, patterns and CEL
# validation rules; the prose descriptions are stripped.
#
# Derived from Istio release {release},
# file {source} of istio/istio.
# Regenerate with scripts/istio-crds.py (see its docstring); do not edit by hand.
#
# Copyright Istio Authors. Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain a copy of the License at
# http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable law or agreed to in
# writing, software distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the specific
# language governing permissions and limitations under the License.
"""


def strip_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 schema node without `description` keywords, at any depth."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key in NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: strip_schema(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [strip_schema(sub) for sub in value]
        elif key in SCHEMA_VALUES:
            out[key] = strip_schema(value)
        else:
            out[key] = value
    return out


def strip_crd(crd: dict[str, Any]) -> dict[str, Any]:
    """The CRD with only what the API server acts on: names, scope, versions, schemas, columns."""
    meta = crd["metadata"]
    spec = crd["spec"]
    versions = []
    for version in spec["versions"]:
        v = {k: val for k, val in version.items() if k not in ("schema", "additionalPrinterColumns")}
        if "additionalPrinterColumns" in version:
            v["additionalPrinterColumns"] = [{k: val for k, val in col.items() if k != "description"}
                                             for col in version["additionalPrinterColumns"]]
        if "schema" in version:
            v["schema"] = {"openAPIV3Schema": strip_schema(version["schema"]["openAPIV3Schema"])}
        versions.append(v)
    return {
        "apiVersion": crd["apiVersion"],
        "kind": crd["kind"],
        "metadata": {k: meta[k] for k in ("name", "labels", "annotations") if k in meta},
        "spec": {**{k: spec[k] for k in ("group", "names", "scope") if k in spec}, "versions": versions},
    }


def select(documents: list[Any]) -> list[dict[str, Any]]:
    """The wanted CRDs in a stable order; an error naming the missing kinds if any is absent."""
    found = {d["spec"]["names"]["kind"]: d for d in documents
             if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
             and d.get("spec", {}).get("names", {}).get("kind") in KINDS}
    missing = [k for k in KINDS if k not in found]
    if missing:
        raise ValueError(f"the input has no CustomResourceDefinition for {', '.join(missing)}")
    return [strip_crd(found[k]) for k in KINDS]


def render(documents: list[Any], release: str, source: str) -> str:
    crds = select(documents)
    body = "---\n".join(yaml.safe_dump(c, sort_keys=True, default_flow_style=False, width=100) for c in crds)
    return HEADER.format(release=release, source=source) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="an Istio CRD file (several YAML documents)")
    parser.add_argument("--release", required=True, help="the Istio release the input comes from")
    parser.add_argument("--source", default="manifests/charts/base/files/crd-all.gen.yaml",
                        help="the input's path in Istio's repository, for the header")
    args = parser.parse_args(argv)
    with open(args.input, encoding="utf-8") as f:
        documents = list(yaml.safe_load_all(f))
    try:
        sys.stdout.write(render(documents, args.release, args.source))
    except ValueError as e:
        print(f"istio-crds: {args.input}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
