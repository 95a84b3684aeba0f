"""Metrics, traces and access logs: what the request path calls.

``Telemetry`` bundles the parts, which live in ``metrics.py``, ``tracing.py``
and ``accesslog.py``. Names and labels: docs/observability.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config.types import TelemetryConfig
from .accesslog import AccessLog
from .metrics import Metrics, Pricing
from .tracing import Tracing, build_tracer_provider


class AttemptEvents:
    """What the failover loop reports (forwarding.AttemptEvents): counted, and a
    failover also becomes an event on the current (request) span."""

    __slots__ = ("_metrics", "_tracing")

    def __init__(self, metrics: Metrics, tracing: Tracing) -> None:
        self._metrics = metrics
        self._tracing = tracing

    def attempt(self, upstream: str, outcome: str, seconds: float) -> None:
        self._metrics.attempt(upstream, outcome, seconds)

    def failover(self, model: str, from_upstream: str) -> None:
        self._metrics.failover(model, from_upstream)
        self._tracing.event("llm_proxy.failover", {"llm_proxy.model": model,
                                                   "llm_proxy.from_upstream": from_upstream})

    def cooldown(self, upstream: str, seconds: float) -> None:
        self._metrics.cooldown(upstream, seconds)


@dataclass(frozen=True)
class Telemetry:
    metrics: Metrics
    tracing: Tracing
    access: AccessLog

    @classmethod
    def build(cls, cfg: TelemetryConfig, access: AccessLog | None = None,
              pricing: Pricing | None = None) -> Telemetry:
        """``access``: from ``configure_access_log(level, fmt)``; by default JSON
        lines on the ``llm_proxy.access`` logger as logging is configured."""
        return cls(metrics=Metrics(multiprocess_dir=cfg.multiprocess_dir, pricing=pricing),
                   tracing=Tracing(build_tracer_provider(cfg)),
                   access=access or AccessLog(logging.getLogger("llm_proxy.access")))

    def events(self) -> AttemptEvents:
        return AttemptEvents(self.metrics, self.tracing)
