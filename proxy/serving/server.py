"""uvicorn, with the shutdown Kubernetes needs.

On SIGTERM: ``/readyz`` fails at once, but the gateway keeps serving for
``server.shutdown_delay`` seconds, while Kubernetes takes the pod out of its
endpoints. Then it stops accepting connections and lets in-flight requests
and streams finish, for up to ``server.shutdown_grace`` seconds. A second
SIGTERM or SIGINT skips the delay.

Streams still open shortly before the grace's end (``STREAM_END_SECONDS``, or
half the grace when that is shorter) are ended by the gateway: each gets the
SSE error event ``server_shutting_down`` and no ``[DONE]``, and is settled,
within the grace. Requests not answered by then (a body still arriving, an
upstream's answer or a stream's first byte awaited) get a 503
``server_shutting_down`` with ``Connection: close`` and are settled too
(``unanswered.py``). What uvicorn would do at its end instead is cancel their
tasks: a stream cut without a word to the client, a plain-text 500 for the
others, and a traceback each.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType
from typing import Protocol

import uvicorn

STREAM_END_SECONDS = 2.0  # kept at the grace's end for ending the streams and requests still open


class OpenStreams(Protocol):
    def end(self, write_by: float) -> int: ...


class Unanswered(Protocol):
    def end(self) -> int: ...


class Draining(Protocol):
    """What the shutdown needs of the gateway (``apis.gateway.Gateway``): the flag that fails
    ``/readyz``, the streams still open, and the requests not answered yet."""

    draining: bool

    @property
    def streams(self) -> OpenStreams: ...

    @property
    def unanswered(self) -> Unanswered: ...


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Draining, shutdown_delay: float,
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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        ending = None
        if grace:
            window = min(STREAM_END_SECONDS, grace / 2)
            ending = asyncio.get_running_loop().call_later(grace - window, self._end_open_requests, window)
        try:
            await super().shutdown(sockets)
        finally:
            if ending is not None:
                ending.cancel()

    def _end_open_requests(self, window: float) -> None:
        # Half the window for the error events to leave; then settling and closing.
        count = self.gateway.streams.end(write_by=asyncio.get_running_loop().time() + window / 2)
        if count:
            self.log.warning("shutdown grace running out: ending %d open stream(s) with an error event", count)
        count = self.gateway.unanswered.end()
        if count:
            self.log.warning("shutdown grace running out: answering %d request(s) not answered yet with 503",
                             count)
