"""The running agent loads only what it uses: after registering with a local bundle, no part of the
`cryptography` package is mapped into the agent's memory (root-cert.pem is read through the ssl module),
while the extension modules it does use are. And the proxy is spawned before the registry builds its
API client (importing the kubernetes client takes a few hundred milliseconds of the loop's time, which
then overlaps Envoy's own start)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit.rig import rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


def test_a_registered_agent_has_not_loaded_cryptography(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.prepare()
        r.start_app()
        agent = r.start_agent()
        wait_for(r.entry, 60, "registration")
        mapped = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{agent.pid}/maps").read_text().splitlines()
                  if len(line.split(maxsplit=5)) == 6}
        assert any("/_yaml" in p for p in mapped), "the check sees extension modules: yaml's is mapped"
        assert not [p for p in mapped if "/cryptography/" in p], sorted(mapped)
        log = r.log_text()
        assert log.index("sidecar: envoy") < log.index("registering as 127.0.0.1")
        assert r.stop_agent() == 0
