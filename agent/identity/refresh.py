"""Keep a fresh identity token where the Kubernetes client reads it.

The registry's client re-reads its bearer token file whenever the file changes
(agent.kube.auth.TokenFile), so the refresher only has to write each new token over it
atomically (0600, under the run directory: never in a golden image). It fetches at once, then at
`fraction` of each token's lifetime, measured from the fetch on this VM's monotonic clock (a skewed
wall clock cannot make it fetch in a loop); failures are retried with agent.retry's backoff while the
current token stays in use. For oidc-file the file another system writes is read directly, so the
refresher only watches it and reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.background import Background
from agent.fsutil import atomic_write
from agent.identity.common import Provider, Token
from agent.redact import register_secret
from agent.retry import Backoff

log = logging.getLogger(__name__)

FILE_POLL = 5.0  # seconds between looks at an oidc-file token


@dataclass(frozen=True)
class IdentityRefreshed:
    provider: str
    expiry: float
    issued: float


@dataclass(frozen=True)
class IdentityRefreshFailed:
    provider: str
    error: str
    retry_in: float
    expiry: float | None  # of the token still in use, if any


def make_provider(ic: Any) -> Provider:
    """The provider agent.yaml's `identity` section names (agent.identity.config.IdentityConfig)."""
    timeout, tries = float(ic.timeout), int(ic.tries)
    if ic.provider == "gcp":
        from agent.identity.gcp import DEFAULT_ENDPOINT, GcpProvider

        return GcpProvider(ic.audience, ic.endpoint or DEFAULT_ENDPOINT, timeout, tries)
    if ic.provider == "azure":
        from agent.identity.azure import DEFAULT_ENDPOINT as AZ
        from agent.identity.azure import AzureProvider

        return AzureProvider(ic.audience, ic.endpoint or AZ, ic.azure.client_id, timeout, tries)
    if ic.provider == "aws":
        from agent.identity.aws import AwsProvider

        return AwsProvider(ic.audience, ic.aws.region, ic.endpoint, ic.aws.signing_algorithm,
                           int(ic.aws.duration), timeout, tries)
    if ic.provider == "oidc-file":
        from agent.identity.oidc_file import OidcFileProvider

        return OidcFileProvider(ic.file)
    raise ValueError(f"no identity provider {ic.provider!r}")


def token_file(cfg: Any) -> str | None:
    """Where the API client reads the identity token, or None without an identity provider."""
    ic = cfg.identity
    if ic.provider == "none":
        return None
    if ic.provider == "oidc-file":
        return str(ic.file)
    if ic.token_file:
        return str(ic.token_file)
    from agent.paths import Layout

    return str(Layout.from_config(cfg).run / "identity-token")


def describe(token: Token) -> str:
    """Who the token says the VM is, for logs and `doctor` (no secret in it)."""
    c = token.claims
    gce = ((c.get("google") or {}).get("compute_engine") or {}) if isinstance(c.get("google"), dict) else {}
    if gce:
        return f"GCE instance {gce.get('instance_name')} ({gce.get('instance_id')}) in {gce.get('project_id')}"
    aws = c.get("https://sts.amazonaws.com/")
    if isinstance(aws, dict) and aws.get("ec2_source_instance_arn"):
        return f"EC2 {aws.get('ec2_source_instance_arn')} as {c.get('sub')}"
    if c.get("xms_mirid"):
        return f"Azure {c.get('xms_mirid')}"
    return f"{c.get('sub')} from {c.get('iss')}"


def instance_key(token: Token, provider: str) -> str | None:
    """The cloud's name for this very VM, from the token: what tells clones of one image apart even
    when they share /etc/machine-id. None when the token does not name an instance."""
    c = token.claims
    value: Any = None
    if provider == "gcp":
        google = c.get("google")
        gce = google.get("compute_engine") if isinstance(google, dict) else None
        value = gce.get("instance_id") if isinstance(gce, dict) else None
    elif provider == "aws":
        aws = c.get("https://sts.amazonaws.com/")
        value = aws.get("ec2_source_instance_arn") if isinstance(aws, dict) else None
    elif provider == "azure":
        # A system-assigned identity's resource id is the VM's; a user-assigned one is shared.
        value = c.get("xms_az_rid") or (c.get("xms_mirid") if "/virtualmachines/" in
                                        str(c.get("xms_mirid", "")).lower() else None)
    elif provider == "oidc-file":
        value = c.get("sub")
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        return None
    return f"{provider}:{value}"


class IdentityRefresher(Background):
    """Fetches the token now and before each one expires; posts IdentityRefreshed / ...Failed."""

    def __init__(self, provider: Provider, path: str | None, post: Callable[[object], None], *,
                 fraction: float = 0.75, backoff: Backoff | None = None) -> None:
        self.provider = provider
        self.path = path if provider.name != "oidc-file" else None  # never write another system's file
        self.post = post
        self.fraction = fraction
        self.backoff = backoff or Backoff(initial=1.0, max=60.0)
        self.current: Token | None = None
        super().__init__("identity-refresh")

    def refresh_once(self) -> Token:
        token = self.provider.fetch()
        register_secret(token.jwt)
        if self.path is not None and (self.current is None or token.jwt != self.current.jwt):
            from pathlib import Path

            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, (token.jwt + "\n").encode(), 0o600)
        if self.current is None or token.jwt != self.current.jwt:
            log.info("identity token from %s (%s): %s; valid until %s", self.provider.name, self.provider.where,
                     describe(token), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(token.expiry)))
        self.current = token
        return token

    def wait_after(self, token: Token) -> float:
        wait = max(1.0, token.refresh_in(self.fraction))
        return min(wait, FILE_POLL) if self.provider.name == "oidc-file" else wait

    def run(self) -> None:
        wait = self.wait_after(self.current) if self.current is not None else 0.0
        while not self._stop.is_set():
            if wait and self._stop.wait(wait):
                return
            before, failing = self.current, self.backoff.attempts > 0
            try:
                token = self.refresh_once()
            except Exception as exc:  # reported and retried: the thread must outlive any one failure
                delay = self.backoff.next_delay()
                expiry = self.current.expiry if self.current else None
                log.warning("identity token from %s failed (retry in %.1fs): %s", self.provider.name, delay, exc)
                self.post(IdentityRefreshFailed(self.provider.name, str(exc), delay, expiry))
                wait = delay
                continue
            self.backoff.reset()
            if before is None or failing or token.jwt != before.jwt:  # an unchanged file is no news
                self.post(IdentityRefreshed(self.provider.name, token.expiry, token.issued))
            wait = self.wait_after(token)
