"""The whole agent registering the address AWS's instance metadata service (the devkit's IMDSv2 fake on
loopback) tells it, and moving the entry when the cloud reassigns the public address."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.identity import FakeImds, Instance
from devkit.rig import Rig, rig
from devkit.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

FIRST, SECOND = "203.0.113.7", "203.0.113.8"  # documentation addresses: only data in the entry


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    with FakeImds(Instance("i-0abc", public_ip=FIRST)) as svc:
        yield svc


@pytest.fixture
def r(tmp_path: Path, imds: FakeImds) -> Iterator[Rig]:
    address = {"metadata": {"provider": "aws", "which": "public", "endpoint": imds.url, "every": "1s",
                            "timeout": "2s"}, "watch": "1s"}
    with rig(tmp_path, registry={"address": address}) as rg:
        rg.svc_ip = None
        rg.prepare()
        rg.start_app()
        yield rg


def test_the_public_address_from_imds_is_registered_and_followed(r: Rig, imds: FakeImds) -> None:
    r.start_agent()
    first = wait_for(lambda: r.entry(r.entry_at(FIRST)), 60, "registration at the public address")
    assert first["spec"]["address"] == FIRST
    assert any(req.method == "PUT" and req.path == "/latest/api/token" for req in imds.requests)

    imds.instance.public_ip = SECOND  # the cloud reassigns the public address
    moved = wait_for(lambda: r.entry(r.entry_at(SECOND)), 30, "the entry at the new public address")
    assert moved["spec"]["address"] == SECOND
    wait_for(lambda: r.entry(r.entry_at(FIRST)) is None, 30, "the old entry withdrawn")
    assert f"address changed: {FIRST} -> {SECOND}" in r.log_text()
    wait_for(lambda: json.loads(r.status_file.read_text())["registration"].get("entry") == r.entry_at(SECOND),
             10, "status naming the new entry")
    assert r.stop_agent() == 0
    assert r.entry(r.entry_at(SECOND)) is None


def test_no_answer_at_start_exits_1_so_the_unit_tries_again(tmp_path: Path) -> None:
    address = {"metadata": {"provider": "gcp", "endpoint": "http://127.0.0.1:9", "timeout": "1s", "tries": 1}}
    with rig(tmp_path, registry={"address": address}) as rg:
        rg.svc_ip = None
        rg.prepare()
        agent = rg.start_agent()
        assert agent.wait(60) == 1
        assert "no address for this VM: registry.address.metadata (gcp)" in rg.log_text()
