"""The API's answers as mesh-agent decides on them: every client exception mapped to one of a few
errors naming the verb and the resource (anything unexpected counts as unavailable), with the
server's Retry-After kept (capped) for agent.retry's backoff."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

from agent.retry import RetryableError

RETRY_AFTER_CAP = 30.0


class ApiError(Exception):
    """A refused or failed call, naming the verb and the resource."""

    def __init__(self, verb: str, resource: str, status: int, message: str,
                 causes: list[str] | None = None) -> None:
        self.verb, self.resource, self.status = verb, resource, status
        self.causes = causes or []
        self.detail = message
        text = f"{verb} {resource}: {status} {message}" if status else f"{verb} {resource}: {message}"
        if self.causes:
            text += " (" + "; ".join(self.causes) + ")"
        super().__init__(text)


class Unauthorized(ApiError):
    """401/403: the credential is missing, expired, or lacks RBAC for this verb and resource."""


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: a stale resourceVersion or an object that already exists."""


class Invalid(ApiError):
    """422 (or 400): the object was refused; `causes` lists the fields."""


class Unavailable(ApiError, RetryableError):
    """Unreachable, timed out, 5xx or 429: try again later (after `retry_after` when the server said)."""

    def __init__(self, verb: str, resource: str, status: int, message: str,
                 retry_after: float | None = None) -> None:
        ApiError.__init__(self, verb, resource, status, message)
        self.retry_after = retry_after


class DeadlineExceeded(Unavailable):
    """The call did not complete within its overall deadline; its connection was cut (agent.deadline)."""

    def __init__(self, verb: str, resource: str, seconds: float, message: str = "") -> None:
        super().__init__(verb, resource, 0, message or f"no complete answer within the {seconds:g}s "
                         "deadline; connection cut")
        self.seconds = seconds


def _retry_after(headers: Any) -> float | None:
    if not headers:
        return None
    value = None
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")
    except AttributeError:
        return None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, RETRY_AFTER_CAP))


def map_error(exc: BaseException, verb: str, resource: str) -> ApiError:
    """Translate a client exception into our errors (anything unexpected is treated as unavailable)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message, causes = exc.reason or "", []
        try:
            body = json.loads(exc.body) if exc.body else {}
            message = body.get("message") or message
            for c in (body.get("details") or {}).get("causes") or []:
                causes.append(f"{c.get('field', '')}: {c.get('message', c.get('reason', ''))}".strip(": "))
        except (ValueError, TypeError, AttributeError):
            pass
        if status in (401, 403):
            return Unauthorized(verb, resource, status, message or "forbidden")
        if status == 404:
            return NotFound(verb, resource, status, message)
        if status == 409:
            return Conflict(verb, resource, status, message)
        if status in (400, 422):
            return Invalid(verb, resource, status, message, causes)
        return Unavailable(verb, resource, status, message or "unavailable", _retry_after(exc.headers))
    return Unavailable(verb, resource, 0, f"unreachable: {type(exc).__name__}: {exc}")
