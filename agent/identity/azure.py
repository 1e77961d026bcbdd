"""Azure: a managed identity's token from the Instance Metadata Service (IMDS).

GET {endpoint}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=A with the header
`Metadata: true` (IMDS refuses requests without it, and requests carrying X-Forwarded-For). A
user-assigned identity is chosen with `client_id`. The answer is JSON: access_token (a JWT from
Microsoft Entra ID whose aud is the resource), expires_on (seconds since the epoch, as a string),
expires_in, not_before, resource, token_type "Bearer". Its iss is https://sts.windows.net/<tenant>/;
tid, oid (the identity's object id) and xms_mirid (the identity's or VM's Azure resource id) name who
it is. IMDS answers 429 when throttled and 5xx while it starts: both are retried.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.identity.common import IdentityError, MetadataService, Token, http, refused, token_from_jwt

DEFAULT_ENDPOINT = "http://169.254.169.254"
PATH = "/metadata/identity/oauth2/token"
API_VERSION = "2018-02-01"


@dataclass
class AzureProvider(MetadataService):
    PATH = PATH

    audience: str
    endpoint: str = DEFAULT_ENDPOINT
    client_id: str | None = None
    timeout: float = 5.0
    tries: int = 3
    name: str = "azure"

    def _once(self) -> Token:
        params = {"api-version": API_VERSION, "resource": self.audience}
        if self.client_id:
            params["client_id"] = self.client_id
        answer = http("GET", self.where, headers={"Metadata": "true"}, params=params, timeout=self.timeout,
                      hint="is this VM on Azure?")
        if answer.status != 200:
            try:
                err = json.loads(answer.body)
                detail = f"{err.get('error', '')}: {err.get('error_description', '')}".strip(": ")
            except (ValueError, AttributeError):
                detail = ""
            if answer.status == 400 and "identity" in detail.lower():
                raise IdentityError(f"{self.where}: no managed identity for this VM ({detail}); assign one, "
                                    "or set identity.azure.client_id for a user-assigned one")
            raise refused(self.where, answer, "the managed identity token was")
        try:
            doc = json.loads(answer.body)
            jwt = doc["access_token"]
        except (ValueError, KeyError, TypeError):
            raise IdentityError(f"{self.where}: the answer is not IMDS's token JSON "
                                "(access_token, expires_on)") from None
        if not isinstance(jwt, str):
            raise IdentityError(f"{self.where}: access_token is not a string")
        try:
            expiry: float | None = float(doc.get("expires_on"))
        except (TypeError, ValueError):
            expiry = None  # other IMDS versions write a date here; the token's exp says the same
        token = token_from_jwt(jwt, expiry=expiry)
        if expiry is not None and abs(token.expiry - expiry) > 1:
            # The claims are what the API server checks; expires_on only says the same.
            raise IdentityError(f"{self.where}: expires_on ({expiry:.0f}) disagrees with the token's exp "
                                f"({token.expiry:.0f})")
        return token
