"""Every wait of a stream has a bound.

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
  it cuts ends with ``upstream_total_timeout``, a write it cuts as above.

Each bound is a deadline of the request's ``Watchdog``: no timer of its own.
"""

from __future__ import annotations

import asyncio

from .asgi import ClientTooSlow, DisconnectWatch, Message, Send
from .errors import ProxyError, UpstreamStreamError
from .transport import UpstreamResponse
from .watchdog import Watchdog


class StreamWaits:
    """One stream's waits."""

    __slots__ = ("_deadline", "_idle", "_watch", "_watchdog")

    def __init__(self, watchdog: Watchdog, watch: DisconnectWatch, idle: float, total: float) -> None:
        self._watchdog = watchdog
        self._watch = watch
        self._idle = idle
        self._deadline = watchdog.time() + total

    async def read(self, response: UpstreamResponse) -> bytes:
        """The upstream's next chunk (``b""`` at its end)."""
        watchdog = self._watchdog
        until = watchdog.time() + self._idle
        total = self._deadline <= until
        watchdog.expire_at(self._deadline if total else until)
        try:
            return await response.read_chunk()
        except asyncio.CancelledError:
            if watchdog.expired():
                raise self._stalled(total) from None
            raise
        finally:
            watchdog.clear()

    async def write(self, send: Send, message: Message) -> None:
        """Send ``message`` to the client. One it does not take in time resets the connection
        (what is still buffered for it could not reach it either) and raises ``ClientTooSlow``."""
        watchdog = self._watchdog
        watchdog.expire_at(min(watchdog.time() + self._idle, self._deadline))
        try:
            await send(message)
        except asyncio.CancelledError:
            if watchdog.expired():
                self._watch.abort()
                raise ClientTooSlow from None
            raise
        finally:
            watchdog.clear()

    def _stalled(self, total: bool) -> ProxyError:
        if total:
            return UpstreamStreamError("The stream did not end within the upstream's total timeout; "
                                       "it was ended.", code="upstream_total_timeout")
        return UpstreamStreamError("The upstream stopped sending for too long; the stream was ended.",
                                   code="upstream_idle_timeout")

