"""Logging: to journald (with structured fields) when started by systemd, else plain lines on stderr.

Never both: under systemd, stderr also ends up in the journal, so writing to both would log twice.
Every handler goes through the redaction filter.
"""

from __future__ import annotations

import logging
import os
import sys

from agent.redact import RedactingFilter

IDENTIFIER = "mesh-agent"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM names that stream)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    dev, _, ino = value.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def make_handler(target: str = "auto") -> logging.Handler:
    use_journal = target == "journal" or (target == "auto" and stderr_is_journal())
    handler: logging.Handler | None = None
    if use_journal:
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER)
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
                                               "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    return handler


def setup(level: str = "info", target: str = "auto") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(make_handler(target))
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # The kubernetes client and urllib3 are chatty at INFO about retries we handle ourselves.
    for noisy in ("urllib3", "kubernetes", "watchdog"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
