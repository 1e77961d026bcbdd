"""The address part: notices when this VM's mesh address changes while the agent runs (a DHCP lease
renewed with another address, an interface replaced, the cloud's public address reassigned) and tells
the loop, as AddressChanged(old, new). This part comes before the others in the loop's list, so
ctx.address is the new one when they see the event: the registry part moves the entry, the sidecar
part restarts the proxy when its launch spec carries the address, the health part points probes
that connect to the instance address (app.probe_host: instance) at the new one.

The watcher polls: every `registry.address.watch` seconds it decides the address again the way the
start did (agent.registry.address.decide, psutil's interface list and /proc), with the address in use
kept while it still qualifies. Polling a few dozen bytes of /proc every few seconds is cheaper and
simpler than following netlink, and it cannot miss an event. A new address counts only when two looks
in a row see it, so an interface briefly holding both addresses, or none, during a renewal never
moves the entry twice. No address at all is logged and changes nothing: the entry stays where it is.

No address at start (DHCP still asking, the interface not up yet) is not an error: the agent runs, the
sidecar starts, and the watcher looks every second until an address appears; that first address counts
at once (AddressChanged with old None) and the registry parts register there.
The metadata service is asked every registry.address.metadata.every (a minute). An address fixed by ISTIO_SVC_IP or
registry.address.value is not watched.

The metadata service is never asked from the loop's thread: the first answer is had in start(),
before the loop runs (as the identity part's first token is), and a reload that turns to it leaves
the question to the watcher, whose first look then counts at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import config
from agent.background import Background
from agent.bundle.model import Bundle
from agent.part import BundleInUse, Context, FatalError
from agent.registry.address import AddressError, decide, fixed

log = logging.getLogger("agent.address")


@dataclass(frozen=True)
class AddressChanged:
    """This VM's mesh address is now `new` (it was `old`, or None: the first address found after a start
    without one)."""

    old: str | None
    new: str


WAITING_EVERY = 1.0  # seconds between looks while this VM has no address at all


class AddressWatcher(Background):
    """A thread that decides the address every `interval` seconds and posts AddressChanged when a new
    one is seen twice in a row. Without a current address it looks every WAITING_EVERY seconds, and the
    first address found counts at once; with `until_found`, the watch ends there."""

    def __init__(self, detect: Callable[[str | None], str], current: str | None, interval: float,
                 post: Callable[[object], None], *, trust_first: bool = False, until_found: bool = False) -> None:
        self.detect, self.current, self.interval, self.post = detect, current, interval, post
        self._until_found = until_found
        # A new configuration: its first answer is no flicker and counts without a second look.
        self._trust_first = trust_first
        super().__init__("address-watch")
        self._candidate: str | None = None
        self._problem: str | None = None

    def run(self) -> None:
        if self._trust_first:
            self.look()
        while not self._stop.wait(self.interval if self.current is not None else WAITING_EVERY):
            if self.look() is not None and self._until_found:
                return

    def look(self) -> AddressChanged | None:
        """One look; returns (and posts) the change it confirmed."""
        try:
            new = self.detect(self.current)
        except AddressError as exc:
            if str(exc) != self._problem:
                log.warning("address: %s; %s", exc,
                            f"keeping {self.current}" if self.current else "still waiting for one")
            self._problem, self._candidate = str(exc), None
            return None
        except Exception:  # a bug must not end the watch
            log.exception("address: the look failed unexpectedly")
            return None
        self._problem = None
        # Nothing to flicker away from yet: the first address counts at once.
        trusted, self._trust_first = self._trust_first or self.current is None, False
        if new == self.current:
            self._candidate = None
            return None
        if new != self._candidate and not trusted:
            self._candidate = new  # seen once: confirmed by the next look
            return None
        change = AddressChanged(self.current, new)
        self.current, self._candidate = new, None
        self.post(change)
        return change


@dataclass(frozen=True)
class AddressSnapshot:
    address: str | None = None
    changes: int = 0
    waiting: str | None = None  # why there is no address yet, while the watcher looks for one

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "address_changes": self.changes} if self.address else {}


class AddressPart:
    name = "address"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bundle: Bundle | None = None
        self.watcher: AddressWatcher | None = None
        self.changes = 0
        self.waiting: str | None = None  # no address yet: why
        self.from_metadata = False  # ctx.address came from the metadata service in start()

    def start(self, now: float) -> None:
        """With `metadata`, ask the cloud now, before the loop runs (bounded by its tries and timeout);
        the first bundle may still fix the address with ISTIO_SVC_IP."""
        a = self.ctx.cfg.registry.address
        if not self.ctx.cfg.registry.enabled or a.value is not None or a.metadata.provider == "none":
            return
        from agent.registry.cloud_address import metadata_address

        try:
            self.ctx.address = metadata_address(a.metadata, a.family)
        except AddressError as exc:
            # Not a configuration problem (exit 1, not 78): the unit starts the agent again, and the
            # metadata service may answer then.
            raise FatalError(f"no address for this VM: {exc}") from None
        self.from_metadata = True

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None

    def status(self) -> AddressSnapshot:
        return AddressSnapshot(self.ctx.address, self.changes, self.waiting)

    def tick(self, now: float) -> float | None:
        return None

    def handle(self, event: object, now: float) -> bool:
        if isinstance(event, BundleInUse):
            first, self.bundle = self.bundle is None, event.bundle
            svc_ip = event.bundle.env_map.get("ISTIO_SVC_IP") or None
            # Decided once, from agent.yaml and the first bundle, before the parts after this one see it;
            # an answer of the metadata service at start yields to ISTIO_SVC_IP, which comes first as
            # everywhere (deciding it asks nobody).
            if first and (not self.from_metadata or svc_ip):
                self.from_metadata = False
                try:
                    self.ctx.address = decide(self.ctx.cfg.registry.address, svc_ip)
                except AddressError as exc:
                    self.ctx.address, self.waiting = None, str(exc)
                    log.warning("no address for this VM yet: %s; looking every %gs", exc, WAITING_EVERY)
                    self.ctx.record_error("address", f"no address yet: {exc}")
            if self.watcher is None and self.ctx.cfg.registry.enabled:
                self.watch(self.ctx.cfg)
            return False
        if isinstance(event, AddressChanged):
            if event.old is None:
                log.info("address found: %s", event.new)
            else:
                log.info("address changed: %s -> %s", event.old, event.new)
                self.changes += 1
                self.ctx.metrics.inc("address_changes")
            self.ctx.address, self.waiting = event.new, None
            return False  # the registry and sidecar parts act on it too
        return False

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        if new.registry.address == old.registry.address or self.bundle is None:
            return
        self.stop()
        svc_ip = self.bundle.env_map.get("ISTIO_SVC_IP") or None
        current = self.ctx.address
        a = new.registry.address
        if not fixed(a, svc_ip) and a.metadata.provider != "none":
            # Not on the loop: the watcher asks at once and its first answer counts.
            self.watch(new, current, trust_first=True)
            return
        try:
            address = decide(a, svc_ip)
        except AddressError as exc:
            log.error("registry.address: %s; %s", exc, f"keeping {current}" if current else "still waiting")
            self.ctx.record_error("address", str(exc))
        else:
            if address != current:
                # Through the queue, so the registry part's new registrar moves its entry.
                self.ctx.post(AddressChanged(current, address))
                current = address
        self.watch(new, current)

    def watch(self, cfg: config.Config, current: str | None = None, trust_first: bool = False) -> None:
        assert self.bundle is not None
        a = cfg.registry.address
        svc_ip = self.bundle.env_map.get("ISTIO_SVC_IP") or None
        current = current or self.ctx.address
        waiting = current is None and self.waiting is not None
        if fixed(a, svc_ip) or not (waiting or (current is not None and (a.watch or trust_first))):
            return
        interval = float(a.metadata.every) if a.metadata.provider != "none" else float(a.watch)
        if not a.watch:
            interval = 365 * 86400.0  # one look for the reload, then none
        self.watcher = AddressWatcher(lambda keep: decide(a, svc_ip, keep=keep), current, interval,
                                      self.ctx.post, trust_first=trust_first,
                                      until_found=waiting and not a.watch).start()
        if current is not None:
            log.info("watching the address %s every %gs", current, interval)
