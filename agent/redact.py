"""The one redaction helper: tokens and keys never reach a log line or a printed summary."""

from __future__ import annotations

import logging
import re
import threading

_PATTERNS = [
    # JWTs (service-account and istio tokens): header.payload.signature, base64url.
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
    # Authorization headers and bearer tokens.
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    # PEM private keys.
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
    # key=value or "key": "value" for secret-sounding keys.
    re.compile(r"(?i)((?:token|password|secret|client[-_]key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{4,}"),
]
MASK = "[REDACTED]"

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a secret read from a file, so it is masked wherever it shows up."""
    value = value.strip()
    if len(value) >= 8:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for s in known:
        text = text.replace(s, MASK)
    for pat in _PATTERNS:
        if pat.groups:
            text = pat.sub(lambda m: m.group(1) + MASK, text)
        else:
            text = pat.sub(MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """Formats the message once, redacts it, and freezes it into the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = cleaned, None
        return True
