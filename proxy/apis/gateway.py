"""The live gateway: everything ``create_app`` builds, passed explicitly.

``Runtime`` is the part a config reload replaces as a whole. A request takes
one snapshot of it at its start and keeps it, so in-flight requests and
streams finish on the pool (and connections) they started with, while new
requests use the new one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..access.keys import Authenticator, StaticKeys
from ..access.quotas import QuotaService
from ..config.types import Config
from ..serving.auth_guard import AuthFailureGuard
from ..telemetry.hub import Telemetry
from ..telemetry.metrics import Pricing
from ..upstreams.forwarding import Forwarder
from ..upstreams.pool import Pool, make_selector
from ..upstreams.retry_budget import RetryBudget
from ..upstreams.transport import Transport
from .stream_waits import OpenStreams
from .unanswered import Unanswered

# Changing these needs a restart: they shape objects built once at start-up.
RESTART_ONLY = ("redis_url", "admin_key", "server")


@dataclass(frozen=True)
class Runtime:
    config: Config
    pool: Pool
    auth: Authenticator
    keys: StaticKeys


class Gateway:
    def __init__(self, config: Config, quotas: QuotaService, telemetry: Telemetry,
                 make_auth: Callable[[StaticKeys], Authenticator] = Authenticator,
                 logger: logging.Logger | None = None) -> None:
        self.quotas = quotas
        self.telemetry = telemetry
        self.log = logger or logging.getLogger("llm_proxy")
        self._make_auth = make_auth
        self.runtime = self._build(config, None)
        self.forwarder = Forwarder(telemetry.events(), time.monotonic, _budget(config), self.log,
                                   telemetry.tracing)
        telemetry.metrics.use_pricing(Pricing(config.pricing))
        telemetry.metrics.configured(config_upstreams(config), config.public_models())
        self.draining = False
        self.auth_guard = AuthFailureGuard()
        self._retired: set[Transport] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self.streams = OpenStreams()  # for the shutdown, which ends those still open at its grace's end
        self.unanswered = Unanswered()  # the same, for requests whose answer has not begun

    def _build(self, config: Config, old: Runtime | None) -> Runtime:
        pool = Pool(config, make_selector(config.routing.strategy), config.health,
                    keep=old.pool.upstreams if old else None)
        self._log_egress(pool, old)
        keys = StaticKeys(config)
        return Runtime(config, pool, self._make_auth(keys), keys)

    def _log_egress(self, pool: Pool, old: Runtime | None) -> None:
        """How each new or changed upstream is reached, once: its proxy, and a warning
        for TLS without verification (anyone on the path could read and change it)."""
        for up in pool.upstreams.values():
            before = old.pool.upstreams.get(up.name) if old is not None else None
            if before is not None and before.config == up.config:
                continue
            proxy = up.config.proxy
            if proxy is not None:
                self.log.info("upstream %s: connections go through proxy %s (%s)", up.name, proxy.url,
                              "its proxy setting" if proxy.source == "proxy" else f"from {proxy.source}")
            if not up.config.tls.verify:
                self.log.warning("upstream %s: tls.verify is false: its certificate is not checked, so "
                                 "anyone on the path can read and change its traffic, its API key included",
                                 up.name)

    def reload(self, config: Config) -> None:
        """Swap in a validated config atomically; unchanged upstreams keep
        their health and connections."""
        old = self.runtime
        for name in RESTART_ONLY:
            if getattr(old.config, name) != getattr(config, name):
                self.log.warning("config reload: '%s' changed; it takes effect at the next restart", name)
        self.runtime = self._build(config, old)
        self.telemetry.metrics.use_pricing(Pricing(config.pricing))
        self.telemetry.metrics.configured(config_upstreams(config), config.public_models())
        if old.config.routing != config.routing:
            self.forwarder.budget = _budget(config)
        retired = [u.transport for u in old.pool.retired_by(self.runtime.pool)]
        if retired:
            # In-flight requests on the old pool may still use these; close them
            # only once the longest answer they could be serving is over.
            grace = max(u.config.timeout.total for u in old.pool.upstreams.values())
            self._retired.update(retired)
            task = asyncio.get_running_loop().create_task(self._close_later(retired, grace))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def _close_later(self, transports: list[Transport], delay: float) -> None:
        await asyncio.sleep(delay)
        for transport in transports:
            self._retired.discard(transport)
            await transport.close()

    def export_state(self) -> None:
        """Upstream health into the metrics; states also change with time, so this runs periodically."""
        now = time.monotonic()
        for up in self.runtime.pool.upstreams.values():
            self.telemetry.metrics.upstream_state(up.name, up.health.state(now))

    def upstream_states(self) -> list[dict[str, Any]]:
        """What ``GET /admin/upstreams`` shows: each upstream's live state on this replica."""
        now, wall = time.monotonic(), time.time()
        views = []
        for up in self.runtime.pool.upstreams.values():
            state = up.health.state(now)
            until = up.health.blocked_until()
            views.append({
                "name": up.name, "provider": up.config.provider, "models": list(up.config.models),
                "priority": up.config.priority, "weight": up.config.weight, "state": state,
                "until": _iso(wall + until - now) if state != "healthy" and until != math.inf else None,
                "in_flight": up.in_flight, "max_concurrency": up.config.max_concurrency,
                "ttfb_ewma_ms": round(up.ttfb_ewma * 1000, 1) if up.ttfb_ewma is not None else None,
                "recent_errors": [{"at": _iso(at), "outcome": outcome, "error": error}
                                  for at, outcome, error in up.recent_errors],
            })
        return views

    async def ready(self) -> dict[str, bool]:
        return {
            "config_loaded": True,
            "upstream_available": self.runtime.pool.any_available(time.monotonic()),
            "quota_store": await self.quotas.check_ready(),
            "accepting": not self.draining,
        }

    async def close(self) -> None:
        for task in list(self._closers):
            task.cancel()
        transports = {u.transport for u in self.runtime.pool.upstreams.values()} | self._retired
        for transport in transports:
            await transport.close()
        await self.quotas.close()


def _budget(config: Config) -> RetryBudget:
    return RetryBudget(config.routing.retry_budget, config.routing.min_retries_per_second)


def config_upstreams(config: Config) -> list[str]:
    return [u.name for u in config.upstreams]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
