"""How the agent drives the installed kubernetes client: the Authorization header a token file yields,
and the server-side apply the client is found to send (tests/integration/clients runs the same under
every client generation, against the emulator)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from agent.kube import apply as KP
from agent.kube import auth as KA


def write_kubeconfig(tmp_path: Path, user: dict) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def header(cfg: object) -> set[str]:
    return {s["value"] for s in cfg.auth_settings().values() if s["key"].lower() == "authorization"}


def test_token_file_in_a_kubeconfig_gives_one_bearer_prefix(tmp_path: Path) -> None:
    """The loader keeps the token under its own api_key name with the prefix in the value; the agent's
    re-reading hook must not add a second `Bearer` (the server refused `Bearer Bearer <token>`)."""
    (tmp_path / "token").write_text("first-token\n")
    cfg = KA.make_configuration(KA.Credentials(kubeconfig=str(write_kubeconfig(tmp_path, {"tokenFile": "token"}))))
    assert header(cfg) == {"Bearer first-token"}
    (tmp_path / "token.new").write_text("second-token\n")
    (tmp_path / "token.new").replace(tmp_path / "token")
    assert header(cfg) == {"Bearer second-token"}


def test_server_and_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t0")
    cfg = KA.make_configuration(KA.Credentials(server="https://127.0.0.1:6443/", token_file=str(tmp_path / "token")))
    assert cfg.host == "https://127.0.0.1:6443"
    assert header(cfg) == {"Bearer t0"}


def test_static_token_is_left_to_the_loader(tmp_path: Path) -> None:
    cfg = KA.make_configuration(KA.Credentials(kubeconfig=str(write_kubeconfig(tmp_path, {"token": "static"}))))
    assert header(cfg) == {"Bearer static"}


def test_the_probe_records_an_apply_without_sending_it() -> None:
    """The style found makes this client put the apply type and the object itself on the wire."""
    from kubernetes import client

    style = KP.apply_style()
    assert style in KP.APPLY_STYLES
    cfg = client.Configuration()
    cfg.host = "http://probe.invalid"
    api, api_client = KP.apply_api(client, cfg, style)
    api_client.rest_client.pool_manager = KP._Recorder()
    obj = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
           "metadata": {"name": "e", "namespace": "n"}, "spec": {"address": "10.0.0.1"}}
    body, extra = KP.apply_args(style, obj)
    try:
        api.patch_namespaced_custom_object("networking.istio.io", "v1", "n", "workloadentries", "e", body,
                                           field_manager="mesh-agent", force=True, _preload_content=False,
                                           **extra)
    except KP._Sent as sent:
        ctype = {k.lower(): v for k, v in sent.headers.items()}["content-type"]
        assert ctype == KP.APPLY_PATCH
        assert json.loads(sent.body) == obj
    else:
        raise AssertionError("the recorder saw no request")
