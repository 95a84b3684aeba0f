"""Requests still unanswered when the shutdown grace runs out: a real gateway process, a stub
upstream that holds its answers, SIGTERM; what each client gets, what the log says, what is
charged (read by another replica on the same Redis).

Each wait is on a state (the upstream holding the requests, the process gone) with a generous
deadline; no test asserts how long anything took.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson

from proxy.apis.schema import parse_chat_request
from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401
from tests.running_gateway import access_lines, issue_key, key_usage, wait_for
from tests.spec import assert_conforms
from tests.stub_upstream import Behaviour, StubUpstream

ADMIN = "sk-admin-unanswered-0123456789"
StartGateway = Callable[..., GatewayProcess]
# Each request its own prompt, so that each has its own estimate.
PLAIN = {"model": "m", "messages": [{"role": "user", "content": "an answer that never comes"}]}
HEADERS_ONLY = {"model": "m", "messages": [{"role": "user", "content": "headers, then a body that never comes"}]}
STREAM = {"model": "m", "messages": [{"role": "user", "content": "a first byte that never comes"}], "stream": True}
SLOW_BODY = {"model": "m", "messages": [{"role": "user", "content": "a body that arrives too late"}]}


def _config(stub: StubUpstream, redis_url: str, server: str) -> str:
    return f"""admin_key: {ADMIN}
redis_url: {redis_url}
upstreams:
  - {{name: a, base_url: '{stub.url}', models: [m], timeout: {{connect: 1, first_byte: 120, idle: 120, total: 600}}}}
server: {server}
"""


def _estimate(body: dict[str, Any]) -> int:
    return parse_chat_request(orjson.dumps(body), "application/json").prompt_tokens


def _httpx_call(gw: GatewayProcess, key: str, body: dict[str, Any], into: list[httpx.Response]) -> None:
    into.append(httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {key}"}))


def _sdk_call(gw: GatewayProcess, key: str, body: dict[str, Any], into: list[openai.APIStatusError]) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)
    try:
        client.chat.completions.create(**body)
    except openai.APIStatusError as exc:
        into.append(exc)


def _slow_body(gw: GatewayProcess, key: str) -> socket.socket:
    """A request whose body stops half-way: it is still being read when the grace runs out."""
    body = orjson.dumps(SLOW_BODY)
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=120)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (key.encode(), len(body), body[:len(body) // 2]))
    return sock


def _raw_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    with sock, sock.makefile("rb") as reader:
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, reader.read(int(headers["content-length"]))


def _assert_shutting_down(status: int, headers: httpx.Headers | dict[str, str], body: bytes) -> None:
    assert (status, headers["connection"], headers["content-type"]) == (503, "close", "application/json"), body
    error = json.loads(body)
    assert_conforms(error, "ErrorResponse")
    assert error["error"]["code"] == "server_shutting_down"


def test_requests_unanswered_when_the_grace_runs_out_get_an_openai_503_and_are_charged_their_prompt(
        gateway: StartGateway, stub: StubUpstream, redis_server: RedisServer) -> None:  # noqa: F811
    gw = gateway(_config(stub, redis_server.url, "{shutdown_delay: 0.5, shutdown_grace: 4, body_timeout: 120}"))
    key_id, key = issue_key(gw, ADMIN, "unanswered")
    stub.queue(Behaviour("hang"), Behaviour("hang_body"), Behaviour("hang"))
    answers: list[httpx.Response] = []
    errors: list[openai.APIStatusError] = []
    calls = [threading.Thread(target=_httpx_call, args=(gw, key, PLAIN, answers)),
             threading.Thread(target=_sdk_call, args=(gw, key, HEADERS_ONLY, errors)),
             threading.Thread(target=_httpx_call, args=(gw, key, STREAM, answers))]
    for held, call in enumerate(calls, 1):  # one at a time: each meets its own behaviour
        call.start()
        wait_for(lambda held=held: stub.in_flight == held, 30)
    slow = _slow_body(gw, key)
    gw.signal(signal.SIGTERM)
    for call in calls:
        call.join(120)
    slow_answer = _raw_answer(slow)
    assert gw.wait(60) == 0

    assert len(answers) == 2 and len(errors) == 1
    for answer in answers:
        _assert_shutting_down(answer.status_code, answer.headers, answer.content)
    _assert_shutting_down(errors[0].status_code, errors[0].response.headers, errors[0].response.content)
    _assert_shutting_down(*slow_answer)
    log = gw.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    lines = access_lines(gw)
    assert len(lines) == 4
    assert all(line["status"] == 503 and line["error_code"] == "server_shutting_down" for line in lines)
    wait_for(lambda: stub.in_flight == 0, 30)  # the upstream requests were closed
    # Settled: another replica on the same store sees no lease left, and each forwarded request
    # charged its prompt estimate (the one whose body never came was not forwarded: nothing).
    later = gateway(_config(stub, redis_server.url, "{shutdown_delay: 0}"))
    usage = key_usage(later, ADMIN, key_id)
    assert usage["concurrency"] == 0
    assert usage["tokens_per_day"] == sum(_estimate(body) for body in (PLAIN, HEADERS_ONLY, STREAM))
