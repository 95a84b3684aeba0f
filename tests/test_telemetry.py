"""Metrics, traces and access logs (proxy/telemetry/)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.loader import telemetry_from_env
from proxy.config.types import ModelPrice, TelemetryConfig
from proxy.telemetry.accesslog import AccessLog, configure_access_log
from proxy.telemetry.hub import Telemetry
from proxy.telemetry.metrics import Metrics, Pricing
from proxy.telemetry.tracing import Tracing, build_tracer_provider
from tests.otlp_receiver import OtlpReceiver, attributes

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return parse(body.decode())


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /,
          **labels: str) -> float:
    return all_samples[(metric, frozenset(labels.items()))]


def finish(m: Metrics, **overrides: object) -> None:
    args: dict[str, object] = dict(model="gpt-4o", upstream="openai", team="team-a", key_name="ci",
                                   status=200, duration=1.3, ttft=0.3, overhead=0.0004,
                                   prompt_tokens=100, completion_tokens=50, stream=True)
    args.update(overrides)
    m.request_started()
    m.request_finished(**args)  # type: ignore[arg-type]


# --- metrics ------------------------------------------------------------------


def test_requests_tokens_and_cost_have_exact_counts_and_labels() -> None:
    m = Metrics(pricing=Pricing({"gpt-4o": ModelPrice(input=2.5, output=10.0)}))
    finish(m)
    finish(m)
    finish(m, status=502, prompt_tokens=0, completion_tokens=0, ttft=None)
    finish(m, model="unknown", upstream="", team="", key_name="", status=401, ttft=None,
           prompt_tokens=0, completion_tokens=0, stream=False)
    m.request_started()
    s = samples(m)
    req = "llm_proxy_requests_total"
    assert value(s, req, model="gpt-4o", upstream="openai", team="team-a", key_name="ci",
                 status_class="2xx", status="200") == 2
    assert value(s, req, model="gpt-4o", upstream="openai", team="team-a", key_name="ci",
                 status_class="5xx", status="502") == 1
    assert value(s, req, model="unknown", upstream="", team="", key_name="", status_class="4xx",
                 status="401") == 1
    assert value(s, "llm_proxy_requests_in_flight") == 1
    tok = "llm_proxy_tokens_total"
    assert value(s, tok, model="gpt-4o", team="team-a", key_name="ci", kind="prompt") == 200
    assert value(s, tok, model="gpt-4o", team="team-a", key_name="ci", kind="completion") == 100
    assert value(s, "llm_proxy_cost_usd_total", model="gpt-4o", team="team-a", key_name="ci") == \
        pytest.approx((200 * 2.5 + 100 * 10.0) / 1e6)
    # A request no upstream answered leaves no empty usage series behind.
    assert not any(name.startswith(("llm_proxy_tokens", "llm_proxy_time_to_first_token"))
                   and dict(labels).get("model") == "unknown" for name, labels in s)
    ttft = "llm_proxy_time_to_first_token_seconds_count"
    assert value(s, ttft, model="gpt-4o", upstream="openai") == 2
    assert value(s, "llm_proxy_request_duration_seconds_count", model="gpt-4o", stream="true") == 3
    assert value(s, "llm_proxy_request_duration_seconds_count", model="unknown", stream="false") == 1
    assert value(s, "llm_proxy_gateway_overhead_seconds_count") == 4


def test_unpriced_models_get_no_cost_series_and_pricing_can_change() -> None:
    m = Metrics()
    finish(m, model="llama")
    assert not any(name == "llm_proxy_cost_usd_total" for name, _ in samples(m))
    m.use_pricing(Pricing({"llama": ModelPrice(input=1.0, output=1.0)}))
    finish(m, model="llama", prompt_tokens=1_000_000, completion_tokens=0)
    assert value(samples(m), "llm_proxy_cost_usd_total", model="llama", team="team-a",
                 key_name="ci") == pytest.approx(1.0)
    assert Pricing({"llama": ModelPrice(1.0, 2.0)}).cost("llama", 10, 20) == pytest.approx(50e-6)
    assert Pricing().cost("llama", 10, 20) is None


def test_histogram_buckets_suit_llm_latencies() -> None:
    m = Metrics()
    finish(m, duration=0.004, ttft=250.0, overhead=0.00004)
    s = samples(m)

    def buckets(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for n, labels in s if n == name + "_bucket")

    duration = buckets("llm_proxy_request_duration_seconds")
    ttft = buckets("llm_proxy_time_to_first_token_seconds")
    overhead = buckets("llm_proxy_gateway_overhead_seconds")
    assert duration[0] == 0.005 and duration[-2] == 300.0 and duration[-1] == float("inf")
    assert ttft[0] == 0.005 and ttft[-2] == 300.0
    assert overhead[0] == 0.00005
    d = "llm_proxy_request_duration_seconds_bucket"
    assert value(s, d, model="gpt-4o", stream="true", le="0.005") == 1
    t = "llm_proxy_time_to_first_token_seconds_bucket"
    assert value(s, t, model="gpt-4o", upstream="openai", le="60.0") == 0
    assert value(s, t, model="gpt-4o", upstream="openai", le="300.0") == 1
    assert value(s, "llm_proxy_gateway_overhead_seconds_bucket", le="5e-05") == 1


def test_upstream_quota_store_and_reload_metrics() -> None:
    m = Metrics()
    m.configured(upstreams=["openai", "azure"], models=["gpt-4o"])
    m.attempt("openai", "429", 0.2)
    m.attempt("openai", "429", 0.3)
    m.attempt("azure", "ok", 0.5)
    m.failover("gpt-4o", "openai")
    m.cooldown("openai", 7.0)
    m.upstream_state("openai", "cooling_down")
    m.upstream_state("azure", "healthy")
    m.quota_rejected("rpm", "team-a", "ci")
    m.budget_remaining("team", "team-a", "tokens_per_day", 1234.0, total=5000.0)
    m.store_error("reserve")
    m.store_latency("reserve", 0.002)
    m.config_reload("error")
    m.auth_failure("invalid_key")
    s = samples(m)
    att = "llm_proxy_upstream_attempts_total"
    assert value(s, att, upstream="openai", outcome="429") == 2
    assert value(s, att, upstream="azure", outcome="ok") == 1
    assert value(s, att, upstream="openai", outcome="ok") == 0  # declared by configured()
    assert value(s, "llm_proxy_upstream_attempt_duration_seconds_count", upstream="openai",
                 outcome="429") == 2
    assert value(s, "llm_proxy_failovers_total", model="gpt-4o") == 1
    assert value(s, "llm_proxy_upstream_cooldowns_total", upstream="openai") == 1
    assert value(s, "llm_proxy_upstream_cooldowns_total", upstream="azure") == 0
    assert value(s, "llm_proxy_upstream_cooldown_seconds_total", upstream="openai") == 7.0
    states = {dict(labels)["state"]: v for (name, labels), v in s.items()
              if name == "llm_proxy_upstream_state" and dict(labels)["upstream"] == "openai"}
    assert states == {"healthy": 0, "cooling_down": 1, "ejected": 0, "half_open": 0, "credentials_bad": 0}
    assert value(s, "llm_proxy_quota_rejections_total", limit="rpm", team="team-a", key_name="ci") == 1
    b = dict(scope="team", name="team-a", limit="tokens_per_day")
    assert value(s, "llm_proxy_budget_remaining_tokens", **b) == 1234.0
    assert value(s, "llm_proxy_budget_limit_tokens", **b) == 5000.0
    assert value(s, "llm_proxy_store_errors_total", operation="reserve") == 1
    assert value(s, "llm_proxy_store_latency_seconds_count", operation="reserve") == 1
    assert value(s, "llm_proxy_config_reloads_total", outcome="error") == 1
    assert value(s, "llm_proxy_config_reloads_total", outcome="ok") == 0
    assert value(s, "llm_proxy_config_last_reload_successful") == 0
    assert value(s, "llm_proxy_auth_failures_total", reason="invalid_key") == 1

    m.configured(upstreams=["azure"], models=["gpt-4o"])  # openai removed by a reload
    gone = [v for (name, labels), v in samples(m).items()
            if name == "llm_proxy_upstream_state" and dict(labels)["upstream"] == "openai"]
    assert gone and all(v == 0 for v in gone)


def test_the_hot_path_binds_labels_once(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Metrics(pricing=Pricing({"gpt-4o": ModelPrice(1.0, 1.0)}))

    def calls() -> None:
        finish(m)
        m.attempt("openai", "ok", 0.1)
        m.upstream_state("openai", "healthy")
        m.quota_rejected("rpm", "team-a", "ci")
        m.store_latency("reserve", 0.001)

    calls()

    def no_labels(self: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(".labels() called on the hot path")

    for cls in (Counter, Gauge, Histogram):
        monkeypatch.setattr(cls, "labels", no_labels)
    calls()
    assert value(samples(m), "llm_proxy_requests_total", model="gpt-4o", upstream="openai", team="team-a",
                 key_name="ci", status_class="2xx", status="200") == 2


def test_two_metrics_objects_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()
    finish(a)
    assert not any(name == "llm_proxy_requests_total" for name, _ in samples(b))


def test_multiprocess_without_the_variable_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(multiprocess_dir=str(tmp_path))


_WORKER = textwrap.dedent("""
    import os, sys
    from proxy.telemetry.metrics import Metrics
    m = Metrics(multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    worker = int(sys.argv[1])
    sys.stdin.readline()  # both workers alive before either writes
    for _ in range(3 + worker):
        m.request_started()
        m.request_finished(model="gpt-4o", upstream="openai", team="team-a", key_name="ci", status=200,
                           duration=0.2, ttft=0.1, overhead=0.0003, prompt_tokens=10,
                           completion_tokens=5, stream=False)
    m.request_started()  # one left in flight in each worker
    m.upstream_state("openai", "ejected" if worker else "healthy")
    m.attempt("openai", "ok", 0.1)
    print("done", flush=True)
    sys.stdin.readline()
""")

_RENDER = textwrap.dedent("""
    import os, sys
    from proxy.telemetry.metrics import Metrics
    body, _ = Metrics(multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"]).render()
    sys.stdout.write(body.decode())
""")


def test_multiprocess_metrics_aggregate_across_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i)], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) for i in (0, 1)]
    try:
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "done"
        rendered = subprocess.run([sys.executable, "-c", _RENDER], env=env, text=True,
                                  capture_output=True, check=True).stdout
    finally:
        for w in workers:
            w.communicate("exit\n", timeout=10)
    assert len(list(tmp_path.glob("*.db"))) >= 2
    s = parse(rendered)
    assert value(s, "llm_proxy_requests_total", model="gpt-4o", upstream="openai", team="team-a",
                 key_name="ci", status_class="2xx", status="200") == 3 + 4
    assert value(s, "llm_proxy_tokens_total", model="gpt-4o", team="team-a", key_name="ci",
                 kind="prompt") == 70
    assert value(s, "llm_proxy_request_duration_seconds_count", model="gpt-4o", stream="false") == 7
    assert value(s, "llm_proxy_request_duration_seconds_bucket", model="gpt-4o", stream="false",
                 le="0.25") == 7
    assert value(s, "llm_proxy_requests_in_flight") == 2  # livesum
    assert value(s, "llm_proxy_upstream_attempts_total", upstream="openai", outcome="ok") == 2
    # livemax: 1 where any worker sees that state
    assert value(s, "llm_proxy_upstream_state", upstream="openai", state="healthy") == 1
    assert value(s, "llm_proxy_upstream_state", upstream="openai", state="ejected") == 1
    assert value(s, "llm_proxy_upstream_state", upstream="openai", state="half_open") == 0
    assert value(s, "llm_proxy_config_last_reload_successful") == 1


# --- tracing ------------------------------------------------------------------


def tracing_with_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def one_request(tracing: Tracing, traceparent: str | None, fail_first: bool = True) -> list[dict[str, str]]:
    """What the request path does: a server span, attempts inside it; returns the headers sent upstream."""
    headers = [(b"content-type", b"application/json")]
    if traceparent:
        headers.append((b"traceparent", traceparent.encode()))
    sent: list[dict[str, str]] = []
    events = Telemetry(Metrics(), tracing, AccessLog(logging.getLogger("t"))).events()
    with tracing.server_span("POST /v1/chat/completions", headers) as span:
        span.request(model="gpt-4o", stream=False, team="team-a", key_name="ci", max_tokens=256,
                     temperature=0.2)
        upstreams = ["openai", "azure"] if fail_first else ["azure"]
        for n, upstream in enumerate(upstreams, 1):
            provider = "azure" if upstream == "azure" else "openai"
            with tracing.attempt_span(upstream=upstream, provider=provider, model="gpt-4o",
                                      upstream_model="gpt-4o-prod", attempt=n,
                                      server_address=f"{upstream}.example") as attempt:
                out: dict[str, str] = {}
                attempt.inject(out)
                sent.append(out)
                if upstream == "openai":
                    attempt.result("429", 429)
                    events.attempt(upstream, "429", 0.1)
                else:
                    attempt.result("ok", 200, model="gpt-4o-2024-08-06", input_tokens=12, output_tokens=7)
            if upstream == "openai":
                events.failover("gpt-4o", "openai")
        span.response(status=200, upstream="azure", model="gpt-4o-2024-08-06", input_tokens=12,
                      output_tokens=7, attempts=len(upstreams))
    return sent


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind]


def test_server_span_continues_the_client_trace_with_attempt_children() -> None:
    tracing, exporter = tracing_with_memory()
    sent = one_request(tracing, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    attempts = by_kind(spans, SpanKind.CLIENT)
    assert len(spans) == 3 and len(attempts) == 2
    assert format(server.context.trace_id, "032x") == CLIENT_TRACE
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.request.stream": False,
        "gen_ai.request.max_tokens": 256, "gen_ai.request.temperature": 0.2,
        "llm_proxy.team": "team-a", "llm_proxy.key_name": "ci", "http.response.status_code": 200,
        "llm_proxy.upstream": "azure", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 7, "llm_proxy.attempts": 2,
    }
    assert [e.name for e in server.events] == ["llm_proxy.failover"]
    assert dict(server.events[0].attributes or {}) == {"llm_proxy.model": "gpt-4o",
                                                        "llm_proxy.from_upstream": "openai"}
    for n, (attempt, headers) in enumerate(zip(attempts, sent, strict=True), 1):
        assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
        assert attempt.context.trace_id == server.context.trace_id
        assert attempt.name == "chat gpt-4o-prod"
        assert attempt.attributes is not None and attempt.attributes["llm_proxy.attempt"] == n
        # the upstream is told this attempt is its parent
        assert headers["traceparent"] == f"00-{CLIENT_TRACE}-{attempt.context.span_id:016x}-01"
    failed, ok = attempts
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["error.type"] == "429"
    assert failed.attributes["gen_ai.provider.name"] == "openai"
    assert ok.status.status_code == StatusCode.UNSET
    assert ok.attributes is not None and ok.attributes["gen_ai.system"] == "azure.ai.openai"
    assert ok.attributes["gen_ai.usage.output_tokens"] == 7
    assert ok.attributes["server.address"] == "azure.example"


def test_without_traceparent_a_new_trace_starts() -> None:
    tracing, exporter = tracing_with_memory()
    one_request(tracing, None, fail_first=False)
    server = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)[0]
    assert server.parent is None and server.context.trace_id != int(CLIENT_TRACE, 16)


def test_server_errors_mark_the_span_and_exceptions_end_it() -> None:
    tracing, exporter = tracing_with_memory()
    with tracing.server_span("POST /v1/chat/completions", {}) as span:
        span.response(status=503)
    with pytest.raises(RuntimeError), tracing.server_span("POST /v1/chat/completions", {}):
        raise RuntimeError("boom")
    with pytest.raises(TimeoutError), tracing.attempt_span(upstream="u", provider="openai", model="m",
                                                           upstream_model="m", attempt=1):
        raise TimeoutError
    first, second, attempt = exporter.get_finished_spans()
    assert first.status.status_code == StatusCode.ERROR
    assert [e.name for e in second.events] == ["exception"]
    assert attempt.status.status_code == StatusCode.ERROR
    assert attempt.attributes is not None and attempt.attributes["error.type"] == "TimeoutError"


def test_a_client_trace_that_is_not_sampled_records_nothing_but_still_propagates() -> None:
    tracing, exporter = tracing_with_memory()
    sent = one_request(tracing, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")
    assert exporter.get_finished_spans() == ()
    assert all(h["traceparent"].startswith(f"00-{CLIENT_TRACE}-") and h["traceparent"].endswith("-00")
               for h in sent)


def _dropping(sampler: Sampler) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    assert tracing._tracer is not None

    def no_sdk_span(*args: object, **kwargs: object) -> None:
        raise AssertionError("a span the sampler drops was started")

    tracing._tracer.start_span = no_sdk_span  # type: ignore[method-assign,assignment]
    return tracing, exporter


@pytest.mark.parametrize("sampler", [ALWAYS_OFF, TraceIdRatioBased(0), ParentBased(ALWAYS_OFF),
                                     ParentBasedTraceIdRatio(0)], ids=["always_off", "ratio_0",
                                                                       "parentbased_always_off",
                                                                       "parentbased_ratio_0"])
def test_a_sampler_that_only_drops_starts_no_span_but_the_trace_still_propagates(sampler: Sampler) -> None:
    tracing, exporter = _dropping(sampler)
    sent = one_request(tracing, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00")  # not sampled: no sampler may keep it
    assert exporter.get_finished_spans() == ()
    assert [h["traceparent"][:35] for h in sent] == [f"00-{CLIENT_TRACE}"] * 2
    assert all(h["traceparent"].endswith("-00") for h in sent)
    assert sent[0]["traceparent"] != sent[1]["traceparent"]  # each attempt is its own (dropped) span
    with tracing.server_span("POST /v1/chat/completions", []) as span:  # no client trace: a new one
        with tracing.attempt_span(upstream="u", provider="openai", model="m", upstream_model="m",
                                  attempt=1) as attempt:
            out: dict[str, str] = {}
            attempt.inject(out)
        assert len(span.trace_id) == 32 and span.trace_id != CLIENT_TRACE
        assert out["traceparent"].startswith(f"00-{span.trace_id}-") and out["traceparent"].endswith("-02")


def test_dropped_spans_carry_what_the_sdk_would_have_sent() -> None:
    """The shortcut against the SDK itself, header for header (span ids aside)."""
    cases = [[], [(b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()), (b"tracestate", b"a=1, b=2")],
             [(b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-02".encode())],
             [(b"traceparent", b"00-garbage")], [(b"tracestate", b"a=1")]]
    for headers in cases:
        sdk = Tracing(TracerProvider(sampler=ALWAYS_OFF))
        sdk._unsampled_trace = lambda parent: None  # type: ignore[method-assign]  # force the SDK's path
        fast, _ = _dropping(ALWAYS_OFF)
        seen = []
        for tracing in (sdk, fast):
            with tracing.server_span("POST /v1/chat/completions", headers) as span:
                with tracing.attempt_span(upstream="u", provider="openai", model="m", upstream_model="m",
                                          attempt=1) as attempt:
                    out: dict[str, str] = {}
                    attempt.inject(out)
                version, trace_id, span_id, flags = out["traceparent"].split("-")
                assert trace_id == span.trace_id and len(span_id) == 16
                seen.append((version, trace_id if headers and b"00-0af7" in headers[0][1] else "new", flags,
                             out.get("tracestate")))
        assert seen[0] == seen[1], headers


def test_a_sampler_that_may_keep_a_span_still_gets_sdk_spans() -> None:
    # a sampled client trace under parent-based: recorded, server span and attempt
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    one_request(tracing, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", fail_first=False)
    assert len(exporter.get_finished_spans()) == 2
    # samplers that may keep a root span, or an attempt under a dropped one, are left to the SDK
    for sampler in (TraceIdRatioBased(0.5), ALWAYS_ON, ParentBased(ALWAYS_OFF, local_parent_not_sampled=ALWAYS_ON)):
        assert Tracing(TracerProvider(sampler=sampler))._unsampled_trace(Context()) is None


def test_no_provider_means_no_spans_and_no_headers() -> None:
    tracing = Tracing(None)
    assert not tracing.enabled
    first = tracing.server_span("POST /v1/chat/completions", [(b"traceparent", b"x")])
    assert first is tracing.server_span("POST /v1/chat/completions", [])  # one shared no-op
    sent = one_request(tracing, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
    assert sent == [{}, {}]
    out: dict[str, str] = {}
    tracing.inject(out)
    assert out == {}
    with tracing.server_span("x", []) as span:
        assert span.trace_id == ""
    tracing.shutdown()


def test_tracing_needs_an_endpoint_and_respects_the_sdk_switches() -> None:
    assert telemetry_from_env({}) == TelemetryConfig()
    assert build_tracer_provider(telemetry_from_env({})) is None
    on = telemetry_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert on.tracing and on.otlp_endpoint == "http://127.0.0.1:4318"
    signal = telemetry_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert signal.otlp_endpoint == "http://c:4318/v1/traces"
    assert not telemetry_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                                   "OTEL_SDK_DISABLED": "true"}).tracing
    assert not telemetry_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                                   "OTEL_TRACES_EXPORTER": "none"}).tracing
    assert telemetry_from_env({"PROMETHEUS_MULTIPROC_DIR": "/tmp/m"}).multiprocess_dir == "/tmp/m"
    tel = Telemetry.build(TelemetryConfig())
    assert not tel.tracing.enabled and tel.tracing.provider is None


def test_spans_reach_an_otlp_http_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    with OtlpReceiver() as receiver:
        # The SDK's exporter reads these itself, as in production.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        provider = build_tracer_provider(telemetry_from_env(os.environ))
        assert provider is not None
        tracing = Tracing(provider)
        one_request(tracing, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
        tracing.shutdown()  # flushes the batch processor
        spans = receiver.wait_for(lambda got: len(got) >= 3)
    assert {s.trace_id.hex() for s in spans} == {CLIENT_TRACE}
    server = next(s for s in spans if s.kind == s.SPAN_KIND_SERVER)
    assert attributes(server)["gen_ai.request.model"] == "gpt-4o"
    assert server.parent_span_id.hex() == CLIENT_SPAN
    assert sum(s.parent_span_id == server.span_id for s in spans) == 2
    assert receiver.resources[0]["service.name"] == "llm-proxy"


# --- access log ---------------------------------------------------------------


def test_access_log_is_one_json_line_without_secrets() -> None:
    stream = io.StringIO()
    log = configure_access_log("info", "json", stream, name="test.access.json")
    log.write({"request_id": "r-1", "trace_id": CLIENT_TRACE, "team": "team-a", "key_name": "ci",
               "model": "gpt-4o", "upstream": "openai", "status": 200, "stream": True,
               "prompt_tokens": 12, "completion_tokens": 7, "duration_ms": 812.34567, "ttft_ms": 101.5,
               "authorization": "Bearer sk-secret", "api_key": "sk-secret",
               "messages": [{"role": "user", "content": "my secret prompt"}], "prompt": "hello",
               "model_note": "sk-secret", "upstream_model": None})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert "sk-secret" not in lines[0] and "prompt\"" not in lines[0] and "secret prompt" not in lines[0]
    assert record.pop("ts").endswith("Z")
    assert record == {"msg": "access", "request_id": "r-1", "trace_id": CLIENT_TRACE, "team": "team-a",
                      "key_name": "ci", "model": "gpt-4o", "upstream": "openai", "status": 200,
                      "stream": True, "prompt_tokens": 12, "completion_tokens": 7,
                      "duration_ms": 812.346, "ttft_ms": 101.5}


def test_access_log_text_format_and_level() -> None:
    stream = io.StringIO()
    log = configure_access_log("info", "text", stream, name="test.access.text")
    log.write({"request_id": "r 2", "status": 429, "model": "x" * 500, "stream": False})
    line = stream.getvalue().strip()
    assert " msg=access request_id=\"r 2\" status=429 model=" + "x" * 200 + " stream=false" in line
    quiet = io.StringIO()
    configure_access_log("warning", "json", quiet, name="test.access.quiet").write({"status": 200})
    assert quiet.getvalue() == ""


async def test_access_lines_of_one_loop_iteration_leave_in_one_write() -> None:
    class Counting(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            Counting.writes += 1
            return super().write(text)

    stream = Counting()
    log = configure_access_log("info", "json", stream, name="test.access.batched")
    for n in range(3):
        log.write({"status": 200, "attempts": n})
    assert stream.getvalue() == ""  # not yet: at the end of this iteration
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["attempts"] for line in lines] == [0, 1, 2] and Counting.writes == 1
    stamp = json.loads(lines[0])["ts"]  # as datetime.isoformat(timespec="milliseconds") wrote it
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    assert abs(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - time.time()) < 5
    log.write({"status": 500})
    log.flush()  # what the app does at shutdown
    assert json.loads(stream.getvalue().splitlines()[-1])["status"] == 500
    await asyncio.sleep(0)
    assert len(stream.getvalue().splitlines()) == 4
