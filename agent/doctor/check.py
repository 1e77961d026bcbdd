"""What every doctor check shares: the Check line it returns, the Context earlier checks fill in for
later ones, and the thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import config
from agent.paths import Layout

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
SOON = 600.0  # a token or certificate closer than this to expiry is a warning
SKEW = 5.0    # clock skew against the API server tolerated before warning


@dataclass(frozen=True)
class Check:
    name: str
    result: str
    message: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.result.upper():4} {self.name}: {self.message}"
        return text + (f"\n     hint: {self.hint}" if self.hint else "")


@dataclass
class Context:
    """What the checks found so far, so later checks build on earlier ones."""
    path: str
    cfg: config.Config | None = None
    layout: Layout | None = None
    bundle: Any = None
    kube: Any = None
    namespace: str | None = None
    group: str | None = None
    identity_token: str | None = None  # the token file the API checks use, with an identity provider


def span(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"
