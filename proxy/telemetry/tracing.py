"""OpenTelemetry traces: one SERVER span per request, one CLIENT span per upstream attempt.

Attributes follow the GenAI semantic conventions (``gen_ai.*``); team and key
name are ``llm_proxy.team`` / ``llm_proxy.key_name``. Never a prompt, a
completion or a key: spans leave the process.

Without an OTLP endpoint there is no provider, and ``Tracing`` hands out one
shared do-nothing scope: no span, no context switch, no allocation per
request. When the provider's sampler can only drop the request's spans
(``always_off``, a ratio of 0, or parent-based on those without a sampled
parent), no SDK span is started either: the request gets the ids the SDK
would have given its non-recording spans (the client's trace id or a new
one, for the access log, and a traceparent naming each attempt, so the
upstream still joins the client's trace), at about a third of the cost. The
global tracer provider is left alone (tests build several).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from types import MappingProxyType, TracebackType
from typing import Generic, Literal, TypeVar

from opentelemetry import context, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, StaticSampler, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..config.types import TelemetryConfig

AttributeValue = str | bool | int | float
Headers = Iterable[tuple[bytes, bytes]] | Mapping[str, str]
_H = TypeVar("_H", "RequestSpan", "AttemptSpan")

_PROPAGATED = frozenset({"traceparent", "tracestate"})
# gen_ai.provider.name (and the older gen_ai.system) for each provider of the config.
_GEN_AI_PROVIDER: Mapping[str, str] = MappingProxyType({"openai": "openai", "azure": "azure.ai.openai"})


def build_tracer_provider(cfg: TelemetryConfig) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP, or None when no endpoint is set.

    The SDK reads the rest itself: OTEL_EXPORTER_OTLP_* (endpoint, headers,
    timeout), OTEL_TRACES_SAMPLER(_ARG), OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*. Call ``shutdown()`` at exit to flush.
    """
    if not cfg.tracing:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "llm-proxy"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def gen_ai_provider(provider: str) -> str:
    return _GEN_AI_PROVIDER.get(provider, provider)


class RequestSpan:
    """The request's SERVER span, as the request path sees it."""

    __slots__ = ("_recording", "_span")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._recording = span.is_recording()

    @property
    def trace_id(self) -> str:
        """For log correlation; "" without a valid trace."""
        ctx = self._span.get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else ""

    def request(self, *, model: str, stream: bool, team: str, key_name: str,
                max_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None) -> None:
        if not self._recording:
            return
        attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat", "gen_ai.request.model": model,
            "gen_ai.request.stream": stream, "llm_proxy.team": team, "llm_proxy.key_name": key_name,
        }
        _optional(attrs, "gen_ai.request.max_tokens", max_tokens)
        _optional(attrs, "gen_ai.request.temperature", temperature)
        _optional(attrs, "gen_ai.request.top_p", top_p)
        self._span.set_attributes(attrs)

    def response(self, *, status: int, upstream: str = "", model: str | None = None,
                 input_tokens: int | None = None, output_tokens: int | None = None,
                 attempts: int | None = None) -> None:
        if not self._recording:
            return
        attrs: dict[str, AttributeValue] = {"http.response.status_code": status}
        _optional(attrs, "llm_proxy.upstream", upstream or None)
        _optional(attrs, "gen_ai.response.model", model)
        _optional(attrs, "gen_ai.usage.input_tokens", input_tokens)
        _optional(attrs, "gen_ai.usage.output_tokens", output_tokens)
        _optional(attrs, "llm_proxy.attempts", attempts)
        if status >= 500:  # a 4xx is the client's error, not the server span's (HTTP semconv)
            attrs["error.type"] = str(status)
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.set_attributes(attrs)

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        if self._recording:
            self._span.add_event(name, attributes)


class AttemptSpan:
    """One upstream attempt's CLIENT span."""

    __slots__ = ("_recording", "_span", "outcome")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._recording = span.is_recording()
        self.outcome: str | None = None

    def inject(self, headers: dict[str, str]) -> None:
        """traceparent/tracestate naming this attempt as the upstream's parent."""
        if self._span.get_span_context().is_valid:
            TraceContextTextMapPropagator().inject(headers, trace.set_span_in_context(self._span))

    def result(self, outcome: str, status: int | None = None, *, model: str | None = None,
               input_tokens: int | None = None, output_tokens: int | None = None,
               error: str | None = None) -> None:
        """outcome: ok|429|5xx|4xx|timeout|connect_error|auth_error|cut (as in the metrics);
        ``error``: what happened, in words, for the span's status."""
        self.outcome = outcome
        if not self._recording:
            return
        attrs: dict[str, AttributeValue] = {"llm_proxy.outcome": outcome}
        _optional(attrs, "http.response.status_code", status)
        _optional(attrs, "gen_ai.response.model", model)
        _optional(attrs, "gen_ai.usage.input_tokens", input_tokens)
        _optional(attrs, "gen_ai.usage.output_tokens", output_tokens)
        if outcome != "ok":
            attrs["error.type"] = outcome
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.set_attributes(attrs)


