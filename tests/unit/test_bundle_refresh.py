"""When the bundle is fetched again: refresh_fraction of the token's lifetime, pure arithmetic."""

from __future__ import annotations

import pytest

from agent.bundle.watch import MIN_RETRY, refresh_at, refresh_delay
from devkit import bundles as kit

T0 = 1_800_000_000.0


def test_seventy_percent_of_the_lifetime_from_iat() -> None:
    cfg = kit.config()
    assert refresh_at(T0 + 3600, T0, T0 + 60, cfg) == pytest.approx(T0 + 2520)
    assert refresh_delay(T0 + 3600, T0, T0 + 60, cfg, now=T0 + 100) == pytest.approx(2420)


def test_fraction_is_configurable() -> None:
    assert refresh_at(T0 + 1000, T0, T0, kit.config(refresh_fraction=0.5)) == pytest.approx(T0 + 500)


def test_without_iat_the_lifetime_counts_from_the_fetch() -> None:
    assert refresh_at(T0 + 1000, None, T0 + 200, kit.config()) == pytest.approx(T0 + 200 + 0.7 * 800)


def test_token_without_expiry_uses_refresh_interval() -> None:
    cfg = kit.config(refresh_interval=600.0)
    assert refresh_delay(None, None, T0, cfg, now=T0 + 100) == pytest.approx(500)


def test_overdue_refresh_runs_now_when_not_tried_since_it_was_due() -> None:
    cfg = kit.config()
    # e.g. at boot with an old bundle: due at T0+2520, now T0+3000
    assert refresh_delay(T0 + 3600, T0, T0, cfg, now=T0 + 3000) == 0.0
    assert refresh_delay(T0 + 3600, T0, T0, cfg, now=T0 + 3000, last_attempt=T0 + 100) == 0.0


def test_overdue_refresh_that_found_nothing_new_backs_off_but_keeps_trying_before_expiry() -> None:
    cfg = kit.config()
    delay = refresh_delay(T0 + 3600, T0, T0, cfg, now=T0 + 2600, last_attempt=T0 + 2590)
    assert delay == pytest.approx(250)  # a quarter of the 1000 s left
    near = refresh_delay(T0 + 3600, T0, T0, cfg, now=T0 + 3590, last_attempt=T0 + 3589)
    assert near == MIN_RETRY
    expired = refresh_delay(T0 + 3600, T0, T0, cfg, now=T0 + 9000, last_attempt=T0 + 8999)
    assert expired == MIN_RETRY


def test_iat_after_exp_is_ignored() -> None:
    assert refresh_at(T0 + 100, T0 + 500, T0, kit.config()) == pytest.approx(T0 + 70)
