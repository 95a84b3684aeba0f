"""The OpenAI surface: chat completions, models, and the probes.

``ChatCompletions`` is a plain ASGI app so that the hot path controls exactly
when bytes leave (nothing before an upstream committed) and can notice a
client that went away (``DisconnectWatch``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import orjson

from ..access.keys import KeyPolicy
from ..access.quotas import Reservation
from ..config.types import DEFAULT_MAX_OUTPUT_TOKENS
from ..errors import (
    AuthenticationError,
    Header,
    InvalidRequestError,
    ProxyError,
    RateLimitError,
    RequestTimeoutError,
    ServerShuttingDownError,
    UpstreamStreamError,
)
from ..io.watchdog import Watchdog
from ..serving.asgi import (
    ClientGone,
    ClientTooSlow,
    DisconnectWatch,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_bytes,
    send_error,
)
from ..telemetry.tracing import RequestSpan
from ..upstreams.forwarding import Forwarded, Route
from ..upstreams.mock import models_body
from .gateway import Gateway, Runtime
from .schema import ChatRequest, parse_chat_request
from .stream_waits import StreamWaits
from .streaming import SseRelay, error_event
from .unanswered import Unanswered

_JSON = b"application/json"
_SSE_HEADERS: tuple[Header, ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


@dataclass(slots=True)
class RequestRecord:
    """What one request did; read by metrics, the span and the access log at its end."""

    started: float
    model: str = "unknown"  # a configured model name only: it becomes a metric label
    upstream: str = ""
    team: str = ""
    key_name: str = ""
    status: int = 0
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttfb: float | None = None
    attempts: int = 0
    upstream_time: float = 0.0  # spent waiting on upstreams (the rest is the gateway's own)
    error_code: str | None = None
    headers: list[Header] = field(default_factory=list)

    def tokens(self) -> int:
        """What the request used, as counted so far: what settling its reservation charges."""
        return self.prompt_tokens + self.completion_tokens


class ChatCompletions:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tel = self.gateway.telemetry
        record = RequestRecord(started=time.perf_counter())
        tel.metrics.request_started()
        watchdog = Watchdog()  # every deadline of this request: one timer
        with tel.tracing.server_span("POST /v1/chat/completions", scope["headers"]) as span:
            try:
                await self._handle(scope, receive, send, record, span, watchdog)
            except ProxyError as exc:
                record.status, record.error_code = exc.status, exc.code
                if isinstance(exc, RateLimitError) and exc.limit:
                    tel.metrics.quota_rejected(exc.limit, record.team, record.key_name)
                await send_error(send, exc, record.headers)
            except ClientGone as gone:
                record.status, record.error_code = 499, gone.code
                if isinstance(gone, ClientTooSlow) and record.stream:
                    tel.metrics.stream_error(gone.code)
            finally:
                watchdog.close()
                _observe(self.gateway, scope, record, span)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord,
                      span: RequestSpan, watchdog: Watchdog) -> None:
        gw = self.gateway
        rt = gw.runtime
        policy = await authenticate(gw, rt, scope)
        record.team, record.key_name = policy.team or "", policy.name
        content_type = header(scope, b"content-type")
        # The raw body is not kept in this frame: a stream would hold it to its end.
        try:
            request = parse_chat_request(await _read_body(receive, scope, rt, watchdog, gw.unanswered),
                                         content_type.decode("latin-1") if content_type else None)
        except InvalidRequestError as exc:
            record.model = exc.model if exc.model in rt.pool.models() else record.model
            raise
        record.stream = request.stream
        route = _route(rt, policy, request.model)  # an unknown model is a 404, whatever the allow-list
        record.model = request.model
        policy.check_model(request.model)
        span.request(model=request.model, stream=request.stream, team=record.team,
                     key_name=record.key_name, max_tokens=request.max_tokens)
        reservation = await gw.quotas.reserve(policy, _estimate(request, rt))
        # Leaving this block settles the reservation with what the request recorded.
        async with reservation.charging(record.tokens):
            record.headers.extend(reservation.headers)
            reservation.headers = ()  # record.headers has them, and lets them go once they were sent
            watch = DisconnectWatch()
            forward_started = time.perf_counter()
            try:
                with watch.watching(receive, scope):
                    forwarded = await self._forward(scope, rt, request, route, reservation, watchdog)
                    record.upstream, record.ttfb = forwarded.candidate.upstream.name, forwarded.ttfb
                    record.attempts = forwarded.attempts
                    # Committed: no other attempt follows. Of the request only what counts its usage is
                    # kept from here; the parsed body (as large as the prompt) is not, for a whole stream.
                    stream, strip_usage = request.stream, not request.include_usage
                    prompt_tokens = request.prompt_tokens
                    del request, route
                    # Leaving this block gives the upstream's slot and connection back.
                    with forwarded:
                        if stream and forwarded.response.status < 400:
                            timeouts = forwarded.candidate.upstream.config.timeout
                            with StreamWaits(gw.streams, watchdog, watch, timeouts.idle, timeouts.total) as waits:
                                await self._relay_stream(send, strip_usage, prompt_tokens, forwarded, record, waits)
                        else:
                            await self._relay_body(send, prompt_tokens, forwarded, record, watch)
            finally:
                record.upstream_time = time.perf_counter() - forward_started

    async def _forward(self, scope: Scope, rt: Runtime, request: ChatRequest, route: Route,
                       reservation: Reservation, watchdog: Watchdog) -> Forwarded:
        """The failover loop, under docs/quotas.md's charging rules for a request that ends there."""
        # Left before an answer (the client went away, or shutdown ended it): an upstream may
        # be at work on the prompt already, and providers bill a prompt they were sent.
        reservation.charge_at_least(request.prompt_tokens)
        try:
            with self.gateway.unanswered.wait():  # a shutdown whose grace runs out answers it 503
                forwarded = await self.gateway.forwarder.forward(rt.pool, rt.config.routing, request, route,
                                                                 _forward_headers(scope), watchdog)
        except ProxyError as exc:
            if not isinstance(exc, ServerShuttingDownError):  # that one ended a forwarded request
                reservation.charge_at_least(0)  # every attempt failed: the upstreams' failure is not the client's bill
            raise
        reservation.charge_at_least(0)  # answered: what the answer used is charged
        return forwarded

    async def _relay_body(self, send: Send, prompt_tokens: int, fwd: Forwarded,
                          record: RequestRecord, watch: DisconnectWatch) -> None:
        status = fwd.response.status
        if status < 400:
            _count_usage(record, prompt_tokens, fwd)
        record.status = status
        watch.finishing = True
        await send_bytes(send, status, fwd.first, _JSON, [*record.headers, *_upstream_header(fwd)])
        if watch.write_timed_out:  # its send waited behind an earlier answer the client never took
            raise ClientTooSlow

    async def _relay_stream(self, send: Send, strip_usage: bool, prompt_tokens: int, fwd: Forwarded,
                            record: RequestRecord, waits: StreamWaits) -> None:
        """Relay the events as they come. A stream waits in here for its whole life, so the relay
        and its waits are one frame, and nothing is kept that was sent already (the first chunk,
        the answer's headers). Every wait, for the upstream or for the client to take a write, is
        bounded (``stream_waits.py``)."""
        relay = SseRelay(strip_usage=strip_usage)
        record.status = 200
        await waits.write(send, {"type": "http.response.start", "status": 200,
                                 "headers": [*_SSE_HEADERS, *record.headers, *_upstream_header(fwd)]})
        record.headers.clear()  # sent: no other answer can start now
        response = fwd.response
        chunk, fwd.first = fwd.first, b""
        tail = b""  # leaves with the end of the body: one write, not two
        try:
            while chunk:
                out = relay.feed(chunk)
                if relay.done:
                    tail = out
                    break
                if out:
                    await waits.write(send, {"type": "http.response.body", "body": out, "more_body": True})
                    out = b""
                chunk = b""  # not kept while the next one is awaited
                chunk = await waits.read(response)
            else:
                raise UpstreamStreamError("The upstream ended the stream before it was complete.",
                                          code="upstream_stream_cut")
        except ProxyError as exc:
            tail = relay.leftover() + self._stream_broken(exc, fwd, record)
        finally:
            record.prompt_tokens, record.completion_tokens = _stream_usage(relay, prompt_tokens)
        # Not marked finishing before this send: the tail carries data, and a client that leaves
        # while it waits on a slow reader abandoned the stream (499).
        await waits.write(send, {"type": "http.response.body", "body": tail})

    def _stream_broken(self, exc: ProxyError, fwd: Forwarded, record: RequestRecord) -> bytes:
        """The error event (no ``[DONE]``) that ends a stream that cannot go on; the record of why."""
        if isinstance(exc, ServerShuttingDownError):
            record.status, code = exc.status, exc.code or "server_shutting_down"
            fwd.finish(ok=True, now=time.monotonic())  # the upstream did not fail
        else:
            record.status = 502
            fwd.upstream_failed = True
            code = exc.code if isinstance(exc, UpstreamStreamError) and exc.code else "upstream_stream_error"
        record.error_code = code
        self.gateway.telemetry.metrics.stream_error(code)
        return error_event(exc.message, code)


