"""The launch specs of the istio and envoy profiles, against what istio-start.sh does."""

from __future__ import annotations

import json

import pytest

from agent.config import SidecarConfig
from agent.sidecar import profiles
from agent.sidecar.profiles import ProfileError

CLUSTER_ENV = {
    "CANONICAL_SERVICE": "billing",
    "CA_ADDR": "istiod.istio-system.svc:15012",
    "ISTIO_INBOUND_PORTS": "8080",
    "ISTIO_NAMESPACE": "vm-apps",
    "ISTIO_SERVICE": "billing.vm-apps",
    "ISTIO_META_NETWORK": "",
    "POD_NAMESPACE": "vm-apps",
    "SERVICE_ACCOUNT": "billing-vm",
}

BOOTSTRAP = json.dumps({
    "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}},
    "static_resources": {"listeners": [
        {"name": "in", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 18080}}},
        {"name": "pipe", "address": {"pipe": {"path": "/run/x.sock"}}},
    ]},
})


def istio(cfg: SidecarConfig | None = None, cluster: dict | None = None, sidecar: dict | None = None,
          address: str | None = "10.0.0.5") -> profiles.LaunchSpec:
    return profiles.istio_profile(cfg or SidecarConfig(), sidecar_env=sidecar or {},
                                  cluster_env=CLUSTER_ENV if cluster is None else cluster,
                                  hostname="vm-1.example.internal", address=address)


def test_istio_runs_pilot_agent_proxy_as_istio_proxy_with_the_scripts_environment() -> None:
    spec = istio()
    assert spec.argv == ("/usr/local/bin/pilot-agent", "proxy")
    assert spec.user == "istio-proxy"
    env = spec.env
    for key, value in CLUSTER_ENV.items():
        if key != "POD_NAMESPACE":
            assert env[key] == value
    assert env["INSTANCE_IP"] == "10.0.0.5"
    assert env["POD_NAME"] == "vm-1"
    assert env["POD_NAMESPACE"] == "vm-apps"
    assert env["PROV_CERT"] == env["OUTPUT_CERTS"] == "/etc/certs"
    assert env["PROXY_CONFIG"] == "serviceCluster: billing.vm-apps\ncontrolPlaneAuthPolicy: MUTUAL_TLS\n"
    assert env["PATH"].startswith("/usr/local/sbin:")
    assert spec.readiness_url == "http://127.0.0.1:15021/healthz/ready"
    assert spec.admin_address == ("127.0.0.1", 15000)
    assert set(spec.ports) == {15000, 15021, 15001, 15006, 15020, 15090}
    assert spec.drain == "signal" and spec.identifier == "istio-proxy"


def test_istio_iptables_setup_and_cleanup_unless_custom() -> None:
    spec = istio()
    pilot = "/usr/local/bin/pilot-agent"
    assert spec.pre_start == ((pilot, "istio-iptables", "--cleanup-only"), (pilot, "istio-iptables"))
    assert spec.post_stop == ((pilot, "istio-iptables", "--cleanup-only"),)
    custom = istio(cluster={**CLUSTER_ENV, "ISTIO_CUSTOM_IP_TABLES": "true"})
    assert custom.pre_start == () and custom.post_stop == ()
    off = istio(SidecarConfig(manage_iptables=False))
    assert off.pre_start == () and off.post_stop == ()


def test_cluster_env_wins_over_sidecar_env_and_defaults_apply() -> None:
    spec = istio(cluster={"ISTIO_SVC_IP": "192.168.1.9", "X": "cluster"},
                 sidecar={"X": "sidecar", "Y": "sidecar", "ISTIO_AGENT_FLAGS": "--log_output_level=debug -v"},
                 address=None)
    env = spec.env
    assert env["X"] == "cluster" and env["Y"] == "sidecar"
    assert env["INSTANCE_IP"] == "192.168.1.9"   # ISTIO_SVC_IP wins over the detected address
    assert env["CA_ADDR"] == "istiod.istio-system.svc:15012"
    assert env["POD_NAMESPACE"] == "default"
    assert env["PROXY_CONFIG"].startswith("serviceCluster: rawvm\n")
    assert spec.argv == ("/usr/local/bin/pilot-agent", "proxy", "--log_output_level=debug", "-v")


def test_istio_respects_given_proxy_config_pod_name_cp_auth_and_tproxy() -> None:
    spec = istio(cluster={**CLUSTER_ENV, "PROXY_CONFIG": "x: 1\n", "POD_NAME": "given",
                          "ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY"})
    assert spec.env["PROXY_CONFIG"] == "x: 1\n"
    assert spec.env["POD_NAME"] == "given"
    assert spec.user == "root"
    none = istio(cluster={**CLUSTER_ENV, "ISTIO_CP_AUTH": "NONE"})
    assert none.env["PROXY_CONFIG"].endswith("controlPlaneAuthPolicy: NONE\n")


def test_istiod_address_precedence_and_discovery_address() -> None:
    base = {k: v for k, v in CLUSTER_ENV.items() if k != "CA_ADDR"}
    env = istio(cluster={**base, "ISTIO_SYSTEM_NAMESPACE": "mesh"}).env
    assert env["CA_ADDR"] == "istiod.mesh.svc:15012"
    assert "discoveryAddress" not in env["PROXY_CONFIG"]
    env = istio(cluster={**base, "ISTIO_PILOT_PORT": "15010"}).env
    assert env["CA_ADDR"] == "istiod.istio-system.svc:15010"
    assert env["PROXY_CONFIG"] == ("serviceCluster: billing.vm-apps\ncontrolPlaneAuthPolicy: MUTUAL_TLS\n"
                                   "discoveryAddress: istiod.istio-system.svc:15010\n")
    env = istio(cluster={**base, "PILOT_ADDRESS": "10.9.9.9:15012", "CA_ADDR": "ca:1"}).env
    assert env["CA_ADDR"] == "ca:1" and env["PROXY_CONFIG"].endswith("discoveryAddress: 10.9.9.9:15012\n")


