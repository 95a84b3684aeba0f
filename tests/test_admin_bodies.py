"""Admin request bodies are held to the admin API's cap and to ``server.body_timeout`` as they
arrive, over raw sockets against a real gateway process: a huge declared body is refused before
it is read, a chunked one once what arrived passes the cap, a slow one when its time is up.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
from collections.abc import Iterator
from typing import BinaryIO

import httpx
import pytest

from tests.gateway_process import GatewayProcess
from tests.spec import assert_conforms
from tests.stub_upstream import StubUpstream

ADMIN = "sk-admin-bodies-admin-key-22222222"
ADMIN_CAP = 64 * 1024
CHUNK = 16 * 1024
OFFERED = 4096  # chunks of CHUNK a client offers at most: 64 MiB, a thousand times the cap


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    stub = StubUpstream().start()
    proc = GatewayProcess(f"""
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
server: {{body_timeout: 2, shutdown_delay: 0}}
""")
    try:
        yield proc.start()
    finally:
        proc.close()
        stub.stop()


def _head(framing: str) -> bytes:
    return (f"POST /admin/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n\r\n").encode()


def _read_answer(reader: BinaryIO) -> tuple[int, dict[str, str], dict[str, object]]:
    status_line = reader.readline()
    assert status_line, "the connection closed without an answer"
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = json.loads(reader.read(int(headers["content-length"])))
    assert_conforms(body, "ErrorResponse")
    return int(status_line.split()[1]), headers, body


@contextlib.contextmanager
def _connection(gw: GatewayProcess) -> Iterator[tuple[socket.socket, BinaryIO]]:
    # The timeout is only a bound for a gateway that never answers: every answer is awaited.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as sock, sock.makefile("rb") as reader:
        yield sock, reader


def _offer_until_answered(sock: socket.socket, chunk: bytes) -> int:
    """Sends ``chunk`` again and again until the gateway answers or stops reading; how many went."""
    sent = 0
    with contextlib.suppress(OSError):  # refused: the rest meets a closed socket
        while sent < OFFERED and not select.select([sock], [], [], 0)[0]:
            sock.sendall(chunk)
            sent += 1
    return sent


def test_a_body_declared_over_the_admin_cap_is_413_before_it_is_read(gw: GatewayProcess) -> None:
    with _connection(gw) as (sock, reader):
        sock.sendall(_head(f"Content-Length: {OFFERED * CHUNK}"))
        status, headers, body = _read_answer(reader)  # answered with nothing of the body sent
        assert (status, headers["connection"]) == (413, "close")
        assert body["error"]["code"] == "request_too_large"  # type: ignore[index]
        assert _offer_until_answered(sock, b"v" * CHUNK) < OFFERED, "the gateway read the whole body"


def test_a_chunked_body_is_413_once_it_passes_the_admin_cap(gw: GatewayProcess) -> None:
    with _connection(gw) as (sock, reader):
        sock.sendall(_head("Transfer-Encoding: chunked"))
        sent = _offer_until_answered(sock, b"%x\r\n%s\r\n" % (CHUNK, b"v" * CHUNK))
        assert sent < OFFERED, "the gateway read every chunk offered"
        status, headers, body = _read_answer(reader)
        assert (status, headers["connection"]) == (413, "close")
        assert body["error"]["code"] == "request_too_large"  # type: ignore[index]


def test_a_slow_admin_body_is_408_at_the_body_timeout(gw: GatewayProcess) -> None:
    with _connection(gw) as (sock, reader):
        sock.sendall(_head("Content-Length: 200") + b'{"name": "slo')  # and nothing more
        status, headers, body = _read_answer(reader)
        assert (status, headers["connection"]) == (408, "close")
        assert body["error"]["code"] == "request_timeout"  # type: ignore[index]


def test_an_admin_body_within_the_cap_is_served(gw: GatewayProcess) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    created = httpx.post(gw.url + "/admin/keys", headers=auth, timeout=30,
                         json={"name": "within-cap", "metadata": {"note": "n" * 2000}})
    assert created.status_code == 201, created.text
    too_large = httpx.post(gw.url + "/admin/keys", headers=auth, timeout=30,
                           content=json.dumps({"name": "x", "pad": "p" * ADMIN_CAP}).encode())
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
