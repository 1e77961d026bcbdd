"""The emulator authenticates JWTs from configured issuers as the API server does with an
AuthenticationConfiguration: discovery + JWKS over HTTPS, signature, issuer, audience, exp/nbf, CEL
claim rules and mappings; then its RBAC decides. Every refusal is the server's 401 Status."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from devkit.identity import TestIssuer
from devkit.kubeapi import KubeAPI
from devkit.kubeapi.oidc import ConfigError, OIDCAuthenticators, install

from .conftest import NS

AUD = "https://kube.mesh.test"


@pytest.fixture(scope="module")
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as iss:
        yield iss


def config(issuer: TestIssuer, *, rules: list[dict[str, Any]] | None = None,
           username: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "apiserver.config.k8s.io/v1beta1", "kind": "AuthenticationConfiguration",
            "jwt": [{"issuer": {"url": issuer.url, "audiences": [AUD], "certificateAuthority": issuer.ca_pem},
                     "claimValidationRules": rules if rules is not None else [
                         {"expression": "claims.google.compute_engine.project_id == 'proj-a'",
                          "message": "only project proj-a"}],
                     "claimMappings": {
                         "username": username or {"expression": "'mesh-vm:' + claims.google.compute_engine"
                                                                ".instance_id"},
                         "groups": {"expression": f"['mesh-vm:{NS}:billing']"},
                         "uid": {"claim": "sub"}}}]}


def claims(issuer: TestIssuer, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": issuer.url, "aud": AUD, "sub": "1077", "iat": now, "exp": now + 600,
            "google": {"compute_engine": {"project_id": "proj-a", "instance_id": "4242", "zone": "z"}}}
    base.update(over)
    return base


def whoami(api: KubeAPI, token: str) -> requests.Response:
    return requests.post(f"{api.url}/apis/authentication.k8s.io/v1/selfsubjectreviews",
                         json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                         headers={"Authorization": f"Bearer {token}"}, verify=str(api.ca_path), timeout=5)


def assert_unauthorized(resp: requests.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json() == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "Unauthorized", "reason": "Unauthorized", "code": 401}


def test_a_valid_token_maps_to_user_groups_and_uid(api: KubeAPI, issuer: TestIssuer) -> None:
    install(api, config(issuer))
    resp = whoami(api, issuer.sign(claims(issuer)))
    assert resp.status_code == 201, resp.text
    info = resp.json()["status"]["userInfo"]
    assert info == {"username": "mesh-vm:4242", "uid": "1077",
                    "groups": [f"mesh-vm:{NS}:billing", "system:authenticated"]}


@pytest.mark.parametrize("alg", ["ES256", "ES384"])
def test_ecdsa_tokens_verify(api: KubeAPI, issuer: TestIssuer, alg: str) -> None:
    install(api, config(issuer))
    assert whoami(api, issuer.sign(claims(issuer), alg)).status_code == 201


def test_the_group_is_authorized_by_rbac_and_nothing_more(api: KubeAPI, issuer: TestIssuer) -> None:
    install(api, config(issuer))
    token = issuer.sign(claims(issuer))
    url = f"{api.url}/apis/networking.istio.io/v1/namespaces/{NS}/workloadgroups"
    headers = {"Authorization": f"Bearer {token}"}
    denied = requests.get(url, headers=headers, verify=str(api.ca_path), timeout=5)
    assert denied.status_code == 403
    assert 'User "mesh-vm:4242" cannot list resource "workloadgroups"' in denied.json()["message"]
    api.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "reader", "namespace": NS},
                "rules": [{"apiGroups": ["networking.istio.io"], "resources": ["workloadgroups"],
                           "verbs": ["list"]}]})
    api.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "reader", "namespace": NS},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                              "name": f"mesh-vm:{NS}:billing"}]})
    assert requests.get(url, headers=headers, verify=str(api.ca_path), timeout=5).status_code == 200


@pytest.mark.parametrize("case", ["expired", "wrong-audience", "wrong-issuer", "not-yet-valid", "unsigned",
                                  "tampered", "hmac", "rule-fails", "rule-claim-missing"])
def test_refused_tokens_get_401(api: KubeAPI, issuer: TestIssuer, case: str) -> None:
    install(api, config(issuer))
    now = int(time.time())
    token = {
        "expired": lambda: issuer.sign(claims(issuer, iat=now - 700, exp=now - 100)),
        "wrong-audience": lambda: issuer.sign(claims(issuer, aud="https://other.example")),
        "wrong-issuer": lambda: issuer.sign(claims(issuer, iss="https://127.0.0.1:1")),
        "not-yet-valid": lambda: issuer.sign(claims(issuer, nbf=now + 3600)),
        "unsigned": lambda: issuer.unsigned(claims(issuer)),
        "tampered": lambda: issuer.sign(claims(issuer))[:-6] + "AAAAAA",
        "hmac": lambda: _hs256(claims(issuer)),
        "rule-fails": lambda: issuer.sign(claims(issuer, google={"compute_engine": {
            "project_id": "proj-b", "instance_id": "1"}})),
        "rule-claim-missing": lambda: issuer.sign(claims(issuer, google={})),
    }[case]()
    assert_unauthorized(whoami(api, token))


def _hs256(c: dict[str, Any]) -> str:
    import hashlib
    import hmac

    from devkit.identity import b64, b64json

    signing_input = f"{b64json({'alg': 'HS256', 'kid': ''})}.{b64json(c)}"
    return f"{signing_input}.{b64(hmac.new(b'', signing_input.encode(), hashlib.sha256).digest())}"


def test_a_key_rotated_away_no_longer_verifies(api: KubeAPI) -> None:
    with TestIssuer() as iss:
        install(api, config(iss))
        old = iss.sign(claims(iss))
        assert whoami(api, old).status_code == 201
        iss.rotate()
        # As the API server: the cached keys serve until a token names a new key, which refetches the JWKS.
        assert whoami(api, iss.sign(claims(iss))).status_code == 201
        assert_unauthorized(whoami(api, old))
        assert iss.hits["/jwks"] == 3  # first use, the new key, the old key now unknown


def test_keys_are_cached(api: KubeAPI) -> None:
    with TestIssuer() as iss:
        install(api, config(iss))
        for _ in range(3):
            assert whoami(api, iss.sign(claims(iss))).status_code == 201
        assert iss.hits["/jwks"] == 1 and iss.hits["/.well-known/openid-configuration"] == 1


def test_claim_and_required_value_rule(api: KubeAPI, issuer: TestIssuer) -> None:
    install(api, config(issuer, rules=[{"claim": "sub", "requiredValue": "1077"}],
                        username={"claim": "sub", "prefix": "vm:"}))
    assert whoami(api, issuer.sign(claims(issuer))).json()["status"]["userInfo"]["username"] == "vm:1077"
    assert_unauthorized(whoami(api, issuer.sign(claims(issuer, sub="9"))))


@pytest.mark.parametrize(("change", "message"), [
    (lambda j: j["claimMappings"].update(username={"claim": "sub"}), "prefix is required when claim is set"),
    (lambda j: j["issuer"].update(url="http://insecure"), "URL scheme must be https"),
    (lambda j: j["issuer"].update(audiences=[]), "at least one issuer.audiences"),
    (lambda j: j["claimValidationRules"].append({"expression": "claims.(", "message": "x"}), "compilation failed"),
])
def test_invalid_configuration_is_refused(issuer: TestIssuer, change: Any, message: str) -> None:
    doc = config(issuer)
    change(doc["jwt"][0])
    with pytest.raises(ConfigError, match=message):
        OIDCAuthenticators(doc)