def test_exec_user_kept_certs_and_workload_identity() -> None:
    spec = istio(sidecar={"EXEC_USER": "proxyuser", "PROV_CERT": ""},
                 cluster={**CLUSTER_ENV, "WORKLOAD_IDENTITY_SOCKET_PATH": "/var/run/wi/socket"})
    assert spec.user == "proxyuser"
    assert spec.env["PROV_CERT"] == "" and spec.env["OUTPUT_CERTS"] == "/etc/certs"
    assert spec.env["JWT_POLICY"] == "none"


def test_istio_without_any_address_is_an_error() -> None:
    with pytest.raises(ProfileError, match="INSTANCE_IP"):
        istio(cluster={"ISTIO_SVC_IP": ""}, address=None)


def test_istio_overrides_for_readiness_and_ports() -> None:
    cfg = SidecarConfig(readiness_url="http://127.0.0.1:25021/healthz/ready", admin_address="127.0.0.1:25000")
    spec = profiles.istio_profile(cfg, sidecar_env={}, cluster_env=CLUSTER_ENV, hostname="h",
                                  address="10.0.0.1", proxy_ports=())
    assert spec.ports == (25000, 25021)
    assert spec.admin_url == "http://127.0.0.1:25000"


def test_envoy_profile_argv_admin_and_ports_from_the_bootstrap() -> None:
    cfg = SidecarConfig(profile="envoy", bootstrap="/etc/envoy/b.json", base_id=7, drain_timeout=2.5)
    spec = profiles.envoy_profile(cfg, BOOTSTRAP, restart_epoch=2)
    assert spec.argv[:7] == ("/usr/local/bin/envoy", "-c", "/etc/envoy/b.json", "--base-id", "7",
                             "--restart-epoch", "2")
    assert spec.argv[spec.argv.index("--drain-time-s") + 1] == "3"
    assert spec.admin_address == ("127.0.0.1", 19000)
    assert spec.readiness_url == "http://127.0.0.1:19000/ready"
    assert spec.ports == (19000, 18080)
    assert spec.user is None and spec.drain == "admin" and spec.pre_start == ()


def test_envoy_profile_yaml_bootstrap_and_wildcard_admin() -> None:
    text = "admin:\n  address:\n    socket_address: {address: '::', port_value: 9901}\n"
    spec = profiles.envoy_profile(SidecarConfig(profile="envoy", bootstrap="/b.yaml"), text)
    assert spec.admin_address == ("::1", 9901)
    assert spec.readiness_url == "http://[::1]:9901/ready"


@pytest.mark.parametrize("text", ["{}", "admin: {}", "[1, 2]", "admin: {address: {socket_address: "
                                  "{port_value: nope}}}", "a: [unclosed"])
def test_envoy_profile_rejects_bootstraps_without_an_admin_port(text: str) -> None:
    with pytest.raises(ProfileError):
        profiles.envoy_profile(SidecarConfig(profile="envoy", bootstrap="/b.yaml"), text)


def test_sidecar_env_reader() -> None:
    text = """# comment
    ISTIO_AGENT_FLAGS="--a --b"

    export ISTIO_CUSTOM_IP_TABLES=true
    EMPTY=
    Q='single $quoted'
    """
    assert profiles.read_env_lines(text) == {"ISTIO_AGENT_FLAGS": "--a --b", "ISTIO_CUSTOM_IP_TABLES": "true",
                                             "EMPTY": "", "Q": "single $quoted"}
    with pytest.raises(ProfileError, match="line 1"):
        profiles.read_env_lines("not a pair")
    with pytest.raises(ProfileError, match="line 2"):
        profiles.read_env_lines("A=1\nB='unclosed")


def test_read_spec_reads_sidecar_env_or_the_bootstrap(tmp_path) -> None:
    from agent.paths import Layout

    layout = Layout(root=tmp_path)
    spec = profiles.read_spec(SidecarConfig(), layout, cluster_env=CLUSTER_ENV, hostname="h",
                              address="10.0.0.1")
    assert spec.profile == "istio" and spec.env["ISTIO_SERVICE"] == "billing.vm-apps"   # no sidecar.env: fine
    layout.sidecar_env.parent.mkdir(parents=True)
    layout.sidecar_env.write_text("# comments\nISTIO_AGENT_FLAGS=--x\n")
    spec = profiles.read_spec(SidecarConfig(), layout, cluster_env=CLUSTER_ENV, hostname="h",
                              address="10.0.0.1")
    assert spec.argv[-1] == "--x"

    (tmp_path / "b.json").write_text(BOOTSTRAP)
    cfg = SidecarConfig(profile="envoy", bootstrap=str(tmp_path / "b.json"))
    spec = profiles.read_spec(cfg, layout, cluster_env={}, hostname="h", address=None)
    assert spec.admin_address == ("127.0.0.1", 19000)
    with pytest.raises(ProfileError, match="cannot read the Envoy bootstrap"):
        profiles.read_spec(SidecarConfig(profile="envoy", bootstrap=str(tmp_path / "missing.json")), layout,
                           cluster_env={}, hostname="h", address=None)
