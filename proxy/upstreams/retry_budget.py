"""A retry budget, so a failing provider does not multiply traffic.

Each request deposits ``ratio`` of a token; each retry (any attempt after a
request's first) spends a whole one. A floor of ``min_per_second`` tokens
accrues with time so a quiet gateway can still retry. The bucket holds at
most ten seconds' worth of the floor (at least 10 tokens), which bounds the
burst of retries when everything fails at once; past that, retries are at
most ``ratio`` of the requests (the approach of Finagle and Envoy).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    def __init__(self, ratio: float, min_per_second: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.capacity = max(10.0, min_per_second * 10)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def deposit(self) -> None:
        self._refill()
        self._tokens = min(self.capacity, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.min_per_second)
        self._last = now
