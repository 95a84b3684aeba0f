"""Failover and timeouts as a client sees them (README.md, "The pool in production"), with real
upstream servers switched into failure at run time."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from tests.gateway_process import GatewayProcess
from tests.stub_upstream import Behaviour, StubUpstream, free_port

KEY = "sk-failover-test"
MESSAGES = [{"role": "user", "content": "hello"}]
StartGateway = Callable[..., GatewayProcess]


def _config(*upstreams: str, strategy: str = "round_robin", attempts: int = 3, deadline: float = 10) -> str:
    ups = "\n".join(upstreams)
    return f"""
upstreams:
{ups}
routing: {{strategy: {strategy}, max_attempts: {attempts}, deadline: {deadline}}}
keys: [{{name: t, key: {KEY}}}]
"""


def _up(name: str, url: str, priority: int = 0, first_byte: float = 2, idle: float = 2,
        total: float = 30) -> str:
    return (f"  - {{name: {name}, base_url: '{url}', models: [m], priority: {priority}, "
            f"timeout: {{connect: 1, first_byte: {first_byte}, idle: {idle}, total: {total}}}}}")


def _client(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _eventually(condition: Callable[[], bool], within: float) -> bool:
    """Poll until the condition holds; a generous bound, so a busy machine only makes it slower."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _post(gw: GatewayProcess, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "m", "messages": MESSAGES, "stream": stream})


@pytest.mark.parametrize("failure", ["500", "502", "503", "504", "429", "garbage", "html_error",
                                     "error_200", "reset", "hang", "hang_body"])
def test_each_retryable_failure_moves_on_to_the_next_upstream(
        gateway: StartGateway, stub: StubUpstream, stub2: StubUpstream, failure: str) -> None:
    gw = gateway(_config(_up("a", stub.url, first_byte=0.5, total=1), _up("b", stub2.url, priority=1)))
    if failure.isdigit() and failure != "429":
        stub.behave("status", status=int(failure))
    else:
        stub.behave(failure)
    for stream in (False, True):
        resp = _post(gw, stream)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-llm-proxy-upstream"] == "b"
        if stream:
            assert resp.text.endswith("data: [DONE]\n\n")
    assert stub2.chat_requests


def test_unreachable_upstream_is_skipped(gateway: StartGateway, stub: StubUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = gateway(_config(_up("dead", dead), _up("b", stub.url, priority=1)))
    completion = _client(gw).chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content


def test_429_retry_after_cools_the_upstream_down_exactly_that_long(
        gateway: StartGateway, stub: StubUpstream, stub2: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url), _up("b", stub2.url)))
    stub.queue(Behaviour("429", {"retry_after": 2}))
    # Round robin would alternate; during the cooldown every request goes to b.
    first = [_post(gw).headers["x-llm-proxy-upstream"] for _ in range(6)]
    assert first.count("a") == 0 and len(stub.chat_requests) == 1
    time.sleep(2.2)
    later = {_post(gw).headers["x-llm-proxy-upstream"] for _ in range(4)}
    assert later == {"a", "b"}


def test_all_candidates_failing_is_502_quickly(gateway: StartGateway, stub: StubUpstream,
                                               stub2: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url), _up("b", stub2.url)))
    stub.behave("status", status=500)
    stub2.behave("status", status=503)
    with pytest.raises(openai.InternalServerError) as err:
        _client(gw).chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert err.value.status_code == 502 and err.value.code == "upstream_error"


def test_every_candidate_cooling_down_after_its_429_is_a_429_with_retry_after(
        gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url)))
    stub.behave("429", retry_after=30)
    for _ in range(2):  # the upstream's own 429, then the gateway holding off as it asked
        resp = _post(gw)
        assert resp.status_code == 429, resp.text
        error = resp.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "upstream_rate_limited"
        assert 1 <= int(resp.headers["retry-after"]) <= 30  # until the cooldown ends, rounded up
        assert 0 < int(resp.headers["retry-after-ms"]) <= 30_000
    assert len(stub.chat_requests) == 1  # the cooldown is kept: no second request upstream


def test_the_openai_sdk_waits_out_an_upstream_429_and_then_succeeds(gateway: StartGateway,
                                                                   stub: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url)))
    # Longer than the SDK's own back-off (0.5 s, then 1 s): it only gets through by honouring Retry-After.
    stub.queue(Behaviour("429", {"retry_after": 3}))
    seen: list[tuple[int, str | None]] = []

    def record(response: httpx.Response) -> None:
        seen.append((response.status_code, response.headers.get("retry-after")))

    with openai.DefaultHttpxClient(event_hooks={"response": [record]}) as http:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=2, timeout=30, http_client=http)
        completion = client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    assert [status for status, _ in seen] == [429, 200]
    assert seen[0][1] is not None and 1 <= int(seen[0][1]) <= 3
    assert len(stub.chat_requests) == 2


def test_every_candidate_ejected_is_a_503_with_retry_after_until_its_probe(
        gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url)) + "health: {failure_threshold: 1, base_ejection: 20}\n")
    stub.behave("status", status=500)
    assert _post(gw).status_code == 502  # it failed: ejected for 20 s
    resp = _post(gw)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_upstream_available"
    assert 1 <= int(resp.headers["retry-after"]) <= 20  # until the half-open probe may go
    assert len(stub.chat_requests) == 1


