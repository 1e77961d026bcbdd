"""The `kubernetes` bundle source against the API emulator: istioctl's files, fresh tokens before
expiry, root certificate rotation, outages, and the RBAC `mesh-agent manifests` prints."""

from __future__ import annotations

import base64
import itertools
import json
import stat
import time
from typing import Any

import pytest

from agent.bundle import accept
from agent.bundle.cluster_inputs import SourceError
from agent.bundle.cluster_source import SOURCE_NAME, ClusterBundleFetched, ClusterFetchFailed
from agent.bundle.store import last_good
from agent.kube.client import GROUPS
from agent.kube.errors import Unauthorized
from agent.paths import Layout
from agent.registry.credentials import read_claims, renew_own_token
from agent.retry import Backoff
from tests.integration.cluster.conftest import (
    AGENT_USER,
    CASE,
    FIXTURES,
    GROUP,
    NS,
    SA,
    World,
    manifest_rules,
    root_cert,
    wait_for,
)


def install(world: World, layout: Layout, files: Any) -> None:
    """What the daemon does with a ClusterBundleFetched: accept.prepare, then accept.commit."""
    prepared = accept.prepare(files, source=SOURCE_NAME, cfg=world.bundle_config(), now=time.time(),
                              layout=layout, installed=last_good(layout))
    assert isinstance(prepared, accept.Candidate)
    accept.commit(prepared, layout, user=None, validators=None)


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_bundle_equals_istioctl_output(world: World) -> None:
    got = world.source().fetch()
    for name in ("cluster.env", "mesh.yaml", "hosts"):
        assert got.files[name].decode() == (FIXTURES / CASE / name).read_text(), name
    assert got.files["root-cert.pem"].decode() == \
        world.api.get("ConfigMap", NS, "istio-ca-root-cert")["data"]["root-cert.pem"]
    token = got.files["istio-token"].decode()
    c = claims(token)
    assert c["aud"] == ["istio-ca"] and c["sub"] == f"system:serviceaccount:{NS}:{SA}"
    assert abs(c["exp"] - c["iat"] - 3600) <= 1
    assert abs(got.token_expiry - c["exp"]) <= 1
    assert got.mesh_from == "cluster" and got.warnings == ()


def test_tokens_are_refreshed_before_they_expire(world: World, short_istio_tokens: int) -> None:
    world.refresher(world.source(), refresh_fraction=0.7, watch=False)
    seen: list[tuple[float, dict[str, Any]]] = []
    for _ in range(4):  # the first token and three renewals of a 5 s token
        ev = world.next_event(ClusterBundleFetched)
        seen.append((time.time(), claims(ev.files["istio-token"].decode())))
        assert ev.refresh_in < short_istio_tokens
    for (_, before), (received, after) in itertools.pairwise(seen):
        assert after["jti"] != before["jti"]
        assert received < before["exp"], "a new token must arrive before the old one expires"


def test_rotated_root_cert_is_picked_up_by_the_watch(world: World) -> None:
    # Real Kubernetes authorises a watch narrowed to one name by its resourceNames; the emulator does not
    # yet, so this test also allows watching ConfigMaps in the namespace.
    from devkit.kubeapi.auth import Rule

    world.api.cluster.auth.grant(AGENT_USER, [Rule(("watch",), ("",), ("configmaps",), (NS,))])
    r = world.refresher(world.source())
    first = world.next_event(ClusterBundleFetched)
    assert first.reason == "initial"
    time.sleep(0.5)  # let the watch start from what the first build read
    new_pem = root_cert("second")
    world.set_root_cert(new_pem)
    ev = world.next_event(ClusterBundleFetched)
    assert ev.reason == "root cert changed"
    assert ev.files["root-cert.pem"].decode() == new_pem
    assert r.status()["error"] is None
    # Installed through the same path as any bundle: the sidecar's root certificate is the new one.
    layout = world.layout()
    install(world, layout, first.files)
    install(world, layout, ev.files)
    assert layout.root_cert.read_text() == new_pem


def test_root_cert_rotated_as_the_watch_history_goes_is_picked_up(world: World) -> None:
    """The root certificate changes and the server's watch history is compacted before the open watch
    saw the change: the watch ends with 410 Gone. Watching again from the version the build read would
    only get 410 again; the refresher watches from the current version and rebuilds."""
    from devkit.kubeapi.auth import Identity, Rule
    from devkit.kubeapi.cluster import Request

    world.api.cluster.auth.grant(AGENT_USER, [Rule(("watch",), ("",), ("configmaps",), (NS,))])
    world.refresher(world.source(), watch_timeout=30)
    assert world.next_event(ClusterBundleFetched).reason == "initial"
    wait_for(lambda: any("watch=" in r.query and r.path.endswith("/configmaps") for r in list(world.api.requests)),
             10)
    new_pem = root_cert("second")
    api = world.api
    cm = api.get("ConfigMap", NS, "istio-ca-root-cert")
    cm["data"] = {"root-cert.pem": new_pem}
    with api.cluster.store.lock:  # the open watch cannot see the change before its history is gone
        api.cluster.update(api.cluster.by_kind("ConfigMap"), "v1", NS, "istio-ca-root-cert", cm,
                           Request(Identity("admin")))
        api.compact()
    ev = world.next_event(ClusterBundleFetched)
    assert ev.reason == "root cert changed"
    assert ev.files["root-cert.pem"].decode() == new_pem


