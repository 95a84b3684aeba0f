"""The upstream HTTP client (proxy/upstreams/transport.py) against a scripted server on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config.loader import parse_config
from proxy.errors import UpstreamConnectionError
from proxy.upstreams.transport import HttpTransport, UpstreamResponse

Answer = Callable[[bytes], bytes | None]  # the request's bytes → what to write back (None: close at once)


class Scripted:
    """Answers each request with the next scripted bytes; ``close_after`` closes the connection after it."""

    def __init__(self) -> None:
        self.answers: list[tuple[bytes | None, bool]] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def then(self, answer: bytes | None, close_after: bool = False) -> Scripted:
        self.answers.append((answer, close_after))
        return self

    async def start(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stops listening and ends every connection's handler (none is left to be cancelled)."""
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                answer, close_after = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def _transport(port: int, **timeout: float) -> HttpTransport:
    limits = ", max_concurrency: 2" if timeout.pop("limited", 0) else ""
    connect = timeout.get("connect", 2)
    config = parse_config(f"""
upstreams: [{{name: a, base_url: 'http://127.0.0.1:{port}/v1', models: [m]{limits},
             timeout: {{connect: {connect}}}}}]
keys: [{{name: k, key: sk-k}}]
""", {})
    return HttpTransport(config.upstreams[0])


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = await Scripted().start()
    yield scripted
    await scripted.stop()


