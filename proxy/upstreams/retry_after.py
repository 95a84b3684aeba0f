"""How long an upstream asked us to wait, from whichever header it used."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from ..config.loader import utc_now

DEFAULT_COOLDOWN = 1.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def cooldown_seconds(headers: Mapping[str, str]) -> float:
    """Seconds to hold traffic after a 429.

    Order: ``retry-after-ms`` (Azure, OpenAI), ``retry-after`` (seconds or an
    HTTP date), then the longest of OpenAI's ``x-ratelimit-reset-*``
    durations ("6m0s", "20ms"). With none of them, a short default.
    """
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    after = headers.get("retry-after")
    if after:
        seconds = _number(after)
        if seconds is not None:
            return seconds
        try:
            return max(0.0, (parsedate_to_datetime(after) - utc_now()).total_seconds())
        except (TypeError, ValueError):
            pass
    resets = [parse_duration(headers.get(h)) for h in
              ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    known = [r for r in resets if r is not None]
    return max(known) if known else DEFAULT_COOLDOWN


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset format ("1s", "6m0s", "1h2m3.5s", "120ms"; written by quotas.duration)."""
    if not text:
        return None
    parts = _DURATION_PART.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