def test_outage_keeps_last_good_reports_and_recovers(world: World, short_istio_tokens: int) -> None:
    r = world.refresher(world.source(), watch=False)
    good = world.next_event(ClusterBundleFetched)
    layout = world.layout()
    install(world, layout, good.files)
    world.api.outage(4.0)
    failed = world.next_event(ClusterFetchFailed)
    assert "unreachable" in failed.error or "Unavailable" in failed.error or failed.error
    assert failed.token_expiry == good.token_expiry
    status = r.status()
    assert status["error"] and status["failures"] >= 1
    assert status["token_expiry"] == good.token_expiry and status["fetched_at"] is not None
    assert layout.istio_token.read_bytes() == good.files["istio-token"], "the last good bundle stays"
    back = world.next_event(ClusterBundleFetched)
    assert back.token_expiry > good.token_expiry
    install(world, layout, back.files)
    assert layout.istio_token.read_bytes() == back.files["istio-token"]
    assert wait_for(lambda: r.status()["error"] is None and r.status()["failures"] == 0, 5)


def test_manifests_rules_are_sufficient_and_each_is_needed(world: World) -> None:
    rules = manifest_rules(read_istio=False)[NS]
    world.set_rules(rules)
    static = world.tmp / "static"
    static.mkdir()
    (static / "mesh.yaml").write_bytes((FIXTURES / CASE / "mesh.yaml").read_bytes())
    (static / "hosts").write_text("192.0.2.10 istiod.istio-system.svc\n")
    got = world.source(read_istio_config=False, static_dir=str(static)).fetch()
    assert got.files["mesh.yaml"] == (FIXTURES / CASE / "mesh.yaml").read_bytes()
    assert got.files["cluster.env"].decode() == (FIXTURES / CASE / "cluster.env").read_text()
    needed = [r for r in rules if set(r.resources) & {"serviceaccounts/token", "configmaps", "workloadgroups"}]
    assert len(needed) == 3
    for missing in needed:
        world.set_rules([r for r in rules if r is not missing])
        with pytest.raises(SourceError) as exc:
            world.source(read_istio_config=False, static_dir=str(static)).fetch()
        message = str(exc.value)
        assert "403" in message and "RBAC" in message and not exc.value.retryable
        assert missing.resources[0].split("/")[0] in message


def test_istio_read_rules_are_optional(world: World) -> None:
    world.set_rules(manifest_rules(read_istio=True)[NS] + manifest_rules(read_istio=True)["istio-system"])
    assert world.source().fetch().warnings == ()
    world.set_rules(manifest_rules(read_istio=False)[NS])
    with pytest.raises(SourceError, match="static_dir is not set"):
        world.source().fetch()


def test_own_token_is_renewed_with_the_manifests_rules(world: World) -> None:
    old_token = world.token_file.read_text()
    before = read_claims(old_token)
    kube = world.kube()
    new = renew_own_token(kube, str(world.token_file))
    assert stat.S_IMODE(world.token_file.stat().st_mode) == 0o600
    assert claims(world.token_file.read_text())["jti"] != claims(old_token)["jti"]
    assert (new.namespace, new.service_account) == (before.namespace, before.service_account)
    assert new.expiry >= before.expiry
    # The registry's client reads the new token on its next request, and it works.
    assert kube.get(GROUPS, NS, GROUP) is not None
    # Without the rule the refusal names what is missing.
    world.set_rules([r for r in manifest_rules(read_istio=False)[NS]
                     if r.resources != ("serviceaccounts/token",)])
    with pytest.raises(Unauthorized, match="serviceaccounts/token"):
        renew_own_token(kube, str(world.token_file))


def test_access_checks_name_what_is_missing(world: World) -> None:
    from agent.bundle.cluster_source import access_checks

    world.set_rules(manifest_rules(read_istio=True)[NS] + manifest_rules(read_istio=True)["istio-system"])
    checks = access_checks(world.kube(), world.settings(), SA)
    assert len(checks) == 7 and all(c.allowed for c in checks), checks
    world.set_rules([r for r in manifest_rules(read_istio=False)[NS] if r.resources != ("serviceaccounts/token",)])
    checks = {c.what: c for c in access_checks(world.kube(), world.settings(), SA)}
    token = checks[f'create serviceaccounts/token "{SA}" in {NS}']
    assert not token.allowed and token.required and "manifests" in token.hint
    assert not checks['get services "istio-eastwestgateway" in istio-system'].required


def test_own_token_renewer_thread_renews_before_expiry(world: World) -> None:
    from agent.registry.credentials import OwnTokenRenewed, OwnTokenRenewer

    kube = world.kube()
    before = read_claims(world.token_file.read_text())
    # A clock 70% into the token's life: the thread renews at once.
    r = OwnTokenRenewer(kube, str(world.token_file), world.events.put, backoff=Backoff(0.2, 1.0),
                        clock=lambda: before.issued + 0.7 * before.lifetime + 1).start()
    try:
        ev = world.next_event(OwnTokenRenewed)
    finally:
        r.stop()
    assert ev.expiry >= before.expiry
    assert read_claims(world.token_file.read_text()).expiry == ev.expiry


def test_a_skewed_vm_clock_does_not_change_the_schedule(world: World, short_istio_tokens: int) -> None:
    # The VM's clock is two hours ahead of the API server's: the next build is still due at 70% of the
    # token's lifetime from now, not at once (which would rebuild in a loop).
    world.refresher(world.source(), watch=False, clock=lambda: time.time() + 7200)
    ev = world.next_event(ClusterBundleFetched)
    assert 0.5 * short_istio_tokens < ev.refresh_in <= 0.7 * short_istio_tokens
