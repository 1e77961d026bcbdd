"""The bundle model: cluster.env syntax, every file's checks, parse_bundle's all-problems report."""

from __future__ import annotations

import time

import pytest

from agent.bundle import hosts, model
from agent.bundle.clusterenv import format_cluster_env
from agent.bundle.model import BundleError, parse_bundle, parse_cluster_env
from devkit import bundles as kit

NOW = time.time()


def problems_of(files: dict[str, bytes], **cfg: object) -> list[str]:
    with pytest.raises(BundleError) as exc:
        parse_bundle(files, NOW, kit.config(**cfg))
    return exc.value.problems


# --- cluster.env ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [kit.CLUSTER_ENV_V4, kit.CLUSTER_ENV_V6])
def test_istioctl_cluster_env_round_trips_byte_for_byte(text: str) -> None:
    pairs = parse_cluster_env(text)
    assert format_cluster_env(pairs) == text
    assert format_cluster_env(dict(reversed(pairs))) == text  # istioctl sorts whole lines


def test_values_are_literal_text_never_expanded() -> None:
    env = dict(parse_cluster_env(kit.CLUSTER_ENV_V4))
    assert env["APP_NOTE"] == "it's $(not run) `nor this`"
    assert env["ISTIO_META_NETWORK"] == ""
    assert env["ISTIO_SERVICE_CIDR"] == "*"
    assert env["ISTIO_METAJSON_LABELS"].startswith('{"app":"billing"')


def test_unknown_keys_are_kept_in_file_order() -> None:
    pairs = parse_cluster_env("ZZZ='1'\nAAA=2\nMIDDLE=''\n")
    assert pairs == [("ZZZ", "1"), ("AAA", "2"), ("MIDDLE", "")]


def test_format_quotes_like_istioctl() -> None:
    assert format_cluster_env({}) == "\n"
    assert format_cluster_env({"A": ""}) == "A=''\n"
    assert format_cluster_env({"A": "w"}) == "A=w\n"  # istioctl's safe set: \\, w and @%+=:,./-
    assert format_cluster_env({"A": "@%+=:,./-w"}) == "A=@%+=:,./-w\n"
    assert format_cluster_env({"A": "istiod.istio-system.svc:15012"}) == "A='istiod.istio-system.svc:15012'\n"
    assert format_cluster_env({"A": "it's"}) == "A='it'\"'\"'s'\n"
    assert format_cluster_env({"A": "x y"}) == "A='x y'\n"
    # whole lines are sorted, so KEY= sorts before KEY_SUFFIX= ('=' < '_') and J before _
    assert format_cluster_env({"ISTIO_META_X": "1", "ISTIO_METAJSON": "2", "ISTIO_META": "3"}) == \
        "ISTIO_META='3'\nISTIO_METAJSON='2'\nISTIO_META_X='1'\n"


def test_comments_blank_lines_double_quotes_and_no_final_newline() -> None:
    text = "# made by hand\n\nA=\"it's\"  # comment\nB='x'\"'\"'y'\nC=x#y"
    assert parse_cluster_env(text) == [("A", "it's"), ("B", "x'y"), ("C", "x#y")]


@pytest.mark.parametrize("line, message", [
    ("A=$(reboot)", "unquoted '$'"),
    ("A=`reboot`", "unquoted '`'"),
    ("A=$HOME", "unquoted '$'"),
    ('A="$(reboot)"', "inside double quotes"),
    ("A=x y", "text after the value"),
    ("A='x' ; reboot", "text after the value"),
    ("A=x;reboot", "unquoted ';'"),
    ("A=*", "unquoted '*'"),
    ("A='open", "unterminated single quote"),
    ("export A=1", "expected KEY='value'"),
    ("1A=1", "expected KEY='value'"),
    ("JUSTAWORD", "expected KEY='value'"),
    ("A='x'\r", "carriage return"),
])
def test_bad_lines_are_errors_with_their_line_number(line: str, message: str) -> None:
    with pytest.raises(BundleError) as exc:
        parse_cluster_env(f"GOOD='1'\n{line}\nALSO_GOOD=2\n")
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith("cluster.env:2: ")
    assert message in exc.value.problems[0]


