"""Cloud identities on loopback: a test OIDC issuer (discovery document and JWKS over HTTPS with its own
CA) and fake metadata services for GCP, Azure and AWS STS that hand out tokens it signs, in each cloud's
wire format. Each fake serves one VM instance; two fakes are two clones of one image. The GCP and Azure
fakes, and FakeImds (AWS's instance metadata service, IMDSv2), also tell the instance's addresses.

    issuer = TestIssuer().start()
    gcp = FakeGcp(issuer, Instance("inst-1")).start()
    provider = GcpProvider("https://kube.example", gcp.url)

The tokens carry the test issuer's URL as `iss` (a real GCP token says https://accounts.google.com):
the emulator must discover the issuer's keys at that URL, as the API server does.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trustme
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


# --- a loopback HTTP(S) server with one routing function ------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Message  # as the handler has them: lookups ignore case
    body: bytes


Response = tuple[int, dict[str, str], bytes]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        req = Request(self.command, url.path, query, self.headers, body)
        self.server.owner.requests.append(req)
        status, headers, out = self.server.owner.route(req)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LoopbackServer


class LoopbackServer:
    scheme = "http"

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._server: _Server | None = None
        self.ssl_context: ssl.SSLContext | None = None

    def route(self, req: Request) -> Response:
        raise NotImplementedError

    def start(self) -> Any:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.owner = self
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(value).encode()


# --- the issuer ------------------------------------------------------------------------------------

@dataclass
class _Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        pub = self.private.public_key()
        if self.alg == "RS256":
            n = pub.public_numbers()
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                    "n": b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
                    "e": b64(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big"))}
        n = pub.public_numbers()
        size = (pub.curve.key_size + 7) // 8
        return {"kty": "EC", "kid": self.kid, "use": "sig", "alg": self.alg,
                "crv": {"ES256": "P-256", "ES384": "P-384"}[self.alg],
                "x": b64(n.x.to_bytes(size, "big")), "y": b64(n.y.to_bytes(size, "big"))}

    def sign(self, data: bytes) -> bytes:
        if self.alg == "RS256":
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        h = hashes.SHA256() if self.alg == "ES256" else hashes.SHA384()
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(h)))
        size = (self.private.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _new_key(alg: str) -> _Key:
    if alg == "RS256":
        private: Any = rsa.generate_private_key(65537, 2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1() if alg == "ES256" else ec.SECP384R1())
    return _Key(uuid.uuid4().hex[:12], alg, private)


class TestIssuer(LoopbackServer):
    """An OIDC issuer on https://127.0.0.1:PORT: discovery document, JWKS, and signing."""

    __test__ = False  # not a pytest class
    scheme = "https"

    def __init__(self, algs: tuple[str, ...] = ("RS256", "ES256", "ES384")) -> None:
        super().__init__()
        self.ca = trustme.CA()
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(self.ssl_context)
        self.keys: dict[str, _Key] = {}
        for alg in algs:
            self.add_key(alg)
        self.hits: dict[str, int] = {}

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem.bytes().decode()

    def add_key(self, alg: str = "RS256") -> str:
        key = _new_key(alg)
        self.keys[key.kid] = key
        return key.kid

    def rotate(self) -> None:
        """New keys replace every old one: tokens signed before no longer verify."""
        self.keys = {}
        for alg in ("RS256", "ES256", "ES384"):
            self.add_key(alg)

    def key_for(self, alg: str) -> _Key:
        return next(k for k in self.keys.values() if k.alg == alg)

    def sign(self, claims: Mapping[str, Any], alg: str = "RS256", kid: str | None = None) -> str:
        key = self.keys[kid] if kid else self.key_for(alg)
        header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
        signing_input = f"{b64json(header)}.{b64json(dict(claims))}"
        return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"

    @staticmethod
    def unsigned(claims: Mapping[str, Any]) -> str:
        return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(dict(claims))}."

    def route(self, req: Request) -> Response:
        self.hits[req.path] = self.hits.get(req.path, 0) + 1
        if req.path == "/.well-known/openid-configuration":
            return _json(200, {"issuer": self.url, "jwks_uri": f"{self.url}/jwks",
                               "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                               "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys.values()})})
        if req.path == "/jwks":
            return _json(200, {"keys": [k.jwk() for k in self.keys.values()]})
        return _json(404, {"error": "not found"})


# --- the VM instances and their clouds -------------------------------------------------------------

