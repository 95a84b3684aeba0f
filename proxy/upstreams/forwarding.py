"""The failover loop: try candidates until one gives a usable first byte.

Nothing reaches the client until an attempt has produced its first body bytes
(a stream) or its whole body (a non-streamed answer), so every failure before
that point can move on to the next candidate. Which upstream is
next is the pool's business; whether it is healthy is the health machine's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import orjson

from ..config.types import RoutingConfig
from ..errors import (
    Header,
    NoUpstreamAvailableError,
    ProxyError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from ..io.watchdog import Watchdog
from ..telemetry.tracing import Tracing
from . import providers
from .pool import Candidate, Pool, Upstream
from .retry_after import cooldown_seconds
from .retry_budget import RetryBudget
from .transport import UpstreamResponse

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
MAX_BODY_BYTES = 64 * 1024 * 1024


class ChatRequest(Protocol):
    """What the failover loop reads of a request (``apis.schema.ChatRequest`` is one)."""

    @property
    def body(self) -> dict[str, Any]: ...

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...

    @property
    def include_usage(self) -> bool: ...


class AttemptEvents(Protocol):
    def attempt(self, upstream: str, outcome: str, seconds: float) -> None: ...

    def failover(self, model: str, from_upstream: str) -> None: ...

    def cooldown(self, upstream: str, seconds: float) -> None: ...


class NoEvents:
    def attempt(self, upstream: str, outcome: str, seconds: float) -> None:
        return None

    def failover(self, model: str, from_upstream: str) -> None:
        return None

    def cooldown(self, upstream: str, seconds: float) -> None:
        return None


@dataclass
class _Tries:
    attempts: int = 0
    last: ProxyError | None = None
    failed_upstream: str = ""
    rate_limited: bool = False  # the last failure was a 429


class _AttemptFailed(Exception):
    """Internal: this candidate failed in a way the next one may not."""

    def __init__(self, outcome: str, error: ProxyError) -> None:
        super().__init__(error.message)
        self.outcome = outcome
        self.error = error
        self.status: int | None = None


class _Hold:
    """What one attempt holds of its upstream: a slot of its ``max_concurrency`` (``in_flight``)
    and, once it answered, the connection the answer comes on (``response``).

    ``with _Hold(upstream) as hold:`` around the attempt. Leaving the block gives both back,
    whatever ended it, unless the attempt committed: then its ``Forwarded`` holds them."""

    __slots__ = ("_committed", "_released", "response", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.response: UpstreamResponse | None = None
        self._committed = False
        self._released = False

    def __enter__(self) -> _Hold:
        self.upstream.in_flight += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            self.release()

    def commit(self) -> _Hold:
        self._committed = True
        return self

    def release(self) -> None:
        """The slot back, the answer dropped (an unfinished one closes its connection); once."""
        if self._released:
            return
        self._released = True
        self.upstream.in_flight -= 1
        if self.response is not None:
            self.response.close()


@dataclass(slots=True)
class Forwarded:
    """A committed upstream answer: the first bytes are in hand.

    It holds the attempt's upstream slot and connection until the relay ends: ``with forwarded:``
    around the relay gives them back when the block ends, whatever ended it, and judges the
    upstream: failed when the relay set ``upstream_failed``, else a success."""

    candidate: Candidate
    response: UpstreamResponse
    first: bytes  # stream: the first chunk; otherwise the whole body
    ttfb: float  # seconds from the start of the winning attempt
    attempts: int
    hold: _Hold = field(repr=False)
    model: str = ""  # the public model that answered (a fallback, perhaps)
    request_model: str = ""
    usage: dict[str, Any] | None = None  # a whole body's usage member, read when it was checked
    upstream_failed: bool = False  # the answer broke off on the upstream's side
    _done: bool = field(default=False, repr=False)

    def __enter__(self) -> Forwarded:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish(ok=not self.upstream_failed, now=time.monotonic())

    def finish(self, ok: bool, now: float) -> None:
        """Judge the upstream and give back what the answer holds; later calls do nothing. The
        ``with`` block's end calls it; a relay that knows the upstream's outcome before its own
        end (a shutdown ends the stream) may call it then."""
        if self._done:
            return
        self._done = True
        if ok:
            self.candidate.upstream.health.success()
        else:
            self.candidate.upstream.health.failure(now)
        self.hold.release()


@dataclass(frozen=True)
class Route:
    """Where a request may go: its model, then its fallbacks, in order."""

    models: tuple[tuple[str, Sequence[Candidate]], ...]


class Forwarder:
    def __init__(self, events: AttemptEvents | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 budget: RetryBudget | None = None,
                 logger: logging.Logger | None = None,
                 tracing: Tracing | None = None) -> None:
        self._log = logger or logging.getLogger("llm_proxy")
        self._tracing = tracing or Tracing(None)
        self._events = events or NoEvents()
        self._clock = clock
        self.budget = budget

    async def forward(self, pool: Pool, routing: RoutingConfig, request: ChatRequest, route: Route,
                      extra_headers: dict[str, str], watchdog: Watchdog) -> Forwarded:
        """``watchdog``: the request's, which bounds each attempt."""
        deadline = self._clock() + routing.deadline
        if self.budget is not None:
            self.budget.deposit()
        state = _Tries()
        for model, candidates in route.models:
            result = await self._try_model(pool, routing, request, model, candidates, deadline,
                                           extra_headers, state, watchdog)
            if result is not None:
                result.model, result.request_model = model, request.model
                return result
        if state.last is None or state.rate_limited:
            held_off = _held_off(route, request.model, self._clock())
            if held_off is not None:
                raise held_off
        if state.last is None:
            raise NoUpstreamAvailableError(
                f"No upstream for the model '{request.model}' is available right now; retry shortly.")
        raise state.last

    async def _try_model(self, pool: Pool, routing: RoutingConfig, request: ChatRequest, model: str,
                         candidates: Sequence[Candidate], deadline: float,
                         extra_headers: dict[str, str], state: _Tries, watchdog: Watchdog) -> Forwarded | None:
        tried: set[str] = set()
        attempts = 0
        while attempts < routing.max_attempts:
            now = self._clock()
            if now >= deadline:
                raise UpstreamTimeoutError("The upstreams did not answer within the deadline.")
            candidate = pool.pick(model, candidates, tried, now)
            if candidate is None:
                if routing.wait_for_cooldown and await self._wait_for_recovery(candidates, tried, deadline):
                    continue
                return None
            if state.attempts and not self._may_retry(state, model):
                return None
            tried.add(candidate.upstream.name)
            attempts += 1
            state.attempts += 1
            try:
                result = await self._attempt(candidate, request, deadline, extra_headers, state.attempts,
                                             watchdog)
            except _AttemptFailed as failed:
                state.last, state.failed_upstream = failed.error, candidate.upstream.name
                state.rate_limited = failed.outcome == "429"
                continue
            result.attempts = state.attempts
            return result
        return None

    def _may_retry(self, state: _Tries, model: str) -> bool:
        if self.budget is not None and not self.budget.try_spend():
            state.last = state.last or NoUpstreamAvailableError("The retry budget is spent.")
            return False
        self._events.failover(model, state.failed_upstream)
        return True

    async def _wait_for_recovery(self, candidates: Sequence[Candidate], tried: set[str],
                                 deadline: float) -> bool:
        """Every candidate is cooling down: sleep until the first recovers, if
        that is within the deadline; an upstream that asked us to wait may be
        tried again afterwards."""
        now = self._clock()
        cooling = [c.upstream for c in candidates if c.upstream.health.state(now) == "cooling_down"]
        if not cooling:
            return False
        first = min(cooling, key=lambda u: u.health.blocked_until())
        if first.health.blocked_until() >= deadline:
            return False
        await asyncio.sleep(max(0.0, first.health.blocked_until() - now))
        tried.discard(first.name)
        return True

    async def _attempt(self, candidate: Candidate, request: ChatRequest, deadline: float,
                       extra_headers: dict[str, str], number: int, watchdog: Watchdog) -> Forwarded:
        up = candidate.upstream
        with self._tracing.attempt_span(upstream=up.name, provider=up.config.provider, model=request.model,
                                        upstream_model=candidate.model, attempt=number) as span:
            headers = {**_BASE_HEADERS, **providers.auth_headers(up.config), **extra_headers}
            span.inject(headers)
            # Whatever ends the attempt gives its upstream slot back and drops an answer begun,
            # unless the attempt commits: its Forwarded then holds them.
            with _Hold(up) as hold:
                try:
                    result = await self._send(candidate, request, deadline, headers, watchdog, hold)
                except _AttemptFailed as failed:
                    span.result(failed.outcome, failed.status, error=_detail(failed.error))
                    raise
            span.result("ok" if result.response.status < 400 else "4xx", result.response.status)
            return result

    async def _send(self, candidate: Candidate, request: ChatRequest, deadline: float,
                    headers: dict[str, str], watchdog: Watchdog, hold: _Hold) -> Forwarded:
        up = candidate.upstream
        cfg = up.config
        started = self._clock()
        up.health.begin(started)
        limit = min(cfg.timeout.first_byte if request.stream else cfg.timeout.total,
                    deadline - started)
        response: UpstreamResponse | None = None
        usage: dict[str, Any] | None = None
        watchdog.expire_in(limit)
        try:
            hold.response = response = await up.transport.post(providers.chat_url(cfg, candidate.model), headers,
                                                               _payload(request, candidate.model))
            self._check_status(candidate, response)
            relayed_error = response.status >= 400
            if request.stream and not relayed_error:
                _check_event_stream(response)
            first = await (response.read_chunk() if request.stream and not relayed_error
                           else _read_body(response))
            if not relayed_error:
                usage = self._check_first(request, first)
        except asyncio.CancelledError:
            if not watchdog.expired():
                # Cancelled from outside (the client went away): the upstream is given back
                # unjudged, and an answer begun is closed (its connection is not left in use).
                raise
            timeout = UpstreamTimeoutError(f"The upstream did not answer within {limit:.3g}s.")
            self._fail(candidate, "timeout", started, health=True, error=timeout.message)
            raise _AttemptFailed("timeout", timeout) from None
        except UpstreamConnectionError as exc:
            self._log.warning("upstream %s: %s", up.name, exc.detail)
            self._fail(candidate, "connect_error", started, health=True, error=exc.detail)
            raise _AttemptFailed("connect_error", exc) from None
        except _AttemptFailed as failed:
            failed.status = response.status if response is not None else None
            self._fail(candidate, failed.outcome, started, health=failed.outcome != "429",
                       error=failed.error.message)
            raise
        finally:
            watchdog.clear()
        # Every header the gateway reads of an answer was read above; a stream keeps its response
        # to its end, and its parsed headers (a kilobyte and more) need not stay with it.
        response.headers = _NO_HEADERS
        ttfb = self._clock() - started
        up.observe_ttfb(ttfb)
        self._events.attempt(up.name, "ok" if response.status < 400 else "4xx", ttfb)
        return Forwarded(candidate, response, first, ttfb, 0, hold.commit(), usage=usage)

    def _check_status(self, candidate: Candidate, response: UpstreamResponse) -> None:
        status = response.status
        health = candidate.upstream.health
        if status == 429:
            seconds = cooldown_seconds(response.headers)
            health.cool_down(self._clock(), seconds)
            self._events.cooldown(candidate.upstream.name, seconds)
            raise _AttemptFailed("429", UpstreamError(
                "Every upstream for this model is rate limited; retry shortly.",
                code="upstream_rate_limited"))
        if status in RETRYABLE_STATUS or 300 <= status < 400 or status >= 505:
            raise _AttemptFailed("5xx", UpstreamError(
                f"The upstream failed with status {status}."))
        if status in (401, 403):
            self._log.error("upstream %s rejected the gateway's credentials (%d); holding it for %ss",
                            candidate.upstream.name, status, health.policy.credentials_recheck)
            health.credentials_rejected(self._clock())
            raise _AttemptFailed("auth_error", UpstreamError(
                "The gateway's credentials for the upstream were rejected.",
                code="upstream_auth_error"))

    @staticmethod
    def _check_first(request: ChatRequest, first: bytes) -> dict[str, Any] | None:
        """Refuse an answer that cannot be relayed; a whole body's usage, parsed once here."""
        if request.stream:
            if not first:
                raise _AttemptFailed("cut", UpstreamError("The upstream closed the stream at once."))
            return None
        try:
            parsed = orjson.loads(first)
        except orjson.JSONDecodeError:
            raise _AttemptFailed("5xx", UpstreamError("The upstream answered with a body that is not JSON.",
                                                      code="upstream_bad_response")) from None
        if not isinstance(parsed, dict) or ("error" in parsed and "choices" not in parsed):
            raise _AttemptFailed("5xx", UpstreamError("The upstream answered with an error body.",
                                                      code="upstream_bad_response"))
        usage = parsed.get("usage")
        return usage if isinstance(usage, dict) else None

    def _fail(self, candidate: Candidate, outcome: str, started: float, health: bool, error: str) -> None:
        up = candidate.upstream
        up.recent_errors.append((time.time(), outcome, error))
        now = self._clock()
        if health:
            up.health.failure(now)
        self._events.attempt(up.name, outcome, now - started)