def _observe(gw: Gateway, scope: Scope, record: RequestRecord, span: RequestSpan) -> None:
    duration = time.perf_counter() - record.started
    tel = gw.telemetry
    tel.metrics.request_finished(
        model=record.model, upstream=record.upstream, team=record.team, key_name=record.key_name,
        status=record.status, duration=duration, ttft=record.ttfb,
        overhead=max(0.0, duration - record.upstream_time), prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens, stream=record.stream)
    span.response(status=record.status, upstream=record.upstream, input_tokens=record.prompt_tokens,
                  output_tokens=record.completion_tokens, attempts=record.attempts)
    tel.access.write({
        "request_id": scope.get("state", {}).get("request_id"), "trace_id": span.trace_id or None,
        "method": "POST", "path": "/v1/chat/completions", "status": record.status,
        "team": record.team, "key_name": record.key_name, "model": record.model,
        "upstream": record.upstream, "stream": record.stream, "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens, "attempts": record.attempts,
        "duration_ms": round(duration * 1000, 2),
        "ttft_ms": round(record.ttfb * 1000, 2) if record.ttfb is not None else None,
        "overhead_ms": round(max(0.0, duration - record.upstream_time) * 1000, 3),
        "error_code": record.error_code,
    })


async def authenticate(gw: Gateway, rt: Runtime, scope: Scope) -> KeyPolicy:
    """The caller's policy; repeated failures from one address become 429s."""
    try:
        return await rt.auth.authenticate(header(scope, b"authorization"))
    except AuthenticationError as exc:
        gw.telemetry.metrics.auth_failure(exc.code or "invalid_api_key")
        client = scope.get("client")
        wait = gw.auth_guard.failed(client[0] if client else "unknown")
        if wait:
            raise RateLimitError("Too many failed authentication attempts from this address.",
                                 code="auth_failures", headers=[(b"retry-after", b"%d" % wait)]) from None
        raise


