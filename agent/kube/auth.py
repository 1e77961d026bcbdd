"""Where the API and its credential come from, and bearer-token rotation.

Bearer tokens: the generations of the kubernetes client keep the token under different api_key names
(`authorization`, `BearerToken`) with or without a separate prefix; the token-file hook finds the names
this configuration's auth_settings reads and writes the whole header value there (see TokenFile.hook).
A token file is read again whenever it changes, so a rotated token (a projected service-account token,
agent.registry.credentials, agent.identity.refresh) is used at once, without a new client.

Every client has one quiet retry for a pooled connection the server closed meanwhile and no other:
backoff belongs to the callers (agent.retry), where the whole fleet's behaviour is decided.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from agent.kube.errors import Unauthorized
from agent.redact import register_secret

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """Where the API and its credential come from: a kubeconfig, or server + CA + token file."""

    kubeconfig: str | None = None
    server: str | None = None
    ca_file: str | None = None
    token_file: str | None = None
    context: str | None = None


class TokenFile:
    """Reads a bearer token file again whenever it changes, so a rotated token is used at once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._lock = threading.Lock()

    def current(self) -> str:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise Unauthorized("read", f"token file {self.path}", 0, exc.strerror or str(exc)) from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as f:
                    token = f.read().strip()
                register_secret(token)
                self._token, self._stamp = token, stamp
                log.debug("bearer token read from %s", self.path)
            return self._token

    def hook(self, configuration: Any) -> None:
        """A Configuration.refresh_api_key_hook: the client calls it before each request.

        The whole header value goes under every api_key name the configuration reads, with no separate
        prefix: a kubeconfig loader may have left `Bearer <token>` under one name and a prefix under
        another, which would otherwise combine into `Bearer Bearer <token>`."""
        value = f"Bearer {self.current()}"
        cls: type = type(configuration)  # typed: mypy does not take type[Any] as hashable for the cache
        for slot in bearer_slots(cls):
            configuration.api_key[slot] = value
            configuration.api_key_prefix.pop(slot, None)


# The names the generated configurations have used for the bearer token's api_key entry.
_BEARER_NAMES = ("authorization", "BearerToken")


@functools.cache
def bearer_slots(configuration_class: type) -> tuple[str, ...]:
    """The api_key names this configuration class's auth_settings reads the bearer token from,
    found by asking it (each name alone) rather than by the client's version."""
    found = []
    for name in _BEARER_NAMES:
        probe = configuration_class()
        probe.refresh_api_key_hook = None
        probe.api_key = {name: "probe"}
        probe.api_key_prefix = {}
        settings = probe.auth_settings() or {}
        if any((s or {}).get("value") == "probe" for s in settings.values()):
            found.append(name)
    if not found:
        raise RuntimeError("this kubernetes client reads its bearer token from no api_key name known here "
                           f"({', '.join(_BEARER_NAMES)})")
    return tuple(found)


def make_configuration(creds: Credentials) -> Any:
    """A kubernetes.client.Configuration for these credentials (no client retries; token file hooked)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    token_file = creds.token_file
    if creds.kubeconfig:
        config.load_kube_config(config_file=creds.kubeconfig, context=creds.context,
                                client_configuration=cfg, persist_config=False)
        token_file = token_file or _kubeconfig_token_file(creds.kubeconfig, creds.context)
    elif creds.server:
        cfg.host = creds.server.rstrip("/")
        if creds.ca_file:
            cfg.ssl_ca_cert = creds.ca_file
    else:
        raise ValueError("no API credentials: set registry.kubeconfig, or registry.server with "
                         "registry.token_file, or ship a kubeconfig in the bundle")
    if token_file:
        tf = TokenFile(token_file)
        cfg.refresh_api_key_hook = tf.hook
        tf.hook(cfg)
    # One quiet retry for a pooled connection the server closed meanwhile; never for a status
    # (a 429 or 5xx goes back to the caller's backoff, which honours Retry-After), nor for a request
    # its deadline cut.
    from agent.deadline import retry

    cfg.retries = retry(total=1, connect=1, read=1, status=0, redirect=0, other=0,
                        raise_on_status=False, respect_retry_after_header=False)
    return cfg


def token_file_of(creds: Credentials) -> str | None:
    """The file the bearer token is read from, if it is read from one: token_file, else the kubeconfig
    user's tokenFile."""
    if creds.token_file or not creds.kubeconfig:
        return creds.token_file
    return _kubeconfig_token_file(creds.kubeconfig, creds.context)


def _kubeconfig_token_file(path: str, context: str | None) -> str | None:
    """The `tokenFile` of the kubeconfig's current user, which the client would read only once."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        ctx_name = context or doc.get("current-context")
        ctx = next(c["context"] for c in doc.get("contexts") or [] if c.get("name") == ctx_name)
        user = next(u.get("user") or {} for u in doc.get("users") or [] if u.get("name") == ctx.get("user"))
    except (OSError, StopIteration, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return None
    value = user.get("tokenFile")
    if value and not os.path.isabs(value):
        value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
    return value



SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_credentials(env: dict[str, str] | None = None, sa_dir: str = SA_DIR) -> Credentials | None:
    """A pod's own credentials (the projected token rotates; TokenFile re-reads it), or None outside."""
    env = dict(os.environ) if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not os.path.exists(os.path.join(sa_dir, "token")):
        return None
    if ":" in host:
        host = f"[{host}]"
    return Credentials(server=f"https://{host}:{port}", ca_file=os.path.join(sa_dir, "ca.crt"),
                       token_file=os.path.join(sa_dir, "token"))