def test_candidates_held_for_different_reasons_give_a_503_until_the_first_is_back(
        gateway: StartGateway, stub: StubUpstream, stub2: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url), _up("b", stub2.url))
                 + "health: {failure_threshold: 1, base_ejection: 20}\n")
    stub.behave("429", retry_after=60)
    stub2.behave("status", status=500)
    assert _post(gw).status_code in (502, 503)  # both tried: one cools down for 60 s, one is ejected for 20
    resp = _post(gw)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_upstream_available"
    assert 1 <= int(resp.headers["retry-after"]) <= 20  # the ejected one's probe comes first
    assert len(stub.chat_requests) == len(stub2.chat_requests) == 1


def test_max_attempts_bounds_the_tries(gateway: StartGateway, stub: StubUpstream,
                                       stub2: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url), _up("b", stub2.url), attempts=1))
    stub.behave("status", status=500)
    stub2.behave("status", status=500)
    assert _post(gw).status_code == 502
    assert len(stub.chat_requests) + len(stub2.chat_requests) == 1


def test_deadline_bounds_all_attempts_together(gateway: StartGateway, stub: StubUpstream,
                                               stub2: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url, first_byte=5), _up("b", stub2.url, first_byte=5),
                         deadline=1.5))
    stub.behave("hang")
    stub2.behave("hang")
    started = time.monotonic()
    resp = _post(gw, stream=True)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3


def test_upstream_401_marks_credentials_bad_and_moves_on(gateway: StartGateway, stub: StubUpstream,
                                                        stub2: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url), _up("b", stub2.url)))
    stub.behave("status", status=401)
    assert {_post(gw).headers["x-llm-proxy-upstream"] for _ in range(5)} == {"b"}
    assert len(stub.chat_requests) == 1  # not retried again while its credentials are bad


def test_stream_cut_after_first_byte_ends_with_error_and_no_done(gateway: StartGateway,
                                                                 stub: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url)))
    stub.behave("cut", after=3)
    resp = _post(gw, stream=True)
    assert resp.status_code == 200
    assert "data: [DONE]" not in resp.text
    last = resp.text.strip().split("\n\n")[-1]
    assert last.startswith('data: {"error"') and "upstream_stream_error" in last
    with pytest.raises(openai.APIError):
        list(_client(gw).chat.completions.create(model="m", messages=MESSAGES, stream=True))  # type: ignore[arg-type]


def test_stream_without_done_is_reported_as_cut(gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url)))
    stub.behave("no_done")
    text = _post(gw, stream=True).text
    assert "data: [DONE]" not in text and '"error"' in text.strip().split("\n\n")[-1]


def test_idle_stream_is_ended_with_an_error_event(gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(_up("a", stub.url, idle=0.5)))
    stub.behave("stall", after=2)
    started = time.monotonic()
    text = _post(gw, stream=True).text
    assert "upstream_idle_timeout" in text and "[DONE]" not in text
    assert time.monotonic() - started < 3


def test_client_disconnect_cancels_the_upstream_request(gateway: StartGateway, stub: StubUpstream) -> None:
    # The stub sends two events and then holds the stream open until its connection closes, so
    # only the gateway cancelling the upstream request can end its handler, however busy the
    # machine is. The client keeps its iterator: an abandoned one closes the connection whenever
    # the garbage collector finalises it, which made this test fail now and then.
    gw = gateway(_config(_up("a", stub.url, idle=600, total=600)))
    stub.behave("stall", after=2)
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "m", "messages": MESSAGES, "stream": True}) as resp:
        chunks = resp.iter_raw()
        next(chunks)
        gc.collect()  # whatever the collector finds now, the connection stays open
        assert stub.in_flight == 1
        chunks.close()
    assert _eventually(lambda: stub.in_flight == 0, within=60)


def test_client_disconnect_during_non_stream_wait_cancels_upstream(gateway: StartGateway,
                                                                   stub: StubUpstream) -> None:
    # The stub never answers: only the gateway cancelling the upstream request ends its handler.
    gw = gateway(_config(_up("a", stub.url, first_byte=600, total=600), deadline=600))
    stub.behave("hang")
    body = orjson.dumps({"model": "m", "messages": MESSAGES})
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                       b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
        assert _eventually(lambda: stub.in_flight == 1, within=60)
    assert _eventually(lambda: stub.in_flight == 0, within=60)


def test_azure_provider_addressing(gateway: StartGateway, stub: StubUpstream) -> None:
    base = stub.url.removesuffix("/v1")
    gw = gateway(f"""
upstreams:
  - name: az
    provider: azure
    base_url: {base}
    api_version: "2024-10-21"
    api_key: azure-secret
    models: {{m: my-deployment}}
keys: [{{name: t, key: {KEY}}}]
""")
    completion = _client(gw).chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    seen = stub.chat_requests[-1]
    assert seen.path == "/openai/deployments/my-deployment/chat/completions"
    assert seen.query == {"api-version": "2024-10-21"}
    assert seen.headers["api-key"] == "azure-secret" and "Authorization" not in seen.headers