def test_all_bad_lines_are_reported_and_duplicates_name_the_first() -> None:
    with pytest.raises(BundleError) as exc:
        parse_cluster_env("A=1\nB=$(x)\nA=2\nC=`y`\n")
    assert [p.split(":")[1] for p in exc.value.problems] == ["2", "3", "4"]
    assert "duplicate key (first on line 1)" in exc.value.problems[1]


def test_multiline_single_quoted_value_keeps_line_numbers() -> None:
    assert parse_cluster_env("A='one\ntwo'\nB=1\n") == [("A", "one\ntwo"), ("B", "1")]
    with pytest.raises(BundleError) as exc:
        parse_cluster_env("A='one\ntwo'\nB=$(x)\n")
    assert exc.value.problems[0].startswith("cluster.env:3:")


# --- hosts ----------------------------------------------------------------------------------------

def test_hosts_lines_ipv4_ipv6_empty_and_comments() -> None:
    lines, problems = hosts.scan_hosts("# gateway\n192.0.2.1 istiod.istio-system.svc  istiod\n"
                                       "fd00::1 istiod-canary.istio-system.svc\n\n")
    assert problems == []
    assert [str(h) for h in lines] == ["192.0.2.1 istiod.istio-system.svc istiod",
                                       "fd00::1 istiod-canary.istio-system.svc"]
    assert hosts.scan_hosts("") == ([], [])


@pytest.mark.parametrize("text, message", [
    ("999.1.1.1 istiod", "not an IPv4 or IPv6 address"),
    ("192.0.2.1", "expected '<address> <hostname>'"),
    ("192.0.2.1 bad_host!name", "not a valid hostname"),
])
def test_bad_hosts_lines(text: str, message: str) -> None:
    _, problems = hosts.scan_hosts("192.0.2.9 ok.example\n" + text + "\n")
    assert len(problems) == 1 and problems[0].startswith("hosts:2: ") and message in problems[0]


# --- the whole bundle -----------------------------------------------------------------------------

@pytest.mark.parametrize("ipv6", [False, True])
def test_istioctl_bundle_parses(ipv6: bool) -> None:
    files = kit.files(NOW, ipv6=ipv6, extras=True)
    b = parse_bundle(files, NOW, kit.config())
    assert b.files["cluster.env"] == files["cluster.env"]
    assert b.env_map["POD_NAMESPACE"] == kit.NS
    assert b.token_subject == f"system:serviceaccount:{kit.NS}:{kit.SA}"
    assert b.token_expiry == pytest.approx(NOW + 3600, abs=2)
    assert b.cert_expiry > NOW + 3000 * 86400
    assert b.probe is not None and b.probe.http_get is not None
    assert (b.probe.http_get.port, b.probe.http_get.path, b.probe.period) == (8080, "/ready", 5.0)
    assert b.probe.failure_threshold == 3  # the documented default, not pilot-agent's 1
    assert b.hosts[0].address == ("fd00:10:96::10" if ipv6 else "192.0.2.10")
    assert b.sidecar is not None and b.sidecar.version == "1.24.2"
    assert b.workload_group is not None and b.kubeconfig is not None
    assert b.warnings == ()
    assert len(b.digest) == 64 and b.version == b.digest[:12]


def test_bundle_is_frozen() -> None:
    b = parse_bundle(kit.files(NOW), NOW, kit.config())
    with pytest.raises(AttributeError):
        b.digest = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        b.files["cluster.env"] = b""  # type: ignore[index]


def test_hosts_file_is_optional_and_may_be_empty() -> None:
    assert parse_bundle(kit.files(NOW, replace={"hosts": None}), NOW, kit.config()).hosts == ()
    assert parse_bundle(kit.files(NOW, replace={"hosts": b""}), NOW, kit.config()).hosts == ()


def test_every_problem_is_listed_at_once() -> None:
    files = kit.files(NOW, replace={
        "cluster.env": b"A=$(x)\nPOD_NAMESPACE=vm-apps\nSERVICE_ACCOUNT=billing-vm\n",
        "root-cert.pem": kit.make_cert(NOW - 10 * 86400, days_valid=1),
        "istio-token": kit.make_token(NOW, aud=("api",)),
        "hosts": b"nonsense\n", "mesh.yaml": None, "extra.txt": b"x"})
    found = problems_of(files)
    assert len(found) == 6, found
    for needle in ("cluster.env:1:", "expired at", "audience must include", "hosts:1:",
                   "mesh.yaml: missing", "extra.txt: unknown file"):
        assert any(needle in p for p in found), (needle, found)