def _held_off(route: Route, model: str, now: float) -> ProxyError | None:
    """The answer when no candidate of the route can take a request now (None when one can), with
    ``Retry-After`` until the first is back: 429 when all of them are cooling down after 429s
    (the client should slow down, as the upstreams asked), else 503."""
    upstreams = list({c.upstream.name: c.upstream for _, found in route.models for c in found}.values())
    if any(up.available(now) for up in upstreams):
        return None
    states = [up.health.state(now) for up in upstreams]
    if all(state == "cooling_down" for state in states):
        wait = min(up.health.blocked_until() for up in upstreams) - now
        return UpstreamRateLimitError(
            f"Every upstream for the model '{model}' is rate limited; retry in {math.ceil(wait)}s.",
            headers=_retry_after(wait))
    # Held until a known time (a cooldown, an ejection's back-off up to its half-open probe, bad
    # credentials' recheck); a probe under way or a full upstream may free up any moment.
    back = [up.health.blocked_until() if state in ("cooling_down", "ejected", "credentials_bad") else now + 1
            for up, state in zip(upstreams, states, strict=True)]
    wait = min(back) - now
    if math.isinf(wait):  # ejected by the active check: back when a check passes
        return NoUpstreamAvailableError(f"No upstream for the model '{model}' is available right now.")
    return NoUpstreamAvailableError(
        f"No upstream for the model '{model}' is available right now; retry in {math.ceil(wait)}s.",
        headers=_retry_after(wait))


