"""uvicorn, with the shutdown Kubernetes needs.

On SIGTERM: ``/readyz`` fails at once, but the gateway keeps serving for
``server.shutdown_delay`` seconds, while Kubernetes takes the pod out of its
endpoints. Then it stops accepting connections and lets in-flight requests
and streams finish, for up to ``server.shutdown_grace`` seconds. A second
SIGTERM or SIGINT skips the delay.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from .gateway import Gateway


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway, shutdown_delay: float,
                 logger: logging.Logger) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.shutdown_delay = shutdown_delay
        self.log = logger
        self._stop_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_at is None and sig == signal.SIGTERM and self.shutdown_delay > 0:
            self.gateway.draining = True
            self._stop_at = time.monotonic() + self.shutdown_delay
            self.log.info("SIGTERM: not ready; serving %.3gs more before draining", self.shutdown_delay)
            return
        self.gateway.draining = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self.log.info("draining: no new connections; finishing in-flight requests")
            return True
        return await super().on_tick(counter)
