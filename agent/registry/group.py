"""The registry's WorkloadGroup follower (agent.kube.follow): what it sees, posted to the loop as
GroupSeen / GroupGone / GroupUnavailable. It lists the group by name once, then watches it: each watch
asks for a timeout drawn in [WATCH_TIMEOUT, 2 x WATCH_TIMEOUT] (so a fleet started together does not
list and watch together every period), and when it ends or breaks the next one resumes from the last
resourceVersion seen; it lists again only when the server says that version is gone (410 Gone).
Failures are backed off (BACKOFF) and reported. After an API outage an agent thus costs one watch
request, not a list and a watch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.kube.client import GROUPS, Kube
from agent.kube.errors import ApiError
from agent.kube.follow import Follower, custom_object
from agent.retry import Backoff

WATCH_TIMEOUT = 300         # seconds: the shortest watch timeoutSeconds (jittered up to twice as long)
BACKOFF = (0.5, 30.0)       # seconds: the first and the longest wait after a failure


@dataclass(frozen=True)
class GroupSeen:
    group: dict[str, Any]


@dataclass(frozen=True)
class GroupGone:
    namespace: str
    name: str


@dataclass(frozen=True)
class GroupUnavailable:
    error: ApiError


def follow_group(kube: Kube, namespace: str, name: str, post: Callable[[object], None],
                 watch_timeout: int = WATCH_TIMEOUT, backoff: Backoff | None = None) -> Follower:
    """A follower of the group (not started) posting what it sees."""

    def seen(group: dict[str, Any]) -> None:
        if group.get("kind") is None:  # list items carry no kind
            group = {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup", **group}
        post(GroupSeen(group))

    def failed(error: ApiError) -> None:
        post(GroupUnavailable(error))

    return Follower(custom_object(kube, GROUPS, namespace, name, f"WorkloadGroup {namespace}/{name}"),
                    seen=seen, gone=lambda: post(GroupGone(namespace, name)), failed=failed,
                    watch_timeout=watch_timeout, backoff=backoff or Backoff(*BACKOFF), name="group-watcher",
                    resume=True, jitter=True)