@dataclass
class Instance:
    """One VM, as its cloud knows it."""

    instance_id: str
    name: str = ""
    project: str = "mesh-project"       # GCP project, Azure subscription, AWS account
    project_number: str = "123456789012"
    zone: str = "europe-west1-b"        # GCP zone, AWS region, Azure location
    image: str = "5926592092274602096"  # GCP licence id of the golden image; AWS: tag; Azure: -
    lifetime: int = 3600
    principal: str = field(default_factory=lambda: str(uuid.uuid4()))  # Azure oid / GCP SA id
    # The first network interface's addresses (documentation ranges: only data, never dialled);
    # None: the instance has none of that kind.
    private_ip: str = "10.128.0.7"
    public_ip: str | None = "203.0.113.7"
    ipv6: str | None = "2001:db8:4000::7"
    mac: str = "0a:1b:2c:3d:4e:5f"

    def __post_init__(self) -> None:
        self.name = self.name or f"vm-{self.instance_id}"


class _Fake(LoopbackServer):
    """A cloud's metadata service for one instance; `fail_next` answers the next requests with a
    status (503: retried by the agent; 4xx: refused)."""

    def __init__(self, issuer: TestIssuer, instance: Instance, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.issuer, self.instance, self.clock = issuer, instance, clock
        self.fail_next: list[int] = []
        self.issued: list[str] = []

    def _times(self, lifetime: int | None = None) -> dict[str, int]:
        now = int(self.clock())
        return {"iat": now, "nbf": now, "exp": now + (lifetime or self.instance.lifetime)}


class FakeGcp(_Fake):
    """GCE's metadata server: the instance identity token, format=full."""

    PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"

    def claims(self, audience: str, licenses: bool = True) -> dict[str, Any]:
        i = self.instance
        times = self._times()
        times.pop("nbf")
        gce: dict[str, Any] = {"instance_creation_timestamp": times["iat"] - 60, "instance_id": i.instance_id,
                               "instance_name": i.name, "project_id": i.project,
                               "project_number": int(i.project_number), "zone": i.zone}
        if licenses:
            gce["license_id"] = [i.image]
        return {"aud": audience, "azp": i.principal, "iss": self.issuer.url, "sub": i.principal,
                **times, "google": {"compute_engine": gce}}

    NIC = "/computeMetadata/v1/instance/network-interfaces/0"

    def route(self, req: Request) -> Response:
        flavor = {"Metadata-Flavor": "Google"}
        addresses = {self.NIC + "/ip": self.instance.private_ip,
                     self.NIC + "/access-configs/0/external-ip": self.instance.public_ip,
                     self.NIC + "/ipv6s": self.instance.ipv6}
        if req.path in addresses:
            if req.headers.get("Metadata-Flavor") != "Google":
                return 403, {**flavor, "Content-Type": "text/html"}, b"Missing Metadata-Flavor:Google header."
            if self.fail_next:
                return self.fail_next.pop(0), flavor, b"unavailable"
            value = addresses[req.path]
            if value is None:
                return 404, {**flavor, "Content-Type": "text/html"}, b"Not Found"
            # ipv6s is a list: one address a line.
            text = value + "\n" if req.path.endswith("/ipv6s") else value
            return 200, {**flavor, "Content-Type": "application/text"}, text.encode()
        if req.path != self.PATH:
            return 404, {**flavor, "Content-Type": "text/html"}, b"Not Found"
        if req.headers.get("Metadata-Flavor") != "Google" or req.headers.get("X-Forwarded-For"):
            return 403, {**flavor, "Content-Type": "text/html"}, b"Missing Metadata-Flavor:Google header."
        if self.fail_next:
            return self.fail_next.pop(0), flavor, b"unavailable"
        audience = req.query.get("audience")
        if not audience:
            return 400, {**flavor, "Content-Type": "text/html"}, b"non-empty audience parameter required"
        if req.query.get("format") != "full":
            return 400, flavor, b"this fake only serves format=full"
        token = self.issuer.sign(self.claims(audience, req.query.get("licenses") == "TRUE"))
        self.issued.append(token)
        return 200, {**flavor, "Content-Type": "text/html"}, token.encode()


class FakeAzure(_Fake):
    """Azure IMDS: a managed identity's token for a resource."""

    PATH = "/metadata/identity/oauth2/token"
    TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    RESOURCE_GROUP = "mesh-rg"

    @property
    def resource_id(self) -> str:
        i = self.instance
        return (f"/subscriptions/{i.project}/resourcegroups/{self.RESOURCE_GROUP}/providers/"
                f"Microsoft.Compute/virtualMachines/{i.name}")

    def claims(self, resource: str) -> dict[str, Any]:
        i = self.instance
        return {"aud": resource, "iss": self.issuer.url, **self._times(), "aio": "E2ZgYJj", "appid": i.principal,
                "appidacr": "2", "idp": self.issuer.url, "idtyp": "app", "oid": i.principal,
                "rh": "0.ARoAv4j5cvGGr0", "sub": i.principal, "tid": self.TENANT, "uti": uuid.uuid4().hex[:22],
                "ver": "1.0", "xms_mirid": self.resource_id, "xms_az_rid": self.resource_id}

    NETWORK_PATH = "/metadata/instance/network/interface"

    def interfaces(self) -> list[dict[str, Any]]:
        i = self.instance
        return [{"ipv4": {"ipAddress": [{"privateIpAddress": i.private_ip, "publicIpAddress": i.public_ip or ""}],
                          "subnet": [{"address": "10.128.0.0", "prefix": "20"}]},
                 "ipv6": {"ipAddress": [{"privateIpAddress": i.ipv6}] if i.ipv6 else []},
                 "macAddress": i.mac.replace(":", "").upper()}]

    def route(self, req: Request) -> Response:
        if req.path == self.NETWORK_PATH:
            if req.headers.get("Metadata") != "true":
                return _json(400, {"error": "Bad request. Required metadata header not specified"})
            if not req.query.get("api-version"):
                return _json(400, {"error": "Bad request. api-version was not specified in the request"})
            if self.fail_next:
                return _json(self.fail_next.pop(0), {"error": "temporarily_unavailable"})
            return _json(200, self.interfaces())
        if req.path != self.PATH:
            return _json(404, {"error": "not_found"})
        if req.headers.get("Metadata") != "true":
            return _json(400, {"error": "invalid_request",
                               "error_description": "Required metadata header not specified"})
        if self.fail_next:
            return _json(self.fail_next.pop(0), {"error": "temporarily_unavailable"})
        resource, version = req.query.get("resource"), req.query.get("api-version")
        if not version:
            return _json(400, {"error": "invalid_request", "error_description": "Required query variable "
                                                                               "'api-version' is missing"})
        if not resource:
            return _json(400, {"error": "invalid_request",
                               "error_description": "Required audience parameter not specified"})
        client_id = req.query.get("client_id")
        if client_id and client_id != self.instance.principal:
            return _json(400, {"error": "invalid_request", "error_description": "Identity not found"})
        claims = self.claims(resource)
        token = self.issuer.sign(claims)
        self.issued.append(token)
        life = claims["exp"] - claims["iat"]
        return _json(200, {"access_token": token, "client_id": self.instance.principal,
                           "expires_in": str(life), "expires_on": str(claims["exp"]),
                           "ext_expires_in": str(life), "not_before": str(claims["nbf"]),
                           "resource": resource, "token_type": "Bearer"})


def sigv4_signature(secret: str, method: str, path: str, headers: Mapping[str, str], signed: list[str],
                    body: bytes, amz_date: str, scope: str) -> str:
    """Signature Version 4 of a request with no query string, computed the way AWS documents it."""
    canonical_headers = "".join(f"{h}:{' '.join(headers[h].strip().split())}\n" for h in signed)
    canonical = "\n".join([method, path, "", canonical_headers, ";".join(signed),
                           hashlib.sha256(body).hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    date, region, service, terminal = scope.split("/")
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, terminal):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class FakeSts(_Fake):
    """AWS STS's Query API: GetWebIdentityToken for the instance's role, SigV4 checked."""

    ACCESS_KEY = "ASIAFAKEINSTANCEROLE"
    SECRET_KEY = "fake-secret-key-of-the-instance-role"
    SESSION_TOKEN = "fake-session-token"
    NS = "https://sts.amazonaws.com/doc/2011-06-15/"
    role = "mesh-vm-role"

    @staticmethod
    def env() -> dict[str, str]:
        """The environment botocore's credential chain reads (as the instance profile would give)."""
        return {"AWS_ACCESS_KEY_ID": FakeSts.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FakeSts.SECRET_KEY,
                "AWS_SESSION_TOKEN": FakeSts.SESSION_TOKEN, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}

    @property
    def role_arn(self) -> str:
        return f"arn:aws:iam::{self.instance.project}:role/{self.role}"

    def claims(self, audience: str, duration: int) -> dict[str, Any]:
        i = self.instance
        times = self._times(duration)
        times.pop("nbf")
        return {"iss": self.issuer.url, "aud": audience, "sub": self.role_arn, **times, "jti": str(uuid.uuid4()),
                "https://sts.amazonaws.com/": {
                    "aws_account": i.project, "source_region": i.zone, "principal_id": self.role_arn,
                    "ec2_source_instance_arn": f"arn:aws:ec2:{i.zone}:{i.project}:instance/{i.instance_id}",
                    "ec2_instance_source_vpc": "vpc-0abc", "ec2_instance_source_private_ipv4": "10.0.0.5",
                    "ec2_role_delivery": "2.0", "principal_tags": {"mesh-image": i.image}}}

    def _error(self, status: int, code: str, message: str) -> Response:
        body = (f'<ErrorResponse xmlns="{self.NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
                f"<Message>{message}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>")
        return status, {"Content-Type": "text/xml"}, body.encode()

    def _check_signature(self, req: Request) -> str | None:
        auth = req.headers.get("Authorization") or ""
        try:
            algo, rest = auth.split(" ", 1)
            parts = dict(p.strip().split("=", 1) for p in rest.split(","))
            akid, scope = parts["Credential"].split("/", 1)
            signed = parts["SignedHeaders"].split(";")
            headers = {k.lower(): v for k, v in req.headers.items()}
            want = sigv4_signature(self.SECRET_KEY, req.method, req.path, headers, signed, req.body,
                                   headers["x-amz-date"], scope)
        except (ValueError, KeyError):
            return "no valid SigV4 Authorization header"
        if algo != "AWS4-HMAC-SHA256" or akid != self.ACCESS_KEY:
            return "unknown access key"
        if not scope.endswith(f"/{self.instance.zone}/sts/aws4_request"):
            return f"credential scope {scope} is not this region's STS"
        if headers.get("x-amz-security-token") != self.SESSION_TOKEN or "x-amz-security-token" not in signed:
            return "the session token is missing or unsigned"
        if not hmac.compare_digest(want, parts["Signature"]):
            return "signature mismatch"
        return None

    def route(self, req: Request) -> Response:
        if req.method != "POST" or req.path != "/":
            return self._error(404, "UnknownOperation", "not found")
        problem = self._check_signature(req)
        if problem:
            return self._error(403, "SignatureDoesNotMatch", problem)
        if self.fail_next:
            status = self.fail_next.pop(0)
            return self._error(status, "ServiceUnavailable" if status >= 500 else "AccessDenied", "injected")
        form = dict(urllib.parse.parse_qsl(req.body.decode()))
        if form.get("Action") != "GetWebIdentityToken" or form.get("Version") != "2011-06-15":
            return self._error(400, "InvalidAction", "unknown action or version")
        if form.get("SigningAlgorithm") not in ("RS256", "ES384"):
            return self._error(400, "ValidationError", "SigningAlgorithm must be RS256 or ES384")
        audience = form.get("Audience.member.1")
        duration = int(form.get("DurationSeconds") or 300)
        if not audience or not 60 <= duration <= 3600:
            return self._error(400, "ValidationError", "bad Audience or DurationSeconds")
        claims = self.claims(audience, duration)
        token = self.issuer.sign(claims, form["SigningAlgorithm"])
        self.issued.append(token)
        expiration = dt.datetime.fromtimestamp(claims["exp"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = (f'<GetWebIdentityTokenResponse xmlns="{self.NS}"><GetWebIdentityTokenResult>'
                f"<WebIdentityToken>{token}</WebIdentityToken><Expiration>{expiration}</Expiration>"
                f"</GetWebIdentityTokenResult><ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId>"
                f"</ResponseMetadata></GetWebIdentityTokenResponse>")
        return 200, {"Content-Type": "text/xml"}, body.encode()


class FakeImds(LoopbackServer):
    """AWS's instance metadata service, IMDSv2 only: PUT /latest/api/token with a TTL header gives a
    session token, which every GET must carry (401 without). Serves the instance's addresses."""

    def __init__(self, instance: Instance) -> None:
        super().__init__()
        self.instance = instance
        self.tokens: set[str] = set()
        self.fail_next: list[int] = []

    def route(self, req: Request) -> Response:
        text = {"Content-Type": "text/plain"}
        if self.fail_next:
            return self.fail_next.pop(0), text, b"unavailable"
        if req.path == "/latest/api/token":
            ttl = req.headers.get("X-aws-ec2-metadata-token-ttl-seconds") or ""
            if req.method != "PUT" or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return 400, text, b"Bad Request"
            token = uuid.uuid4().hex
            self.tokens.add(token)
            return 200, {**text, "X-aws-ec2-metadata-token-ttl-seconds": ttl}, token.encode()
        if req.headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return 401, text, b"Unauthorized"
        i = self.instance
        values = {"/latest/meta-data/local-ipv4": i.private_ip, "/latest/meta-data/public-ipv4": i.public_ip,
                  "/latest/meta-data/mac": i.mac,
                  f"/latest/meta-data/network/interfaces/macs/{i.mac}/ipv6s": i.ipv6}
        value = values.get(req.path)
        if value is None:
            return 404, text, b"Not Found"
        return 200, text, value.encode()
