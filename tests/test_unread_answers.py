"""Finished answers that a client never reads: ``server.send_timeout`` bounds how long the gateway
holds them. Real gateway process, a stub upstream answering large bodies, raw sockets with a tiny
receive buffer that send a request and read nothing; the gateway's memory read from /proc.

Each wait is on a state (an access-log line, a connection the gateway closed) with a generous
deadline; no test asserts how long anything took.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from proxy.config.loader import parse_config
from proxy.errors import ConfigError
from tests.gateway_process import GatewayProcess
from tests.raw_http import closed_once_read
from tests.running_gateway import access_lines, wait_for
from tests.stub_upstream import StubUpstream

KEY = "sk-unread-answers-key-0123456789"
MIB = 1024 * 1024
ANSWER_MIB = 4
CONNECTIONS = 12  # held all at once, they would cost the gateway 48 MiB
# Growth allowed once they are gone: well under what holding them all takes. The allocator may keep
# some freed answers' memory mapped for reuse (a busy machine saw 24 MiB kept), so the bound is
# three quarters of holding them all, which the gateway reached before the answers were bounded.
RSS_BOUND_MIB = CONNECTIONS * ANSWER_MIB * 3 // 4
BIG_ANSWER = {
    "id": "chatcmpl-big", "object": "chat.completion", "created": 1_700_000_000, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "w" * (ANSWER_MIB * MIB)},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 1000, "total_tokens": 1009},
}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "a large answer, please"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    server.behave("status", status=200, body=BIG_ANSWER)
    yield server
    server.stop()


@pytest.fixture
def gw(stub: StubUpstream) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(f"""
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: reader, key: {KEY}}}]
server: {{send_timeout: 2, shutdown_delay: 0}}
""")
    try:
        yield proc.start()
    finally:
        proc.close()


def _rss_mib(gw: GatewayProcess) -> float:
    assert gw.proc is not None
    with open(f"/proc/{gw.proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _request() -> bytes:
    body = orjson.dumps(CHAT)
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))


def _client_that_never_reads(gw: GatewayProcess, requests: int = 1) -> socket.socket:
    """Its receive buffer, set before connecting (it sets the TCP window), is as small as the
    kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(_request() * requests)
    return sock


def _closed_by_the_gateway(sock: socket.socket) -> bool:
    """Without reading: whether the gateway reset or closed the connection."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLRDHUP) for _, events in poller.poll(0))


def _answered(gw: GatewayProcess, count: int) -> Callable[[], bool]:
    return lambda: len(access_lines(gw)) >= count


def test_answers_a_client_never_reads_are_dropped_and_memory_stays_bounded(gw: GatewayProcess) -> None:
    warm = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"})  # the heap grown for one such answer
    assert warm.status_code == 200 and len(warm.content) > ANSWER_MIB * MIB
    before = _rss_mib(gw)
    sockets = []
    try:
        for count in range(2, CONNECTIONS + 2):  # one at a time: one answer in the making at once
            sockets.append(_client_that_never_reads(gw))
            wait_for(_answered(gw, count))
        wait_for(lambda: all(_closed_by_the_gateway(sock) for sock in sockets))
        grown = _rss_mib(gw) - before
        assert all(closed_once_read(sock) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    assert grown < RSS_BOUND_MIB, f"RSS grew by {grown:.1f} MiB"
    assert [line["status"] for line in access_lines(gw)] == [200] * (CONNECTIONS + 1)  # answered, then dropped
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_pipelined_request_whose_answer_waited_behind_an_untaken_one_is_logged_499(
        gw: GatewayProcess) -> None:
    sock = _client_that_never_reads(gw, requests=2)
    try:
        wait_for(lambda: _closed_by_the_gateway(sock))
        wait_for(_answered(gw, 2))
        assert closed_once_read(sock)
    finally:
        sock.close()
    first, second = access_lines(gw)
    assert (first["status"], first.get("error_code")) == (200, None)
    # Its answer could not be sent: the connection was reset while it waited for room.
    assert (second["status"], second["error_code"]) == (499, "client_write_timeout")
    assert second["completion_tokens"] == 1000  # the upstream answered it: its usage is charged


def test_send_timeout_is_sixty_seconds_unless_set_and_must_be_positive() -> None:
    upstreams = "upstreams: [{name: a, base_url: 'http://a/v1', models: [m]}]\n"
    assert parse_config(upstreams, {}).server.send_timeout == 60
    assert parse_config(upstreams + "server: {send_timeout: 5}", {}).server.send_timeout == 5
    for bad in ("0", ".inf", "soon"):
        with pytest.raises(ConfigError) as raised:
            parse_config(upstreams + f"server: {{send_timeout: {bad}}}", {})
        assert any("server.send_timeout" in problem for problem in raised.value.problems)