def _retry_after(seconds: float) -> list[Header]:
    ms = max(1, math.ceil(seconds * 1000))
    return [(b"retry-after", b"%d" % -(-ms // 1000)), (b"retry-after-ms", b"%d" % ms)]


def _detail(error: ProxyError) -> str:
    return error.detail if isinstance(error, UpstreamConnectionError) else error.message


def _check_event_stream(response: UpstreamResponse) -> None:
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise _AttemptFailed("5xx", UpstreamError(
            "The upstream answered a streaming request with something other than an event stream.",
            code="upstream_bad_response"))


_BASE_HEADERS = {
    "Content-Type": "application/json",
    "Accept-Encoding": "identity",
    "User-Agent": "llm-proxy",
}


def _payload(request: ChatRequest, upstream_model: str) -> bytes:
    body = dict(request.body)
    body["model"] = upstream_model
    if request.stream and not request.include_usage:
        # Ask for the usage event so streamed tokens are counted; the relay strips it again.
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
    return orjson.dumps(body)


async def _read_body(response: UpstreamResponse) -> bytes:
    if response.status >= 400:
        # Error bodies of 4xx answers are relayed, but never unbounded.
        return await _read_all(response, 1024 * 1024)
    return await _read_all(response, MAX_BODY_BYTES)


async def _read_all(response: UpstreamResponse, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while chunk := await response.read_chunk():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _AttemptFailed("5xx", UpstreamError("The upstream's answer is too large."))
    return b"".join(parts)
