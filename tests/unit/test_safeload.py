"""Deep, huge and aliased documents from outside: one clear line (agent.safeload), never a RecursionError,
never minutes in the YAML scanner."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent import safeload
from agent.bundle import source
from agent.bundle.model import BundleError, parse_bundle
from devkit import bundles as kit

pytestmark = pytest.mark.timeout(30)  # the unfixed parser takes minutes on these

NOW = time.time()
DEEP_FLOW = "defaultConfig: " + "[" * 20000 + "]" * 20000 + "\n"
# 5,000 nested mappings, in flow style and in block style (one space per level; as deep as 1 MiB allows)
DEEP_WG_FLOW = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nspec: " + "{a: " * 5000 + "1" + "}" * 5000
DEEP_WG_BLOCK = "spec:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 1200)) + " " * 1200 + "v: 1\n"


def refused(name: str, text: str, **kw: object) -> list[str]:
    files = kit.files(NOW, extras=True, replace={name: text.encode()})
    with pytest.raises(BundleError) as err:
        parse_bundle(files, NOW, kit.config(**kw))  # type: ignore[arg-type]
    return err.value.problems


def test_mesh_yaml_with_20000_brackets() -> None:
    assert refused("mesh.yaml", DEEP_FLOW) == ["mesh.yaml:1: nested more than 64 levels deep"]


def test_workloadgroup_with_5000_nested_mappings() -> None:
    assert refused("workloadgroup.yaml", DEEP_WG_FLOW) == ["workloadgroup.yaml:3: nested more than 64 levels deep"]
    assert refused("workloadgroup.yaml", DEEP_WG_BLOCK) == ["workloadgroup.yaml:65: nested more than 64 levels deep"]


def test_compact_sequences_count_as_levels() -> None:
    assert refused("sidecar.yaml", "- " * 200 + "x\n") == ["sidecar.yaml:1: nested more than 64 levels deep"]


def test_anchors_and_aliases_are_refused() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    assert refused("kubeconfig", laughs) == [
        "kubeconfig:1: anchors and aliases (&, *) are not allowed; write the values out"]


def test_too_many_values_and_too_large() -> None:
    with pytest.raises(safeload.LoadError, match="more than 100000 values"):
        safeload.load_yaml("[" + ",".join(["0"] * 100_001) + "]", "x.yaml")
    with pytest.raises(safeload.LoadError, match=r"x\.yaml: 1048577 bytes, more than the limit of 1048576"):
        safeload.load_yaml("#" * (1024 * 1024 + 1), "x.yaml")
    with pytest.raises(safeload.LoadError, match="more than 10 values"):
        safeload.load_json("[" + ",".join(["0"] * 11) + "]", max_items=10)


def test_deep_json_is_refused_before_the_parser() -> None:
    with pytest.raises(safeload.LoadError, match=r"x\.json: nested more than 64 levels deep"):
        safeload.load_json("[" * 20000 + "]" * 20000, "x.json")
    with pytest.raises(safeload.LoadError, match="not valid JSON"):
        safeload.load_json('{"a": NaN}')


def test_ordinary_documents_load_as_before() -> None:
    import yaml

    for text in (kit.MESH_YAML, kit.WORKLOADGROUP, kit.KUBECONFIG, kit.SIDECAR_YAML,
                 "command: [/bin/sh, -c, 'echo [[[[ {{']\nurl: https://[::1]:6443/#x\n# [[[[[\n",
                 "a: |\n" + "".join(" " * (2 + i) + "text\n" for i in range(80))):
        assert safeload.load_yaml(text) == yaml.safe_load(text)


def test_a_deep_kubeconfig_in_a_directory_source_does_not_crash_the_fetch(tmp_path: Path) -> None:
    files = kit.files(NOW, replace={"kubeconfig": DEEP_FLOW.encode()})
    fetched = source.read_local(kit.write_dir(tmp_path / "vm", files), 1024 * 1024)
    assert fetched.files["kubeconfig"] == DEEP_FLOW.encode()


def test_brackets_the_line_scan_takes_for_quoted_text_are_still_counted() -> None:
    # In flow context `x'` is a plain scalar and the brackets after it nest; the event count catches it.
    doc = "a: [x'" + "[" * 100 + "y'" + "]" * 101 + "\n"
    with pytest.raises(safeload.LoadError, match=r"x\.yaml:1: (nested more than 64 levels deep|not valid YAML)"):
        safeload.load_yaml(doc, "x.yaml")
