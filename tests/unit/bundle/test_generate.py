"""The bundle built from a WorkloadGroup equals what istioctl writes for the same inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.bundle import goyaml
from agent.bundle.clusterenv import format_cluster_env
from agent.bundle.clusterenv import quote_value as quote
from agent.bundle.generate import (
    GenerateError,
    Inputs,
    Options,
    canonical_service,
    generate,
    hosts_file,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "istioctl"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def _inputs(case: str, **extra: object) -> Inputs:
    d = FIXTURES / case
    inp = yaml.safe_load((d / "inputs.yaml").read_text())
    opts = Options(internal_ip=inp.get("internal_ip"), external_ip=inp.get("external_ip"),
                   dns_capture=inp.get("dns_capture", True))
    args = dict(group=yaml.safe_load((d / "workloadgroup.yaml").read_text()),
                mesh=(d / "meshconfig.yaml").read_text(), istio_namespace=inp["istio_namespace"],
                revision=inp["revision"], cluster_id=inp["cluster_id"],
                gateway_address=inp.get("gateway_address"), token="TOKEN", root_cert="CERT\n", options=opts)
    args.update(extra)
    return Inputs(**args)  # type: ignore[arg-type]


def test_there_are_several_cases() -> None:
    assert len(CASES) >= 5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["cluster.env", "mesh.yaml", "hosts"])
def test_files_equal_istioctl_output(case: str, name: str) -> None:
    out = generate(_inputs(case))
    assert out[name].decode() == (FIXTURES / case / name).read_text()


def test_token_and_root_cert_are_passed_through() -> None:
    out = generate(_inputs("ipv4"))
    assert out["istio-token"] == b"TOKEN"
    assert out["root-cert.pem"] == b"CERT\n"
    assert sorted(out) == sorted(["cluster.env", "mesh.yaml", "hosts", "root-cert.pem", "istio-token"])


def test_autoregister_adds_the_group_key() -> None:
    out = generate(_inputs("ipv4", options=Options(autoregister=True))).get("cluster.env", b"").decode()
    assert "ISTIO_META_AUTO_REGISTER_GROUP='foo'\n" in out
    assert "ISTIO_SVC_IP" not in out


def test_absent_mesh_config_still_makes_a_bundle() -> None:
    out = generate(_inputs("nil-proxy-metadata", mesh=None))
    assert b"TRUST_DOMAIN=''" in out["cluster.env"]
    assert yaml.safe_load(out["mesh.yaml"])["defaultConfig"]["readinessProbe"] == {"httpGet": {"port": 8080}}


def test_group_without_probe_removes_the_mesh_readiness_probe() -> None:
    inp = _inputs("ipv4")
    group = yaml.safe_load((FIXTURES / "ipv4" / "workloadgroup.yaml").read_text())
    del group["spec"]["probe"]
    mesh = "defaultConfig:\n  readinessProbe:\n    tcpSocket:\n      port: 1\n"
    out = generate(Inputs(**{**inp.__dict__, "group": group, "mesh": mesh}))
    assert "readinessProbe" not in yaml.safe_load(out["mesh.yaml"])["defaultConfig"]


def test_annotation_on_both_places_spec_metadata_wins() -> None:
    group = {"metadata": {"name": "a", "namespace": "n", "annotations": {
        "proxy.istio.io/config": "meshId: one\nproxyMetadata: {A: '1', B: '1'}"}},
        "spec": {"metadata": {"annotations": {"proxy.istio.io/config": "meshId: two\nproxyMetadata: {B: '2'}"}}}}
    out = generate(Inputs(group=group, mesh=None))
    env = out["cluster.env"].decode()
    assert "A='1'" in env and "B='2'" in env and "ISTIO_META_MESH_ID='two'" in env


@pytest.mark.parametrize("mesh, message", [
    ("defaultConfig: [1]", "must be a map"),
    ("defaultConfig:\n  proxyMetadata:\n    A: 1\n", "must be a string"),
    ("{{{", "not valid YAML"),
])
def test_bad_mesh_config_is_a_clear_error(mesh: str, message: str) -> None:
    with pytest.raises(GenerateError, match=message):
        generate(_inputs("ipv4", mesh=mesh))


def test_group_without_name_is_refused() -> None:
    with pytest.raises(GenerateError, match=r"metadata.name"):
        generate(Inputs(group={"metadata": {"namespace": "x"}}, mesh=None))


def test_bad_port_is_refused() -> None:
    group = {"metadata": {"name": "a", "namespace": "n"}, "spec": {"template": {"ports": {"http": "x"}}}}
    with pytest.raises(GenerateError, match=r"ports\.http"):
        generate(Inputs(group=group, mesh=None))


@pytest.mark.parametrize("value, quoted", [
    ("", "''"), ("foo", "'foo'"), ("22,15090", "'22,15090'"), ("w", "w"), ("/w.w-w:w", "/w.w-w:w"),
    ("it's", "'it'\"'\"'s'"), ("*", "'*'"),
])
def test_istioctl_quoting(value: str, quoted: str) -> None:
    assert quote(value) == quoted


def test_cluster_env_sorted_as_lines() -> None:
    text = format_cluster_env({"ISTIO_META_X": "1", "ISTIO_METAJSON_LABELS": "{}", "A": ""})
    assert text == "A=''\nISTIO_METAJSON_LABELS='{}'\nISTIO_META_X='1'\n"


def test_canonical_service_fallbacks() -> None:
    assert canonical_service({}, "wg") == ("wg", "latest")
    assert canonical_service({"app": "a", "version": "v"}, "wg") == ("a", "v")
    assert canonical_service({"app": "a", "app.kubernetes.io/name": "b",
                              "service.istio.io/canonical-name": "c"}, "wg")[0] == "c"


def test_hosts_only_for_ip_addresses() -> None:
    assert hosts_file("fd00::2", "istio-system", "default") == "fd00::2 istiod.istio-system.svc\n"
    assert hosts_file("gw.example.com", "istio-system", "") == ""
    assert hosts_file(None, "istio-system", "x") == ""


def test_go_key_order_puts_letters_after_other_characters() -> None:
    assert goyaml.sorted_keys(["ISTIO_METAJSON_LABELS", "ISTIO_META_X", "a10", "a9"]) == \
        ["ISTIO_META_X", "ISTIO_METAJSON_LABELS", "a9", "a10"]


@pytest.mark.parametrize("value, text", [(8080, "8080"), (0.5, "0.5"), (1e-05, "1e-05"),
                                         (1234567.5, "1.2345675e+06"), (2.0, "2"), (-0.25, "-0.25")])
def test_go_number_format(value: float, text: str) -> None:
    assert goyaml.dump({"n": value}) == f'"n": {text}\n'


def test_go_string_quoting() -> None:
    out = goyaml.dump({"a": "true", "b": "", "c": "8080", "d": "{x}", "e": "plain text", "f": "l1\nl2"})
    assert out == 'a: "true"\nb: ""\nc: "8080"\nd: \'{x}\'\ne: plain text\nf: |-\n  l1\n  l2\n'


def test_go_json_escapes_html_characters() -> None:
    assert goyaml.go_json({"b": "<&>", "a": "ü"}) == '{"a":"ü","b":"\\u003c\\u0026\\u003e"}'
