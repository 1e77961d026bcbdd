"""A new address restarts an istio-profile proxy with the new INSTANCE_IP (istiod knows the proxy by
it); the same address, or an address fixed by ISTIO_SVC_IP, leaves the proxy running. The sidecar part
with the stand-in pilot-agent running the real Envoy, inside a network namespace of the test's own (so
the profile's fixed proxy ports are free)."""

from __future__ import annotations

import dataclasses
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import config as C
from agent.bundle.model import Bundle, parse_bundle
from agent.metrics import Metrics
from agent.part import Context
from agent.paths import Layout
from agent.registry.address_part import AddressChanged
from agent.sidecar.machine import State
from agent.sidecar.part import Package, SidecarPart
from devkit import bundles as kit
from devkit.netns import NetNs, unavailable

from .helpers import IstioStandIn

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(120),
              pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")]


def bundle(svc_ip: str | None) -> Bundle:
    env = kit.CLUSTER_ENV_V4 if svc_ip else kit.CLUSTER_ENV_V4.replace("ISTIO_SVC_IP='10.0.0.5'\n", "")
    now = time.time()
    return parse_bundle(kit.files(now, replace={"cluster.env": env.encode()}), now, kit.config())


class Loop:
    def __init__(self, part: SidecarPart, events: queue.SimpleQueue[object]) -> None:
        self.part, self.events = part, events

    def run_until(self, done: Callable[[], bool], timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not done():
            try:
                event: object | None = self.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            if event is not None:
                self.part.handle(event, time.monotonic())
            self.part.tick(time.monotonic())
        return done()


@pytest.fixture
def part(tmp_path: Path) -> Iterator[tuple[SidecarPart, Loop, IstioStandIn]]:
    with NetNs() as ns, ns.entered():
        standin = IstioStandIn(user="nobody" if os.geteuid() == 0 else None, manage_iptables=False)
        cfg = dataclasses.replace(C.parse("bundle: {source: /b}\n"), sidecar=standin.cfg)
        layout = Layout(root=tmp_path)
        layout.sidecar_env.parent.mkdir(parents=True, exist_ok=True)
        layout.sidecar_env.write_text("".join(f"{k}={v}\n" for k, v in standin.sidecar_env.items()))
        events: queue.SimpleQueue[object] = queue.SimpleQueue()
        ctx = Context(cfg, layout, events, Metrics())
        p = SidecarPart(ctx)
        p.package = Package.READY
        try:
            yield p, Loop(p, events), standin
        finally:
            if p.supervisor is not None:
                p.supervisor.stop(drain=False)
            standin.cleanup()


def proxies(standin: IstioStandIn) -> list[dict]:
    return [c for c in standin.calls() if c["argv"][:1] == ["proxy"]]


def test_a_new_address_restarts_the_istio_proxy_with_it(part: tuple[SidecarPart, Loop, IstioStandIn]) -> None:
    p, loop, standin = part
    b = bundle(None)
    p.bundle = b
    p.ctx.address = "10.77.0.5"
    p.start_proxy(b)
    sup = p.supervisor
    assert sup is not None
    assert loop.run_until(lambda: sup.state is State.RUNNING), sup.reason
    assert [c["env"]["INSTANCE_IP"] for c in proxies(standin)] == ["10.77.0.5"]

    p.handle(AddressChanged("10.77.0.5", "10.77.0.5"), time.monotonic())  # nothing new
    assert sup.state is State.RUNNING and sup.requested_restarts == 0

    p.handle(AddressChanged("10.77.0.5", "10.78.0.6"), time.monotonic())
    assert loop.run_until(lambda: len(proxies(standin)) == 2 and sup.state is State.RUNNING), sup.reason
    assert [c["env"]["INSTANCE_IP"] for c in proxies(standin)] == ["10.77.0.5", "10.78.0.6"]
    assert sup.requested_restarts == 1 and sup.restarts == 0  # asked for, not a crash


def test_an_address_fixed_by_istio_svc_ip_leaves_the_proxy_be(part: tuple[SidecarPart, Loop, IstioStandIn]) -> None:
    p, loop, standin = part
    b = bundle("10.0.0.5")
    p.bundle = b
    p.start_proxy(b)
    sup = p.supervisor
    assert sup is not None
    assert loop.run_until(lambda: sup.state is State.RUNNING), sup.reason
    p.handle(AddressChanged("10.77.0.5", "10.78.0.6"), time.monotonic())
    loop.run_until(lambda: False, timeout=1.0)
    assert sup.state is State.RUNNING and sup.requested_restarts == 0
    assert [c["env"]["INSTANCE_IP"] for c in proxies(standin)] == ["10.0.0.5"]


def test_without_an_address_the_istio_proxy_waits_for_the_first(part: tuple[SidecarPart, Loop, IstioStandIn]) -> None:
    """No ISTIO_SVC_IP and no address yet (DHCP at boot): no proxy, no failure; the first address
    found starts it with that INSTANCE_IP."""
    p, loop, standin = part
    b = bundle(None)
    p.bundle = b
    p.ctx.address = None
    p.start_proxy(b)
    assert p.supervisor is None and proxies(standin) == []
    p.ctx.address = "10.77.0.9"  # as the address part sets it before the other parts see the event
    p.handle(AddressChanged(None, "10.77.0.9"), time.monotonic())
    sup = p.supervisor
    assert sup is not None
    assert loop.run_until(lambda: sup.state is State.RUNNING), sup.reason
    assert [c["env"]["INSTANCE_IP"] for c in proxies(standin)] == ["10.77.0.9"]
