"""The `kubernetes` bundle source under every client generation (tests/clientgen.py): the bundle built
from the cluster, the root-certificate watch and the agent's own token renewal. A failure's test id
names the generation."""

from __future__ import annotations

import time

import pytest

from devkit.kubeapi.auth import Rule
from tests.clientgen import Agent, Generation, gen  # noqa: F401
from tests.integration.cluster.conftest import AGENT_USER, CASE, FIXTURES, GROUP, ISTIO_NS, NS, World


@pytest.mark.subprocess
def test_builds_the_bundle_and_renews_its_token(world: World, gen: Generation) -> None:  # noqa: F811
    # The emulator authorises a one-name watch only without resourceNames (see the rotation test), and
    # takes the old clients' `watch=True` (capital T, which the API server's ParseBool accepts) for a list.
    world.api.cluster.auth.grant(AGENT_USER, [Rule(("watch", "list"), ("",), ("configmaps",), (NS,))])
    agent = Agent(gen)
    try:
        agent.call("open", creds={"server": world.api.url, "ca_file": str(world.api.ca_path),
                                  "token_file": str(world.token_file)})
        got = agent.call("fetch", settings={"namespace": NS, "group": GROUP, "istio_namespace": ISTIO_NS})
        for name in ("cluster.env", "mesh.yaml", "hosts"):
            assert got["files"][name] == (FIXTURES / CASE / name).read_text(), name
        assert got["token_expiry"] > time.time()
        events = agent.call("core", method="watch_configmap",
                            args=[NS, "istio-ca-root-cert", got["root_cert_version"], 1])
        assert events == []
        before = world.token_file.read_text()
        assert agent.call("renew_own_token", token_file=str(world.token_file)) > time.time() + 600
        assert world.token_file.read_text() != before
    finally:
        agent.close()
