"""An app developer's view: the official openai SDK against a real gateway
process in front of a real upstream server, both on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from proxy.upstreams import mock
from tests.gateway_process import GatewayProcess
from tests.spec import assert_conforms
from tests.stub_upstream import StubUpstream

KEY = "sk-test-app-key"
LIMITED_KEY = "sk-test-limited"
UPSTREAM_KEY = "sk-upstream-secret-1"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def config(stub: StubUpstream) -> str:
    return f"""
upstreams:
  - name: stub
    base_url: {stub.url}
    api_key: {UPSTREAM_KEY}
    models: {{gpt-4o-mini: stub-mini, gpt-4o: gpt-4o}}
keys:
  - {{name: app, key: {KEY}, team: team-a}}
  - {{name: limited, key: {LIMITED_KEY}, team: team-a, models: ["gpt-4o-mini"]}}
server: {{max_body_bytes: 65536}}
"""


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[StubUpstream, GatewayProcess]]:
    stub = StubUpstream().start()
    gw = GatewayProcess(config(stub)).start()
    yield stub, gw
    gw.close()
    stub.stop()


@pytest.fixture
def upstream(env: tuple[StubUpstream, GatewayProcess]) -> StubUpstream:
    env[0].reset()
    return env[0]


@pytest.fixture
def client(env: tuple[StubUpstream, GatewayProcess]) -> openai.OpenAI:
    return openai.OpenAI(base_url=env[1].url + "/v1", api_key=KEY, max_retries=0, timeout=20)


@pytest.fixture
def raw(env: tuple[StubUpstream, GatewayProcess]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env[1].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=20) as c:
        yield c


def test_completion_has_every_field_and_conforms_to_openai_schema(client: openai.OpenAI,
                                                                  upstream: StubUpstream) -> None:
    resp = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    completion = resp.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    # The body is the upstream's, untouched: ``model`` is the upstream's own name for it.
    assert completion.created > 0 and completion.model == "stub-mini"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens)
    assert_conforms(orjson.loads(resp.content), "CreateChatCompletionResponse")
    assert resp.headers["content-type"] == "application/json"
    assert len(resp.headers["x-request-id"]) >= 16
    # The body is relayed as the upstream sent it.
    assert resp.content == upstream.chat_requests[-1].sent
    assert upstream.chat_requests[-1].body["model"] == "stub-mini"


def test_n_greater_than_one_and_max_tokens_finish_reason(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=3, max_tokens=4)  # type: ignore[arg-type]
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.finish_reason for c in completion.choices} == {"length"}
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_stream_yields_same_text_as_non_stream_and_ends_cleanly(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage


def test_stream_with_include_usage_gets_the_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8


def _raw_stream(raw: httpx.Client, body: dict[str, object]) -> tuple[httpx.Headers, bytes]:
    with raw.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        return resp.headers, b"".join(resp.iter_raw())


def test_stream_bytes_are_exactly_the_upstreams(raw: httpx.Client, upstream: StubUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}, "some_future_field": {"x": [1, 2]}}
    headers, received = _raw_stream(raw, body)
    assert received == upstream.chat_requests[-1].sent
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-accel-buffering"] == "no" and "content-encoding" not in headers
    for event in received.split(b"\n\n"):
        if event.startswith(b"data: {"):
            assert_conforms(orjson.loads(event[6:]), "CreateChatCompletionStreamResponse")


def test_stream_without_usage_is_what_the_upstream_sends_without_the_option(
        raw: httpx.Client, upstream: StubUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    _, received = _raw_stream(raw, body)
    sent_upstream = upstream.chat_requests[-1].body
    assert sent_upstream["stream_options"] == {"include_usage": True}  # the gateway asked for it
    expected = b"".join(mock.stream_events(mock.plan({**body, "model": "stub-mini"}, 8), False))
    assert received == expected
    assert received.endswith(b"data: [DONE]\n\n")


def test_models_list_is_filtered_by_the_keys_allow_list(env: tuple[StubUpstream, GatewayProcess]) -> None:
    url = env[1].url + "/v1"
    every = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).models.list()
    assert sorted(m.id for m in every.data) == ["gpt-4o", "gpt-4o-mini"]
    limited = openai.OpenAI(base_url=url, api_key=LIMITED_KEY, max_retries=0).models.list()
    assert [m.id for m in limited.data] == ["gpt-4o-mini"]
    assert_conforms(every.model_dump(), "ListModelsResponse")


def test_missing_and_wrong_keys_are_401(env: tuple[StubUpstream, GatewayProcess],
                                        upstream: StubUpstream) -> None:
    bad = openai.OpenAI(base_url=env[1].url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert err.value.code == "invalid_api_key"
    assert httpx.post(env[1].url + "/v1/chat/completions", json={}).status_code == 401
    assert upstream.chat_requests == []


def test_model_outside_allow_list_is_403(env: tuple[StubUpstream, GatewayProcess],
                                         upstream: StubUpstream) -> None:
    limited = openai.OpenAI(base_url=env[1].url + "/v1", api_key=LIMITED_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as err:
        limited.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert err.value.status_code == 403 and err.value.body["param"] == "model"  # type: ignore[index]
    assert upstream.chat_requests == []


def test_unknown_model_is_404_model_not_found(env: tuple[StubUpstream, GatewayProcess],
                                              client: openai.OpenAI) -> None:
    limited = openai.OpenAI(base_url=env[1].url + "/v1", api_key=LIMITED_KEY, max_retries=0)
    for caller in (client, limited):  # an allow-list does not turn a model that does not exist into a 403
        with pytest.raises(openai.NotFoundError) as err:
            caller.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
        assert err.value.code == "model_not_found"


def test_refused_requests_are_counted_under_their_configured_model(raw: httpx.Client) -> None:
    def refused(model: str, status: str) -> float:
        labels = (f'model="{model}"', 'key_name="app"', f'status="{status}"')
        lines = [line for line in raw.get("/metrics").text.splitlines()
                 if line.startswith("llm_proxy_requests_total{") and all(label in line for label in labels)]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = refused("gpt-4o", "400"), refused("unknown", "400")
    answer = raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES, "temperature": 9})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "decimal_above_max_value"
    raw.post("/v1/chat/completions", json={"model": "not-configured", "messages": MESSAGES, "n": 0})
    assert (refused("gpt-4o", "400"), refused("unknown", "400")) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 3}, "temperature"),
    ({"model": "gpt-4o-mini", "messages": []}, "messages"),
    ({"model": "gpt-4o-mini", "messages": MESSAGES, "n": 0}, "n"),
    ({"model": "gpt-4o-mini", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "gpt-4o-mini", "messages": MESSAGES, "stream_options": {"include_usage": True}},
     "stream_options"),
])
def test_invalid_bodies_are_400_with_param_before_any_upstream_call(
        raw: httpx.Client, upstream: StubUpstream, body: dict[str, object], param: str) -> None:
    resp = raw.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert_conforms(resp.json(), "ErrorResponse")
    assert upstream.chat_requests == []


def test_malformed_json_wrong_content_type_and_oversized_body(raw: httpx.Client) -> None:
    bad_json = raw.post("/v1/chat/completions", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    form = raw.post("/v1/chat/completions", content=b"model=x", headers={"content-type": "text/plain"})
    assert form.status_code == 400
    huge = raw.post("/v1/chat/completions", json={"model": "gpt-4o-mini",
                                                  "messages": [{"role": "user", "content": "x" * 70000}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"


def test_unknown_fields_pass_through_and_client_key_never_forwarded(
        client: openai.OpenAI, upstream: StubUpstream) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                   extra_body={"future_param": {"deep": [1, "two", None]}},
                                   extra_headers={"Cookie": "session=abc", "api-key": "client-thing"})
    seen = upstream.chat_requests[-1]
    assert seen.body["future_param"] == {"deep": [1, "two", None]}
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY not in str(seen.headers) and "Cookie" not in seen.headers and "api-key" not in seen.headers


def test_request_id_is_echoed_or_generated(raw: httpx.Client) -> None:
    given = raw.get("/healthz", headers={"x-request-id": "my-trace-123"})
    assert given.headers["x-request-id"] == "my-trace-123"
    hostile = raw.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"
    assert raw.post("/v1/chat/completions", json={}).headers["x-request-id"]


def test_request_id_is_forwarded_upstream(raw: httpx.Client, upstream: StubUpstream) -> None:
    raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES},
             headers={"x-request-id": "abc-123"})
    assert upstream.chat_requests[-1].headers["X-Request-Id"] == "abc-123"


def test_upstream_client_errors_are_relayed_not_retried(raw: httpx.Client, upstream: StubUpstream) -> None:
    error = {"error": {"message": "bad tool schema", "type": "invalid_request_error",
                       "param": "tools", "code": None}}
    upstream.behave("status", status=400, body=error)
    resp = raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert resp.status_code == 400 and resp.json() == error
    assert len(upstream.chat_requests) == 1


def test_probes(raw: httpx.Client) -> None:
    assert raw.get("/healthz").json() == {"status": "ok"}
    ready = raw.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_unknown_route_and_wrong_method_are_openai_errors(raw: httpx.Client) -> None:
    missing = raw.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    wrong = raw.get("/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
