"""The identity part: the cloud's token as this VM's API credential, fetched before anything talks to
the API and kept fresh by agent.identity.refresh's thread."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from agent import config
from agent.identity.refresh import (
    IdentityRefreshed,
    IdentityRefresher,
    IdentityRefreshFailed,
    describe,
    instance_key,
    make_provider,
)
from agent.part import Context

log = logging.getLogger("agent.identity")


@dataclass(frozen=True)
class IdentitySnapshot:
    provider: str = "none"
    who: str = ""
    expiry: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.provider == "none":
            return {}
        d: dict[str, Any] = {"provider": self.provider, "who": self.who, "expiry": self.expiry}
        if self.error:
            d["error"] = self.error
        return d


class IdentityPart:
    name = "identity"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.refresher: IdentityRefresher | None = None
        self.error: str | None = None
        self.provider = ctx.cfg.identity.provider  # as started; a change waits for the next start

    def start(self, now: float) -> None:
        """A failure is reported, not fatal: the refresher retries, and API calls fail as unauthorised
        until then."""
        ic = self.ctx.cfg.identity
        if ic.provider == "none":
            return
        self.refresher = IdentityRefresher(make_provider(ic), self.ctx.identity_token(), self.ctx.post,
                                           fraction=ic.refresh_fraction)
        try:
            self.refresher.refresh_once()
        except Exception as exc:  # reported; the refresher retries
            log.error("identity token from %s: %s", ic.provider, exc)
            self.ctx.record_error("identity", str(exc))
            self.error = str(exc)
        self.ctx.instance_key = self.instance_key()
        self.refresher.start()

    def instance_key(self) -> str | None:
        """The cloud's instance, which tells clones of one image apart better than their machine-id."""
        r = self.refresher
        if r is None or r.current is None:
            return None
        return instance_key(r.current, self.provider)

    def handle(self, event: object, now: float) -> bool:
        if isinstance(event, IdentityRefreshFailed):
            self.ctx.record_error("identity", f"{event.error} (retry in {event.retry_in:.0f}s)")
            self.error = event.error
            return True
        if isinstance(event, IdentityRefreshed):
            self.error = None
            return True
        return False

    def tick(self, now: float) -> float | None:
        return None

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        if new.identity != old.identity:
            log.warning("identity settings changed: they take effect at the next restart of mesh-agent")

    def stop(self) -> None:
        if self.refresher is not None:
            self.refresher.stop()

    def status(self) -> IdentitySnapshot:
        provider = self.provider
        token = self.refresher.current if self.refresher is not None else None
        return IdentitySnapshot(provider=provider, who=describe(token) if token else "",
                                expiry=token.expiry if token else None, error=self.error)
