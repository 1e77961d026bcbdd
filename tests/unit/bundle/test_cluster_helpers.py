"""Pure helpers of the cluster source and the agent's own credential."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from agent.bundle.cluster_inputs import token_times
from agent.bundle.cluster_source import ClusterBundleFetched, ClusterFetchFailed, observe
from agent.metrics import Metrics
from agent.registry.credentials import CredentialError, read_claims, renew_at, write_atomically


def jwt(claims: dict[str, object]) -> str:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.sig"


SA_CLAIMS = {"iat": 1000, "exp": 4600, "aud": ["https://kubernetes.default.svc"],
             "kubernetes.io": {"namespace": "vm-apps", "serviceaccount": {"name": "billing-vm", "uid": "u"}}}


def test_token_times() -> None:
    assert token_times(jwt({"iat": 10, "exp": 20})) == (10.0, 20.0)
    assert token_times("not-a-jwt") == (None, None)


def test_read_claims_and_renewal_time() -> None:
    c = read_claims(jwt(SA_CLAIMS))
    assert (c.namespace, c.service_account, c.audiences) == ("vm-apps", "billing-vm",
                                                             ("https://kubernetes.default.svc",))
    assert c.lifetime == 3600
    assert renew_at(c, 0.7) == 1000 + 0.7 * 3600


def test_a_legacy_or_foreign_token_cannot_be_renewed() -> None:
    with pytest.raises(CredentialError, match="bound service-account token"):
        read_claims(jwt({"iss": "x", "exp": 5}))
    with pytest.raises(CredentialError):
        read_claims("opaque-static-token")


def test_write_atomically_replaces_with_private_mode(tmp_path: Path) -> None:
    target = tmp_path / "d" / "token"
    write_atomically(str(target), b"one", 0o600)
    write_atomically(str(target), b"two", 0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["token"]


def test_observe_records_expiry_and_failures() -> None:
    m = Metrics()
    if not m.enabled:
        pytest.skip("prometheus-client is not installed")
    observe(m, ClusterBundleFetched(files={}, reason="initial", token_expiry=12345.0, refresh_in=10.0))
    observe(m, ClusterFetchFailed(error="down", failures=1, retry_in=1.0, token_expiry=12345.0))
    text = m.render().decode()
    assert 'mesh_agent_expiry_timestamp_seconds{what="token"} 12345.0' in text
    assert 'mesh_agent_errors_total{where="bundle"} 1.0' in text


def test_settings_from_the_configuration() -> None:
    from agent import config
    from agent.bundle.cluster_source import settings_from_config

    cfg = config.parse("bundle:\n  source: kubernetes\n  kubernetes:\n    namespace: vm-apps\n    group: billing\n"
                       "    revision: canary\n    token_lifetime: 2h\n    read_istio_config: false\n"
                       "    static_dir: /etc/mesh-agent/static\n")
    s = settings_from_config(cfg.bundle, svc_ip="10.0.0.5")
    assert (s.namespace, s.group, s.revision, s.token_lifetime) == ("vm-apps", "billing", "canary", 7200)
    assert not s.read_istio_config and s.static_dir == "/etc/mesh-agent/static" and s.svc_ip == "10.0.0.5"


def test_kubernetes_source_needs_the_group() -> None:
    from agent import config

    with pytest.raises(config.ConfigError, match=r"kubernetes\.namespace"):
        config.parse("bundle:\n  source: kubernetes\n")
