"""How this process's kubernetes client must be called to send a server-side apply.

The generations of the client send it differently, so how is found out once per process by watching
this client serialise a probe apply (apply_style): a call whose request never leaves the process, its
connection pool replaced by a recorder. The regenerated client takes `_content_type` per call and
serialises a dict body; the older generation hard-codes merge-patch in its generated calls and lets
the ApiClient's default headers override per-call ones, so applies go through a second ApiClient on the
same configuration whose default Content-Type is the apply type. Its REST layer then either serialises
a dict for the apply type (30.x) or passes only a pre-serialised string through unchanged (22.6, where
JSON is YAML); the probe takes the first form whose recorded request carries the apply type and the
very object.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

APPLY_PATCH = "application/apply-patch+yaml"

# How a server-side apply is sent (see the module docstring), in the order tried.
PER_CALL = "per-call content type"          # _content_type=..., dict body
DEFAULT_HEADER = "default header"           # a second ApiClient's default Content-Type, dict body
DEFAULT_HEADER_TEXT = "default header, text body"  # the same, body pre-serialised to JSON
APPLY_STYLES = (PER_CALL, DEFAULT_HEADER, DEFAULT_HEADER_TEXT)


class _Sent(Exception):
    """Raised by the recorder in place of sending: what the REST layer would have put on the wire."""

    def __init__(self, headers: Any, body: Any) -> None:
        super().__init__("recorded")
        self.headers, self.body = dict(headers or {}), body


class _Recorder:
    """Stands in for the client's urllib3 pool during the probe: nothing is sent anywhere."""

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        raise _Sent(kwargs.get("headers"), kwargs.get("body"))

    def clear(self) -> None:
        pass


def apply_api(client_mod: Any, configuration: Any, style: str) -> tuple[Any, Any]:
    """(CustomObjectsApi, ApiClient) through which `style` applies are sent."""
    api_client = client_mod.ApiClient(configuration)
    if style != PER_CALL:
        api_client.set_default_header("Content-Type", APPLY_PATCH)
    return client_mod.CustomObjectsApi(api_client), api_client


def apply_args(style: str, obj: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The body and extra keyword arguments of an apply sent in `style`."""
    if style == PER_CALL:
        return obj, {"_content_type": APPLY_PATCH}
    return (json.dumps(obj) if style == DEFAULT_HEADER_TEXT else obj), {}


def _sends_apply(api: Any, style: str) -> bool:
    """Does this style make the client put the apply type and the object itself on the wire?"""
    probe = {"apiVersion": "example.com/v1", "kind": "Probe", "metadata": {"name": "p", "namespace": "n"},
             "spec": {"x": 1}}
    body, extra = apply_args(style, probe)
    for fn in (api.patch_namespaced_custom_object, api.patch_namespaced_custom_object_status):
        try:
            fn("example.com", "v1", "n", "probes", "p", body, field_manager="probe", force=True,
               _preload_content=False, **extra)
        except _Sent as sent:
            ctype = next((v for k, v in sent.headers.items() if k.lower() == "content-type"), "")
            data = sent.body.decode() if isinstance(sent.body, bytes) else sent.body
            try:
                decoded = json.loads(data) if isinstance(data, str) else None
            except ValueError:
                decoded = None
            if ctype != APPLY_PATCH or decoded != probe:
                return False
        except Exception:  # an unknown keyword, a body the REST layer refuses: not this style
            return False
        else:
            return False
    return True


@functools.cache
def apply_style() -> str:
    """How this process's kubernetes client must be called to send a server-side apply."""
    from kubernetes import client

    for style in APPLY_STYLES:
        cfg = client.Configuration()
        cfg.host = "http://probe.invalid"
        api, api_client = apply_api(client, cfg, style)
        api_client.rest_client.pool_manager = _Recorder()
        try:
            if _sends_apply(api, style):
                log.debug("server-side apply: %s", style)
                return style
        finally:
            api_client.rest_client.pool_manager = _Recorder()
    raise RuntimeError("this kubernetes client sends no server-side apply the API server accepts "
                       f"(tried: {', '.join(APPLY_STYLES)})")

