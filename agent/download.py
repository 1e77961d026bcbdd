"""The one way the agent downloads over HTTP(S) (the bundle, the sidecar package): requests, with an
overall deadline and a size cap on top of its per-operation timeouts.

requests' timeouts bound the connect and each gap between bytes, not the whole transfer: a server that
trickles a byte every few seconds keeps a download going forever. The session's connections are cut by
an agent.deadline.Deadline when its time is up; the caller then sees `deadline.expired` and reports
that, not the broken read it caused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.deadline import Deadline, track_pool_manager

__all__ = ["Deadline", "DownloadTooLarge", "body_chunks", "session"]


class DownloadTooLarge(Exception):
    """The body is larger than allowed."""


def session(deadline: Deadline) -> Any:
    """A requests.Session whose connections the deadline can cut; no proxies or netrc from the
    environment."""
    import requests
    from requests.adapters import HTTPAdapter

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            track_pool_manager(self.poolmanager, lambda: deadline)

    s = requests.Session()
    s.trust_env = False
    adapter = Adapter(max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


def body_chunks(resp: Any, max_size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """The response body in chunks, refusing more than max_size bytes (DownloadTooLarge)."""
    size = 0
    for part in resp.iter_content(chunk):
        size += len(part)
        if size > max_size:
            raise DownloadTooLarge(f"the body is larger than {max_size} bytes")
        yield part
