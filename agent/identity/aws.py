"""AWS: a JWT from STS GetWebIdentityToken (IAM outbound identity federation), signed with the
credentials of the instance's role.

The request is STS's Query API: POST to the regional endpoint https://sts.<region>.amazonaws.com/
(the global endpoint does not serve this action) with Action=GetWebIdentityToken,
Version=2011-06-15, Audience.member.1=A, SigningAlgorithm (RS256 or ES384, required) and
DurationSeconds (60..3600; STS's default is 300), signed with Signature Version 4. The answer is XML:
GetWebIdentityTokenResult carries WebIdentityToken and Expiration. The token's sub is the role's ARN;
claims under "https://sts.amazonaws.com/" name aws_account, source_region, ec2_source_instance_arn
(for an instance role) and more. The account must first enable the feature
(`aws iam enable-outbound-web-identity-federation`), which gives its issuer URL.

botocore (Debian: python3-botocore) is optional and imported only here: it finds the role's
credentials (instance metadata, environment, profiles) and signs the request. The request is built
and sent here, so botocore releases whose STS model predates this action work too.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from agent.identity.common import IdentityError, Token, http, token_from_jwt, with_retries
from agent.retry import RetryableError

API_VERSION = "2011-06-15"
CLAIMS_NAMESPACE = "https://sts.amazonaws.com/"
RETRYABLE_CODES = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable",
                   "InternalFailure", "ExpiredToken", "RequestExpired"}


def _botocore() -> Any:
    try:
        import botocore.auth
        import botocore.awsrequest
        import botocore.exceptions
        import botocore.session
    except ImportError:
        raise IdentityError("identity provider aws needs botocore (Debian: apt install python3-botocore; "
                            "pip: botocore)") from None
    return botocore


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(root: ET.Element, name: str) -> ET.Element | None:
    return next((e for e in root.iter() if _local(e.tag) == name), None)


def parse_answer(body: bytes) -> tuple[str, float | None]:
    """(token, expiration) from GetWebIdentityToken's XML answer."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise IdentityError(f"the STS answer is not XML: {exc}") from None
    token, expiration = _find(root, "WebIdentityToken"), _find(root, "Expiration")
    if token is None or not (token.text or "").strip():
        raise IdentityError("the STS answer carries no WebIdentityToken")
    when = None
    if expiration is not None and expiration.text:
        try:
            when = dt.datetime.fromisoformat(expiration.text.strip().replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise IdentityError(f"the STS answer's Expiration is not a time: {expiration.text!r}") from None
    return (token.text or "").strip(), when


def parse_error(body: bytes) -> tuple[str, str]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", body[:200].decode("utf-8", "replace")
    code, message = _find(root, "Code"), _find(root, "Message")
    return (code.text or "" if code is not None else ""), (message.text or "" if message is not None else "")


@dataclass
class AwsProvider:
    audience: str
    region: str | None = None
    endpoint: str | None = None  # default: https://sts.<region>.amazonaws.com
    signing_algorithm: str = "RS256"
    duration: int = 3600
    timeout: float = 5.0
    tries: int = 3
    name: str = "aws"

    def _region(self, session: Any) -> str:
        region = self.region or session.get_config_variable("region")
        if not region:
            raise IdentityError("identity.aws.region is not set and no AWS region is configured "
                                "(GetWebIdentityToken needs a regional STS endpoint)")
        return str(region)

    @property
    def where(self) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/") + "/"
        return f"https://sts.{self.region}.amazonaws.com/" if self.region else "https://sts.<region>.amazonaws.com/"

    def fetch(self) -> Token:
        botocore = _botocore()
        try:
            session = botocore.session.Session()
            region = self._region(session)
            url = self.endpoint.rstrip("/") + "/" if self.endpoint else f"https://sts.{region}.amazonaws.com/"
            return with_retries(lambda: self._once(botocore, session, region, url), self.tries)
        except botocore.exceptions.BotoCoreError as exc:  # e.g. the role's credentials could not be read
            raise IdentityError(f"AWS credentials: {exc}") from None

    def _once(self, botocore: Any, session: Any, region: str, url: str) -> Token:
        creds = session.get_credentials()
        if creds is None:
            raise IdentityError("no AWS credentials: attach an IAM role (instance profile) to this VM "
                                "that may call sts:GetWebIdentityToken")
        form = {"Action": "GetWebIdentityToken", "Version": API_VERSION, "Audience.member.1": self.audience,
                "SigningAlgorithm": self.signing_algorithm, "DurationSeconds": str(int(self.duration))}
        body = urllib.parse.urlencode(form).encode()
        request = botocore.awsrequest.AWSRequest(
            method="POST", url=url, data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
        botocore.auth.SigV4Auth(creds.get_frozen_credentials(), "sts", region).add_auth(request)
        answer = http("POST", url, headers=dict(request.headers.items()), data=body, timeout=self.timeout,
                      hint="is this VM on AWS, and may it reach the regional STS endpoint?")
        if answer.status != 200:
            code, message = parse_error(answer.body)
            text = f"{url}: GetWebIdentityToken refused: {answer.status} {code}: {message}".rstrip(": ")
            if code in RETRYABLE_CODES:
                raise RetryableError(text)
            if code == "OutboundWebIdentityFederationDisabled" or "not enabled" in message.lower():
                text += " (enable it: aws iam enable-outbound-web-identity-federation)"
            raise IdentityError(text)
        jwt, expiration = parse_answer(answer.body)
        return token_from_jwt(jwt, expiry=expiration)
