"""Faults a test can inject: latency, 429 with Retry-After, 5xx, connection resets, outages."""

from __future__ import annotations

import http.client
import json
import ssl
import time

import pytest
from kubernetes import client

from devkit.kubeapi import KubeAPI
from tests.integration.kubeapi.conftest import GROUP, NS, VERSION

WE = (GROUP, VERSION, NS, "workloadentries")
PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/workloadentries"


def get(api: KubeAPI, path: str = PATH) -> http.client.HTTPResponse:
    """One plain request, no client-side retries."""
    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, context=ctx, timeout=20)
    conn.request("GET", path, headers={"Authorization": f"Bearer {api.admin_token}"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_latency_delays_matching_requests(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    fault = api.faults.latency(0.3, path="workloadentries", times=1)
    start = time.monotonic()
    co.list_namespaced_custom_object(*WE)
    assert time.monotonic() - start >= 0.3
    co.list_namespaced_custom_object(*WE)
    assert fault.hits == 1 and fault.times == 0  # used up by the first request only


def test_429_carries_retry_after(api: KubeAPI) -> None:
    api.faults.status(429, retry_after=2, method="GET")
    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, context=ctx, timeout=20)
    conn.request("GET", PATH, headers={"Authorization": f"Bearer {api.admin_token}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 429 and resp.headers["Retry-After"] == "2"
    assert body["reason"] == "TooManyRequests" and body["details"] == {"retryAfterSeconds": 2}
    assert get(api).status == 200


def test_the_python_client_itself_waits_out_a_429(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    # urllib3 (under the kubernetes client) retries 429/503 with Retry-After on its own: a caller
    # sees the delay, not the error, unless it turns urllib3's retries off.
    api.faults.status(429, retry_after=1, method="GET")
    start = time.monotonic()
    assert co.list_namespaced_custom_object(*WE)["items"] == []
    assert time.monotonic() - start >= 1
    assert [r.code for r in api.requests if r.path == PATH][-2:] == [429, 200]


@pytest.mark.parametrize("code,reason", [(500, "InternalError"), (503, "ServiceUnavailable")])
def test_server_errors_for_n_requests_then_recovery(api: KubeAPI, code: int, reason: str) -> None:
    api.faults.status(code, times=2)
    assert [get(api).status for _ in range(3)] == [code, code, 200]
    assert [r.code for r in api.requests[-3:]] == [code, code, 200]


def test_connection_reset(api: KubeAPI) -> None:
    api.faults.reset(times=1)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, ssl.SSLError, OSError)):
        get(api)
    assert get(api).status == 200


def test_outage_refuses_connections_then_recovers(api: KubeAPI) -> None:
    api.outage(0.5)
    with pytest.raises(ConnectionRefusedError):
        get(api)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            assert get(api).status == 200
            break
        except ConnectionRefusedError:
            time.sleep(0.05)
    else:
        pytest.fail("the server did not come back")


def test_but_a_patch_sees_the_429(api: KubeAPI, co: client.CustomObjectsApi) -> None:
    # urllib3 retries only methods it deems idempotent (GET, PUT, DELETE...), never POST or PATCH.
    api.faults.status(429, retry_after=1, method="PATCH")
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadEntry", "metadata": {"name": "a"},
            "spec": {"address": "10.0.0.1"}}
    with pytest.raises(client.ApiException) as exc:
        co.patch_namespaced_custom_object(*WE, "a", body, field_manager="m",
                                          _content_type="application/apply-patch+yaml")
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "1"
