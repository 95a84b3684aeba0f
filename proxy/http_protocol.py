"""uvicorn's httptools protocol with a header-size limit and a header-read timeout.

uvicorn reads a request's header block whole however large it is, and keeps a
connection that never finishes its headers for ever. This subclass bounds both:

* ``max_header_bytes``: a request line and headers larger than this get 431
  (an OpenAI-format error) and the connection is closed. An unfinished block
  is refused as soon as the reads that surely belong to it pass the limit, so
  the parser never holds more than the limit plus two reads (uvloop reads up
  to 256 kB at a time); a finished one is measured as parsed, so whether a
  request passes does not depend on how the network cut it into reads.
* ``header_timeout``: from the moment a connection opens, or the first byte of
  a request arrives on a kept-alive one, the whole header block must arrive
  within this (408). A connection that sends nothing is closed without an
  answer, as is one that trickles bytes that start no request (stray line
  breaks, the rest of a body already answered). Between requests uvicorn's
  keep-alive timeout applies as before; while the application works on a
  request (body, answer, stream) no deadline runs: ``server.body_timeout``
  and the upstream timeouts bound that.

A refused connection is closed gracefully: the answer is sent, the write side
shut, and whatever the client still sends is read and dropped for up to
``LINGER_SECONDS``, so it reads the answer rather than a reset. When an answer
to an earlier request is still being sent on the connection (pipelining), that
answer is finished first and the connection closed after it.

The timers are ``loop.call_later`` handles: one per connection, plus one per
request only when its headers arrive in more than one read.

It also tells the application at once when the connection is lost
(``asgi.DisconnectSignal``), so a request need not keep a task waiting on
``receive()`` for ``http.disconnect`` to learn that its client went away, and
lets it reset a connection whose client stopped reading its answer.

A connection lives as long as the stream it carries, so it keeps little: its
own attributes are slots (past 30 attributes an instance dictionary is no
longer shared-key and takes 1.5 kB), and the request queue and uvicorn's two
events keep their waiters in lists (a deque takes 760 bytes when created).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .asgi import DISCONNECT_HOOK, DisconnectSignal
from .batched_writes import BatchedTransport
from .errors import ProxyError, RequestHeaderFieldsTooLargeError, RequestTimeoutError

LINGER_SECONDS = 2.0
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: a close sends RST and drops unsent bytes


class _Refused(Exception):
    """Raised from a parser callback to stop the parser after a refusal."""


class _Event(asyncio.Event):
    """An ``asyncio.Event`` whose waiters are a list (there is one at most): the base class's
    deque takes 760 bytes as soon as it is created, for every connection and request."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[bool]] = []  # type: ignore[assignment]