def test_autoregister_key_is_dropped_with_a_warning_keeping_other_bytes() -> None:
    env = kit.CLUSTER_ENV_V4.replace("ISTIO_INBOUND_PORTS='8080'\n",
                                     "ISTIO_INBOUND_PORTS='8080'\nISTIO_META_AUTO_REGISTER_GROUP='billing'\n")
    b = parse_bundle(kit.files(NOW, replace={"cluster.env": env.encode()}), NOW, kit.config())
    assert b.files["cluster.env"] == kit.CLUSTER_ENV_V4.encode()
    assert "ISTIO_META_AUTO_REGISTER_GROUP" not in b.env_map
    assert b.dropped_keys == ("ISTIO_META_AUTO_REGISTER_GROUP",)
    assert any("dropped ISTIO_META_AUTO_REGISTER_GROUP" in w for w in b.warnings)
    found = problems_of(kit.files(NOW, replace={"cluster.env": env.encode()}), on_autoregister="refuse")
    assert len(found) == 1 and "--autoregister" in found[0]


def test_token_without_exp_warns_and_has_no_expiry() -> None:
    b = parse_bundle(kit.files(NOW, replace={"istio-token": kit.make_token(NOW, claims={"exp": None})}),
                     NOW, kit.config())
    assert b.token_expiry is None and any("no expiry" in w for w in b.warnings)


def test_cert_close_to_expiry_warns() -> None:
    b = parse_bundle(kit.files(NOW, replace={"root-cert.pem": kit.make_cert(NOW, days_valid=5)}),
                     NOW, kit.config())
    assert any("expires soon" in w for w in b.warnings)
    assert b.cert_expiry == pytest.approx(NOW + 5 * 86400, abs=2)


def test_several_root_certs_expiry_is_the_earliest() -> None:
    pem = kit.make_cert(NOW, days_valid=400) + kit.make_cert(NOW, days_valid=100, cn="Old Root")
    b = parse_bundle(kit.files(NOW, replace={"root-cert.pem": pem}), NOW, kit.config())
    assert b.cert_expiry == pytest.approx(NOW + 100 * 86400, abs=2)


def test_probe_kinds_from_mesh_yaml() -> None:
    def probe(yaml_probe: str) -> object:
        mesh = "defaultConfig:\n  readinessProbe:\n" + yaml_probe
        return parse_bundle(kit.files(NOW, replace={"mesh.yaml": mesh.encode()}), NOW,
                            kit.config(allow_exec_probe=True)).probe

    p = probe("    tcpSocket:\n      port: 9000\n    failureThreshold: 2\n")
    assert p.tcp_socket.port == 9000 and p.failure_threshold == 2  # type: ignore[attr-defined]
    p = probe("    exec:\n      command: [/bin/true, x]\n    timeoutSeconds: 4\n")
    assert p.exec.command == ("/bin/true", "x") and p.timeout == 4.0  # type: ignore[attr-defined]
    p = probe("    grpc:\n      port: 9001\n      service: health\n")
    assert (p.grpc.port, p.grpc.service) == (9001, "health")  # type: ignore[attr-defined]
    p = probe("    httpGet:\n      port: 80\n      scheme: HTTPS\n      httpHeaders:\n"
              "      - name: Host\n        value: app\n")
    assert p.http_get.scheme == "HTTPS" and p.http_get.http_headers[0].name == "Host"  # type: ignore


def test_no_readiness_probe_is_fine() -> None:
    b = parse_bundle(kit.files(NOW, replace={"mesh.yaml": b"defaultConfig:\n  meshId: m\n"}), NOW,
                     kit.config())
    assert b.probe is None


def test_sha256sums_valid() -> None:
    import hashlib

    files = kit.files(NOW)
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    files["SHA256SUMS"] = sums.encode()
    assert parse_bundle(files, NOW, kit.config()).extras == ("SHA256SUMS",)


def test_summary_never_shows_the_token() -> None:
    files = kit.files(NOW, extras=True)
    b = parse_bundle(files, NOW, kit.config())
    text = repr(model.summary(b))
    token = files["istio-token"].decode()
    assert token not in text and token.split(".")[1] not in text and token.split(".")[2] not in text
    assert "not-a-real-token" not in text
