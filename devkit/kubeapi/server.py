"""The HTTP(S) front of the emulator: routing, authentication, authorization, discovery, watches,
faults; and `KubeAPI`, the object a test starts and stops."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme
import yaml

from devkit.kubeapi import openapi, protobuf, table
from devkit.kubeapi import persist as persistence
from devkit.kubeapi.auth import ADMIN, Identity, Rule, forbidden_message
from devkit.kubeapi.clientcerts import ClientCert, client_ca, identity_of
from devkit.kubeapi.cluster import Cluster, Request
from devkit.kubeapi.faults import Faults, message_for, reason_for
from devkit.kubeapi.resources import VIRTUAL, ResourceType, api_resource
from devkit.kubeapi.status import ApiError, bad_request, gone, method_not_allowed, unauthorized

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.4", "gitCommit": "0" * 40,
                  "gitTreeState": "clean", "buildDate": "2025-04-22T00:00:00Z", "goVersion": "go1.23.6",
                  "compiler": "gc", "platform": "linux/amd64"}
PUBLIC_PATHS = ("/version", "/healthz", "/readyz", "/livez")


@dataclass(frozen=True)
class Route:
    rt: ResourceType | None
    version: str
    namespace: str  # "" for cluster-scoped or all namespaces
    name: str
    subresource: str
    special: str = ""  # "ssar", "ssr", "token"


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: str
    user: str
    code: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], api: KubeAPI) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.api = api
        self.connections: set[socket.socket] = set()
        self.closing = threading.Event()  # set when this listener goes away (stop or outage)
        self.conn_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.conn_lock:
            self.connections.add(request)
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the client's
        # delayed ACK add 40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.api.ssl_context is not None:
                request.settimeout(10)
                try:
                    request = self.api.ssl_context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                request.settimeout(None)
                with self.conn_lock:
                    self.connections.add(request)
            super().finish_request(request, client_address)
        finally:
            with self.conn_lock:
                self.connections.discard(request)

    def drop_connections(self) -> None:
        self.closing.set()
        self.api.cluster.store.wake_all()  # open watches end now, not at their timeout
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet; requests are recorded instead
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # --- plumbing ------------------------------------------------------------------------------------

    @property
    def api(self) -> KubeAPI:
        return self.server.api

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        self._user = ""
        self._code = 0
        self._recorded = False
        self._trickle = 0.0
        self._method, self._url = method, url
        body = self._read_body()
        try:
            if not self._faults(method, url.path, url.query):
                return
            self._dispatch(method, url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}, body)
        except ApiError as exc:
            self._send_json(exc.code, exc.body(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug here must show as a 500, like a real server's, not a hang
            traceback.print_exc()
            with contextlib.suppress(OSError):
                error = ApiError(500, "InternalError", f"Internal error occurred: {exc!r}")
                self._send_json(500, error.body())
        finally:
            self._record()

    def _record(self) -> None:
        # Recorded before the response goes out, so a test that got the answer also sees the record.
        if not self._recorded:
            self._recorded = True
            url = self._url
            self.api.record(RequestRecord(self._method, url.path, url.query, self._user, self._code))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _faults(self, method: str, path: str, query: str) -> bool:
        for fault in self.api.faults.take(method, path, query):
            if fault.kind == "latency":
                time.sleep(fault.delay)
            elif fault.kind == "reset":
                self._code = -1
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.close()
                return False
            elif fault.kind == "status":
                headers = {}
                details: dict[str, Any] = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                    details = {"retryAfterSeconds": fault.retry_after}
                raise ApiError(fault.code, reason_for(fault.code), message_for(fault.code), details or None,
                               headers)
            elif fault.kind == "trickle":
                self._trickle = fault.delay
        return True

    def _write_body(self, data: bytes) -> None:
        if not self._trickle:
            self.wfile.write(data)
            return
        try:
            self.wfile.flush()
            for i in range(len(data)):
                if self.server.closing.wait(self._trickle):  # the server going away drops it
                    self.close_connection = True
                    return
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
        except OSError:  # the client cut it: what the fault is there to show
            self.close_connection = True

    def _send_json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self._code = code
        self._record()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", secrets.token_hex(8))
        for warning in self.api.cluster.take_warnings():
            self.send_header("Warning", f'299 - {json.dumps(warning)}')
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self._write_body(data)

    def _send_text(self, code: int, text: str) -> None:
        data = text.encode()
        self._code = code
        self._record()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._write_body(data)

    def _json_body(self, raw: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if ctype == "application/vnd.kubernetes.protobuf":
            try:
                return protobuf.decode(raw)
            except protobuf.ProtobufError as exc:
                raise ApiError(415, "UnsupportedMediaType", str(exc)) from exc
        try:
            return json.loads(raw) if ctype == "application/json" else yaml.safe_load(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"error decoding request body: {exc}") from exc

    # --- routing ------------------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, query: dict[str, str], raw: bytes) -> None:
        path = path.rstrip("/") or "/"
        if path in PUBLIC_PATHS:
            if path == "/version":
                self._send_json(200, SERVER_VERSION)
            else:
                self._send_text(200, "ok")
            return
        ident = self._authenticate()
        self._user = ident.user
        discovery = self.api.discovery(path)
        if discovery is not None:
            if method != "GET":
                raise method_not_allowed()
            self._send_json(200, discovery)
            return
        if path.startswith("/openapi/"):
            doc = self.api.openapi_v3(path)
            if doc is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            self._send_json(200, doc)
            return
        route = self.api.route(path)
        if route is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        cluster = self.api.cluster
        if route.special == "ssar":
            if method != "POST":
                raise method_not_allowed()
            self._send_json(201, cluster.access_review(ident, self._json_body(raw)))
            return
        if route.special == "ssr":
            self._send_json(201, {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None},
                                  "status": {"userInfo": {"username": ident.user, "uid": ident.uid,
                                                          "groups": list(ident.all_groups)}}})
            return
        rt = route.rt
        assert rt is not None
        verb = self._verb(method, route, query)
        resource = f"{rt.plural}/{route.subresource}" if route.subresource else rt.plural
        if not cluster.auth.allowed(ident, verb, rt.group, resource,
                                    route.namespace, route.name):
            msg = forbidden_message(ident, verb, rt.group, rt.plural, route.namespace, route.name,
                                    route.subresource)
            raise ApiError(403, "Forbidden", msg, {"name": route.name, "group": rt.group, "kind": rt.plural})
        if verb not in rt.verbs and not route.subresource:
            raise method_not_allowed()
        manager = query.get("fieldManager") or (self.headers.get("User-Agent") or "unknown").split("/")[0]
        if len(manager) > 128:
            raise bad_request("fieldManager: Too long: must have at most 128 bytes")
        dry_run = query.get("dryRun") == "All"
        if query.get("dryRun") not in (None, "All"):
            raise bad_request(f"Unsupported dryRun value: {query.get('dryRun')}")
        fv = query.get("fieldValidation", "Warn")
        if fv not in ("Ignore", "Warn", "Strict"):
            raise bad_request(f"fieldValidation must be one of Ignore, Warn, Strict, not {fv!r}")
        req = Request(ident, manager, dry_run, fv)
        ctype = self.headers.get("Content-Type") or ""
        if method == "PATCH" and ctype.startswith("application/apply-patch"):
            req = Request(ident, query.get("fieldManager", ""), dry_run, fv)
        ns = route.namespace
        if route.special == "token":
            if method != "POST":
                raise method_not_allowed()
            self._send_json(201, cluster.token_request(ns, route.name, self._json_body(raw), req))
            return
        if route.subresource and route.subresource != "status":
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        v = route.version
        if verb == "get":
            obj = cluster.get(rt, v, ns, route.name)
            if table.wants_table(self.headers.get("Accept") or ""):
                obj = table.table(rt, v, [obj], obj["metadata"]["resourceVersion"],
                                  query.get("includeObject", ""))
            self._send_json(200, obj)
        elif verb == "list":
            limit = int(query.get("limit", "0") or 0)
            listed = cluster.list(rt, v, ns or None, query.get("labelSelector"), query.get("fieldSelector"),
                                  limit, query.get("continue"))
            if table.wants_table(self.headers.get("Accept") or ""):
                out = table.table(rt, v, listed["items"], listed["metadata"]["resourceVersion"],
                                  query.get("includeObject", ""))
                if listed["metadata"].get("continue"):
                    out["metadata"]["continue"] = listed["metadata"]["continue"]
                listed = out
            self._send_json(200, listed)
        elif verb == "watch":
            self._watch(rt, v, ns, query)
        elif verb == "create":
            self._send_json(201, cluster.create(rt, v, ns, self._json_body(raw), req))
        elif verb == "update":
            body = self._json_body(raw)
            self._send_json(200, cluster.update(rt, v, ns, route.name, body, req, route.subresource))
        elif verb == "patch":
            force = _flag(query.get("force"))
            existed = cluster.store.get((rt.group, rt.plural), ns if rt.namespaced else "",
                                        route.name) is not None
            out = cluster.patch(rt, v, ns, route.name, self.headers.get("Content-Type") or "", raw, req,
                                route.subresource, force)
            self._send_json(200 if existed else 201, out)
        elif verb == "delete":
            options = self._json_body(raw) if raw else {}
            if query.get("propagationPolicy"):
                options["propagationPolicy"] = query["propagationPolicy"]
            self._send_json(200, cluster.delete(rt, v, ns, route.name, options, req))
        elif verb == "deletecollection":
            options = self._json_body(raw) if raw else {}
            if query.get("propagationPolicy"):
                options["propagationPolicy"] = query["propagationPolicy"]
            listed = cluster.list(rt, v, ns or None, query.get("labelSelector"), query.get("fieldSelector"))
            for item in listed["items"]:
                m = item["metadata"]
                cluster.delete(rt, v, m.get("namespace", ""), m["name"], dict(options), req)
            self._send_json(200, listed)
        else:
            raise method_not_allowed()

    def _verb(self, method: str, route: Route, query: dict[str, str]) -> str:
        if route.special == "token":
            return "create"
        if method == "GET":
            if route.name:
                return "get"
            return "watch" if _flag(query.get("watch")) else "list"
        if route.name and route.subresource == "" and method == "POST":
            raise method_not_allowed()
        verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
        if method not in verbs:
            raise method_not_allowed()
        if method in ("PUT", "PATCH") and not route.name:
            raise method_not_allowed()
        if method == "DELETE" and not route.name:
            return "deletecollection"
        if route.subresource == "status" and method not in ("PUT", "PATCH"):
            raise method_not_allowed()
        return verbs[method]

    def _authenticate(self) -> Identity:
        # As the API server's union authenticator: a verified client certificate first, then a token.
        if isinstance(self.connection, ssl.SSLSocket):
            cert_ident = identity_of(self.connection.getpeercert())
            if cert_ident is not None:
                return cert_ident
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Bearer "):
            raise unauthorized()
        ident = self.api.cluster.auth.authenticate(header[7:].strip(), self.api.cluster.sa_uid)
        if ident is None:
            raise unauthorized()
        return ident

    # --- watch ----------------------------------------------------------------------------------------

    def _watch(self, rt: ResourceType, version: str, ns: str, query: dict[str, str]) -> None:
        cluster, store = self.api.cluster, self.api.cluster.store
        match = cluster.selector(rt, query.get("labelSelector"), query.get("fieldSelector"))
        bookmarks = _flag(query.get("allowWatchBookmarks"))
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        key = rt.store_key
        changed = store.changed_for(key)
        rv_param = query.get("resourceVersion", "")
        initial: list[dict[str, Any]] = []
        with store.lock:
            if rv_param in ("", "0"):
                initial = [o for o in store.items(key, ns or None) if match(o)]
                last = store.rv
            else:
                try:
                    last = int(rv_param)
                except ValueError as exc:
                    raise bad_request(f"invalid resource version {rv_param!r}") from exc
        self._code = 200
        self._record()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        # The stream ends by closing the connection: say so, or a client pools the socket and its next
        # request (a POST, which urllib3 does not retry) dies with "Remote end closed connection".
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        as_table = table.wants_table(self.headers.get("Accept") or "")

        def shape(obj: dict[str, Any]) -> dict[str, Any]:
            # `kubectl get -w` asks for each event's object as a one-row Table.
            if not as_table:
                return obj
            return table.table(rt, version, [obj], obj["metadata"]["resourceVersion"],
                               query.get("includeObject", ""))

        def encode(etype: str, obj: dict[str, Any]) -> bytes:
            return json.dumps({"type": etype, "object": obj}).encode() + b"\n"

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def send(etype: str, obj: dict[str, Any]) -> None:
            write(encode(etype, obj))

        if self._trickle:
            self._trickle_watch(b"".join(encode("ADDED", shape(cluster._out(rt, version, o)))
                                         for o in initial))
            return
        try:
            for obj in initial:
                send("ADDED", shape(cluster._out(rt, version, obj)))
            next_bookmark = time.monotonic() + self.api.bookmark_interval
            while not self.server.closing.is_set() and time.monotonic() < deadline:
                with changed:
                    if store.too_old(last, key):
                        send("ERROR", gone(f"too old resource version: {last} ({store.rv})").body())
                        break
                    events = store.since(last, key)
                    if not events:
                        now = time.monotonic()
                        wake = min(deadline, next_bookmark if bookmarks else deadline, now + 1.0)
                        changed.wait(timeout=max(0.0, wake - now))
                        events = store.since(last, key)
                    current = store.rv
                for e in events:
                    last = e.rv
                    if e.key != key:
                        continue
                    etype = self._event_type(e, ns, match)
                    if etype:
                        cache_key = (version, as_table, etype)
                        data = e.encoded.get(cache_key)
                        if data is None:
                            data = encode(etype, shape(cluster._out(rt, version, e.obj)))
                            e.encoded[cache_key] = data
                        write(data)
                last = max(last, current) if not store.too_old(last, key) else last
                if bookmarks and time.monotonic() >= next_bookmark:
                    send("BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version(version),
                                      "metadata": {"resourceVersion": str(last)}})
                    next_bookmark = time.monotonic() + self.api.bookmark_interval
            if not self.server.closing.is_set():  # a server going away drops streams, it does not end them
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except OSError:
            pass

    def _trickle_watch(self, events: bytes) -> None:
        """The trickle fault on a watch: the events a byte per chunk, then newlines, until the client or
        the server goes away."""
        sent = 0
        try:
            while not self.server.closing.wait(self._trickle):
                byte = events[sent:sent + 1] or b"\n"
                sent += 1
                self.wfile.write(b"1\r\n%s\r\n" % byte)
                self.wfile.flush()
        except OSError:
            pass

    @staticmethod
    def _event_type(e: Any, ns: str, match: Any) -> str | None:
        def visible(o: dict[str, Any] | None) -> bool:
            return o is not None and (not ns or o["metadata"].get("namespace") == ns) and match(o)

        if e.type == "ADDED":
            return "ADDED" if visible(e.obj) else None
        if e.type == "DELETED":
            return "DELETED" if visible(e.obj) else None
        now, before = visible(e.obj), visible(e.old)
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        return "DELETED" if before else None


@functools.cache
def _ca() -> trustme.CA:
    """One CA per process (and one server certificate per listening address): making them is the slow
    part of starting."""
    return trustme.CA()


@functools.cache
def _flag(value: str | None) -> bool:
    """A boolean query parameter as the API server parses it (strconv.ParseBool): Python clients
    before 24 send `True`."""
    return (value or "").lower() in ("1", "t", "true")


def _server_context() -> ssl.SSLContext:
    """TLS for the server: client certificates are asked for, not required (tokens work without), and
    must be signed by the client CA when given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=client_ca().cert_pem.decode())
    return ctx


