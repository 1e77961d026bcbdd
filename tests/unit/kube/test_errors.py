"""Error mapping and token files: the pure parts of agent.kube (errors, auth)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from agent.kube import auth as KA
from agent.kube import errors as KE


def api_exc(status: int, body: dict | None = None, headers: dict | None = None) -> ApiException:
    exc = ApiException(status=status, reason="R")
    exc.body = json.dumps(body) if body is not None else None
    exc.headers = headers
    return exc


def test_refusals_name_verb_and_resource() -> None:
    err = KE.map_error(api_exc(403, {"message": 'leases is forbidden: User "x" cannot patch'}), "patch",
                      'leases.coordination.k8s.io "e" in namespace ns')
    assert isinstance(err, KE.Unauthorized)
    assert str(err).startswith('patch leases.coordination.k8s.io "e" in namespace ns: 403')


def test_invalid_lists_causes() -> None:
    body = {"message": "invalid", "details": {"causes": [{"field": "spec.address", "message": "Required"}]}}
    err = KE.map_error(api_exc(422, body), "patch", "x")
    assert isinstance(err, KE.Invalid) and err.causes == ["spec.address: Required"]
    assert "spec.address: Required" in str(err)


@pytest.mark.parametrize("status,cls", [(404, KE.NotFound), (409, KE.Conflict), (500, KE.Unavailable),
                                        (503, KE.Unavailable), (429, KE.Unavailable)])
def test_status_classes(status: int, cls: type) -> None:
    assert isinstance(KE.map_error(api_exc(status), "get", "x"), cls)


def test_retry_after_is_honoured_and_capped() -> None:
    assert KE.map_error(api_exc(429, headers={"Retry-After": "3"}), "get", "x").retry_after == 3.0
    assert KE.map_error(api_exc(429, headers={"Retry-After": "900"}), "get", "x").retry_after == 30.0
    assert KE.map_error(api_exc(503, headers={"Retry-After": "soon"}), "get", "x").retry_after is None


def test_unreachable_is_retryable() -> None:
    err = KE.map_error(ConnectionRefusedError(111, "refused"), "get", "x")
    assert isinstance(err, KE.Unavailable) and "unreachable" in str(err)


def test_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token-value\n")
    tf = KA.TokenFile(str(path))
    assert tf.current() == "first-token-value"
    new = tmp_path / "token.new"
    new.write_text("second-token-value")
    os.replace(new, path)
    assert tf.current() == "second-token-value"
    path.unlink()
    with pytest.raises(KE.Unauthorized, match="token file"):
        tf.current()


def test_in_cluster_credentials(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t" * 20)
    creds = KA.in_cluster_credentials({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"},
                                     sa_dir=str(tmp_path))
    assert creds is not None and creds.server == "https://[fd00::1]:443"
    assert creds.token_file == str(tmp_path / "token")
    assert KA.in_cluster_credentials({}, sa_dir=str(tmp_path)) is None