class _UnsampledTrace:
    """A request whose spans the sampler drops: what its non-recording spans
    would carry. ``flags`` are the SDK's for them (never sampled; the
    random-trace-id bit as the SDK sets it); ``state`` is the client's
    tracestate as the SDK re-serialises it."""

    __slots__ = ("flags", "ids", "state", "trace_id")

    def __init__(self, trace_id: int, flags: int, state: str, ids: IdGenerator) -> None:
        self.trace_id = trace_id
        self.flags = flags
        self.state = state
        self.ids = ids


class _UnsampledRequestSpan(RequestSpan):
    __slots__ = ("_trace",)

    def __init__(self, unsampled: _UnsampledTrace) -> None:
        super().__init__(trace.INVALID_SPAN)
        self._trace = unsampled

    @property
    def trace_id(self) -> str:
        return format(self._trace.trace_id, "032x")


class _UnsampledAttemptSpan(AttemptSpan):
    __slots__ = ("_trace",)

    def __init__(self, unsampled: _UnsampledTrace) -> None:
        super().__init__(trace.INVALID_SPAN)
        self._trace = unsampled

    def inject(self, headers: dict[str, str]) -> None:
        """What the SDK's propagator writes for a non-recording attempt span."""
        t = self._trace
        headers["traceparent"] = f"00-{t.trace_id:032x}-{t.ids.generate_span_id():016x}-{t.flags:02x}"
        if t.state:
            headers["tracestate"] = t.state


class _UnsampledScope(Generic[_H]):
    """Makes the request's unsampled trace current (for its attempts) without an OTel context."""

    __slots__ = ("_current", "_handle", "_token", "_trace")

    def __init__(self, current: ContextVar[_UnsampledTrace | None], unsampled: _UnsampledTrace,
                 handle: _H) -> None:
        self._current = current
        self._trace = unsampled
        self._handle: _H = handle
        self._token: Token[_UnsampledTrace | None] | None = None

    def __enter__(self) -> _H:
        self._token = self._current.set(self._trace)
        return self._handle

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if self._token is not None:
            self._current.reset(self._token)
        return False


class _Scope(Generic[_H]):
    """Makes a span current for a block and ends it; a plain class because a
    generator-based context manager costs more per request."""

    __slots__ = ("_handle", "_span", "_token")

    def __init__(self, span: Span, handle: _H) -> None:
        self._span = span
        self._handle: _H = handle
        self._token: object = None

    def __enter__(self) -> _H:
        self._token = context.attach(trace.set_span_in_context(self._span))
        return self._handle

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        span = self._span
        if exc is not None and span.is_recording():
            if isinstance(self._handle, AttemptSpan) and self._handle.outcome is None:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                span.set_attribute("error.type", type(exc).__name__)
            elif isinstance(self._handle, RequestSpan):
                span.record_exception(exc)
        context.detach(self._token)  # type: ignore[arg-type]
        span.end()
        return False


class _NoScope(Generic[_H]):
    """Stands for a scope when tracing is off: stateless, so one serves every request."""

    __slots__ = ("_handle",)

    def __init__(self, handle: _H) -> None:
        self._handle: _H = handle

    def __enter__(self) -> _H:
        return self._handle

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        return False


