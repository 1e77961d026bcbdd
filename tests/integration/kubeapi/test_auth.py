"""Bearer tokens, client certificates, RBAC-like policies (401/403), SelfSubjectAccessReview, TokenRequest."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from kubernetes import client, config

from devkit.kubeapi import KubeAPI, rules
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION, entry

WE = (GROUP, VERSION, NS, "workloadentries")


def client_for(api: KubeAPI, token: str, tmp_path: Path) -> client.ApiClient:
    path = api.write_kubeconfig(tmp_path / f"kc-{abs(hash(token))}", token)
    return config.new_client_from_config(str(path))


def test_unknown_token_is_401(api: KubeAPI, tmp_path: Path) -> None:
    co = client.CustomObjectsApi(client_for(api, "nobody-knows-this", tmp_path))
    with pytest.raises(client.ApiException) as exc:
        co.list_namespaced_custom_object(*WE)
    assert exc.value.status == 401 and json.loads(exc.value.body)["reason"] == "Unauthorized"


def test_expired_token_is_401(api: KubeAPI, tmp_path: Path) -> None:
    api.add_token("old", "alice", [rules("*", "*")], expires_at=time.time() - 1)
    with pytest.raises(client.ApiException) as exc:
        client.CustomObjectsApi(client_for(api, "old", tmp_path)).list_namespaced_custom_object(*WE)
    assert exc.value.status == 401


def test_policy_limits_verbs_resources_and_namespaces(api: KubeAPI, tmp_path: Path) -> None:
    api.create_namespace("elsewhere")
    api.add_token("t", "agent", [rules("get,list,watch,create,patch", "workloadentries", NS)])
    co = client.CustomObjectsApi(client_for(api, "t", tmp_path))
    co.create_namespaced_custom_object(*WE, entry())
    with pytest.raises(client.ApiException) as exc:
        co.delete_namespaced_custom_object(*WE, "billing-10-0-0-1")
    status = json.loads(exc.value.body)
    assert exc.value.status == 403 and status["reason"] == "Forbidden"
    assert status["message"] == ('workloadentries.networking.istio.io "billing-10-0-0-1" is forbidden: User '
                                 '"agent" cannot delete resource "workloadentries" in API group '
                                 '"networking.istio.io" in the namespace "vm-apps"')
    with pytest.raises(client.ApiException) as exc:
        co.list_namespaced_custom_object(GROUP, VERSION, "elsewhere", "workloadentries")
    assert exc.value.status == 403
    with pytest.raises(client.ApiException) as exc:
        co.list_cluster_custom_object(GROUP, VERSION, "workloadentries")
    assert exc.value.status == 403 and "at the cluster scope" in exc.value.body
    with pytest.raises(client.ApiException) as exc:
        co.patch_namespaced_custom_object_status(*WE, "billing-10-0-0-1", {"status": {}})
    assert exc.value.status == 403
    assert 'resource "workloadentries/status"' in json.loads(exc.value.body)["message"]


def test_self_subject_access_review_answers_from_the_policy(api: KubeAPI, tmp_path: Path) -> None:
    api.add_token("t", "agent", [rules("patch", "workloadentries", NS)])
    authz = client.AuthorizationV1Api(client_for(api, "t", tmp_path))

    def can(verb: str, ns: str = NS) -> bool:
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(namespace=ns, verb=verb, group=GROUP,
                                                            resource="workloadentries")))
        return authz.create_self_subject_access_review(review).status.allowed

    assert can("patch") and not can("delete") and not can("patch", "other")


def test_token_request_mints_a_service_account_jwt(api: KubeAPI, kube_client: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_client)
    core.create_namespaced_service_account(NS, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="billing-vm")))
    req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=["istio-ca"], expiration_seconds=3600))
    out = core.create_namespaced_service_account_token("billing-vm", NS, req)
    payload = out.status.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == ["istio-ca"] and claims["sub"] == f"system:serviceaccount:{NS}:billing-vm"
    assert claims["exp"] - claims["iat"] == 3600
    too_short = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[],
                                                                                  expiration_seconds=60))
    with pytest.raises(client.ApiException) as exc:
        core.create_namespaced_service_account_token("billing-vm", NS, too_short)
    assert exc.value.status == 422
    with pytest.raises(client.ApiException) as exc:
        core.create_namespaced_service_account_token("missing", NS, req)
    assert exc.value.status == 404


def test_minted_tokens_authenticate_as_the_service_account(api: KubeAPI, tmp_path: Path) -> None:
    api.create({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "reaper", "namespace": NS}})
    api.grant(f"system:serviceaccount:{NS}:reaper", [rules("list", "workloadentries", NS)])
    token = api.mint_token(NS, "reaper")
    co = client.CustomObjectsApi(client_for(api, token, tmp_path))
    assert co.list_namespaced_custom_object(*WE)["items"] == []
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(*WE, entry())
    assert exc.value.status == 403
    assert f'User "system:serviceaccount:{NS}:reaper"' in json.loads(exc.value.body)["message"]
    istio_token = api.mint_token(NS, "reaper", audiences=["istio-ca"])
    with pytest.raises(client.ApiException) as exc:
        client.CustomObjectsApi(client_for(api, istio_token, tmp_path)).list_namespaced_custom_object(*WE)
    assert exc.value.status == 401  # a token for istiod is not a token for the API server
    api.delete("ServiceAccount", NS, "reaper")
    with pytest.raises(client.ApiException) as exc:
        co.list_namespaced_custom_object(*WE)
    assert exc.value.status == 401


def _tls_post(api: KubeAPI, path: str, body: dict, cert: object | None = None, token: str | None = None,
              tmp_path: Path | None = None) -> tuple[int, dict]:
    """A bare HTTPS request, optionally with a client certificate (cert: a ClientCert) and a token."""
    import http.client
    import ssl

    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    if cert is not None:
        assert tmp_path is not None
        (tmp_path / "c.crt").write_bytes(cert.cert_pem)
        (tmp_path / "c.key").write_bytes(cert.key_pem)
        ctx.load_cert_chain(tmp_path / "c.crt", tmp_path / "c.key")
    conn = http.client.HTTPSConnection(api.host, api.port, context=ctx, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, json.dumps(body), headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


WHOAMI = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
WHOAMI_BODY = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}


def test_client_certificate_authenticates_its_cn_and_organizations(api: KubeAPI, tmp_path: Path) -> None:
    cert = api.issue_client_cert("vm-alice", ["team-a", "team-b"])
    code, review = _tls_post(api, WHOAMI, WHOAMI_BODY, cert=cert, tmp_path=tmp_path)
    assert code == 201
    info = review["status"]["userInfo"]
    assert info["username"] == "vm-alice"
    assert {"team-a", "team-b", "system:authenticated"} <= set(info["groups"])


def test_client_certificate_rules_come_from_its_groups(api: KubeAPI, tmp_path: Path) -> None:
    api.grant("team-b", [rules("list", "workloadentries", NS)])
    cert = api.issue_client_cert("vm-bob", ["team-b"])
    (tmp_path / "b.crt").write_bytes(cert.cert_pem)
    (tmp_path / "b.key").write_bytes(cert.key_pem)
    kc = api.write_kubeconfig(tmp_path / "cert.kubeconfig", user="bob", credentials={
        "client-certificate": str(tmp_path / "b.crt"), "client-key": str(tmp_path / "b.key")})
    co = client.CustomObjectsApi(config.new_client_from_config(str(kc)))
    assert co.list_namespaced_custom_object(*WE)["items"] == []
    with pytest.raises(client.ApiException) as exc:
        co.create_namespaced_custom_object(*WE, entry())
    assert exc.value.status == 403 and 'User "vm-bob" cannot create' in json.loads(exc.value.body)["message"]


def test_client_certificate_comes_before_a_token(api: KubeAPI, tmp_path: Path) -> None:
    """As the API server's union authenticator: x509 is asked first."""
    api.add_token("carol-token", "carol")
    cert = api.issue_client_cert("vm-dave")
    code, review = _tls_post(api, WHOAMI, WHOAMI_BODY, cert=cert, token="carol-token", tmp_path=tmp_path)
    assert code == 201 and review["status"]["userInfo"]["username"] == "vm-dave"
    code, review = _tls_post(api, WHOAMI, WHOAMI_BODY, token="carol-token")
    assert code == 201 and review["status"]["userInfo"]["username"] == "carol"


def test_a_certificate_from_another_ca_is_refused(api: KubeAPI, tmp_path: Path) -> None:
    import ssl

    from devkit.kubeapi.clientcerts import ClientCA

    stranger = ClientCA().issue("mallory", ["system:masters"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_post(api, WHOAMI, WHOAMI_BODY, cert=stranger, tmp_path=tmp_path)
