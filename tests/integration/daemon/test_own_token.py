"""`registry.renew_token`: the agent registers with its own bound service-account token and renews it
with TokenRequest before it expires, writing the next one over registry.token_file; the registry's
client reads the new one from its next request on."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent import jwtclaims
from devkit.rig import GROUP, NS, REPO, Rig, agent_env, app_rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

SA = "billing-vm"


@pytest.fixture
def r(tmp_path: Path) -> Iterator[Rig]:
    with app_rig(tmp_path) as rg:
        yield rg


def _agent_role(r: Rig) -> None:
    """The service account and its Role as `mesh-agent manifests` prints them."""
    out = subprocess.run([sys.executable, "-m", "agent", "manifests", "--group", GROUP, "--namespace", NS,
                          "--service-account", SA, "--port", f"http={r.app_port}"],
                         env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    for doc in yaml.safe_load_all(out):
        if doc and doc["kind"] in ("ServiceAccount", "Role", "RoleBinding") and SA in json.dumps(doc):
            r.api.create(doc, manager="kubectl")


def test_the_agents_own_token_is_renewed_before_it_expires(r: Rig) -> None:
    _agent_role(r)
    sa = r.api.get("ServiceAccount", NS, SA)
    assert sa is not None
    audiences = jwtclaims.read(r.api.mint_token(NS, SA)).claims["aud"]
    # A token issued 590 s ago that lives 600 s: past 70 % of its life, so due for renewal now, and
    # expired 10 s from now, after which only the renewed one works.
    old, old_exp = r.api.cluster.auth.mint(NS, SA, sa["metadata"]["uid"], audiences, 600, now=time.time() - 590)
    token_file = r.tmp / "agent-token"
    token_file.write_text(old + "\n")
    token_file.chmod(0o600)
    assert r.api.ca_path is not None
    r.overrides = {"registry": {"kubeconfig": None, "server": r.api.url, "ca_file": str(r.api.ca_path),
                                "token_file": str(token_file), "renew_token": True}}
    r.write_config()
    r.start_agent()
    wait_for(r.entry, 60, "registration with the service account's token")
    renewed = wait_for(lambda: (t := token_file.read_text().strip()) != old and t, 30, "the token renewed")
    claims = jwtclaims.read(renewed).claims
    assert claims["kubernetes.io"]["serviceaccount"]["name"] == SA and claims["aud"] == audiences
    assert claims["exp"] > old_exp + 500 and claims["exp"] - claims["iat"] == 600  # the same lifetime
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert renewed not in r.log_text()  # a secret: never logged
    assert f"renewed the agent's own token for {NS}/{SA}" in r.log_text()
    status = wait_for(lambda: (s := json.loads(r.status_file.read_text())).get("identity", {}).get("expiry") and s,
                      15, "status showing the renewed token's expiry")
    assert status["identity"]["expiry"] == claims["exp"] and not status["identity"].get("error")

    # The registry goes on with the new token: once the old one has expired, a change is still written.
    time.sleep(max(0.0, old_exp - time.time()) + 1)
    ask = urllib.request.Request(f"{r.api.url}/api", headers={"Authorization": f"Bearer {old}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(ask, timeout=30, context=ssl.create_default_context(cafile=str(r.api.ca_path)))
    assert refused.value.code == 401  # the old token is no good any more
    r.kill_app()
    wait_for(lambda: r.entry() is None, 30, "the withdrawal, written with the renewed token")
    assert r.stop_agent() == 0


def test_renew_token_without_a_token_file_says_so_and_registration_goes_on(r: Rig) -> None:
    r.overrides = {"registry": {"renew_token": True}}  # the rig's kubeconfig carries its token inline
    r.write_config()
    r.start_agent()
    wait_for(r.entry, 60, "registration")
    wait_for(lambda: "registry.renew_token: the credential is not read from a file" in r.log_text(), 15,
             "the reason renewal cannot work")
    status = json.loads(r.status_file.read_text())
    assert "not read from a file" in status["identity"]["error"]
    assert r.stop_agent() == 0
