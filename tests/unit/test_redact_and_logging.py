"""Secrets never reach log output."""

from __future__ import annotations

import logging

import pytest

from agent import logs
from agent.redact import MASK, redact, register_secret

JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJhdWQiOlsiaXN0aW8tY2EiXSwic3ViIjoic3lzdGVtOnNlcnZpY2VhY2NvdW50"
       "OnZtOmJpbGxpbmcifQ.c2lnbmF0dXJlLWJ5dGVz")


@pytest.mark.parametrize("text", [
    f"token is {JWT}",
    "Authorization: Bearer abcdefghijklmnop123",
    '{"token": "s3cr3t-value-123"}',
    "password=hunter2hunter2",
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----",
])
def test_patterns_are_masked(text: str) -> None:
    out = redact(text)
    assert MASK in out
    for secret in (JWT, "abcdefghijklmnop123", "s3cr3t-value-123", "hunter2hunter2", "MHcCAQEEIB"):
        assert secret not in out


def test_registered_secret_is_masked_anywhere() -> None:
    register_secret("opaque-token-0f9e8d7c\n")
    assert redact("got opaque-token-0f9e8d7c from file") == f"got {MASK} from file"


def test_ordinary_text_is_untouched() -> None:
    text = "applied WorkloadEntry billing-10-0-0-5 in vm-apps (resourceVersion 42)"
    assert redact(text) == text


def test_token_given_to_logger_never_appears(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("debug", "stderr")
    try:
        log = logging.getLogger("agent.test")
        log.info("fetched bundle with token %s", JWT)
        log.warning("header %s", {"Authorization": "Bearer zyxwvutsrq987654"})
        try:
            raise ValueError(f"bad token {JWT}")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert "fetched bundle with token" in err and "failed" in err and "ValueError" in err
    assert JWT not in err and "zyxwvutsrq987654" not in err
    assert err.count(MASK) >= 3


def test_journal_only_when_stderr_is_the_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # not our stderr's device:inode
    assert logs.stderr_is_journal() is False
    assert isinstance(logs.make_handler("auto"), logging.StreamHandler)
