"""Every wait of a stream has a bound, and a shutdown can end the streams still open.

A stream waits on both sides: for the upstream's next chunk, and for the client
to take what was written to it (uvicorn's ``send`` blocks while the
connection's write buffer is over its high-water mark, that is while the client
reads nothing). Unbounded, a client that stops reading would hold the stream,
its upstream connection and ``max_concurrency`` slot, and its key's concurrency
lease for as long as it keeps the connection open.

* a wait for the upstream ends after the upstream's ``idle`` timeout
  (``upstream_idle_timeout``), a write the client does not take after the same
  ``idle``: the connection is reset, the stream ends as abandoned (499,
  ``client_write_timeout``);
* ``total``, counted from the first byte, bounds both: a wait for the upstream
  it cuts ends with ``upstream_total_timeout``, a write it cuts as above;
* ``OpenStreams.end`` (the shutdown's grace is running out) ends every stream
  open then or later: a wait for the upstream at once (``server_shutting_down``),
  a write when it is given.

Each bound is a deadline of the request's ``Watchdog``: no timer of its own.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

from ..errors import ProxyError, ServerShuttingDownError, UpstreamStreamError
from ..io.watchdog import Watchdog
from ..serving.asgi import ClientTooSlow, DisconnectWatch, Message, Send
from ..upstreams.transport import UpstreamResponse


class OpenStreams:
    """The streams being relayed now, so that a shutdown can end them."""

    __slots__ = ("_open", "write_by")

    def __init__(self) -> None:
        self._open: set[StreamWaits] = set()
        self.write_by = math.inf  # loop time; finite once the streams are being ended

    @property
    def ending(self) -> bool:
        return self.write_by != math.inf

    def __len__(self) -> int:
        return len(self._open)

    def add(self, waits: StreamWaits) -> None:
        self._open.add(waits)

    def discard(self, waits: StreamWaits) -> None:
        self._open.discard(waits)

    def end(self, write_by: float) -> int:
        """End every open stream, and every one that opens from now on: a wait for the
        upstream at once, a write to the client by ``write_by`` (loop time) at the latest.
        Returns how many were open."""
        self.write_by = write_by
        for waits in self._open:
            waits.end(write_by)
        return len(self._open)


class StreamWaits:
    """One stream's waits; ``with`` it for the stream's life, so that a shutdown finds it."""

    __slots__ = ("_deadline", "_idle", "_reading", "_streams", "_watch", "_watchdog", "_write_until")

    def __init__(self, streams: OpenStreams, watchdog: Watchdog, watch: DisconnectWatch, idle: float,
                 total: float) -> None:
        self._streams = streams
        self._watchdog = watchdog
        self._watch = watch
        self._idle = idle
        self._deadline = watchdog.time() + total
        self._reading = False
        self._write_until: float | None = None  # the bound of the write under way

    def __enter__(self) -> StreamWaits:
        self._streams.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._streams.discard(self)

    async def read(self, response: UpstreamResponse) -> bytes:
        """The upstream's next chunk (``b""`` at its end)."""
        if self._streams.ending:
            raise _shutting_down()
        watchdog = self._watchdog
        until = watchdog.time() + self._idle
        total = self._deadline <= until
        watchdog.expire_at(self._deadline if total else until)
        self._reading = True
        try:
            return await response.read_chunk()
        except asyncio.CancelledError:
            if watchdog.expired():
                raise self._stalled(total) from None
            raise
        finally:
            self._reading = False
            watchdog.clear()

    async def write(self, send: Send, message: Message) -> None:
        """Send ``message`` to the client. One it does not take in time resets the connection
        (what is still buffered for it could not reach it either) and raises ``ClientTooSlow``."""
        if not self._watch.write_may_wait():
            await send(message)  # nothing holds it back: it is written at once, with no wait to bound
            return
        watchdog = self._watchdog
        self._write_until = until = min(watchdog.time() + self._idle, self._deadline,
                                        self._streams.write_by)
        watchdog.expire_at(until)
        try:
            await send(message)
        except asyncio.CancelledError:
            if watchdog.expired():
                self._watch.abort()
                raise ClientTooSlow from None
            raise
        finally:
            self._write_until = None
            watchdog.clear()

    def end(self, write_by: float) -> None:
        """The shutdown ends this stream: a wait for the upstream now, a write by ``write_by``."""
        watchdog = self._watchdog
        if self._reading:
            watchdog.expire_at(watchdog.time())
        elif self._write_until is not None and write_by < self._write_until:
            self._write_until = write_by
            watchdog.expire_at(write_by)

    def _stalled(self, total: bool) -> ProxyError:
        if self._streams.ending:
            return _shutting_down()
        if total:
            return UpstreamStreamError("The stream did not end within the upstream's total timeout; "
                                       "it was ended.", code="upstream_total_timeout")
        return UpstreamStreamError("The upstream stopped sending for too long; the stream was ended.",
                                   code="upstream_idle_timeout")


def _shutting_down() -> ServerShuttingDownError:
    return ServerShuttingDownError("The gateway is shutting down; the stream was ended before it was "
                                   "complete. Retry the request.")