async def _body(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    return b"".join(parts)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\nok"


async def test_a_post_is_one_plain_http_11_request_and_the_connection_is_kept(server: Scripted) -> None:
    server.then(OK).then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    for _ in range(2):
        response = await transport.post(url, {"Content-Type": "application/json", "Authorization": "Bearer k"},
                                        b'{"a":1}')
        assert response.status == 200 and response.headers["content-type"] == "application/json"
        assert await _body(response) == b"ok"
        response.close()
    assert server.connections == 1
    assert server.requests[0] == (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        "Content-Type: application/json\r\nAuthorization: Bearer k\r\nAccept: */*\r\n"
        'Accept-Encoding: identity\r\nContent-Length: 7\r\n\r\n{"a":1}').encode()
    await transport.close()


async def test_chunked_and_unframed_bodies_and_an_interim_answer(server: Scripted) -> None:
    server.then(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")
    server.then(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", close_after=True)
    server.then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/models"
    for expected in (b"abcde", b"until the end", b"ok"):
        response = await transport.get(url, {})
        assert response.status == 200 and await _body(response) == expected
        response.close()
    assert server.connections == 2  # "Connection: close" is honoured
    # nothing here decodes gzip or deflate, so nothing asks for them (a health check's GET included)
    assert all(b"Accept-Encoding: identity\r\n" in r and b"gzip" not in r for r in server.requests)
    await transport.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n",
])
async def test_a_body_cut_short_is_an_error_after_the_bytes_that_came(server: Scripted, answer: bytes) -> None:
    server.then(answer, close_after=True)
    transport = _transport(server.port)
    response = await transport.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", {}, b"{}")
    assert await response.read_chunk() == b"half"
    with pytest.raises(UpstreamConnectionError):
        await response.read_chunk()
    response.close()
    await transport.close()


async def test_no_answer_and_no_server_are_connection_errors(server: Scripted) -> None:
    server.then(None)
    transport = _transport(server.port)
    with pytest.raises(UpstreamConnectionError):
        await transport.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", {}, b"{}")
    await server.stop()
    with pytest.raises(UpstreamConnectionError):
        await transport.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", {}, b"{}")
    await transport.close()


async def test_an_unread_answer_closes_its_connection_and_an_idle_one_closed_upstream_is_not_used(
        server: Scripted) -> None:
    server.then(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabcd").then(OK, close_after=True).then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    (await transport.post(url, {}, b"{}")).close()  # dropped before its end: that connection is closed
    response = await transport.post(url, {}, b"{}")
    assert await _body(response) == b"ok"
    response.close()  # kept, but the upstream closes it...
    await asyncio.sleep(0.05)
    response = await transport.post(url, {}, b"{}")  # ...so a new one carries this
    assert await _body(response) == b"ok"
    response.close()
    assert server.connections == 3
    await transport.close()


async def test_max_concurrency_makes_the_next_request_wait_within_the_connect_timeout(server: Scripted) -> None:
    server.then(OK).then(OK).then(OK)
    transport = _transport(server.port, connect=0.2, limited=1)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    held = [await transport.post(url, {}, b"{}") for _ in range(2)]
    with pytest.raises(UpstreamConnectionError):
        await transport.post(url, {}, b"{}")  # both in use for longer than the connect timeout
    waiting = asyncio.ensure_future(transport.post(url, {}, b"{}"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert await _body(held[0]) == b"ok"
    held[0].close()
    response = await waiting
    assert await _body(response) == b"ok"
    response.close()
    held[1].close()
    await transport.close()


async def test_a_header_that_would_split_the_request_is_refused(server: Scripted) -> None:
    transport = _transport(server.port)
    with pytest.raises(ValueError, match="split"):
        await transport.post(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                             {"X-Request-Id": "a\r\nX-Evil: 1"}, b"{}")
    assert server.requests == []
    await transport.close()


async def test_an_answer_left_unread_while_reading_was_paused_does_not_stall_the_next_one(
        server: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.upstreams.transport.HIGH_WATER", 4)
    server.then(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 10\r\n\r\n0123456789").then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    response = await transport.post(url, {}, b"{}")
    assert response.status == 500
    response.close()  # whole (reading paused after it), unread: the connection is kept
    response = await asyncio.wait_for(transport.post(url, {}, b"{}"), 2)
    assert await asyncio.wait_for(_body(response), 2) == b"ok"
    response.close()
    assert server.connections == 1
    await transport.close()


async def test_a_connection_given_back_to_a_waiting_request_keeps_max_concurrency(server: Scripted) -> None:
    server.then(OK).then(OK).then(OK).then(OK)
    transport = _transport(server.port, limited=1)  # max_concurrency: 2
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    first, second = [await transport.post(url, {}, b"{}") for _ in range(2)]
    third = asyncio.ensure_future(transport.post(url, {}, b"{}"))
    await asyncio.sleep(0.05)
    assert await _body(first) == b"ok"
    first.close()  # its slot and its connection go to the third...
    fourth = asyncio.ensure_future(transport.post(url, {}, b"{}"))
    await asyncio.sleep(0.05)
    assert third.done() and not fourth.done()  # ...and the fourth waits for a slot
    assert server.connections == 2
    second.close()
    for waited in (third, fourth):
        response = await waited
        assert await _body(response) == b"ok"
        response.close()
    await transport.close()


async def test_trailers_and_bytes_after_the_answer_are_not_part_of_it(server: Scripted) -> None:
    server.then(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n")
    server.then(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
    server.then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    response = await transport.post(url, {}, b"{}")
    assert "x-trailer" not in response.headers and await _body(response) == b"ok"
    response.close()
    response = await transport.post(url, {}, b"{}")
    assert list(response.headers.items()) == [("Content-Type", "application/json"), ("Content-Length", "2")]
    assert await _body(response) == b"ok"
    response.close()  # a second answer came: that connection is not used again
    response = await transport.post(url, {}, b"{}")
    assert await _body(response) == b"ok"
    response.close()
    assert server.connections == 2
    await transport.close()


async def test_an_endless_answer_head_is_an_error(server: Scripted) -> None:
    server.then(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * 1024 * 1024))
    transport = _transport(server.port)
    with pytest.raises(UpstreamConnectionError):
        await asyncio.wait_for(transport.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", {}, b"{}"), 2)
    await transport.close()


async def test_an_endless_trailer_is_an_error_once_it_passes_the_head_limit() -> None:
    """An answer whose last chunk is followed by a trailer that never ends: the parser would
    gather the field's value for ever. Refused past MAX_HEAD_BYTES, long before the upstream is
    done sending (it offers 64 MiB)."""
    offered, sent = 64, 0
    cut = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n{}")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
        try:
            for _ in range(offered):
                writer.write(b"v" * (1024 * 1024))
                await writer.drain()
                sent += 1
        except ConnectionError:
            cut.set()
        writer.close()

    listening = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    transport = _transport(port)
    response = await transport.post(f"http://127.0.0.1:{port}/v1/chat/completions", {}, b"{}")
    assert await response.read_chunk() == b"ok"
    with pytest.raises(UpstreamConnectionError, match="answer trailer over"):
        await response.read_chunk()
    response.close()
    await asyncio.wait_for(cut.wait(), 30)  # the connection was dropped, not read to the end
    assert sent < offered
    await transport.close()
    listening.close()


async def test_a_chunked_answer_with_a_trailer_under_the_limit_is_read_whole(server: Scripted) -> None:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (b"a" * 300_000, b"b" * 3))
    server.then(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
                + b"0\r\nX-T: " + b"t" * 500_000 + b"\r\n\r\n").then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    response = await transport.post(url, {}, b"{}")
    assert await _body(response) == b"a" * 300_000 + b"bbb"
    response.close()
    response = await transport.post(url, {}, b"{}")  # and the connection is kept
    assert await _body(response) == b"ok"
    response.close()
    assert server.connections == 1
    await transport.close()


async def test_a_reset_ends_a_body_without_length_with_an_error() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n{}")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST: the body was cut, not ended

    listening = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    transport = _transport(port)
    response = await transport.post(f"http://127.0.0.1:{port}/v1/chat/completions", {}, b"{}")
    assert await response.read_chunk() == b"partial"
    with pytest.raises(UpstreamConnectionError):
        await response.read_chunk()
    response.close()
    await transport.close()
    listening.close()


async def test_a_pooled_connection_whose_end_was_read_but_not_yet_reported_is_not_used(server: Scripted) -> None:
    server.then(OK).then(OK)
    transport = _transport(server.port)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    response = await transport.post(url, {}, b"{}")
    assert await _body(response) == b"ok"
    response.close()
    (pool,) = transport._pools.values()
    (idle,) = pool._idle
    assert idle.transport is not None
    idle.transport.close()  # as the loop does on reading the upstream's FIN; connection_lost comes later
    response = await transport.post(url, {}, b"{}")  # nothing was sent on it: a new connection carries this
    assert await _body(response) == b"ok"
    response.close()
    assert server.connections == 2
    await transport.close()