class Tracing:
    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("llm_proxy") if provider is not None else None
        self._propagator = TraceContextTextMapPropagator()
        self._no_request = _NoScope(RequestSpan(trace.INVALID_SPAN))
        self._no_attempt = _NoScope(AttemptSpan(trace.INVALID_SPAN))
        # The request (if any) in this task whose spans are dropped: its attempts follow it.
        self._unsampled: ContextVar[_UnsampledTrace | None] = ContextVar(f"llm_proxy_unsampled_{id(self)}",
                                                                         default=None)
        sampler = provider.sampler if provider is not None else None
        self._drops_roots = sampler is not None and _always_drops(sampler, "root")
        self._drops_unsampled_remote = sampler is not None and _always_drops(sampler, "remote_unsampled")
        self._drops_sampled_remote = sampler is not None and _always_drops(sampler, "remote_sampled")

    def server_span(self, name: str, headers: Headers,
                    attributes: Mapping[str, AttributeValue] | None = None,
                    ) -> AbstractContextManager[RequestSpan]:
        """``with tracing.server_span("POST /v1/chat/completions", scope["headers"]) as span:``
        continues the client's W3C traceparent when it sent one."""
        if self._tracer is None:
            return self._no_request
        carrier = _carrier(headers)
        parent = self._propagator.extract(carrier) if carrier else context.Context()
        unsampled = self._unsampled_trace(parent)
        if unsampled is not None:
            return _UnsampledScope(self._unsampled, unsampled, _UnsampledRequestSpan(unsampled))
        span = self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        return _Scope(span, RequestSpan(span))

    def _unsampled_trace(self, parent: context.Context) -> _UnsampledTrace | None:
        """The request's ids when the sampler can only drop its spans and its
        attempts' (as the SDK's ``Tracer.start_span`` would set them); else None."""
        assert self.provider is not None
        ids = self.provider.id_generator
        remote = trace.get_current_span(parent).get_span_context()
        if not remote.is_valid:
            if not self._drops_roots:
                return None
            random_id = ids.is_trace_id_random()
            return _UnsampledTrace(ids.generate_trace_id(), TraceFlags.RANDOM_TRACE_ID if random_id else 0,
                                   "", ids)
        if not (self._drops_sampled_remote if remote.trace_flags.sampled else self._drops_unsampled_remote):
            return None
        random_bit = TraceFlags.RANDOM_TRACE_ID if remote.trace_flags.random_trace_id else 0
        state = remote.trace_state.to_header() if remote.trace_state else ""
        return _UnsampledTrace(remote.trace_id, random_bit, state, ids)

    def attempt_span(self, *, upstream: str, provider: str, model: str, upstream_model: str,
                     attempt: int, server_address: str | None = None,
                     ) -> AbstractContextManager[AttemptSpan]:
        """``with tracing.attempt_span(...) as span: span.inject(headers); ...; span.result("ok", 200)``.
        A child of the current span: open it inside ``server_span``."""
        if self._tracer is None:
            return self._no_attempt
        unsampled = self._unsampled.get()
        if unsampled is not None:
            return _NoScope(_UnsampledAttemptSpan(unsampled))
        attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": gen_ai_provider(provider),
            "gen_ai.system": gen_ai_provider(provider), "gen_ai.request.model": upstream_model,
            "llm_proxy.model": model, "llm_proxy.upstream": upstream, "llm_proxy.attempt": attempt,
        }
        _optional(attrs, "server.address", server_address)
        span = self._tracer.start_span(f"chat {upstream_model}", kind=SpanKind.CLIENT, attributes=attrs)
        return _Scope(span, AttemptSpan(span))

    def inject(self, headers: dict[str, str]) -> None:
        """Adds traceparent/tracestate of the current span; nothing without one."""
        if self._tracer is not None:
            self._propagator.inject(headers)

    def event(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        """An event on the current span (a retry, a failover)."""
        if self._tracer is not None:
            span = trace.get_current_span()
            if span.is_recording():
                span.add_event(name, attributes)

    def shutdown(self) -> None:
        """Flushes spans still queued; call once at exit."""
        if self.provider is not None:
            self.provider.shutdown()


_Parent = Literal["root", "remote_sampled", "remote_unsampled"]
_PARENT_BASED_DELEGATES = MappingProxyType({
    "root": "_root", "remote_sampled": "_remote_parent_sampled",
    "remote_unsampled": "_remote_parent_not_sampled", "local_unsampled": "_local_parent_not_sampled",
})


def _always_drops(sampler: Sampler, parent: _Parent) -> bool:
    """Whether ``sampler`` drops every span with such a parent, and every
    attempt span under it (a local parent that is not sampled): only the
    SDK's own samplers are known; any other may sample."""
    return _drops(sampler, parent) and _drops(sampler, "local_unsampled")


def _drops(sampler: Sampler, parent: _Parent | Literal["local_unsampled"]) -> bool:
    if isinstance(sampler, StaticSampler):
        return sampler.get_description() == ALWAYS_OFF.get_description()
    if isinstance(sampler, TraceIdRatioBased):
        return sampler.bound == 0  # the sampler keeps trace ids below its bound
    if isinstance(sampler, ParentBased):
        # The delegates have no public accessor; without them the SDK decides, span by span.
        chosen = getattr(sampler, _PARENT_BASED_DELEGATES[parent], None)
        return isinstance(chosen, Sampler) and _drops(chosen, "root")
    return False


def _carrier(headers: Headers) -> dict[str, str]:
    if isinstance(headers, Mapping):
        return {k.lower(): v for k, v in headers.items() if k.lower() in _PROPAGATED}
    out: dict[str, str] = {}
    for name, value in headers:
        if name in (b"traceparent", b"tracestate"):  # ASGI header names are lower-case
            out[name.decode()] = value.decode("latin-1")
    return out


def _optional(attrs: dict[str, AttributeValue], name: str, value: AttributeValue | None) -> None:
    if value is not None:
        attrs[name] = value
