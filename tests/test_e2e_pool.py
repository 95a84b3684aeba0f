"""The pool in production (issue: health, balancing, reload, shutdown), seen
from outside: real gateway processes, real upstream servers, real signals."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx

from tests.gateway_process import GatewayProcess
from tests.stub_upstream import Behaviour, StubUpstream

KEY = "sk-pool-test"
MESSAGES = [{"role": "user", "content": "hello"}]
StartGateway = Callable[..., GatewayProcess]
AUTH = {"Authorization": f"Bearer {KEY}"}


def _config(upstreams: str, extra: str = "") -> str:
    return f"upstreams:\n{upstreams}\nkeys: [{{name: t, key: {KEY}}}]\n{extra}"


def _post(gw: GatewayProcess, model: str = "m", stream: bool = False, timeout: float = 30) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, timeout=timeout,
                      json={"model": model, "messages": MESSAGES, "stream": stream})


def _stream_in_background(gw: GatewayProcess) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def run() -> None:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={"model": "m", "messages": MESSAGES, "stream": True}) as resp:
            result["status"] = resp.status_code
            result["upstream"] = resp.headers.get("x-llm-proxy-upstream")
            result["body"] = b"".join(resp.iter_raw())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _refuses_connections(gw: GatewayProcess) -> bool:
    try:
        httpx.get(gw.url + "/healthz", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def _wait_for(predicate: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_reload_on_file_change_keeps_running_stream_on_old_pool(gateway: StartGateway, stub: StubUpstream,
                                                               stub2: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}",
                         "server: {reload_interval: 0.2}"))
    stub.behave("slow", delay=0.1)  # 14 events: about 1.3 s
    thread, result = _stream_in_background(gw)
    _wait_for(lambda: stub.in_flight == 1)
    gw.config_path.write_text(_config(f"  - {{name: b, base_url: '{stub2.url}', models: [m]}}",
                                      "server: {reload_interval: 0.2}"))
    _wait_for(lambda: _post(gw).headers.get("x-llm-proxy-upstream") == "b")
    thread.join(10)
    assert result["status"] == 200 and result["upstream"] == "a"
    assert bytes(result["body"]).endswith(b"data: [DONE]\n\n")  # type: ignore[call-overload]
    assert "config reloaded" in gw.log()


def test_sighup_reloads_and_a_bad_config_is_rejected(gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}",
                         "server: {reload_interval: 0}"))
    gw.config_path.write_text(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m, m2]}}"))
    gw.signal(signal.SIGHUP)
    _wait_for(lambda: _post(gw, "m2").status_code == 200)
    gw.config_path.write_text("upstreams: [{name: broken, base_url: 'nope', models: []}]\n")
    gw.signal(signal.SIGHUP)
    _wait_for(lambda: "config reload rejected" in gw.log())
    assert "upstreams[0].base_url" in gw.log()
    assert _post(gw, "m2").status_code == 200  # the old config still serves


def test_sigterm_fails_readiness_at_once_finishes_streams_then_refuses(
        gateway: StartGateway, stub: StubUpstream) -> None:
    # The delay is long enough for a busy machine to ask /readyz and send a request within it.
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}",
                         "server: {shutdown_delay: 5, shutdown_grace: 30}"))
    stub.behave("slow", delay=0.6)  # about 8 s: longer than the delay
    thread, result = _stream_in_background(gw)
    _wait_for(lambda: stub.in_flight == 1)
    gw.signal(signal.SIGTERM)
    _wait_for(lambda: httpx.get(gw.url + "/readyz").status_code == 503, 5)
    assert _post(gw).status_code == 200  # still serving during the delay
    _wait_for(lambda: _refuses_connections(gw))
    thread.join(30)
    assert result["status"] == 200 and bytes(result["body"]).endswith(b"data: [DONE]\n\n")  # type: ignore[call-overload]
    assert gw.wait(10) == 0


def test_active_check_ejects_before_users_notice_and_readmits(gateway: StartGateway, stub: StubUpstream,
                                                             stub2: StubUpstream) -> None:
    check = "health_check: {interval: 0.2, timeout: 1, unhealthy_threshold: 2}"
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m], {check}}}\n"
                         f"  - {{name: b, base_url: '{stub2.url}', models: [m], priority: 1}}",
                         "health: {base_ejection: 0.5, max_ejection: 1}"))
    checks = lambda: sum(s.path == "/v1/models" for s in stub.seen)  # noqa: E731
    passed = checks()  # checks that ran before the upstream broke passed (a busy machine starts slowly)
    stub.models_status = 503
    # Checks run one after another: when the third since the break arrives, its second failure was counted.
    _wait_for(lambda: checks() >= passed + 3)
    assert {_post(gw).headers["x-llm-proxy-upstream"] for _ in range(3)} == {"b"}
    assert stub.chat_requests == []  # no user request went to the broken upstream
    assert all(s.path == "/v1/models" for s in stub.seen)
    stub.models_status = 200
    _wait_for(lambda: _post(gw).headers["x-llm-proxy-upstream"] == "a")


def test_fallback_model_serves_when_every_own_upstream_is_down(gateway: StartGateway, stub: StubUpstream,
                                                              stub2: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [big]}}\n"
                         f"  - {{name: b, base_url: '{stub2.url}', models: [small]}}",
                         "models: {big: {fallbacks: [small]}}"))
    assert "x-llm-proxy-fallback-model" not in _post(gw, "big").headers
    stub.behave("status", status=503)
    resp = _post(gw, "big")
    assert resp.status_code == 200 and resp.headers["x-llm-proxy-fallback-model"] == "small"
    assert stub2.chat_requests[-1].body["model"] == "small"


def test_retry_budget_stops_a_failing_provider_from_multiplying_traffic(
        gateway: StartGateway, stub: StubUpstream, stub2: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}\n"
                         f"  - {{name: b, base_url: '{stub2.url}', models: [m]}}",
                         "routing: {strategy: round_robin, retry_budget: 0.1, min_retries_per_second: 0}\n"
                         "health: {failure_threshold: 1000}"))
    stub.behave("status", status=500)
    stub2.behave("status", status=500)
    requests = 60
    statuses = Counter(_post(gw).status_code for _ in range(requests))
    attempts = len(stub.chat_requests) + len(stub2.chat_requests)
    assert statuses[502] + statuses[503] == requests
    assert attempts <= requests + 10 + requests * 0.1 + 1  # the burst of 10, then 10%


def test_wait_for_cooldown_rides_out_a_short_429(gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}",
                         "routing: {wait_for_cooldown: true, deadline: 30}"))
    stub.queue("429")  # Retry-After: 1
    started = time.monotonic()
    resp = _post(gw)
    assert resp.status_code == 200
    assert time.monotonic() - started >= 0.9  # it waited out the cooldown instead of failing at once
    assert len(stub.chat_requests) == 2


def test_weighted_strategy_shares_real_traffic(gateway: StartGateway, stub: StubUpstream,
                                               stub2: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m], weight: 1}}\n"
                         f"  - {{name: b, base_url: '{stub2.url}', models: [m], weight: 3}}",
                         "routing: {strategy: weighted}"))
    counts = Counter(_post(gw).headers["x-llm-proxy-upstream"] for _ in range(40))
    assert counts == {"a": 10, "b": 30}


def test_least_requests_avoids_a_slow_upstream(gateway: StartGateway, stub: StubUpstream,
                                              stub2: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}\n"
                         f"  - {{name: b, base_url: '{stub2.url}', models: [m]}}",
                         "routing: {strategy: least_requests}"))
    stub.behave("slow", delay=0.3)
    threads = [threading.Thread(target=_post, args=(gw, "m", True)) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(20)
    # Streams to the slow upstream pile up, so later requests go to the fast one.
    assert len(stub2.chat_requests) >= 3


def test_admin_upstreams_shows_live_state(gateway: StartGateway, stub: StubUpstream, stub2: StubUpstream) -> None:
    gw = gateway(_config(f"  - {{name: a, base_url: '{stub.url}', models: [m]}}\n"
                         f"  - {{name: b, base_url: '{stub2.url}', models: [m], priority: 1}}",
                         "admin_key: sk-admin-pool"))
    stub.queue(Behaviour("429", {"retry_after": 30}))
    assert _post(gw).headers["x-llm-proxy-upstream"] == "b"
    admin = {"Authorization": "Bearer sk-admin-pool"}
    assert httpx.get(gw.url + "/admin/upstreams").status_code == 401
    views = {u["name"]: u for u in httpx.get(gw.url + "/admin/upstreams", headers=admin).json()["data"]}
    assert views["a"]["state"] == "cooling_down" and views["a"]["until"].endswith("Z")
    assert views["a"]["recent_errors"][-1]["outcome"] == "429"
    assert views["b"]["state"] == "healthy" and views["b"]["ttfb_ewma_ms"] is not None
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'llm_proxy_upstream_state{state="cooling_down",upstream="a"} 1.0' in metrics
    assert 'llm_proxy_upstream_cooldowns_total{upstream="a"} 1.0' in metrics
