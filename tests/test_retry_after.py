from email.utils import format_datetime

import pytest

from proxy.access.quotas import duration
from proxy.config.loader import utc_now
from proxy.upstreams.retry_after import DEFAULT_COOLDOWN, cooldown_seconds, parse_duration


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ({"x-ratelimit-reset-requests": "1m3s", "x-ratelimit-reset-tokens": "20ms"}, 63.0),
    ({}, DEFAULT_COOLDOWN),
    ({"retry-after": "soon"}, DEFAULT_COOLDOWN),
    ({"retry-after": "-3"}, DEFAULT_COOLDOWN),
])
def test_cooldown_from_headers(headers: dict[str, str], expected: float) -> None:
    assert cooldown_seconds(headers) == pytest.approx(expected)


def test_http_date_retry_after() -> None:
    from datetime import timedelta
    when = format_datetime(utc_now() + timedelta(seconds=30), usegmt=True)
    assert 28 <= cooldown_seconds({"retry-after": when}) <= 30


@pytest.mark.parametrize("seconds", [0.12, 1, 59, 60, 61.5, 360, 3723])
def test_duration_roundtrip(seconds: float) -> None:
    assert parse_duration(duration(round(seconds * 1000))) == pytest.approx(seconds, abs=0.001)


def test_openai_duration_examples() -> None:
    assert duration(360_000) == "6m0s"
    assert parse_duration("6m0s") == 360
    assert parse_duration("1h") == 3600
    assert parse_duration("bogus") is None