async def _read_body(receive: Receive, scope: Scope, rt: Runtime, watchdog: Watchdog,
                     unanswered: Unanswered) -> bytes:
    # The request's one timer is armed here: the attempts and the stream move it.
    watchdog.expire_in(rt.config.server.body_timeout)
    try:
        with unanswered.wait():  # a shutdown whose grace runs out answers it 503
            return await read_body(receive, scope, rt.config.server.max_body_bytes)
    except asyncio.CancelledError:
        if watchdog.expired():
            raise RequestTimeoutError("The request body did not arrive in time.") from None
        raise
    finally:
        watchdog.clear()


def _estimate(request: ChatRequest, rt: Runtime) -> int:
    """What the quotas hold while the request is in flight: its prompt, and for each choice at
    most what its model can write (an absurd ``max_tokens`` must not hold a team's whole budget)."""
    settings = rt.config.models.get(request.model)
    ceiling = settings.max_output_tokens if settings else DEFAULT_MAX_OUTPUT_TOKENS
    completion = min(request.max_tokens or rt.config.quotas.default_max_tokens, ceiling)
    return request.prompt_tokens + completion * request.n


def _forward_headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    request_id = scope.get("state", {}).get("request_id")
    if request_id:
        out["X-Request-Id"] = request_id
    return out


def _route(rt: Runtime, policy: KeyPolicy, model: str) -> Route:
    chain = [(model, rt.pool.candidates(model))]
    settings = rt.config.models.get(model)
    for fallback in settings.fallbacks if settings else ():
        if policy.allows(fallback):
            chain.append((fallback, rt.pool.candidates(fallback)))
    return Route(tuple(chain))


def _upstream_header(fwd: Forwarded) -> tuple[Header, ...]:
    upstream = (b"x-llm-proxy-upstream", fwd.candidate.upstream.name.encode())
    if fwd.model and fwd.model != fwd.request_model:
        return upstream, (b"x-llm-proxy-fallback-model", fwd.model.encode())
    return (upstream,)


def _count_usage(record: RequestRecord, prompt_tokens: int, fwd: Forwarded) -> None:
    usage = fwd.usage
    if usage is None:
        record.prompt_tokens = prompt_tokens
        record.completion_tokens = max(1, len(fwd.first) // 16)
        return
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    record.completion_tokens = int(usage.get("completion_tokens") or 0)


def _stream_usage(relay: SseRelay, prompt_tokens: int) -> tuple[int, int]:
    if relay.usage is not None:
        usage = relay.usage
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    # The upstream sent no usage (it ignores include_usage, or the stream was
    # cut): one token per content event is the usual framing.
    return prompt_tokens, relay.content_events


class Models:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.gateway.runtime
        try:
            policy = await authenticate(self.gateway, rt, scope)
        except ProxyError as exc:
            await send_error(send, exc)
            return
        models = [m for m in rt.pool.models() if policy.allows(m)]
        await send_bytes(send, 200, models_body(models), _JSON)


class Probe:
    """``/healthz``: the process answers. ``/readyz``: it should get traffic."""

    def __init__(self, gateway: Gateway, readiness: bool) -> None:
        self.gateway = gateway
        self.readiness = readiness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.readiness:
            await send_bytes(send, 200, b'{"status":"ok"}', _JSON)
            return
        checks = await self.gateway.ready()
        ok = all(checks.values())
        body = orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks})
        await send_bytes(send, 200 if ok else 503, body, _JSON)


class MetricsEndpoint:
    """``/metrics`` in the Prometheus text format (multiprocess-aware)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.gateway.export_state()
        body, content_type = self.gateway.telemetry.metrics.render()
        await send_bytes(send, 200, body, content_type.encode())
