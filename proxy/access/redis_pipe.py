"""One pipelined connection to Redis for the quota hot path.

redis-py takes a pooled connection per command and waits for its reply before
the connection can serve anyone else: about 46 µs of CPU per call here, against
9 µs when every request's command goes down one connection and replies are
matched to callers in order (``bench/README.md``). This module does only that
matching; hiredis parses the replies and redis-py parses the URL and builds the
TLS context. The commands of all requests that reach Redis in one loop pass
leave in one send (``batched_writes``), so under load Redis reads and answers
several requests' scripts per wake-up. Sentinel and Cluster URLs keep
redis-py (``io.redis_client.connect``).

Errors are redis-py's own exception classes, so ``store_redis`` translates
them like any other Redis failure. The pipe bounds its own calls: one timer
per connection, not one per call, fails every waiting command once the oldest
has waited past the timeout (the connection is then stuck: a frozen Redis, a
dead peer) and starts afresh. A reply that comes after its caller gave up is
read and dropped, which keeps every later reply matched to its own caller.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from ..io.batched_writes import BatchedTransport

Arg = str | int | bytes


@dataclass(frozen=True)
class Script:
    """A Lua script known by its SHA-1, sent whole only when Redis lacks it (NOSCRIPT)."""

    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())


def _frame(args: Sequence[Arg]) -> bytes:
    frame: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # its stub admits one argument
    return frame


class _Protocol(asyncio.Protocol):
    """Replies, in order, to the futures of the commands written."""

    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.lost = False
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._reader = hiredis.Reader(protocolError=redis_errors.InvalidResponse,
                                      replyError=redis_errors.ResponseError)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The commands of every request that reaches Redis in one loop pass leave in one send.
        self.transport = BatchedTransport(cast(asyncio.Transport, transport), self._loop)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future = self.pending.popleft()[0]
                if not future.done():  # its caller may have timed out
                    future.set_result(reply)
        except (redis_errors.InvalidResponse, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._fail(redis_errors.ConnectionError(f"Redis protocol error: {exc!r}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis_errors.ConnectionError("Connection to Redis lost."))

    def send(self, frame: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        if self.lost or self.transport.is_closing():
            # uvloop raises RuntimeError for a write to a closed transport, asyncio stays silent.
            raise redis_errors.ConnectionError("Connection to Redis lost.")
        loop = self._loop
        future = loop.create_future()
        now = loop.time()
        self.pending.append((future, now))
        self.transport.write(frame)
        if self._timer is None:
            self._timer = loop.call_at(now + self._timeout, self._check_stall)
        return future

    def _check_stall(self) -> None:
        self._timer = None
        if not self.pending or self.lost:
            return
        oldest = self.pending[0][1]
        if self._loop.time() - oldest >= self._timeout - 0.001:  # the loop's timers are ms-grained
            self.abort(redis_errors.TimeoutError(f"Redis did not answer within {self._timeout:g} s."))
        else:
            self._timer = self._loop.call_at(oldest + self._timeout, self._check_stall)

    def abort(self, why: Exception | None = None) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(why or redis_errors.ConnectionError("Redis connection closed."))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(exc)


class RedisPipe:
    """Commands from any number of tasks, pipelined on one lazily (re)opened connection."""

    def __init__(self, url: str, timeout: float, max_pending: int = 10_000) -> None:
        options: dict[str, Any] = dict(parse_url(url))
        kind = options.pop("connection_class", None)
        self._auth = [a for a in (options.get("username"), options.get("password")) if a]
        self._db = int(options.get("db") or 0)
        self._path: str | None = options.get("path")
        self._host: str = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._ssl = None
        if kind is SSLConnection:
            ssl_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
            self._ssl = SSLConnection(host=self._host, port=self._port, **ssl_options).ssl_context.get()
        elif kind not in (None, UnixDomainSocketConnection):
            raise ValueError(f"unsupported Redis URL for a pipelined connection: {kind}")
        self._timeout = timeout
        self._max_pending = max_pending
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def execute(self, *args: Arg) -> Any:
        """One command's reply; redis-py's exception classes on failure (an error reply raises)."""
        conn = self._conn
        if conn is None or conn.lost:
            conn = await self._connection()
        if len(conn.pending) >= self._max_pending:
            raise redis_errors.ConnectionError("Too many Redis commands waiting for a reply.")
        reply = await conn.send(_frame(args))
        if isinstance(reply, redis_errors.ResponseError):
            raise reply
        return reply

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """The script's reply (EVALSHA; EVAL when Redis does not have it)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis_errors.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # A restarted or failed-over Redis lost its script cache; EVAL loads it again.
        return await self.execute("EVAL", script.body, len(keys), *keys, *args)

    async def _connection(self) -> _Protocol:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        # Shielded: one caller timing out must not cancel the connect the others wait on.
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        conn: _Protocol | None = None
        try:
            async with asyncio.timeout(self._timeout):
                if self._path is not None:
                    _, conn = await loop.create_unix_connection(self._new_protocol, self._path)
                else:
                    _, conn = await loop.create_connection(self._new_protocol, self._host, self._port,
                                                          ssl=self._ssl)
                await self._handshake(conn)
        except BaseException as exc:
            if conn is not None:
                conn.abort()  # a handshake that failed or ran out of time leaves no socket behind
            if isinstance(exc, OSError | TimeoutError):
                raise redis_errors.ConnectionError(f"Cannot connect to Redis: {exc!r}") from exc
            raise
        self._conn = conn
        return conn

    def _new_protocol(self) -> _Protocol:
        return _Protocol(self._timeout)

    async def _handshake(self, conn: _Protocol) -> None:
        steps = ([("AUTH", *self._auth)] if self._auth else []) + ([("SELECT", self._db)] if self._db else [])
        replies = await asyncio.gather(*(conn.send(_frame(step)) for step in steps))
        refused = [r for r in replies if isinstance(r, redis_errors.ResponseError)]
        if refused:
            conn.abort()
            raise redis_errors.AuthenticationError(f"Redis refused the connection: {refused[0]}")

    async def ping(self) -> None:
        await self.execute("PING")

    async def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
