"""Per-client-IP limiting of authentication failures.

A flood of wrong keys from one address is answered with 429 once that
address has failed ``burst`` times, refilling at ``per_second``; a request
with a valid key is never held back (the check runs only after a lookup
fails), so a legitimate client behind the same address keeps working. The
table of addresses is bounded (least recently seen dropped first) so a
spray of source addresses cannot grow memory without limit.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class AuthFailureGuard:
    def __init__(self, burst: float = 20, per_second: float = 1.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_second = per_second
        self.max_clients = max_clients
        self._clock = clock
        self._tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def failed(self, client: str) -> float:
        """Record a failure; return 0 when it may be answered as usual (401),
        else the seconds until this client may try again (answer 429)."""
        now = self._clock()
        tokens, last = self._tokens.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_second)
        self._tokens[client] = (tokens - 1, now)
        while len(self._tokens) > self.max_clients:
            self._tokens.popitem(last=False)
        if tokens >= 1:
            return 0.0
        return math.ceil((1 - tokens) / self.per_second) if self.per_second else 60.0
