"""A real OpenAI-compatible HTTP server on loopback that tests can make fail.

It runs aiohttp.web on its own event loop in a background thread, so the
gateway (a separate process, or uvicorn in the test) reaches it over TCP just
as it would reach a provider. Answers are the ``proxy.upstreams.mock`` bytes, so they
are real OpenAI framing, and every request and every byte sent is recorded.

Behaviours (``stub.behave(mode, **options)`` for all requests, or
``stub.queue(mode, ...)`` for the next ones, in order):
  ok, status (options: status, body), 429 (retry_after), hang (no headers),
  hang_body (headers, then nothing), cut (stream: ``after`` events then the
  connection drops), stall (stream: ``after`` events then silence), slow
  (``delay`` between events), garbage (200 with a non-JSON body), html_error
  (502 text/html), error_200 (200 with an OpenAI error body), no_done
  (stream without ``[DONE]``), reset (connection closed before any answer),
  no_usage (ignores include_usage, like some OpenAI-compatible servers),
  truncated (200 JSON cut in half, with a matching Content-Length),
  cut_body (the connection drops half-way through the body, or half-way
  through event ``after`` of a stream), wrong_type (a stream answered as one
  JSON body, a plain request answered as an event stream), garbage_sse (200
  text/event-stream of bytes that are no SSE at all), endless (stream:
  content events that never end, ``delay`` between them and ``size``
  characters of text in each, until the gateway goes away; a test's bound,
  ``seconds`` and ``max_bytes``, then cuts it), endless_trailer (200
  chunked: the answer, or a stream's first event, then the last chunk and a
  trailer field that never ends, written 1 MiB at a time, ``mib`` of them,
  until the connection is dropped; ``Seen.trailer_mib`` counts them).

``stub.response_headers`` are added to every chat answer (e.g. the headers a
provider uses to name its account: ``openai-organization``, ``set-cookie``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.upstreams import mock


@dataclass
class Behaviour:
    mode: str = "ok"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: dict[str, Any]
    sent: bytes = b""
    trailer_mib: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StubUpstream:
    def __init__(self, completion_tokens: int = 8, tls: ssl.SSLContext | None = None) -> None:
        self.completion_tokens = completion_tokens
        self.tls = tls  # serve https with this context
        self.port = free_port()
        self.default = Behaviour()
        self._queue: list[Behaviour] = []
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.models_status = 200  # what GET /v1/models (the active health check) answers
        self.response_headers: dict[str, str] = {}  # added to every chat answer
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    def behave(self, mode: str, **options: Any) -> None:
        with self.lock:
            self.default = Behaviour(mode, options)
            self._queue.clear()

    def queue(self, *modes: str | Behaviour) -> None:
        with self.lock:
            self._queue.extend(m if isinstance(m, Behaviour) else Behaviour(m) for m in modes)

    def reset(self) -> None:
        with self.lock:
            self.default = Behaviour()
            self._queue.clear()
            self.seen.clear()
            self.max_in_flight = 0
            self.models_status = 200

    @property
    def chat_requests(self) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith("/chat/completions")]

    def start(self) -> StubUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.on_response_prepare.append(self._add_headers)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        for _ in range(4):  # the port picked in __init__ may have been taken by another test process since
            try:
                await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls).start()
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                self.port = free_port()
        raise RuntimeError("no free port for the stub upstream")

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.path.endswith("/chat/completions"):
            response.headers.update(self.response_headers)

    def _next(self) -> Behaviour:
        with self.lock:
            return self._queue.pop(0) if self._queue else self.default

    async def _models(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, dict(request.query), CIMultiDict(request.headers), {}))
        if self.models_status != 200:
            return web.Response(status=self.models_status)
        return web.Response(body=mock.models_body(["stub-model"]), content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        seen = Seen(request.path, dict(request.query), CIMultiDict(request.headers), body)
        self.seen.append(seen)
        behaviour = self._next()
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await _answer(self, request, body, behaviour, seen)
        finally:
            with self.lock:
                self.in_flight -= 1


async def _answer(stub: StubUpstream, request: web.Request, body: dict[str, Any], b: Behaviour,
                  seen: Seen) -> web.StreamResponse:
    opts = b.options
    if opts.get("delay_headers"):
        await asyncio.sleep(opts["delay_headers"])
    if b.mode == "hang":
        await asyncio.sleep(3600)
    if b.mode == "reset":
        assert request.transport is not None
        request.transport.close()
        return web.Response(status=500)
    if b.mode == "status":
        return _json(seen, opts.get("body", {"error": {"message": "stub failure", "type": "server_error",
                                                          "param": None, "code": None}}),
                     opts.get("status", 500), opts.get("headers"))
    if b.mode == "429":
        headers = {"Retry-After": str(opts.get("retry_after", 1))}
        return _json(seen, {"error": {"message": "Rate limit reached", "type": "requests",
                                      "param": None, "code": "rate_limit_exceeded"}}, 429, headers)
    if b.mode == "garbage":
        return _raw(seen, b"<<not json at all", "application/json")
    if b.mode == "html_error":
        return _raw(seen, b"<html><body>502 Bad Gateway</body></html>", "text/html", 502)
    if b.mode == "error_200":
        return _json(seen, {"error": {"message": "overloaded", "type": "server_error",
                                      "param": None, "code": None}}, 200)
    plan = mock.plan(body, stub.completion_tokens)
    if b.mode == "truncated":
        whole = mock.completion_body(plan)
        return _raw(seen, whole[:len(whole) // 2], "application/json")
    if b.mode == "wrong_type":
        if body.get("stream"):
            return _raw(seen, mock.completion_body(plan), "application/json")
        return _raw(seen, b"".join(mock.stream_events(plan, False)), "text/event-stream")
    if b.mode == "garbage_sse":
        return _raw(seen, b"\x00\xffthis is not server-sent events at all" * 8, "text/event-stream")
    if b.mode == "endless_trailer":
        return await _endless_trailer(request, body, plan, opts.get("mib", 64), seen)
    if b.mode == "cut_body" and not body.get("stream"):
        return await _cut_body(request, mock.completion_body(plan), seen)
    if b.mode == "hang_body" and not body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await asyncio.sleep(3600)
    if not body.get("stream"):
        return _raw(seen, mock.completion_body(plan), "application/json")
    if b.mode == "endless":
        return await _endless(request, body, opts, plan)
    return await _stream(request, body, b, plan, seen)


async def _stream(request: web.Request, body: dict[str, Any], b: Behaviour, plan: mock.Completion,
                  seen: Seen) -> web.StreamResponse:
    opts = b.options
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and b.mode != "no_usage"
    events = list(mock.stream_events(plan, include_usage))
    if b.mode == "no_done":
        events = events[:-1]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    if b.mode == "hang_body":
        await asyncio.sleep(3600)
    for i, event in enumerate(events):
        if b.mode == "cut_body" and i == opts.get("after", 2):
            seen.sent += event[:len(event) // 2]
            await resp.write(event[:len(event) // 2])
            await asyncio.sleep(0.05)  # let the half event leave before the connection drops
            assert request.transport is not None
            request.transport.close()
            return resp
        if b.mode in ("cut", "stall") and i == opts.get("after", 2):
            if b.mode == "stall":
                await asyncio.sleep(3600)
            assert request.transport is not None
            request.transport.close()
            return resp
        if b.mode == "slow" and i:
            await asyncio.sleep(opts.get("delay", 0.05))
        seen.sent += event  # first: the client may have it all before write() returns here
        await resp.write(event)
    await resp.write_eof()
    return resp


async def _endless(request: web.Request, body: dict[str, Any], opts: dict[str, Any],
                   plan: mock.Completion) -> web.StreamResponse:
    """Content events with no last one. What was sent is not recorded: it can be many megabytes."""
    extra: dict[str, Any] = {"usage": None} if (body.get("stream_options") or {}).get("include_usage") else {}
    event = b"data: " + orjson.dumps({
        "id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": plan.model,
        "choices": [{"index": 0, "delta": {"content": "x" * opts.get("size", 8)}, "logprobs": None,
                     "finish_reason": None}], **extra}) + b"\n\n"
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    delay = opts.get("delay", 0.0)
    stop_at = time.monotonic() + opts.get("seconds", 60.0)
    sent, max_bytes = 0, opts.get("max_bytes", 256 * 1024 * 1024)
    while time.monotonic() < stop_at and sent < max_bytes:
        await resp.write(event)
        sent += len(event)
        await asyncio.sleep(delay)
    assert request.transport is not None
    request.transport.close()
    return resp


async def _cut_body(request: web.Request, whole: bytes, seen: Seen) -> web.StreamResponse:
    """Promise the whole body (Content-Length), send half, drop the connection."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(whole)
    await resp.prepare(request)
    await resp.write(whole[:len(whole) // 2])
    seen.sent = whole[:len(whole) // 2]
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return resp


async def _endless_trailer(request: web.Request, body: dict[str, Any], plan: mock.Completion, mib: int,
                           seen: Seen) -> web.StreamResponse:
    """The answer in one chunk, the last chunk, then a trailer field whose value never ends."""
    if body.get("stream"):
        content_type, data = "text/event-stream", next(iter(mock.stream_events(plan, False)))
    else:
        content_type, data = "application/json", mock.completion_body(plan)
    seen.sent = data
    writer = request.writer  # raw bytes, with back-pressure: no response was prepared, so no framing of its own
    with contextlib.suppress(ConnectionError):
        await writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"%x\r\n%s\r\n0\r\nX-Trailer: " % (content_type.encode(), len(data), data))
        while seen.trailer_mib < mib:
            await writer.write(b"v" * (1024 * 1024))
            seen.trailer_mib += 1
    assert request.transport is not None
    request.transport.close()
    return web.Response(status=500)  # never sent: the connection is closed


def _json(seen: Seen, payload: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return _raw(seen, orjson.dumps(payload), "application/json", status, headers)


def _raw(seen: Seen, data: bytes, content_type: str, status: int = 200,
         headers: dict[str, str] | None = None) -> web.Response:
    seen.sent = data
    return web.Response(body=data, status=status, content_type=content_type, headers=headers)
