"""Faults a test injects: added latency, error statuses (429 with Retry-After, 5xx), connection resets,
answers trickled a byte at a time. Outages (the port stops answering for N seconds) are handled by the
server itself."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # "latency" | "status" | "reset" | "trickle"
    method: str | None = None  # GET, PATCH, ...; None matches any
    path: str | None = None  # a regular expression searched in the request path
    times: int | None = None  # how many requests it hits; None until cleared
    delay: float = 0.0  # latency: before the answer; trickle: between two bytes of it
    code: int = 0
    retry_after: int | None = None
    hits: int = 0
    query: str | None = None  # a regular expression searched in the query string ("watch=" for watches)

    def matches(self, method: str, path: str, query: str = "") -> bool:
        if self.method and self.method.upper() != method:
            return False
        if self.query and re.search(self.query, query) is None:
            return False
        return not self.path or re.search(self.path, path) is not None


_REASONS = {429: "TooManyRequests", 500: "InternalError", 502: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}
_MESSAGES = {429: "Too many requests, please try again later.",
             500: "Internal error occurred: injected fault",
             503: "The server is currently unable to handle the request", 504: "The request timed out"}


def reason_for(code: int) -> str:
    return _REASONS.get(code, "InternalError")


def message_for(code: int) -> str:
    return _MESSAGES.get(code, f"injected fault {code}")


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def latency(self, seconds: float, *, method: str | None = None, path: str | None = None,
                times: int | None = None) -> Fault:
        return self.add(Fault("latency", method, path, times, delay=seconds))

    def status(self, code: int, *, retry_after: int | None = None, method: str | None = None,
               path: str | None = None, times: int | None = 1) -> Fault:
        return self.add(Fault("status", method, path, times, code=code, retry_after=retry_after))

    def reset(self, *, method: str | None = None, path: str | None = None, times: int | None = 1) -> Fault:
        return self.add(Fault("reset", method, path, times))

    def trickle(self, seconds_per_byte: float, *, method: str | None = None, path: str | None = None,
                query: str | None = None, times: int | None = None) -> Fault:
        """The answer's status line and headers at once, then its body one byte every seconds_per_byte
        (the request itself is carried out). A watch trickles its events so, then a newline (which
        clients skip) every seconds_per_byte, and never ends by itself: not at its timeoutSeconds
        either. What a peer (or a man in the middle) looks like that holds a client without ever
        tripping its read timeout."""
        return self.add(Fault("trickle", method, path, times, delay=seconds_per_byte, query=query))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str, query: str = "") -> list[Fault]:
        """The faults that hit this request (each one used up by one hit)."""
        hit: list[Fault] = []
        with self._lock:
            for fault in list(self._faults):
                if not fault.matches(method, path, query):
                    continue
                fault.hits += 1
                hit.append(fault)
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
        return hit
