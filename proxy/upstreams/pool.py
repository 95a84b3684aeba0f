"""The pool: which upstreams serve a model, and which one to try next.

Selection is kept apart from health (``health.py``) and from the data path
(``forwarding.py``): a strategy only ever sees the candidates that are
available right now, in the best priority tier that has any.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config.types import Config, HealthConfig, Strategy, UpstreamConfig
from ..errors import ModelNotFoundError
from .health import Health
from .transport import Transport, make_transport


class Upstream:
    """One configured upstream, its connection pool, and its live state on this replica."""

    def __init__(self, config: UpstreamConfig, health: Health, transport: Transport) -> None:
        self.config = config
        self.name = config.name
        self.health = health
        self.transport = transport
        self.in_flight = 0
        self.ttfb_ewma: float | None = None
        self.check_failures = 0  # consecutive failed active checks
        self.recent_errors: deque[tuple[float, str, str]] = deque(maxlen=10)  # (wall time, outcome, what happened)

    def available(self, now: float) -> bool:
        cap = self.config.max_concurrency
        return (cap is None or self.in_flight < cap) and self.health.available(now)

    def observe_ttfb(self, seconds: float, alpha: float = 0.3) -> None:
        prev = self.ttfb_ewma
        self.ttfb_ewma = seconds if prev is None else prev + alpha * (seconds - prev)


@dataclass(frozen=True, slots=True)
class Candidate:
    upstream: Upstream
    model: str  # the upstream's own name for the public model


class Selector(Protocol):
    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate:
        i = self._next.get(model, 0)
        self._next[model] = i + 1
        return candidates[i % len(candidates)]


class Weighted:
    """Smooth weighted round robin (as nginx): exact shares, no bursts."""

    def __init__(self) -> None:
        self._current: dict[tuple[str, str], float] = {}

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate:
        total = 0.0
        best: Candidate | None = None
        best_score = float("-inf")
        for c in candidates:
            key = (model, c.upstream.name)
            score = self._current.get(key, 0.0) + c.upstream.config.weight
            self._current[key] = score
            total += c.upstream.config.weight
            if score > best_score:
                best, best_score = c, score
        assert best is not None
        self._current[(model, best.upstream.name)] -= total
        return best


class LeastRequests:
    """Power of two choices over in-flight requests, scaled by weight."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if _load(a) <= _load(b) else b


def _load(c: Candidate) -> float:
    return (c.upstream.in_flight + 1) / c.upstream.config.weight


class Latency:
    """Lowest EWMA time to first byte; a small share explores so a recovered
    or not-yet-measured upstream gets measured again."""

    def __init__(self, rng: random.Random, explore: float = 0.05) -> None:
        self._rng = rng
        self._explore = explore

    def choose(self, model: str, candidates: Sequence[Candidate]) -> Candidate:
        unmeasured = [c for c in candidates if c.upstream.ttfb_ewma is None]
        if unmeasured:
            return self._rng.choice(unmeasured)
        if self._rng.random() < self._explore:
            return self._rng.choice(list(candidates))
        return min(candidates, key=lambda c: c.upstream.ttfb_ewma or 0.0)


def make_selector(strategy: Strategy, rng: random.Random | None = None) -> Selector:
    rng = rng or random.Random()
    factories: Mapping[Strategy, Callable[[], Selector]] = {
        "round_robin": RoundRobin,
        "weighted": Weighted,
        "least_requests": lambda: LeastRequests(rng),
        "latency": lambda: Latency(rng),
    }
    return factories[strategy]()


class Pool:
    def __init__(self, config: Config, selector: Selector,
                 health_policy: HealthConfig = HealthConfig(),
                 keep: Mapping[str, Upstream] | None = None,
                 transport: Callable[[UpstreamConfig], Transport] = make_transport) -> None:
        self.upstreams: dict[str, Upstream] = {}
        for uc in config.upstreams:
            old = (keep or {}).get(uc.name)
            if old is not None and old.config == uc:
                # A reload keeps the live state and connections of an unchanged upstream.
                self.upstreams[uc.name] = Upstream(uc, old.health, old.transport)
            else:
                self.upstreams[uc.name] = Upstream(uc, Health(health_policy), transport(uc))
        self._routes: dict[str, list[Candidate]] = {}
        for up in self.upstreams.values():
            for public, own in up.config.models.items():
                self._routes.setdefault(public, []).append(Candidate(up, own))
        self._selector = selector

    def models(self) -> list[str]:
        return list(self._routes)

    def candidates(self, model: str) -> Sequence[Candidate]:
        found = self._routes.get(model)
        if not found:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model")
        return found

    def pick(self, model: str, candidates: Sequence[Candidate], tried: set[str],
             now: float) -> Candidate | None:
        """The next candidate to try, or None when none is available."""
        tier: list[Candidate] = []
        best_priority = None
        for c in candidates:
            if c.upstream.name in tried or not c.upstream.available(now):
                continue
            p = c.upstream.config.priority
            if best_priority is None or p < best_priority:
                tier, best_priority = [c], p
            elif p == best_priority:
                tier.append(c)
        return self._selector.choose(model, tier) if tier else None

    def any_available(self, now: float) -> bool:
        return any(u.available(now) for u in self.upstreams.values())

    def retired_by(self, new: Pool) -> list[Upstream]:
        """Upstreams of this pool whose connections the new pool does not reuse."""
        kept = {id(u.transport) for u in new.upstreams.values()}
        return [u for u in self.upstreams.values() if id(u.transport) not in kept]
