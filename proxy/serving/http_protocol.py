"""uvicorn's httptools protocol, bounded where a client controls what it holds.

uvicorn reads a request's header block whole however large it is, and keeps a
connection that never finishes its headers for ever. This subclass bounds both:

* ``max_header_bytes``: a request line and headers larger than this get 431
  (an OpenAI-format error) and the connection is closed. An unfinished block
  is refused as soon as the reads that surely belong to it pass the limit, so
  the parser never holds more than the limit plus two reads (uvloop reads up
  to 256 kB at a time); a finished one is measured as parsed, so whether a
  request passes does not depend on how the network cut it into reads. A
  chunked body's trailer (the header fields after its last chunk, which the
  parser gathers as it does headers) is held to the same limit, and its
  fields are dropped: they are not the request's headers.
* ``header_timeout``: from the moment a connection opens, or the first byte of
  a request arrives on a kept-alive one, the whole header block must arrive
  within this (408); so must a trailer, from the first read that ends inside
  it. A connection that sends nothing is closed without an answer, as is one
  that trickles bytes that start no request (stray line breaks, the rest of a
  body already answered). Between requests uvicorn's keep-alive timeout
  applies as before; while the application works on a request (body, answer,
  stream) no other deadline runs: ``server.body_timeout`` and the upstream
  timeouts bound that.
* A request answered before its body was read (a wrong key, a body declared
  too large, an unknown route) is answered with ``Connection: close`` and the
  connection ends there: nothing after the answer is parsed. While a body is
  unread the request's cycle is told not to keep the connection alive (so
  uvicorn adds the header and closes after the answer); reading the body to
  its end gives the connection back its keep-alive.
* At most ``MAX_PIPELINED`` requests wait behind the one being answered:
  the parser reads on through a whole socket read, so a read of tiny
  pipelined requests would otherwise queue thousands of them. The requests
  taken are answered, then the connection is closed.
* Malformed HTTP gets a 400 in OpenAI's format, not uvicorn's plain text.
* ``send_timeout``: an answer finished while part of it is still held for the
  client (it reads slowly, or not at all) must be taken within this, else the
  connection is reset and what it held dropped. Unbounded, a client that sends
  requests and never reads would keep each answer, up to the upstream answer
  cap, and the connection for ever: closing a connection waits for its buffer
  to drain. The timer runs from the end of each answer while bytes are held,
  and is stopped by the end of the next; an answer under way when it expires
  is bounded by its own waits (a stream's writes), not by it. A request still
  under way then (a pipelined one whose answer waited for the buffer) learns
  why its connection went (``DisconnectSignal.write_timed_out``).

A refused connection is closed gracefully: the answer is sent, the write side
shut, and whatever the client still sends is read and dropped for up to
``LINGER_SECONDS`` and ``linger_bytes``, so a client still sending its body
reads the answer rather than a reset. When an answer to an earlier request is
still being sent on the connection (pipelining), that answer is finished first
and the connection closed after it.

The timers are ``loop.call_later`` handles: one per connection, plus one per
request only when its headers (or its trailer) arrive in more than one read,
one while a refused connection lingers, and one while a finished answer is
held for a client that has not taken it.

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
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from ..errors import InvalidRequestError, ProxyError, RequestHeaderFieldsTooLargeError, RequestTimeoutError
from ..io.batched_writes import BatchedTransport
from .asgi import DISCONNECT_HOOK, DisconnectSignal, Receive, Scope, Send, send_error

LINGER_SECONDS = 2.0
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: a close sends RST and drops unsent bytes
MAX_PIPELINED = 32


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


class _ClientTransport(BatchedTransport):
    """The connection's transport as uvicorn and its request cycles see it.

    While ``client_sending`` is set (a request's body is unread, or a request was refused), a
    ``close`` lingers: closing a socket with unread bytes makes the kernel send a reset, which
    can destroy the answer before the client reads it."""

    __slots__ = ("_linger", "client_sending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport, loop)
        self.client_sending = False
        self._linger: asyncio.TimerHandle | None = None

    @property
    def lingering(self) -> bool:
        return self._linger is not None

    def close(self) -> None:
        if self._linger is not None:
            return  # its timer closes
        if self.client_sending and self.can_write_eof() and not self._transport.is_closing():
            self.linger()
        else:
            super().close()

    def linger(self) -> None:
        """Send what is held, shut the write side, and close for good after LINGER_SECONDS (or
        when the client shuts its side); the protocol reads and drops what arrives meanwhile."""
        self.write_eof()
        if not self._transport.is_reading():
            self._transport.resume_reading()  # uvicorn pauses reading while a body is unread
        self._linger = self._loop.call_later(LINGER_SECONDS, self.close_now)

    def close_now(self) -> None:
        self.forget_linger()
        super().close()

    def forget_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def is_closing(self) -> bool:
        return self._linger is not None or self._transport.is_closing()


class _Refusal:
    """The ASGI app a queued request gets instead of the gateway's when its own bytes were
    refused: it answers in its turn, after the answers in flight before it."""

    __slots__ = ("error",)

    def __init__(self, error: ProxyError) -> None:
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(send, self.error)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """Use :func:`limited_protocol` to get a subclass with the configured limits."""

    __slots__ = ("_block_bytes", "_block_slack", "_deadline", "_disconnect", "_done", "_dropped",
                 "_in_head", "_in_trailer", "_keeps_alive", "_out", "_read_size", "_reading_body",
                 "_send_deadline")

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    linger_bytes: int = 8 * 1024 * 1024  # what a refused client may still send (server.max_body_bytes)
    send_timeout: float = 60.0  # for the client to take a finished answer (server.send_timeout)

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.pipeline = _Pipeline()  # type: ignore[assignment]
        self._read_size = 0  # length of the read being parsed
        self._in_head = False  # between a request's first byte and the end of its headers
        self._in_trailer = False  # past a chunk's size line with no data after it: the last chunk's trailer
        self._block_bytes = 0  # reads that began inside the open head or trailer: no more than its size
        self._block_slack = 0  # the read it began in: with _block_bytes, no less than its size
        self._reading_body = False  # between the end of a request's headers and the end of its body
        self._keeps_alive = False  # what the request asked of the connection, withheld while its body is unread
        self._done = False  # refused: nothing more is parsed here
        self._dropped = 0  # bytes read and dropped while lingering
        self._deadline: asyncio.TimerHandle | None = None  # the header or trailer timeout
        self._send_deadline: asyncio.TimerHandle | None = None  # the send timeout of a finished answer
        self._disconnect = DisconnectSignal(self)  # DISCONNECT_HOOK of every request on this connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # A response's head and body leave in one send, and a stream's events of one loop pass too.
        self._out = _ClientTransport(transport, self.loop)
        super().connection_made(self._out)
        writable = _Event()
        writable.set()
        self.flow._is_writable_event = writable  # FlowControl's, set as it sets its own
        self._deadline = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._cancel_send_deadline()
        self._out.forget_linger()
        super().connection_lost(exc)
        self._disconnect.fire()

    def data_received(self, data: bytes) -> None:
        # uvicorn's own data_received, with the accounting around the parser's feed (no super() call:
        # a refusal from a parser callback must stop the parser without uvicorn's 400 and its warning).
        if self._out.lingering:
            self._dropped += len(data)
            if self._dropped > self.linger_bytes:
                self._out.close_now()  # a client still sending this much is not waiting for an answer
            return
        if self._done:
            return  # refused, an answer still in flight: read and drop
        self._unset_keepalive_if_required()
        self._read_size = size = len(data)
        if self._in_head or self._in_trailer:
            self._block_bytes += size
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self._done:  # else refused from a callback, which raised to stop the parser
                self.logger.info("%s: invalid HTTP request (%s); 400", self._peer(), exc)
                self.send_400_response(f"Invalid HTTP request received ({exc}).")
            return
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                return  # the connection is the WebSocket protocol's now
            self._decline_upgrade(data[upgrade.args[0]:])
        if self.transport.is_closing():
            return
        if self._in_head or self._in_trailer:
            if self._block_bytes > self.max_header_bytes:
                self._refuse_too_large(trailer=self._in_trailer)
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
        self._cancel_send_deadline()
        if self._out.get_write_buffer_size():  # the client has not taken it all yet
            self._send_deadline = self.loop.call_later(self.send_timeout, self._send_timeout_expired)
        super().on_response_complete()

    def _decline_upgrade(self, rest: bytes) -> None:
        """Serve a request that offers an upgrade the gateway does not speak (``Upgrade: h2c``,
        which curl --http2 and Java's HTTP clients send) as HTTP/1.1, as RFC 9110 allows.

        The parser stops at the end of such a head and treats what follows as another protocol:
        the request's body and any pipelined request would be lost, and the connection with them.
        A new parser takes over, first given the head again without the offer (only its framing
        headers: it frames the body but is not handled twice), then the bytes the old one left."""
        self.logger.debug("%s: an upgrade offer declined", self._peer())
        framing = b"".join(name + b": " + value + b"\r\n" for name, value in self.scope["headers"]
                           if name in (b"content-length", b"transfer-encoding"))
        self.parser = httptools.HttpRequestParser(_AfterDeclinedUpgrade(self))
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        self.data_received(b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + rest)

    def shutdown(self) -> None:
        self._keeps_alive = False  # the server stops: a body read later must not keep the connection
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        self._refuse(InvalidRequestError(msg, code="invalid_http_request"))

    def on_message_begin(self) -> None:
        self._in_head = True
        self._block_bytes = 0
        self._block_slack = self._read_size
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_HOOK: self._disconnect}  # type: ignore[dict-item]  # ASGI types extensions as dicts

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._deadline is not None:
            self._cancel_deadline()
        limit = self.max_header_bytes
        if self._block_bytes + self._block_slack > limit and self._parsed_size() > limit:
            self._refuse_too_large()
            raise _Refused  # stops the parser: nothing after this head is read
        if len(self.pipeline) >= MAX_PIPELINED:
            self.logger.info("%s: more than %d pipelined requests; closing after their answers",
                             self._peer(), MAX_PIPELINED)
            self._stop_parsing()
            self.cycle.keep_alive = False  # the last one taken
            raise _Refused
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before:  # a new request (not an upgrade): its event, not yet awaited
            cycle.message_event = _Event()
            self.headers = []  # a trailer's fields land here, not in the request's headers
            self._reading_body = self._out.client_sending = True
            self._keeps_alive, cycle.keep_alive = cycle.keep_alive, False

    def on_chunk_header(self) -> None:
        # Data follows a chunk's size line, except after the last chunk's: its trailer does.
        self._in_trailer = True
        self._block_bytes = 0
        self._block_slack = self._read_size

    def on_body(self, body: bytes) -> None:
        if self._in_trailer:  # the size line was a data chunk's
            self._in_trailer = False
            self._cancel_deadline()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # the end of a head that offers an upgrade, not of its request (see _decline_upgrade)
        if self._in_trailer:
            self._in_trailer = False
            self._cancel_deadline()
            if self._fields_size(self.headers) > self.max_header_bytes:
                self._refuse_too_large(trailer=True)
                raise _Refused
        if self._reading_body:
            self._reading_body = self._out.client_sending = False
            if not self.cycle.response_started:
                self.cycle.keep_alive = self._keeps_alive
        super().on_message_complete()

    def write_paused(self) -> bool:
        """The transport holds more than its high-water mark: a send waits for the client."""
        return self.flow.write_paused

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

    def _send_timeout_expired(self) -> None:
        self._send_deadline = None
        if not self._out.get_write_buffer_size():
            return  # taken
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            return  # a later answer is under way: its own waits bound it, and its end starts this again
        self.logger.info("%s: the client did not take its answer within %gs; connection reset",
                         self._peer(), self.send_timeout)
        self._disconnect.write_timed_out = True
        self.abort_connection()

    def _cancel_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _parsed_size(self) -> int:
        """The request line and headers as parsed: their size, give or take optional spaces."""
        return len(self.parser.get_method()) + len(self.url) + 14 + self._fields_size(self.headers)

    @staticmethod
    def _fields_size(fields: list[tuple[bytes, bytes]]) -> int:
        return sum(len(name) + len(value) + 4 for name, value in fields)  # colon, space, line break

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
        if not self._in_head and not self._in_trailer:  # no request was begun: nothing to answer
            self.transport.close()
            return
        block = "headers" if self._in_head else "trailer"
        self.logger.debug("%s: request %s incomplete after %gs; 408", self._peer(), block, self.header_timeout)
        self._refuse(RequestTimeoutError(
            f"The request's {block} did not arrive within {self.header_timeout:g} s."))

    def _refuse_too_large(self, trailer: bool = False) -> None:
        block = "trailer is" if trailer else "headers are"
        self.logger.info("%s: request %s over %d bytes; 431", self._peer(), block, self.max_header_bytes)
        self._refuse(RequestHeaderFieldsTooLargeError(
            f"The request's {block} larger than the gateway accepts ({self.max_header_bytes} bytes)."))

    def _stop_parsing(self) -> None:
        self._cancel_deadline()
        self._done = True
        self._in_head = self._in_trailer = False
        self._out.client_sending = True

    def _refuse(self, error: ProxyError) -> None:
        self._stop_parsing()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not self._reading_body or cycle.response_started:
                cycle.keep_alive = False  # finish the answer under way, then close
                return
            # This request's own body broke off.
            if self.pipeline:  # it waits behind answers in flight: it gets this answer in its turn
                cycle.keep_alive = False
                self.pipeline[0] = (cycle, cast(Any, _Refusal(error)))
                return
            cycle.disconnected = True  # its application stops waiting for the body; the answer is ours
            cycle.message_event.set()
        body = error.body()
        head = [STATUS_LINE[error.status]]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(body))
        self.transport.write(b"".join(head) + body)
        self._out.close()

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


def limited_protocol(max_header_bytes: int, header_timeout: float,
                     max_body_bytes: int = LimitedHttpToolsProtocol.linger_bytes,
                     send_timeout: float = LimitedHttpToolsProtocol.send_timeout) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, bound to these limits."""

    class Limited(LimitedHttpToolsProtocol):
        pass

    Limited.max_header_bytes = max_header_bytes
    Limited.header_timeout = header_timeout
    Limited.linger_bytes = max_body_bytes
    Limited.send_timeout = send_timeout
    return Limited
