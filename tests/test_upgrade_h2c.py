"""A request that offers an upgrade to cleartext HTTP/2 (``curl --http2`` on an
http:// URL sends one) is answered over HTTP/1.1, like any other: the gateway
does not speak h2c, and must not drop the connection for the offer."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import BinaryIO

import pytest

from tests.gateway_process import GatewayProcess

KEY = "sk-h2c-test"
H2C_OFFER = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    gw = GatewayProcess(f"upstreams: [{{name: a, provider: mock, models: [m]}}]\n"
                        f"keys: [{{name: app, key: {KEY}}}]\nserver: {{shutdown_delay: 0}}\n").start()
    yield gw
    gw.close()


def _request(method: str, path: str, body: bytes = b"", chunked: bool = False) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = (f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n").encode()
    if chunked:
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:], b""))
    return head + H2C_OFFER + b"\r\n" + body


def _read_response(reader: BinaryIO) -> tuple[int, bytes]:
    status_line = reader.readline()
    assert status_line, "the connection was closed without an answer"
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), reader.read(length)


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_chat_request_offering_h2c_is_answered_and_the_connection_serves_the_next(
        gateway: GatewayProcess, chunked: bool) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock, \
            sock.makefile("rb") as reader:
        sock.sendall(_request("POST", "/v1/chat/completions", CHAT, chunked))
        status, body = _read_response(reader)
        assert status == 200, body  # the body reached the gateway
        assert json.loads(body)["choices"][0]["message"]["content"]
        sock.sendall(_request("GET", "/v1/models"))
        status, body = _read_response(reader)
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["m"]


def test_pipelined_requests_behind_an_h2c_offer_are_answered_in_order(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock, \
            sock.makefile("rb") as reader:
        sock.sendall(_request("POST", "/v1/chat/completions", CHAT) + _request("GET", "/v1/models")
                     + _request("POST", "/v1/chat/completions", b"{not json"))
        assert _read_response(reader)[0] == 200
        status, body = _read_response(reader)
        assert status == 200 and json.loads(body)["object"] == "list"
        status, body = _read_response(reader)
        assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_an_h2c_offer_does_not_let_a_request_frame_its_body_twice(gateway: GatewayProcess) -> None:
    """Both Content-Length and chunked framing: refused, as without the offer, so nothing behind
    the body can pass as a request of its own."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n" + H2C_OFFER + b"\r\n")
    smuggled = f"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock, \
            sock.makefile("rb") as reader:
        sock.sendall(head + b"0\r\n\r\n" + smuggled)
        status, _ = _read_response(reader)
        assert status == 400
        assert reader.read() == b""  # closed: the smuggled request got no answer