def _certificates(host: str) -> tuple[trustme.CA, trustme.LeafCert]:
    names = ["127.0.0.1", "::1", "localhost"]
    return _ca(), _ca().issue_cert(*names, *([host] if host not in names else []))


class KubeAPI:
    """A strict Kubernetes API server emulator on loopback.

    >>> api = KubeAPI().start()
    >>> api.kubeconfig          # a kubeconfig for the admin token
    >>> api.add_token("t", "alice", [rules("get", "workloadentries", "vm-apps")])
    >>> api.faults.status(429, retry_after=1)
    >>> api.stop()
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, tls: bool = True,
                 state_dir: str | Path | None = None, crds: str | Path | None = None,
                 load_crds: bool = True, bookmark_interval: float = 1.0, history: int = 1000,
                 gc_delay: float = 0.05, persist: bool = False) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.cluster = Cluster(openapi.load_crds(crds) if load_crds else (), history)
        self.faults = Faults()
        self.bookmark_interval = bookmark_interval
        self.gc_delay = gc_delay
        self.state_dir = Path(state_dir) if state_dir else None
        self.admin_token = secrets.token_urlsafe(24)
        self.cluster.auth.add_token(self.admin_token, Identity("admin", ("system:masters",)), ADMIN)
        self.requests: list[RequestRecord] = []
        self.stopping = threading.Event()
        self.ssl_context: ssl.SSLContext | None = None
        self._ca_pem = b""
        self.persist = persist
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._gc_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._restart_timer: threading.Timer | None = None
        self.kubeconfig: Path | None = None
        self.ca_path: Path | None = None

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> KubeAPI:
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="kubeapi-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.persist:
            self._restore()
        elif self.tls:
            ca, cert = _certificates(self.host)
            self._ca_pem = ca.cert_pem.bytes()
            self.ssl_context = _server_context()
            cert.configure_cert(self.ssl_context)
        self._listen()
        self.port = self._server.server_address[1] if self._server else self.port
        self._gc_thread = threading.Thread(target=self._gc_loop, name="kubeapi-gc", daemon=True)
        self._gc_thread.start()
        if self._ca_pem:
            self.ca_path = self.state_dir / "ca.crt"
            self.ca_path.write_bytes(self._ca_pem)
        self.kubeconfig = self.write_kubeconfig(self.state_dir / "kubeconfig", self.admin_token)
        return self

    def _restore(self) -> None:
        """--persist: the CA, signing key, admin token and objects of the last run, if any."""
        assert self.state_dir is not None
        if self.tls:
            ca, ca_key = persistence.load_or_make_ca(self.state_dir)
            cert_path, key_path = persistence.issue_server_cert(self.state_dir, ca, ca_key, self.host)
            self._ca_pem = (self.state_dir / "ca.crt").read_bytes()
            self.ssl_context = _server_context()
            self.ssl_context.load_cert_chain(cert_path, key_path)
        self.cluster.auth.key = persistence.load_or_make_signing_key(self.state_dir)
        self.cluster.auth.revoke(self.admin_token)
        self.admin_token = persistence.load_or_make_token(self.state_dir)
        self.cluster.auth.add_token(self.admin_token, Identity("admin", ("system:masters",)), ADMIN)
        persistence.load_objects(self.cluster.store, self.state_dir)

    def _listen(self) -> None:
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="kubeapi", daemon=True)
        self._thread.start()

    def _unlisten(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()

    def stop(self) -> None:
        self.stopping.set()
        self.cluster.store.wake_all()  # watchers see `stopping` now
        if self.persist and self.state_dir is not None:
            persistence.save_objects(self.cluster.store, self.state_dir)
        if self._restart_timer:
            self._restart_timer.cancel()
        self._unlisten()
        self.cluster.gc_wakeup.set()
        if self._gc_thread:
            self._gc_thread.join(timeout=2)

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def outage(self, seconds: float) -> None:
        """Stop answering at once (connections refused, open ones dropped); come back after seconds."""
        self._unlisten()

        def back() -> None:
            if not self.stopping.is_set():
                self._listen()

        self._restart_timer = threading.Timer(seconds, back)
        self._restart_timer.daemon = True
        self._restart_timer.start()

    def _gc_loop(self) -> None:
        while not self.stopping.is_set():
            if not self.cluster.gc_wakeup.wait(timeout=0.5):
                continue
            self.cluster.gc_wakeup.clear()
            time.sleep(self.gc_delay)
            for _ in range(20):  # cascades: each pass may orphan the next level
                if not self.cluster.collect_garbage():
                    break

    # --- what tests use ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self._ca_pem

    def write_kubeconfig(self, path: str | Path, token: str | None = None, user: str = "user",
                         namespace: str = "default", *, credentials: dict[str, Any] | None = None) -> Path:
        """A kubeconfig for `token`, or for any other kubeconfig user entry given as `credentials`
        (e.g. {"tokenFile": ...}, {"client-certificate": ..., "client-key": ...}, {"exec": ...})."""
        cluster: dict[str, Any] = {"server": self.url}
        if self._ca_pem:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "emulator", "cluster": cluster}],
            "users": [{"name": user, "user": credentials if credentials is not None else {"token": token}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": user,
                                                         "namespace": namespace}}],
            "current-context": "emulator",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def add_token(self, token: str, identity: Identity | str,
                  policy: list[Rule] | tuple[Rule, ...] | None = None,
                  *, expires_at: float | None = None) -> Identity:
        """Accept `token` as `identity` (a user name or Identity), granting it `policy` (Rules)."""
        return self.cluster.auth.add_token(token, identity, policy, expires_at=expires_at)

    def issue_client_cert(self, user: str, groups: tuple[str, ...] | list[str] = (),
                          policy: list[Rule] | tuple[Rule, ...] | None = None) -> ClientCert:
        """A client certificate (CN=user, one O per group) that authenticates as `user`, granting it
        `policy`."""
        if policy:
            self.grant(user, policy)
        return client_ca().issue(user, groups)

    def grant(self, subject: str, policy: list[Rule] | tuple[Rule, ...]) -> None:
        """More rules for a user or group, e.g. "system:serviceaccount:vm-apps:billing-vm"."""
        self.cluster.auth.grant(subject, policy)

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)
            del self.requests[:-5000]

    def compact(self) -> None:
        """Drop the watch history: a watch from any older resourceVersion now gets 410 Gone."""
        self.cluster.store.compact()

    # Direct object access for assertions and seeding (no HTTP, no authorization).

    def _type(self, kind_or_plural: str) -> ResourceType:
        for rt in self.cluster.types.values():
            if kind_or_plural in (rt.kind, rt.plural, rt.singular):
                return rt
        raise KeyError(kind_or_plural)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        rt = self._type(kind)
        return self.cluster.store.get((rt.group, rt.plural), namespace if rt.namespaced else "", name)

    def objects(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        rt = self._type(kind)
        return self.cluster.store.items((rt.group, rt.plural), namespace)

    def create(self, obj: dict[str, Any], *, manager: str = "test") -> dict[str, Any]:
        """Create an object as the admin would (validated like any request)."""
        rt = self._type(obj["kind"])
        version = obj.get("apiVersion", "").rpartition("/")[2] or rt.storage_version
        ns = obj.get("metadata", {}).get("namespace", "default") if rt.namespaced else ""
        return self.cluster.create(rt, version, ns, obj, Request(Identity("admin"), manager=manager))

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.cluster.create_namespace(name)

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        rt = self._type(kind)
        return self.cluster.delete(rt, rt.storage_version, namespace, name, {}, Request(Identity("admin")))

    def mint_token(self, namespace: str, service_account: str, audiences: list[str] | None = None,
                   seconds: int = 3600) -> str:
        body = {"spec": {"audiences": audiences, "expirationSeconds": seconds}}
        return self.cluster.token_request(namespace, service_account, body)["status"]["token"]

    # --- discovery and routing -----------------------------------------------------------------------------

    def discovery(self, path: str) -> dict[str, Any] | None:
        types = list(self.cluster.types.values())
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]}
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1",
                    "resources": [r for rt in types if rt.group == "" for r in api_resource(rt)]}
        groups: dict[str, list[str]] = {}
        for rt in types:
            if rt.group:
                for v in rt.versions:
                    if v not in groups.setdefault(rt.group, []):
                        groups[rt.group].append(v)
        for group, version, _ in VIRTUAL:
            groups.setdefault(group, [version])
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in sorted(groups.items())]}
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2 and parts[1] in groups:
            vs = groups[parts[1]]
            return {"kind": "APIGroup", "apiVersion": "v1", "name": parts[1],
                    "versions": [{"groupVersion": f"{parts[1]}/{v}", "version": v} for v in vs],
                    "preferredVersion": {"groupVersion": f"{parts[1]}/{vs[0]}", "version": vs[0]}}
        if parts[0] == "apis" and len(parts) == 3 and parts[2] in groups.get(parts[1], []):
            group, version = parts[1], parts[2]
            resources = [r for rt in types if rt.group == group and version in rt.versions
                         for r in api_resource(rt)]
            resources += [r for g, v, r in VIRTUAL if g == group and v == version]
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}",
                    "resources": resources}
        return None

    def openapi_v3(self, path: str) -> dict[str, Any] | None:
        """Just enough OpenAPI v3 for kubectl: each kind's PATCH operation and the query parameters it
        takes (kubectl looks for fieldValidation there before asking the server to validate strictly).
        Schemas are not published; kubectl then falls back to JSON merge patch for custom resources."""
        gvs: dict[str, list[ResourceType]] = {}
        for rt in self.cluster.types.values():
            for v in rt.versions:
                gvs.setdefault(f"apis/{rt.group}/{v}" if rt.group else f"api/{v}", []).append(rt)
        if path == "/openapi/v3":
            return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={len(rts)}"}
                              for gv, rts in sorted(gvs.items())}}
        gv = path[len("/openapi/v3/"):]
        if gv not in gvs:
            return None
        version = gv.rsplit("/", 1)[1]
        params = [{"name": n, "in": "query", "schema": {"type": "string"}}
                  for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
        paths = {}
        for rt in gvs[gv]:
            scope = "/namespaces/{namespace}" if rt.namespaced else ""
            gvk = {"group": rt.group, "version": version, "kind": rt.kind}
            paths[f"/{gv}{scope}/{rt.plural}/{{name}}"] = {
                "patch": {"operationId": f"patch{rt.kind}", "parameters": params,
                          "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
                          "responses": {"200": {"description": "OK"}}}}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
                "paths": paths, "components": {"schemas": {}}}

    def route(self, path: str) -> Route | None:
        parts = path.strip("/").split("/")
        if parts[:1] == ["api"] and parts[1:2] == ["v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if group == "authorization.k8s.io" and version == "v1" and rest == ["selfsubjectaccessreviews"]:
            return Route(None, version, "", "", "", "ssar")
        if group == "authentication.k8s.io" and version == "v1" and rest == ["selfsubjectreviews"]:
            return Route(None, version, "", "", "", "ssr")
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        elif group == "" and len(rest) >= 2 and rest[0] == "namespaces":
            # /api/v1/namespaces/{name}[/status]: the namespace object itself
            rest = ["namespaces", *rest[1:]]
        if not rest or len(rest) > 3:
            return None
        rt = self.cluster.resource(group, version, rest[0])
        if rt is None:
            return None
        if ns and not rt.namespaced:
            return None
        if rt.namespaced and not ns and len(rest) > 1:
            return None  # a namespaced object is only addressed inside its namespace
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub == "token" and rt.plural == "serviceaccounts":
            return Route(rt, version, ns, name, sub, "token")
        return Route(rt, version, ns, name, sub)
