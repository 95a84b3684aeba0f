"""Active health checks: ``GET {base_url}/models``, never a paid completion.

Only upstreams with ``health_check`` in their config are checked, through the
upstream's own transport (so its proxy and TLS settings). After
``unhealthy_threshold`` consecutive failures the upstream is ejected before
a user request finds out; a passing check readmits an ejected upstream. A
failed check's reason goes to the upstream's recent errors, and the last one
into the log line of the ejection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..errors import UpstreamConnectionError
from . import providers
from .pool import Pool, Upstream


class ActiveChecks:
    def __init__(self, pool: Callable[[], Pool], logger: logging.Logger,
                 on_state: Callable[[Upstream], None] = lambda up: None) -> None:
        self._pool = pool
        self._log = logger
        self._on_state = on_state
        self._due: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await self.run_due(time.monotonic())
            await asyncio.sleep(0.25)

    async def run_due(self, now: float) -> None:
        due = [u for u in self._pool().upstreams.values()
               if u.config.health_check is not None and self._due.get(u.name, 0.0) <= now]
        for up in due:
            assert up.config.health_check is not None
            self._due[up.name] = now + up.config.health_check.interval
        await asyncio.gather(*(self.check(up) for up in due))

    async def check(self, up: Upstream) -> bool:
        settings = up.config.health_check
        assert settings is not None
        failed = await self._probe(up, settings.timeout)
        now = time.monotonic()
        if failed is None:
            up.check_failures = 0
            if up.health.state(now) in ("ejected", "half_open"):
                self._log.info("upstream %s passed its health check; readmitted", up.name)
                up.health.success()
                self._on_state(up)
            return True
        up.check_failures += 1
        up.recent_errors.append((time.time(), "health_check", failed))
        if up.check_failures >= settings.unhealthy_threshold and up.health.state(now) == "healthy":
            self._log.warning("upstream %s failed %d health checks (the last: %s); ejected",
                              up.name, up.check_failures, failed)
            up.health.eject()
            self._on_state(up)
        return False

    async def _probe(self, up: Upstream, limit: float) -> str | None:
        """Why the check failed, or None when it passed."""
        cfg = up.config
        try:
            async with asyncio.timeout(limit):
                response = await up.transport.get(providers.models_url(cfg), providers.auth_headers(cfg))
                try:
                    while await response.read_chunk():
                        pass
                finally:
                    response.close()
        except TimeoutError:
            return f"no answer within {limit:g}s"
        except UpstreamConnectionError as exc:
            return exc.detail
        if response.status in (401, 403):
            self._log.error("upstream %s rejected the gateway's credentials (health check got %d)",
                            up.name, response.status)
            up.health.credentials_rejected(time.monotonic())
            return f"the credentials were rejected ({response.status})"
        return None if 200 <= response.status < 300 else f"answered {response.status}"
