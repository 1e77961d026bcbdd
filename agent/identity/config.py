"""agent.yaml's `identity` section: the VM's cloud identity as its API credential (docs/identity.md);
agent/config.py holds the whole file's schema and loads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.schema import field
from agent.units import Duration
from agent.units import duration as _d


@dataclass(frozen=True)
class AzureIdentityConfig:
    """Azure IMDS settings."""
    client_id: str | None = field(None, help="client id of a user-assigned managed identity; "
                                  "default: the system-assigned one")


@dataclass(frozen=True)
class AwsIdentityConfig:
    """AWS STS GetWebIdentityToken settings."""
    region: str | None = field(None, help="STS region (a regional endpoint is needed); default: "
                               "botocore's configured region")
    signing_algorithm: Literal["RS256", "ES384"] = field("RS256", help="how STS signs the token")
    duration: Duration = field(_d("1h"), min=60.0, max=3600.0, help="lifetime asked for each token")


@dataclass(frozen=True)
class IdentityConfig:
    """The VM's cloud identity as its Kubernetes credential (see docs/identity.md)."""

    provider: Literal["none", "gcp", "azure", "aws", "oidc-file"] = field(
        "none", help="none: registry.token_file or a kubeconfig; gcp, azure, aws: the cloud's signed "
        "identity token; oidc-file: a JWT another system keeps in `file`")
    audience: str | None = field(None, help="the token's audience, one the API server's "
                                 "AuthenticationConfiguration accepts (gcp, azure, aws)")
    endpoint: str | None = field(None, help="metadata service (gcp, azure) or STS (aws) base URL; "
                                 "default: the cloud's own")
    file: str | None = field(None, help="the JWT file (oidc-file), read again when it changes")
    token_file: str | None = field(None, help="where the agent keeps the current token (0600); "
                                   "default: <run_dir>/identity-token")
    refresh_fraction: float = field(0.75, min=0.3, max=0.9,
                                    help="fetch a new token when this fraction of its lifetime has passed")
    timeout: Duration = field(_d("5s"), min=0.5, max=60.0, help="per request to the metadata service")
    tries: int = field(3, min=1, max=10, help="attempts per fetch before it counts as failed")
    azure: AzureIdentityConfig = field(factory=AzureIdentityConfig)
    aws: AwsIdentityConfig = field(factory=AwsIdentityConfig)

    @staticmethod
    def checks(c: IdentityConfig) -> list[tuple[str, str]]:
        out = []
        if c.provider in ("gcp", "azure", "aws") and not (c.audience or "").strip():
            out.append(("audience", f"provider {c.provider} needs an audience (the API server's "
                        "jwt issuer.audiences)"))
        if c.provider == "oidc-file" and not c.file:
            out.append(("file", "provider oidc-file needs file"))
        if c.file and c.provider != "oidc-file":
            out.append(("file", "file is only for provider oidc-file"))
        if c.endpoint is not None and not c.endpoint.startswith(("http://", "https://")):
            out.append(("endpoint", f'expected an http:// or https:// URL, got "{c.endpoint}"'))
        return out