class _Pipeline(list[Any]):
    """uvicorn's queue of pipelined requests (``appendleft``, ``pop``) as a list, not a deque:
    it is nearly always empty, and an empty deque takes 760 bytes."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Use :func:`limited_protocol` to get a subclass with the configured limits."""

    __slots__ = ("_deadline", "_disconnect", "_done", "_head_bytes", "_head_slack", "_in_head", "_out",
                 "_read_size")

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        self._read_size = 0  # length of the read being parsed
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_bytes = 0  # reads that began inside the open header block: no more than its size
        self._head_slack = 0  # the read the block began in: with _head_bytes, no less than its size
        self._done = False  # refused: nothing more is parsed here
        self._deadline: asyncio.TimerHandle | None = None  # the header timeout, or the linger after a refusal
        self._disconnect = DisconnectSignal(self)  # DISCONNECT_HOOK of every request on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # A response's head and body leave in one send, and a stream's events of one loop pass too.
        self._out = BatchedTransport(transport, self.loop)
        super().connection_made(self._out)
        writable = _Event()
        writable.set()
        self.flow._is_writable_event = writable  # FlowControl's, set as it sets its own
        self._deadline = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)
        self._disconnect.fire()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own data_received, with the accounting around the parser's feed (no super() call:
        # a refusal from a parser callback must stop the parser without uvicorn's 400 and its warning).
        if self._done:
            return  # lingering after a refusal: read and drop
        self._unset_keepalive_if_required()
        self._read_size = size = len(data)
        if self._in_head:
            self._head_bytes += size
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._done:  # else refused from a callback, which raised to stop the parser
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                return  # the connection is the WebSocket protocol's now
            self._decline_upgrade(data[upgrade.args[0]:])
        if self.transport.is_closing():
            return
        if self._in_head:
            if self._head_bytes > self.max_header_bytes:
                self._refuse_too_large()
            elif self._deadline is None:
                self._arm_deadline()
        elif self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            # Bytes that start no request (uvicorn has just dropped its keep-alive timer for them).
            self._arm_deadline()

    def eof_received(self) -> None:
        # The client shut its side: the transport closes itself next, past the batching, so what
        # this pass held (a stream's last events) leaves first, as uvloop's own buffer would.
        self._out.flush()
        super().eof_received()

    def on_response_complete(self) -> None:
        # A finished answer leaves now, not after what its request does next (settling its quota).
        self._out.flush()
        super().on_response_complete()

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # the end of a head that offers an upgrade, not of its request (see _decline_upgrade)
        super().on_message_complete()

    def _decline_upgrade(self, rest: bytes) -> None:
        """Serve a request that offers an upgrade the gateway does not speak (``Upgrade: h2c``,
        which curl --http2 and Java's HTTP clients send) as HTTP/1.1, as RFC 9110 allows.

        The parser stops at the end of such a head and treats what follows as another protocol:
        the request's body and any pipelined request would be lost, and the connection with them.
        A new parser takes over, first given the head again without the offer (only its framing
        headers: it frames the body but is not handled twice), then the bytes the old one left."""
        self.logger.debug("%s: an upgrade offer declined", self._peer())
        framing = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers
                           if name in (b"content-length", b"transfer-encoding"))
        self.parser = httptools.HttpRequestParser(_AfterDeclinedUpgrade(self))
        with contextlib.suppress(AttributeError):  # httptools before 0.6.3 has no leniencies
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        self.data_received(b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + rest)

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_slack = self._read_size
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_HOOK: self._disconnect}  # type: ignore[dict-item]  # ASGI types extensions as dicts

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._deadline is not None:
            self._cancel_deadline()
        if self._head_bytes + self._head_slack > self.max_header_bytes and self._parsed_size() > self.max_header_bytes:
            self._refuse_too_large()
            raise _Refused  # stops the parser: nothing after this head is read
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a new request (not an upgrade): its event, not yet awaited
            self.cycle.message_event = _Event()

    def abort_connection(self) -> None:
        """The application gives up on a client that does not read its answer
        (``DisconnectSignal.abort``): the connection is reset, and what is buffered for it is
        dropped rather than left for the kernel to keep sending."""
        if self.cycle is not None:
            self.cycle.disconnected = True  # its sends return at once; the answer stays unfinished
        sock = self._out.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        self._out.abort()

    def _parsed_size(self) -> int:
        """The request line and headers as parsed: their size, give or take optional spaces."""
        size = len(self.parser.get_method()) + len(self.url) + 14  # spaces, HTTP/1.1, line breaks
        for name, value in self.headers:
            size += len(name) + len(value) + 4
        return size

    def _arm_deadline(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._in_head:  # no request was begun: nothing to answer
            self.transport.close()
            return
        self.logger.debug("%s: request headers incomplete after %gs; 408", self._peer(), self.header_timeout)
        self._refuse(RequestTimeoutError(
            f"The request's headers did not arrive within {self.header_timeout:g} s."))

    def _refuse_too_large(self) -> None:
        self.logger.info("%s: request headers over %d bytes; 431", self._peer(), self.max_header_bytes)
        self._refuse(RequestHeaderFieldsTooLargeError(
            f"The request's headers are larger than the gateway accepts ({self.max_header_bytes} bytes)."))

    def _refuse(self, error: ProxyError) -> None:
        self._cancel_deadline()
        self._done = True
        self._in_head = False
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # finish the answer under way, then close
            return
        body = error.body()
        head = [STATUS_LINE[error.status]]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(body))
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "client"


class _AfterDeclinedUpgrade:
    """The callbacks of the parser that takes over from one stopped by an upgrade offer: the
    protocol's, except for the head written again for it (its request is already under way)."""

    def __init__(self, protocol: LimitedHttpToolsProtocol) -> None:
        self._protocol = protocol
        self._in_replayed_head = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)

    def on_message_begin(self) -> None:
        if not self._in_replayed_head:
            self._protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._in_replayed_head:
            self._protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_replayed_head:
            self._protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._in_replayed_head:
            self._in_replayed_head = False
            return
        self._protocol.on_headers_complete()


def limited_protocol(max_header_bytes: int, header_timeout: float) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, bound to these limits."""

    class Limited(LimitedHttpToolsProtocol):
        pass

    Limited.max_header_bytes = max_header_bytes
    Limited.header_timeout = header_timeout
    return Limited
