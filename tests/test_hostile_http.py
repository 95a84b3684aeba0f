"""Hostile HTTP at the gateway's protocol edges, over raw sockets against a real gateway process.

Chunked trailers that never end (from a client, and from an upstream), bodies of requests the
gateway refuses before reading them, malformed HTTP, and the router's slash redirect. Where an
attack used to cost memory, the gateway's resident memory is sampled from /proc while it runs.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

import httpx
import pytest

from tests.gateway_process import GatewayProcess
from tests.raw_http import read_response
from tests.spec import assert_conforms
from tests.stub_upstream import StubUpstream

GOOD = "sk-hostile-http-good-key-00000000"
ADMIN = "sk-hostile-http-admin-key-1111111"
MAX_BODY = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
MIB = 1024 * 1024
OFFERED_MIB = 48  # what each attacker offers to send: past every limit, and bounded
RSS_BOUND_MIB = 24  # growth allowed while an attack runs (each used to hold what it sent)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CHAT_BODY = json.dumps(CHAT).encode()


@pytest.fixture(scope="module")
def stub() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(stub: StubUpstream) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(f"""
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: good, key: {GOOD}}}]
health: {{failure_threshold: 1000000}}
server: {{max_body_bytes: {MAX_BODY}, max_header_bytes: {MAX_HEADER_BYTES}, body_timeout: 10,
          shutdown_delay: 0}}
""")
    try:
        yield proc.start()
    finally:
        proc.close()


@pytest.fixture(autouse=True)
def _plain_stub(stub: StubUpstream) -> None:
    stub.reset()


def _rss_kib(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    with open(f"/proc/{gw.proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _peak_growth_mib(gw: GatewayProcess, attack: Callable[[], None]) -> float:
    """Runs ``attack`` in a thread, sampling the gateway's RSS until it ends: the largest growth."""
    before = peak = _rss_kib(gw)
    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    while thread.is_alive():
        peak = max(peak, _rss_kib(gw))
        thread.join(0.01)
    return (max(peak, _rss_kib(gw)) - before) / 1024


def _good_request(gw: GatewayProcess) -> int:
    return httpx.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=60,
                      headers={"Authorization": f"Bearer {GOOD}"}).status_code


def _closed(sock: socket.socket, reader: BinaryIO) -> bool:
    """Whether the gateway ends the connection (within a generous wait) rather than keeping it."""
    sock.settimeout(10)
    try:
        return reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class Flood:
    """One connection sending ``head`` and then ``OFFERED_MIB`` MiB, 1 MiB at a time, until
    the gateway answers or stops reading; then it reads the answer."""

    def __init__(self, gw: GatewayProcess, head: bytes) -> None:
        self.gw = gw
        self.head = head
        self.sent_mib = 0
        self.answer = b""

    def __call__(self) -> None:
        with socket.create_connection(("127.0.0.1", self.gw.port), timeout=60) as sock:
            with contextlib.suppress(OSError):  # refused: the rest meets a closed socket
                sock.sendall(self.head)
                while self.sent_mib < OFFERED_MIB and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(b"v" * MIB)
                    self.sent_mib += 1
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    self.answer += chunk


def _chunked_head(key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n%s\r\n" % (len(CHAT_BODY), CHAT_BODY)


# --- chunked trailers ------------------------------------------------------------------------


def test_an_endless_request_trailer_is_refused_and_memory_stays_bounded(gw: GatewayProcess) -> None:
    flood = Flood(gw, _chunked_head(GOOD) + b"0\r\nX-T: ")  # a good key: the body is read, then the trailer
    statuses: list[int] = []

    def attack_and_a_good_client() -> None:
        attacker = threading.Thread(target=flood)
        attacker.start()
        statuses.append(_good_request(gw))  # answered meanwhile
        attacker.join(120)

    grown = _peak_growth_mib(gw, attack_and_a_good_client)
    assert statuses == [200]
    assert flood.sent_mib < OFFERED_MIB, "the gateway read the whole trailer"
    assert flood.answer == b"" or flood.answer.startswith(b"HTTP/1.1 431"), flood.answer[:200]
    assert grown < RSS_BOUND_MIB, f"RSS grew by {grown:.1f} MiB"


def test_an_upstreams_endless_trailer_is_a_502_and_memory_stays_bounded(
        gw: GatewayProcess, stub: StubUpstream) -> None:
    stub.behave("endless_trailer", mib=OFFERED_MIB)
    answers: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(base_url=gw.url, timeout=60, headers={"Authorization": f"Bearer {GOOD}"}) as client:
            answers.append(client.post("/v1/chat/completions", json=CHAT))
            answers.append(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))

    grown = _peak_growth_mib(gw, call)
    plain, stream = answers
    assert plain.status_code == 502, plain.text
    assert_conforms(plain.json(), "ErrorResponse")
    assert stream.status_code == 200 and b'data: {"error":' in stream.content, stream.content[-300:]
    assert not stream.content.endswith(b"data: [DONE]\n\n")
    assert stub.chat_requests and all(seen.trailer_mib < OFFERED_MIB for seen in stub.chat_requests)
    assert grown < RSS_BOUND_MIB, f"RSS grew by {grown:.1f} MiB"


