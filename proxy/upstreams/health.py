"""Passive health of one upstream: a small state machine, no I/O.

States and transitions:

- ``healthy``: takes traffic. A success resets the failure count.
- ``cooling_down``: the upstream answered 429; no traffic until the time it
  named (Retry-After), then ``healthy`` again.
- ``ejected``: ``failure_threshold`` consecutive failures (connection errors,
  timeouts, 5xx). Back-off grows ``base_ejection * 2**(ejections-1)`` up to
  ``max_ejection``. When it runs out the upstream is ``half_open``.
- ``half_open``: exactly one probe request is let through; success readmits
  (``healthy``, back-off reset), failure ejects again with a longer back-off.
- An active health check that fails ejects with no end time: only a passing
  check readmits, so no user request is spent as a probe.
- ``credentials_bad``: the upstream answered 401/403. It is retried only
  after ``credentials_recheck`` seconds, so a bad key does not burn retries.

Time is passed in by the caller (monotonic seconds), which keeps this testable
without sleeping.
"""

from __future__ import annotations

import math
from typing import Literal

from ..config.types import HealthConfig

State = Literal["healthy", "cooling_down", "ejected", "half_open", "credentials_bad"]


class Health:
    def __init__(self, policy: HealthConfig) -> None:
        self.policy = policy
        self._failures = 0
        self._ejections = 0
        self._until = 0.0
        self._blocked: State = "healthy"  # why traffic is held until _until
        self._probe_out = False

    def state(self, now: float) -> State:
        if now < self._until:
            return self._blocked
        if self._blocked in ("ejected", "credentials_bad"):
            return "half_open"
        return "healthy"

    def available(self, now: float) -> bool:
        state = self.state(now)
        return state == "healthy" or (state == "half_open" and not self._probe_out)

    def blocked_until(self) -> float:
        return self._until

    def begin(self, now: float) -> None:
        """An attempt starts; in half-open it is the one probe."""
        if self.state(now) == "half_open":
            self._probe_out = True

    def success(self) -> None:
        self._failures = 0
        self._ejections = 0
        self._probe_out = False
        self._blocked = "healthy"
        self._until = 0.0

    def failure(self, now: float) -> None:
        half_open = self.state(now) == "half_open"
        self._probe_out = False
        self._failures += 1
        if half_open or self._failures >= self.policy.failure_threshold:
            self._eject(now)

    def cool_down(self, now: float, seconds: float) -> None:
        """A 429: hold traffic exactly as long as the upstream asked."""
        self._probe_out = False
        until = now + min(max(seconds, 0.0), self.policy.max_cooldown)
        if until > self._until or self._blocked == "healthy":
            self._blocked, self._until = "cooling_down", until

    def eject(self) -> None:
        """An active check found the upstream down: held out, with no user
        request as a probe, until a check passes (``success``)."""
        self._probe_out = False
        self._failures = 0
        self._blocked, self._until = "ejected", math.inf

    def hold(self, state: State, until: float) -> None:
        """Another replica saw this upstream fail: hold traffic as it did,
        without counting a failure here (the back-off is that replica's)."""
        if until > self._until or self._blocked == "healthy" or self.state(until) == "healthy":
            self._probe_out = False
            self._blocked, self._until = state, until

    def credentials_rejected(self, now: float) -> None:
        self._probe_out = False
        self._blocked, self._until = "credentials_bad", now + self.policy.credentials_recheck

    def _eject(self, now: float) -> None:
        self._ejections += 1
        self._failures = 0
        backoff = self.policy.base_ejection * 2 ** (self._ejections - 1)
        self._blocked = "ejected"
        self._until = now + min(backoff, self.policy.max_ejection)
