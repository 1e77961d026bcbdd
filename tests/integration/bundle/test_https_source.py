"""Fetching over real HTTPS (own CA, loopback): success, 304, errors, timeouts, size caps, wrong CA,
bearer token and client certificate."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.bundle.accept import Unchanged
from agent.bundle.model import parse_bundle
from agent.bundle.source import Fetched, FetchError, NotModified, Validators, fetch
from agent.bundle.update import Updated, update
from agent.redact import redact
from devkit import bundles as kit
from devkit.bundleserver import LAST_MODIFIED, serve
from devkit.roots import make_root

NOW = time.time()


def no_sleep(_seconds: float) -> None:
    pass


@pytest.fixture()
def server(tmp_path: Path):
    with serve(tmp_path) as srv:
        srv.state.body = kit.make_tar(kit.files(NOW))
        yield srv


def cfg(server, path: str = "/bundle.tar.gz", **kw: object):
    kw.setdefault("ca_file", str(server.ca_file))
    kw.setdefault("connect_timeout", 2.0)
    kw.setdefault("read_timeout", 2.0)
    return kit.config(server.url + path, **kw)


def test_success_then_not_modified(server) -> None:
    got = fetch(cfg(server), sleep=no_sleep)
    assert isinstance(got, Fetched)
    assert set(got.files) == set(kit.files(NOW)) and got.files["cluster.env"] == kit.CLUSTER_ENV_V4.encode()
    assert got.validators == Validators('"v1"', LAST_MODIFIED)
    assert got.size == len(server.state.body) and got.source == server.url + "/bundle.tar.gz"
    parse_bundle(got.files, NOW, cfg(server))

    again = fetch(cfg(server), got.validators, sleep=no_sleep)
    assert isinstance(again, NotModified) and again.validators == got.validators
    assert server.state.headers_seen[-1]["If-None-Match"] == '"v1"'
    assert server.state.headers_seen[-1]["If-Modified-Since"] == LAST_MODIFIED

    server.state.etag = '"v2"'  # a new bundle: downloaded again
    assert isinstance(fetch(cfg(server), got.validators, sleep=no_sleep), Fetched)


def test_update_over_https_installs_then_is_unchanged(server, tmp_path: Path) -> None:
    layout = make_root(tmp_path)
    first = update(cfg(server), layout, user=None, now=NOW)
    assert isinstance(first, Updated) and first.installed.etag == '"v1"'
    assert layout.cluster_env.read_bytes() == kit.CLUSTER_ENV_V4.encode()
    second = update(cfg(server), layout, user=None, now=NOW)
    assert isinstance(second, Unchanged) and second.installed.digest == first.bundle.digest
    assert server.state.hits["/bundle.tar.gz"] == 2


@pytest.mark.parametrize("code, message", [
    (401, "HTTP 401 Unauthorized: the server refused our credentials"),
    (403, "HTTP 403 Forbidden"),
    (404, "HTTP 404 Not Found"),
])
def test_client_errors_are_not_retried(server, code: int, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        fetch(cfg(server, f"/status/{code}"), sleep=no_sleep)
    assert server.state.hits[f"/status/{code}"] == 1


def test_server_errors_are_retried_then_reported(server) -> None:
    delays: list[float] = []
    with pytest.raises(FetchError, match="HTTP 500"):
        fetch(cfg(server, "/status/500"), sleep=delays.append, tries=3)
    assert server.state.hits["/status/500"] == 3 and len(delays) == 2


def test_retry_after_is_honoured_and_the_retry_succeeds(server) -> None:
    delays: list[float] = []
    got = fetch(cfg(server, "/flaky"), sleep=delays.append, tries=3)
    assert isinstance(got, Fetched) and server.state.hits["/flaky"] == 2
    assert len(delays) == 1 and delays[0] >= 0.05


def test_bearer_token_is_sent_and_never_logged(server, tmp_path: Path) -> None:
    server.state.token = "bundle-server-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(server.state.token + "\n")
    with pytest.raises(FetchError, match="HTTP 401"):
        fetch(cfg(server), sleep=no_sleep)
    got = fetch(cfg(server, token_file=str(token_file)), sleep=no_sleep)
    assert isinstance(got, Fetched)
    assert redact(f"Authorization: Bearer {server.state.token}").count(server.state.token) == 0


def test_slow_server_times_out(server) -> None:
    server.state.slow_seconds = 2.0
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch(cfg(server, "/slow", read_timeout=0.3), sleep=no_sleep, tries=2)
    assert time.monotonic() - started < 1.9  # did not wait for the server


def test_truncated_body_is_refused(server) -> None:
    with pytest.raises(FetchError, match=r"IncompleteRead|truncated|Connection broken"):
        fetch(cfg(server, "/truncated"), sleep=no_sleep, tries=2)
    assert server.state.hits["/truncated"] == 2  # a cut connection is worth one more try


def test_oversize_body_is_refused_by_content_length(server) -> None:
    server.state.oversize = 4096
    with pytest.raises(FetchError, match=r"4098 bytes is larger than bundle.max_size \(1024\)"):
        fetch(cfg(server, "/oversize", max_size=1024), sleep=no_sleep)


def test_oversize_chunked_body_stops_at_the_cap(server) -> None:
    server.state.oversize = 10 * 1024 * 1024
    with pytest.raises(FetchError, match=r"the body is larger than bundle\.max_size"):
        fetch(cfg(server, "/chunked-oversize", max_size=64 * 1024), sleep=no_sleep)


def test_wrong_ca_is_refused(server, tmp_path: Path) -> None:
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(FetchError, match=r"TLS verification failed.*bundle\.ca_file"):
        fetch(cfg(server, ca_file=str(other)), sleep=no_sleep)
    assert server.state.hits == {}  # no request was sent


def test_system_cas_do_not_trust_a_private_ca(server) -> None:
    with pytest.raises(FetchError, match="TLS verification failed"):
        fetch(cfg(server, ca_file=None), sleep=no_sleep)


def test_redirects_are_not_followed(server) -> None:
    with pytest.raises(FetchError, match="redirects are not followed"):
        fetch(cfg(server, "/redirect"), sleep=no_sleep)


def test_plain_http_is_refused_unless_allowed() -> None:
    with pytest.raises(FetchError, match="http:// is refused"):
        fetch(kit.config("http://127.0.0.1:9/bundle.tar.gz"), sleep=no_sleep)


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    delays: list[float] = []
    with pytest.raises(FetchError, match="Connection refused"):
        fetch(kit.config(f"https://127.0.0.1:{port}/b.tar.gz", connect_timeout=1.0), sleep=delays.append,
              tries=2)
    assert len(delays) == 1


def test_client_certificate(tmp_path: Path) -> None:
    with serve(tmp_path, require_client_cert=True) as srv:
        srv.state.body = kit.make_tar(kit.files(NOW))
        with pytest.raises(FetchError):
            fetch(cfg(srv), sleep=no_sleep, tries=1)
        cert, key = srv.client_cert_files()
        assert isinstance(fetch(cfg(srv, client_cert=cert, client_key=key), sleep=no_sleep), Fetched)


def test_ipv6_loopback(tmp_path: Path) -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with serve(tmp_path, host="::1") as srv:
            srv.state.body = kit.make_tar(kit.files(NOW, ipv6=True))
            got = fetch(kit.config(f"https://[::1]:{srv.url.rsplit(':', 1)[1]}/bundle.tar.gz",
                                   ca_file=str(srv.ca_file)), sleep=no_sleep)
            assert isinstance(got, Fetched) and got.source.startswith("https://[::1]:")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")


def test_refresher_posts_what_it_fetched_and_retries_failures(server, tmp_path: Path) -> None:
    import queue

    from agent.bundle.update import BundleFetched, BundleFetchFailed, Refresher
    from agent.retry import Backoff

    events: queue.Queue[object] = queue.Queue()
    ok = Refresher(cfg(server), events.put, lambda: None).start()
    try:
        got = events.get(timeout=30)
        assert isinstance(got, BundleFetched) and "cluster.env" in got.files
        assert events.empty()  # nothing more until the loop schedules the next fetch
        ok.refresh_now()
        assert isinstance(events.get(timeout=30), BundleFetched)
    finally:
        ok.stop()
    bad = Refresher(cfg(server, "/status/404"), events.put, lambda: None,
                    retry=Backoff(initial=0.05, max=0.1)).start()
    try:
        first, second = events.get(timeout=30), events.get(timeout=30)
        assert isinstance(first, BundleFetchFailed) and "HTTP 404" in first.error
        assert isinstance(second, BundleFetchFailed)  # retried on its own, with backoff
    finally:
        bad.stop()
