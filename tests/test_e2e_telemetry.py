"""Metrics, traces and access logs from a real gateway process after known traffic."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import httpx
import openai
import orjson

from tests.gateway_process import GatewayProcess
from tests.otlp_receiver import OtlpReceiver
from tests.stub_upstream import Behaviour, StubUpstream

KEY = "sk-telemetry-test"
MESSAGES = [{"role": "user", "content": "count my tokens please"}]


def _config(stub: StubUpstream, stub2: StubUpstream) -> str:
    return f"""
upstreams:
  - {{name: main, base_url: '{stub.url}', models: [m]}}
  - {{name: backup, base_url: '{stub2.url}', models: [m], priority: 1}}
keys: [{{name: app, key: {KEY}, team: team-a, limits: {{rpm: 4}}}}]
pricing: {{m: {{input: 1.0, output: 2.0}}}}
"""


def _sample(metrics: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_known_traffic_exactly(gateway: Callable[..., GatewayProcess], stub: StubUpstream,
                                             stub2: StubUpstream) -> None:
    gw = gateway(_config(stub, stub2))
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    stub.behave("status", status=500)
    client.chat.completions.create(model="m", messages=MESSAGES)  # fails over to backup  # type: ignore[arg-type]
    client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    with contextlib.suppress(openai.RateLimitError):  # the 5th in a minute: rpm 4
        client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    httpx.post(gw.url + "/v1/chat/completions", json={}, headers={"Authorization": "Bearer sk-nope"})
    text = httpx.get(gw.url + "/metrics").text

    ok = {"model": "m", "team": "team-a", "key_name": "app"}
    assert _sample(text, "llm_proxy_requests_total", status="200", upstream="main", **ok) == 2
    assert _sample(text, "llm_proxy_requests_total", status="200", upstream="backup", **ok) == 2
    assert _sample(text, "llm_proxy_requests_total", status="429") == 1
    assert _sample(text, "llm_proxy_quota_rejections_total", limit="rpm", team="team-a", key_name="app") == 1
    assert _sample(text, "llm_proxy_upstream_attempts_total", upstream="main", outcome="5xx") == 2
    assert _sample(text, "llm_proxy_failovers_total", model="m") == 2
    assert _sample(text, "llm_proxy_auth_failures_total") == 1
    assert _sample(text, "llm_proxy_requests_in_flight") == 0
    # Four answers of 8 completion tokens each, all counted, streamed or not.
    assert _sample(text, "llm_proxy_tokens_total", kind="completion", **ok) == 32
    prompt = _sample(text, "llm_proxy_tokens_total", kind="prompt", **ok)
    assert prompt == 4 * orjson.loads(stub.chat_requests[0].sent)["usage"]["prompt_tokens"]
    cost = _sample(text, "llm_proxy_cost_usd_total", model="m")
    assert abs(cost - (prompt * 1.0 + 32 * 2.0) / 1e6) < 1e-12
    assert _sample(text, "llm_proxy_upstream_state", upstream="main", state="healthy") == 1
    assert "sk-" not in text  # no key ever becomes a label


def test_traces_continue_the_clients_trace_and_reach_the_upstream(
        gateway: Callable[..., GatewayProcess], stub: StubUpstream, stub2: StubUpstream) -> None:
    with OtlpReceiver() as receiver:
        gw = gateway(_config(stub, stub2), env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                                                "OTEL_BSP_SCHEDULE_DELAY": "100"})
        stub.queue(Behaviour("status", {"status": 500}))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        resp = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                          headers={"Authorization": f"Bearer {KEY}",
                                   "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                          json={"model": "m", "messages": MESSAGES, "max_tokens": 5})
        assert resp.status_code == 200
        spans = receiver.wait_for(lambda s: len(s) >= 3)
    by_kind: dict[int, list] = {}  # type: ignore[type-arg]
    for span in spans:
        assert span.trace_id.hex() == trace_id
        by_kind.setdefault(span.kind, []).append(span)
    (server,) = by_kind[2]  # SPAN_KIND_SERVER
    attempts = by_kind[3]  # SPAN_KIND_CLIENT
    assert len(attempts) == 2 and all(a.parent_span_id == server.span_id for a in attempts)
    attrs = {a.key: a.value for a in server.attributes}
    assert attrs["gen_ai.request.model"].string_value == "m"
    assert attrs["gen_ai.usage.output_tokens"].int_value == 5
    assert attrs["llm_proxy.team"].string_value == "team-a"
    assert any(e.name == "llm_proxy.failover" for e in server.events)
    # Each upstream saw a traceparent naming its own attempt span as parent.
    for seen in (stub.chat_requests[-1], stub2.chat_requests[-1]):
        parent = seen.headers["traceparent"].split("-")
        assert parent[1] == trace_id
        assert parent[2] in {a.span_id.hex() for a in attempts}
    assert all(KEY not in str(span) for span in spans)


def test_access_log_is_one_json_line_per_request_without_secrets(
        gateway: Callable[..., GatewayProcess], stub: StubUpstream, stub2: StubUpstream) -> None:
    gw = gateway(_config(stub, stub2))
    httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                         "x-request-id": "req-42"},
               json={"model": "m", "messages": MESSAGES})
    deadline = time.monotonic() + 30  # the line is written after the answer is sent
    while True:
        lines = [line for line in gw.log().splitlines() if line.startswith('{"ts"')]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert entry["request_id"] == "req-42" and entry["status"] == 200 and entry["team"] == "team-a"
    assert entry["key_name"] == "app" and entry["upstream"] == "main" and entry["completion_tokens"] == 8
    assert KEY not in gw.log() and "count my tokens" not in gw.log()
    assert re.search(r"sk-[A-Za-z0-9]", gw.log()) is None


def test_budget_gauges_are_refreshed_from_the_store(gateway: Callable[..., GatewayProcess],
                                                     stub: StubUpstream) -> None:
    gw = gateway(f"""
upstreams: [{{name: main, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: app, key: {KEY}, team: team-a, limits: {{tokens_per_day: 1000}}}}]
teams: [{{name: team-a, limits: {{tokens_per_month: 50000}}}}]
""")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    # max_tokens: without it the estimate (4096 tokens) would not fit in the day's 1000.
    used = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16).usage  # type: ignore[arg-type]
    assert used is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(gw.url + "/metrics").text
        if _sample(text, "llm_proxy_budget_remaining_tokens", scope="key", name="app",
                   limit="tokens_per_day") == 1000 - used.total_tokens:
            break
        time.sleep(0.5)
    assert _sample(text, "llm_proxy_budget_remaining_tokens", scope="key", name="app",
                   limit="tokens_per_day") == 1000 - used.total_tokens
    assert _sample(text, "llm_proxy_budget_remaining_tokens", scope="team", name="team-a",
                   limit="tokens_per_month") == 50000 - used.total_tokens
    assert _sample(text, "llm_proxy_budget_limit_tokens", scope="team", name="team-a",
                   limit="tokens_per_month") == 50000
