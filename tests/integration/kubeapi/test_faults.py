"""Faults a test can inject: latency, 429 with Retry-After, 5xx, connection resets, outages."""

from __future__ import annotations

import http.client
import json
import socket
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


def _open_raw(api: KubeAPI, path: str) -> tuple[ssl.SSLSocket, bytes]:
    """A request on a TLS socket of our own; the status line and headers, and what came after them."""
    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", api.port), timeout=20),
                           server_hostname="127.0.0.1")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api.admin_token}\r\n\r\n"
                 .encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(4096)
        assert chunk, "the server closed before its headers"
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    return sock, head + b"\r\n\r\n" + rest


def _read_for(sock: ssl.SSLSocket, seconds: float) -> tuple[bytes, bool]:
    """What arrives within `seconds`, and whether the server ended the connection meanwhile."""
    end = time.monotonic() + seconds
    got = b""
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            return got, True
        got += chunk
    return got, False


def test_trickle_sends_the_headers_then_the_body_a_byte_at_a_time(api: KubeAPI) -> None:
    whole = get(api)
    assert whole.status == 200
    api.faults.trickle(0.5, path="workloadentries")
    sock, first = _open_raw(api, PATH)
    try:
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length:" in head
        more, ended = _read_for(sock, 2.0)
        # A list of no entries is well over 100 bytes; at two a second, only a few have come.
        assert not ended and 0 < len(body + more) < 20
    finally:
        sock.close()
    api.faults.clear()
    fast = api.faults.trickle(0.001, path="workloadentries", times=1)
    resp = get(api)  # the whole answer, correct, just slow
    assert resp.status == 200 and fast.hits == 1


def test_a_trickled_watch_never_ends_even_at_its_timeout(api: KubeAPI) -> None:
    api.faults.trickle(0.2, path="workloadentries")
    sock, first = _open_raw(api, PATH + "?watch=true&timeoutSeconds=1")
    try:
        assert first.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in first
        more, ended = _read_for(sock, 3.0)  # three times the watch's timeout
        assert not ended
        assert more.count(b"1\r\n\n\r\n") >= 2  # newlines a byte per chunk: bytes, but no event
    finally:
        sock.close()
    api.faults.clear()
    sock, _ = _open_raw(api, PATH + "?watch=true&timeoutSeconds=1")
    try:
        _, ended = _read_for(sock, 15.0)
        assert ended  # without the fault the watch ends at its timeout
    finally:
        sock.close()
