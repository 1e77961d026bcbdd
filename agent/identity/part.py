"""The identity part: this VM's API credential, kept alive. With an identity provider, the cloud's token,
fetched before anything talks to the API and kept fresh by agent.identity.refresh's thread. Without
one, and with `registry.renew_token`, the agent's own bound service-account token, renewed with
TokenRequest before it expires by agent.registry.credentials' thread (from the first bundle on, since
the bundle's kubeconfig may be where the credential is named)."""

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
from agent.part import BundleInUse, Context
from agent.registry.credentials import OwnTokenRenewed, OwnTokenRenewer, OwnTokenRenewFailed

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
        self.own: OwnTokenRenewer | None = None  # registry.renew_token's renewer, once started
        self.own_expiry: float | None = None
        self.own_due = False

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
        if isinstance(event, BundleInUse):
            # Started from tick, after the other parts had the bundle: the proxy is spawned before the
            # kubernetes client is imported.
            self.own_due = self.own is None and self.renews_own_token()
            return False
        if isinstance(event, OwnTokenRenewFailed):
            self.ctx.record_error("credential", f"{event.error} (retry in {event.retry_in:.0f}s)")
            self.error = event.error
            return True
        if isinstance(event, OwnTokenRenewed):
            self.error, self.own_expiry = None, event.expiry
            return True
        if isinstance(event, IdentityRefreshFailed):
            self.ctx.record_error("identity", f"{event.error} (retry in {event.retry_in:.0f}s)")
            self.error = event.error
            return True
        if isinstance(event, IdentityRefreshed):
            self.error = None
            return True
        return False

    def tick(self, now: float) -> float | None:
        if self.own_due:
            self.own_due = False
            self.start_own_renewer()
        return None

    def renews_own_token(self) -> bool:
        reg = self.ctx.cfg.registry
        return self.provider == "none" and reg.renew_token and reg.enabled

    def start_own_renewer(self) -> None:
        """The renewer of the registry's own token file, with a client on that very credential."""
        from agent.kube.auth import token_file_of
        from agent.registry import service

        try:
            creds = service.credentials(self.ctx.cfg.registry, self.ctx.shipped_kubeconfig())
        except service.PlanError as exc:
            self.fail(f"registry.renew_token: {exc}")
            return
        token_file = token_file_of(creds)
        if token_file is None:
            self.fail("registry.renew_token: the credential is not read from a file, so there is nothing to "
                      "renew (set registry.token_file, or a kubeconfig user with tokenFile)")
            return
        self.own = OwnTokenRenewer(self.ctx.api(), token_file, self.ctx.post).start()
        log.info("renewing the agent's own token in %s before it expires", token_file)

    def fail(self, message: str) -> None:
        log.error("%s", message)
        self.ctx.record_error("credential", message)
        self.error = message

    def reconfigure(self, old: config.Config, new: config.Config) -> None:
        if new.identity != old.identity:
            log.warning("identity settings changed: they take effect at the next restart of mesh-agent")

    def stop(self) -> None:
        if self.refresher is not None:
            self.refresher.stop()
        if self.own is not None:
            self.own.stop()

    def status(self) -> IdentitySnapshot:
        if self.renews_own_token():
            return IdentitySnapshot(provider="service-account token (renewed)", who="",
                                    expiry=self.own_expiry, error=self.error)
        provider = self.provider
        token = self.refresher.current if self.refresher is not None else None
        return IdentitySnapshot(provider=provider, who=describe(token) if token else "",
                                expiry=token.expiry if token else None, error=self.error)
