"""GCP: the instance identity token from the Compute Engine metadata server.

GET {endpoint}/computeMetadata/v1/instance/service-accounts/default/identity?audience=A&format=full
with the header `Metadata-Flavor: Google`; the answer is the JWT itself as text. The metadata server
answers with the same header, which tells it apart from anything else listening on that address.
`format=full` adds the `google.compute_engine` claims (project_id, project_number, zone, instance_id,
instance_name, instance_creation_timestamp; `licenses=TRUE` adds license_id, the image's licences).
Google signs it with RS256, issuer https://accounts.google.com, and it lives one hour.
The VM needs a service account attached, but that account needs no IAM role for this.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.identity.common import IdentityError, MetadataService, Token, http, refused, token_from_jwt

DEFAULT_ENDPOINT = "http://metadata.google.internal"
PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
ISSUER = "https://accounts.google.com"


@dataclass
class GcpProvider(MetadataService):
    PATH = PATH

    audience: str
    endpoint: str = DEFAULT_ENDPOINT
    timeout: float = 5.0
    tries: int = 3
    licenses: bool = True
    name: str = "gcp"

    def _once(self) -> Token:
        params = {"audience": self.audience, "format": "full"}
        if self.licenses:
            params["licenses"] = "TRUE"
        answer = http("GET", self.where, headers={"Metadata-Flavor": "Google"}, params=params,
                      timeout=self.timeout, hint="is this VM on GCP (Compute Engine)?")
        if answer.status == 404:
            raise IdentityError(f"{self.where}: 404: no service account is attached to this VM "
                                "(an identity token needs one, with no role)")
        if answer.status != 200:
            raise refused(self.where, answer, "the identity token was")
        if answer.headers.get("Metadata-Flavor") != "Google":
            raise IdentityError(f"{self.where}: the answer lacks the header Metadata-Flavor: Google; "
                                "this is not GCP's metadata server")
        text = answer.body.decode("ascii", "replace").strip()
        return token_from_jwt(text)
