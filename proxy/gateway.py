"""The live gateway: everything ``create_app`` builds, passed explicitly.

``Runtime`` is the part a config reload replaces as a whole. A request takes
one snapshot of it at its start and keeps it, so in-flight requests finish on
the pool they started with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import Config
from .forwarding import AttemptEvents, Forwarder
from .health import HealthPolicy
from .keys import Authenticator, StaticKeys
from .pool import Pool, make_selector
from .quotas import QuotaService
from .transport import Transport, make_transport


@dataclass(frozen=True)
class Runtime:
    config: Config
    pool: Pool
    auth: Authenticator


class Gateway:
    def __init__(self, config: Config, quotas: QuotaService,
                 make_auth: Callable[[StaticKeys], Authenticator] = Authenticator,
                 events: AttemptEvents | None = None,
                 health_policy: HealthPolicy = HealthPolicy()) -> None:
        self.quotas = quotas
        self._make_auth = make_auth
        self._health_policy = health_policy
        self.transports: dict[str, Transport] = {}
        self.runtime = self._build(config, None)
        self.forwarder = Forwarder(self.transport, events, time.monotonic)
        self.draining = False

    def _build(self, config: Config, old: Runtime | None) -> Runtime:
        keep = old.pool.upstreams if old else None
        pool = Pool(config, make_selector(config.routing.strategy), self._health_policy, keep)
        for upstream in config.upstreams:
            previous = old.config if old else None
            unchanged = previous is not None and upstream in previous.upstreams
            if upstream.name not in self.transports or not unchanged:
                self.transports[upstream.name] = make_transport(upstream)
        return Runtime(config, pool, self._make_auth(StaticKeys(config)))

    def transport(self, name: str) -> Transport:
        return self.transports[name]

    def ready(self) -> dict[str, bool]:
        now = time.monotonic()
        return {
            "config_loaded": True,
            "upstream_available": self.runtime.pool.any_available(now),
            "quota_store": self.quotas.ready(),
            "accepting": not self.draining,
        }

    async def close(self) -> None:
        for transport in self.transports.values():
            await transport.close()
        await self.quotas.close()
