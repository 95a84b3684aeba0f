"""The edge to upstreams: one keep-alive HTTP/1.1 connection pool per upstream, and the mock.

Everything above this module sees only ``Transport`` and ``UpstreamResponse``;
connection and protocol failures are translated here into
``UpstreamConnectionError``.

The client is this module's own: ``asyncio.Protocol`` connections whose
answers httptools parses (uvicorn ships it). One upstream call cost the
gateway about 48 µs of CPU through aiohttp's ``ClientSession`` (which
httpx cost 25 times more than) and costs about 10 here (bench/README.md, #2):
the request head is one string written with its body, the answer's bytes
are handed over as they arrive, and nothing else happens per request. What
it does, as aiohttp did for the gateway: keep-alive connections (an idle one
is closed after ``KEEPALIVE_SECONDS``), at most ``max_concurrency`` in use
(others wait, within the connect timeout), TLS for https, bodies framed by
Content-Length, chunked (a trailer is dropped, and held to the head's size
limit) or the end of the connection, and a body cut short is an error,
raised once the bytes before the cut were read. It keeps no
cookies (aiohttp sent a provider's cookies back; no client should share them),
and asks for ``identity`` encoding (it decodes none). A connection is opened
directly or through the upstream's forward proxy, with the upstream's TLS
settings (``connect``); an error says what happened and where.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, Protocol, cast

import httptools
import orjson
from multidict import CIMultiDict
from yarl import URL

from ..config.tls import TlsFileError, client_context
from ..config.types import ForwardProxy, UpstreamConfig
from ..errors import UpstreamConnectionError
from . import connect, mock

KEEPALIVE_SECONDS = 30.0
# Unread answer bytes above which the connection stops reading (a slow client
# must not make the gateway buffer a fast upstream's whole answer).
HIGH_WATER = 256 * 1024
# Bytes an answer's head (status line, headers, interim answers) may take, and
# so may a chunked body's trailer: httptools sets no limit of its own, and
# gathers a header field's value whole, however long.
MAX_HEAD_BYTES = 1024 * 1024


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrive; ``b""`` at the end of the body."""
        ...

    def close(self) -> None:
        """Drop the response; an unfinished body closes the connection."""
        ...


