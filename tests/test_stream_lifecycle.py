"""How a stream ends when nobody finishes it: a client that stops reading, an
upstream that never ends, a shutdown whose grace runs out. Real gateway
processes, real stub upstreams, raw sockets where a client must misbehave.

Each wait is on a state (a lease released, an upstream slot free, a process
gone) with a generous deadline; no test asserts how long anything took.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from tests.gateway_process import GatewayProcess
from tests.raw_http import closed_once_read
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401
from tests.running_gateway import access_lines, issue_key, key_usage, wait_for
from tests.stub_upstream import Behaviour, StubUpstream

ADMIN = "sk-admin-streams-0123456789"
KEY = "sk-streams-test-key"
MESSAGES = [{"role": "user", "content": "a stream that nobody finishes"}]
StartGateway = Callable[..., GatewayProcess]


def _config(stub: StubUpstream, timeout: str, extra: str = "") -> str:
    return f"""admin_key: {ADMIN}
upstreams:
  - {{name: a, base_url: '{stub.url}', models: [m], max_concurrency: 1, timeout: {timeout}}}
keys: [{{name: t, key: {KEY}, limits: {{concurrency: 1}}}}]
server: {{shutdown_delay: 0}}
{extra}"""


def _upstream_in_flight(gw: GatewayProcess) -> int:
    views = httpx.get(gw.url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=10).json()["data"]
    return int(views[0]["in_flight"])


def _stream_request(key: str, max_tokens: int | None = None) -> bytes:
    body = orjson.dumps({"model": "m", "messages": MESSAGES, "stream": True,
                         **({"max_tokens": max_tokens} if max_tokens else {})})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (key.encode(), len(body), body))


def _client_that_never_reads(gw: GatewayProcess) -> socket.socket:
    """A streaming request whose client reads nothing: its receive buffer, set before connecting
    (it sets the TCP window), is as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(_stream_request(KEY))
    return sock


@pytest.mark.parametrize("bound", ["idle", "total"])
def test_a_client_that_stops_reading_is_dropped_and_gives_back_its_lease_and_upstream(
        gateway: StartGateway, stub: StubUpstream, bound: str) -> None:
    timeout = "{connect: 1, first_byte: 2, idle: 3, total: 600}" if bound == "idle" else \
        "{connect: 1, first_byte: 2, idle: 600, total: 3}"
    gw = gateway(_config(stub, timeout))
    stub.queue(Behaviour("endless", {"size": 4096, "seconds": 120}))
    sock = _client_that_never_reads(gw)
    try:
        wait_for(lambda: stub.in_flight == 1, 20)
        # The gateway's writes to it block once the buffers are full; after the idle timeout (or
        # at the total) it gives up: the upstream request is ended, its slot and the key's lease
        # come back.
        wait_for(lambda: stub.in_flight == 0 and _upstream_in_flight(gw) == 0)
        assert closed_once_read(sock)
    finally:
        sock.close()
    answer = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                        json={"model": "m", "messages": MESSAGES}, timeout=30)
    assert answer.status_code == 200, answer.text  # concurrency 1: the lease was released
    cut = [line for line in access_lines(gw) if line["status"] == 499]
    assert len(cut) == 1 and cut[0]["error_code"] == "client_write_timeout"
    assert cut[0]["completion_tokens"] > 0  # what the upstream streamed until the cut is charged
    assert 'llm_proxy_stream_errors_total{code="client_write_timeout"} 1.0' in httpx.get(gw.url + "/metrics").text


def test_a_stream_that_never_ends_is_ended_at_total_with_its_own_code(
        gateway: StartGateway, stub: StubUpstream) -> None:
    gw = gateway(_config(stub, "{connect: 1, first_byte: 2, idle: 10, total: 2}"))
    stub.behave("endless", delay=0.05, seconds=120)
    with pytest.raises(openai.APIError) as raised:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for _ in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            pass
    assert raised.value.code == "upstream_total_timeout"
    wait_for(lambda: any(line["status"] == 502 for line in access_lines(gw)), 20)
    line = next(line for line in access_lines(gw) if line["status"] == 502)
    assert line["error_code"] == "upstream_total_timeout"
    assert 'llm_proxy_stream_errors_total{code="upstream_total_timeout"} 1.0' in httpx.get(gw.url + "/metrics").text


# --- shutdown --------------------------------------------------------------------------------


def _read_stream(gw: GatewayProcess, key: str, into: list[bytes]) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {key}"},
                      json={"model": "m", "messages": MESSAGES, "stream": True}) as resp:
        parts = []
        try:
            parts.extend(resp.iter_raw())
        except httpx.TransportError as exc:  # cut without an end
            parts.append(b"\n\ncut: " + repr(exc).encode())
        into.append(b"".join(parts))


def _sdk_stream(gw: GatewayProcess, key: str, into: list[BaseException]) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)
    try:
        for _ in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            pass
    except openai.APIError as exc:
        into.append(exc)


def test_streams_open_when_the_shutdown_grace_runs_out_get_an_error_event_and_are_settled(
        gateway: StartGateway, stub: StubUpstream, redis_server: RedisServer) -> None:  # noqa: F811
    config = _config(stub, "{connect: 1, first_byte: 2, idle: 30, total: 600}",
                     f"redis_url: {redis_server.url}").replace("max_concurrency: 1", "max_concurrency: 10")
    gw = gateway(config.replace("shutdown_delay: 0", "shutdown_delay: 0.5, shutdown_grace: 4"))
    key_id, key = issue_key(gw, ADMIN, "drained")
    stub.behave("endless", delay=0.05, seconds=120)
    stub.queue(Behaviour("endless", {"size": 4096, "seconds": 120}))
    stuck = _client_that_never_reads(gw)  # not even the error event reaches it: reset in time
    wait_for(lambda: stub.in_flight == 1, 20)
    bodies: list[bytes] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_read_stream, args=(gw, key, bodies)) for _ in range(2)]
    threads.append(threading.Thread(target=_sdk_stream, args=(gw, key, errors)))
    for thread in threads:
        thread.start()
    wait_for(lambda: stub.in_flight == 4, 20)
    gw.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert gw.wait(60) == 0
    stuck.close()
    assert len(bodies) == 2 and len(errors) == 1
    for body in bodies:
        last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert b"[DONE]" not in body and last.startswith(b"data: {"), body[-300:]
        assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "server_shutting_down"
    assert getattr(errors[0], "code", None) == "server_shutting_down"
    log = gw.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    lines = access_lines(gw)
    assert [line["error_code"] for line in lines if line["key_name"] == "t"] == ["client_write_timeout"]
    ended = [line for line in lines if line["key_name"] == "drained"]
    assert len(ended) == 3
    assert all(line["status"] == 503 and line["error_code"] == "server_shutting_down" for line in ended)
    # Settled: another replica on the same store sees no lease left and exactly the usage logged.
    later = gateway(config)
    assert key_usage(later, ADMIN, key_id)["concurrency"] == 0
    assert key_usage(later, ADMIN, key_id)["tokens_per_day"] == sum(
        line["prompt_tokens"] + line["completion_tokens"] for line in ended)