# --- bodies of refused requests ----------------------------------------------------------------


def _head(method: str, path: str, key: str | None, length: int) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _refused_unread(gw: GatewayProcess, head: bytes, source: str = "127.0.0.1") -> tuple[int, dict[str, str]]:
    """Sends ``head``, reads the answer, then offers the declared body: returns the answer once the
    gateway closed the connection without taking all of it."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30, source_address=(source, 0)) as sock, \
            sock.makefile("rb") as reader:
        sock.sendall(head)
        status, headers, body = read_response(reader)
        assert_conforms(json.loads(body), "ErrorResponse")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < OFFERED_MIB:
                sock.sendall(b"v" * MIB)
                sent += 1
        assert sent < OFFERED_MIB, f"the gateway read the {status} request's body"
        assert _closed(sock, reader)
    return status, headers


@pytest.mark.parametrize(("method", "path", "key", "status"), [
    ("POST", "/v1/chat/completions", "sk-wrong-key-0000000000000000", 401),
    ("POST", "/v1/chat/completions", None, 401),
    ("POST", "/v1/no-such-route", GOOD, 404),
    ("PUT", "/v1/models", GOOD, 405),
])
def test_a_request_refused_before_its_body_is_answered_and_closed_unread(
        gw: GatewayProcess, method: str, path: str, key: str | None, status: int) -> None:
    answered, headers = _refused_unread(gw, _head(method, path, key, 5_000_000_000))
    assert (answered, headers["connection"]) == (status, "close")
    assert _good_request(gw) == 200


def test_a_body_declared_too_large_is_413_and_closed_unread(gw: GatewayProcess) -> None:
    status, headers = _refused_unread(gw, _head("POST", "/v1/chat/completions", GOOD, MAX_BODY + 1))
    assert (status, headers["connection"]) == (413, "close")


def test_the_auth_guards_429_is_closed_unread(gw: GatewayProcess) -> None:
    source = "127.0.0.9"  # an address of its own: the guard counts failures per address
    head = _head("POST", "/v1/chat/completions", "sk-wrong-key-0000000000000000", 5_000_000_000)
    statuses: list[int] = []
    while len(statuses) < 100 and statuses[-5:] != [429] * 5:  # 401s until the guard holds the address
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30, source_address=(source, 0)) as sock, \
                sock.makefile("rb") as reader:
            sock.sendall(head)
            status, headers, _ = read_response(reader)
            assert headers["connection"] == "close"
            statuses.append(status)
    assert statuses[0] == 401 and statuses[-5:] == [429] * 5
    status, headers = _refused_unread(gw, head, source)  # still held: each failure counts
    assert (status, headers["connection"], headers["retry-after"].isdigit()) == (429, "close", True)


def test_an_endless_trailer_without_a_key_is_refused_unread(gw: GatewayProcess) -> None:
    flood = Flood(gw, _chunked_head(None) + b"0\r\nX-T: ")
    flood()
    assert flood.sent_mib < OFFERED_MIB
    assert flood.answer.startswith(b"HTTP/1.1 401"), flood.answer[:200]
    assert b"connection: close\r\n" in flood.answer.lower()


def test_a_client_on_keep_alive_is_served_request_after_request(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock, sock.makefile("rb") as reader:
        for _ in range(3):
            sock.sendall(_head("POST", "/v1/chat/completions", GOOD, len(CHAT_BODY)) + CHAT_BODY)
            status, headers, _ = read_response(reader)
            assert status == 200 and "connection" not in headers
        # A wrong key whose body came whole with its head: answered, and the connection kept.
        sock.sendall(_head("POST", "/v1/chat/completions", "sk-wrong-key-0000000000000000", len(CHAT_BODY))
                     + CHAT_BODY)
        status, headers, _ = read_response(reader)
        assert status == 401 and "connection" not in headers
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + GOOD.encode() + b"\r\n\r\n")
        assert read_response(reader)[0] == 200


# --- malformed requests, redirects -------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"G\x00T /healthz HTTP/1.1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    _chunked_head(GOOD) + b"zz\r\n",  # a broken chunk in a body being read
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
], ids=["header", "version", "method", "framing", "chunk", "http2"])
def test_malformed_http_gets_an_openai_format_400_and_the_close(gw: GatewayProcess, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock, sock.makefile("rb") as reader:
        sock.sendall(raw)
        status, headers, body = read_response(reader)
        assert (status, headers["content-type"], headers["connection"]) == (400, "application/json", "close")
        error = json.loads(body)
        assert_conforms(error, "ErrorResponse")
        assert (error["error"]["type"], error["error"]["code"]) == ("invalid_request_error", "invalid_http_request")
        assert _closed(sock, reader)
    assert _good_request(gw) == 200


@pytest.mark.parametrize("path", ["/admin/keys/", "/v1/models/", "/v1/chat/completions/", "/docs/assets"])
def test_no_redirect_is_built_from_the_clients_host(gw: GatewayProcess, path: str) -> None:
    resp = httpx.get(gw.url + path, headers={"Host": "evil.example"})
    assert "location" not in resp.headers
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"