class Transport(Protocol):
    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse: ...

    async def get(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class _Target:
    """What a URL string gives a request: where to connect and what to ask for.

    Through a proxy, an http request names its whole URL (absolute form) and
    carries the proxy's credentials; an https one goes through a tunnel as is."""

    __slots__ = ("address", "head")

    def __init__(self, url: str, method: str, proxy: ForwardProxy | None = None) -> None:
        parsed = URL(url)  # percent-encodes what needs it, as aiohttp did
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise UpstreamConnectionError(f"cannot reach upstream: unsupported URL scheme {parsed.scheme!r}")
        self.address = (parsed.raw_host, parsed.port or (443 if parsed.scheme == "https" else 80),
                        parsed.scheme == "https")
        authority = parsed.host_port_subcomponent
        if proxy is not None and parsed.scheme == "http":
            self.head = f"{method} http://{authority}{parsed.raw_path_qs} HTTP/1.1\r\nHost: {authority}\r\n"
            if proxy.authorization is not None:
                self.head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        else:
            self.head = f"{method} {parsed.raw_path_qs} HTTP/1.1\r\nHost: {authority}\r\n"


def _request_head(target: _Target, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """The request line and headers, with Accept, Content-Length, and
    ``Accept-Encoding: identity`` when none is given: nothing here decodes gzip."""
    lines = [target.head]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent: it would split the request")
        lines.append(f"{name}: {value}\r\n")
    lines.append("Accept: */*\r\n")
    if "Accept-Encoding" not in headers and not any(name.lower() == "accept-encoding" for name in headers):
        lines.append("Accept-Encoding: identity\r\n")
    if body is None:
        lines.append("\r\n")
    else:
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("utf-8")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as it arrives.

    One lives as long as a stream, so it is slotted and keeps little: the unread
    chunks in a list (a deque allocates a 64-slot block up front), the answer's
    header lines only until its head is handed over."""

    __slots__ = ("_buffered", "_chunks", "_complete", "_error", "_framed", "_head", "_head_bytes",
                 "_headers", "_in_trailer", "_keep_alive", "_parser", "_paused", "_status", "_waiter",
                 "idle_since", "lost", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: list[tuple[str, str]] = []
        self._status = 0
        self._head: asyncio.Future[None] | None = None  # resolved by the answer's headers
        self._chunks: list[bytes] = []
        self._framed = False  # the answer's length is known (Content-Length, chunked, 204/304)
        self._buffered = 0
        self._head_bytes = 0  # of the head, then of the trailer
        self._in_trailer = False  # past a chunk's size line with no data after it: the last chunk's trailer
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False  # read at the answer's end (the parser forgets it after)
        self._error: str | None = None  # why the answer cannot go on, in words

    # --- the request side ---

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._status, self._complete, self._keep_alive, self._error = [], 0, False, False, None
        self._framed = self._in_trailer = False
        self._chunks.clear()
        self._buffered = self._head_bytes = 0
        self._head = asyncio.get_running_loop().create_future()
        if self.lost or self.transport.is_closing():
            self._fail("the upstream had closed the idle connection")
            return
        if self._paused:  # the last answer ended while reading was paused, and was not read
            self._paused = False
            self.transport.resume_reading()
        self.transport.write(data)

    async def response_head(self) -> tuple[int, CIMultiDict[str]]:
        assert self._head is not None
        await self._head
        self._head = None  # resolved: a stream need not keep it
        if self._error is not None:
            raise UpstreamConnectionError(f"cannot reach upstream: {self._error}", detail=self._error)
        headers, self._headers = CIMultiDict(self._headers), []
        return self._status, headers

    async def read_chunk(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise UpstreamConnectionError(f"upstream connection broke: {self._error}")
            if self._complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        """The answer was read to its end and the connection may carry another."""
        return self._complete and self._keep_alive and self._error is None and not self.lost

    def abort(self) -> None:
        self.lost = True  # at once: connection_lost comes an iteration later, and it must not be reused
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, but not a subclass

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self._complete:
            self._fail("bytes after the answer")  # nobody asked for them: this connection is done
            self.abort()
            return
        in_trailer = self._in_trailer
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed answer ({exc})")
            self.abort()
            return
        if not self._status:  # still in the answer's head
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(f"answer head over {MAX_HEAD_BYTES} bytes")
                self.abort()
        elif in_trailer and self._in_trailer and not self._complete:  # a read all of the trailer
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(f"answer trailer over {MAX_HEAD_BYTES} bytes")
                self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._parser is None or self._complete:
            return
        if self._error is None and exc is None and self._status and not self._framed:
            self._finish()  # a body without a length ends with the connection
        else:
            self._fail(connect.lost(exc))

    def pause_writing(self) -> None:  # the request body is written at once; nothing to hold back
        return None

    def resume_writing(self) -> None:
        return None

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request: feed_data stops with a parser error
            raise ValueError("UnexpectedData")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._status:
            return  # a chunked body's trailer: not one of the answer's headers
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = []  # an interim answer (100 Continue): the real one follows
            return
        self._status = status
        self._framed = self._has_length()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_chunk_header(self) -> None:
        # Data follows a chunk's size line, except after the last chunk's: its trailer does.
        self._in_trailer = True
        self._head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._in_trailer = False
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200 or self._status == 0:
            return
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._finish()

    # --- internals ---

    def _has_length(self) -> bool:
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length" or (lowered == "transfer-encoding" and "chunked" in value.lower()):
                return True
        return self._status in (204, 304)

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, reason: str) -> None:
        if self._error is None and not self._complete:
            self._error = reason
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Pool:
    """Keep-alive connections to one address; at most ``limit`` in use (0: no limit)."""

    def __init__(self, dialer: connect.Dialer, limit: int, connect_timeout: float,
                 proxied_http: bool = False) -> None:
        self.dialer = dialer
        self.proxied_http = proxied_http  # an http upstream through a proxy: a 407 is the proxy's
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None

    async def acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if not self._limit or self._in_use < self._limit:
            conn = self._take_idle(loop)
            if conn is not None:
                self._in_use += 1
                return conn
        try:
            async with asyncio.timeout(self._connect_timeout):  # the wait for a free slot counts, as in aiohttp
                if self._limit and self._in_use >= self._limit:
                    await self._wait_for_slot(loop)
                self._in_use += 1
                conn = self._take_idle(loop)  # one given back while this waited
                if conn is not None:
                    return conn
                try:
                    conn = await self.dialer.open(_Connection)
                except BaseException:
                    self._release_slot()
                    raise
        except TimeoutError:
            raise UpstreamConnectionError(
                "cannot reach upstream: connect timeout",
                detail=f"no connection within {self._connect_timeout:g}s, the connect timeout "
                       f"({self.dialer.where})") from None
        self._all.add(conn)
        return conn

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            # is_closing: the upstream's FIN was read, and connection_lost comes an iteration later
            if (not conn.lost and conn.transport is not None and not conn.transport.is_closing()
                    and loop.time() - conn.idle_since < KEEPALIVE_SECONDS):
                return conn
            self._drop(conn)
        return None

    def release(self, conn: _Connection) -> None:
        """Give back a connection whose answer is over: kept when it can carry another."""
        self._release_slot()
        if conn.reusable:
            loop = asyncio.get_running_loop()
            conn.idle_since = loop.time()
            self._idle.append(conn)
            if self._sweeper is None:
                self._sweeper = loop.call_later(KEEPALIVE_SECONDS, self._sweep)
        else:
            conn.abort()
            self._drop(conn)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._in_use >= self._limit:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_next()  # woken, then cancelled: the free slot goes to the next one
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _release_slot(self) -> None:
        self._in_use -= 1
        self._wake_next()

    def _wake_next(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _drop(self, conn: _Connection) -> None:
        conn.abort()
        self._all.discard(conn)

    def _sweep(self) -> None:
        """Close connections idle longer than KEEPALIVE_SECONDS; run while any are idle."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        keep = [c for c in self._idle if not c.lost and now - c.idle_since < KEEPALIVE_SECONDS]
        for conn in self._idle:
            if conn not in keep:
                self._drop(conn)
        self._idle = keep
        if keep:
            wait = KEEPALIVE_SECONDS - (now - min(c.idle_since for c in keep))
            self._sweeper = asyncio.get_running_loop().call_later(max(wait, 0.05), self._sweep)


async def _no_more() -> bytes:
    return b""


class _HttpResponse:
    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: _Pool, conn: _Connection, status: int, headers: CIMultiDict[str]) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.headers: Mapping[str, str] = headers

    def read_chunk(self) -> Coroutine[Any, Any, bytes]:
        # The connection's coroutine itself, not one wrapping it: a stream waits in
        # here for its whole life, and each coroutine frame waiting costs memory.
        conn = self._conn
        return conn.read_chunk() if conn is not None else _no_more()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


class HttpTransport:
    """Keep-alive connection pools to one upstream, created inside the event loop."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._pools: dict[tuple[str, int, bool], _Pool] = {}
        self._targets: dict[tuple[str, str], _Target] = {}  # the upstream's few URLs, parsed once
        self._tls: ssl.SSLContext | None = None

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        return await self._request("POST", url, headers, body)

    async def get(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        return await self._request("GET", url, headers, None)

    async def _request(self, method: str, url: str, headers: Mapping[str, str],
                       body: bytes | None) -> UpstreamResponse:
        target = self._targets.get((method, url))
        if target is None:
            target = self._targets[(method, url)] = _Target(url, method, self._config.proxy)
        pool = self._pools.get(target.address)
        if pool is None:
            pool = self._pools[target.address] = self._pool(target.address)
        head = _request_head(target, headers, body)
        conn = await pool.acquire()
        try:
            conn.send(head + body if body else head)
            status, response_headers = await conn.response_head()
            if status == 407 and pool.proxied_http:
                raise UpstreamConnectionError("cannot reach upstream: the proxy refused the request (407)",
                                              detail="the proxy answered 407 (proxy credentials missing or refused)")
        except UpstreamConnectionError as exc:
            conn.abort()
            pool.release(conn)
            raise UpstreamConnectionError(exc.message, detail=f"{exc.detail} ({pool.dialer.where})") from None
        except BaseException:
            conn.abort()
            pool.release(conn)
            raise
        return _HttpResponse(pool, conn, status, response_headers)

    def _pool(self, address: tuple[str, int, bool]) -> _Pool:
        host, port, https = address
        tls = self._tls_context() if https else None
        proxy = self._config.proxy
        return _Pool(connect.dialer(host, port, tls, proxy), self._config.max_concurrency or 0,
                     self._config.timeout.connect, proxied_http=proxy is not None and not https)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                self._tls = client_context(self._config.tls)
            except TlsFileError as exc:  # checked with the config; changed on disk since
                raise UpstreamConnectionError("cannot reach upstream: its TLS settings cannot be used",
                                              detail=f"tls.{exc.setting}: {exc.message}") from None
        return self._tls

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools = {}


class _MockResponse:
    def __init__(self, events: Iterator[bytes], delay: float, content_type: str) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {"content-type": content_type}
        self._events = events
        self._delay = delay
        self._first = True

    async def read_chunk(self) -> bytes:
        if self._delay and not self._first:
            await asyncio.sleep(self._delay)
        self._first = False
        return next(self._events, b"")

    def close(self) -> None:
        self._events = iter(())


class MockTransport:
    """The ``mock`` provider: OpenAI-format answers generated in-process."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._settings = config.mock
        self._models = list(config.models.values())

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        request = orjson.loads(body)
        if self._settings.latency:
            await asyncio.sleep(self._settings.latency)
        plan = mock.fresh(mock.plan(request, self._settings.completion_tokens))
        tps = self._settings.tokens_per_second
        if request.get("stream"):
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return _MockResponse(mock.stream_events(plan, usage), 1 / tps if tps else 0.0,
                                 "text/event-stream; charset=utf-8")
        if tps:
            await asyncio.sleep(plan.completion_tokens / tps)
        return _MockResponse(iter((mock.completion_body(plan),)), 0.0, "application/json")

    async def get(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        return _MockResponse(iter((mock.models_body(self._models),)), 0.0, "application/json")

    async def close(self) -> None:
        return None


def make_transport(config: UpstreamConfig) -> Transport:
    return MockTransport(config) if config.provider == "mock" else HttpTransport(config)
