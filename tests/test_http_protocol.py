"""The limits of proxy/serving/http_protocol.py, over real sockets.

A uvicorn server runs in a thread on uvloop (as the gateway does) with a tiny
ASGI app and small limits, so each case takes about a second; the hostile
input suite checks the same limits against a whole gateway process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.serving.asgi import DISCONNECT_HOOK
from proxy.serving.http_protocol import LINGER_SECONDS, MAX_PIPELINED, LimitedHttpToolsProtocol, limited_protocol
from tests.gateway_process import GatewayProcess
from tests.raw_http import read_response
from tests.stub_upstream import free_port

MAX_HEADER_BYTES = 4096
HEADER_TIMEOUT = 1.0
KEEP_ALIVE = 5.0
SLOW = 1.5  # /slow answers after this: longer than the header timeout
LOST = threading.Event()  # set by /watch's disconnect callback
BUSY = 0.5  # /then-busy holds the event loop this long after its answer


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, answers ``<path> <body size>`` (``/headers``: the header names;
    ``/refuse``: a 401 before reading the body); accepts WebSockets."""
    if scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await receive()  # until the client goes
        return
    assert scope["type"] == "http"
    if scope["path"] == "/refuse":  # answered before its body is read, as a wrong key is
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"7")]})
        await send({"type": "http.response.body", "body": b"refused"})
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW)
    if scope["path"] == "/watch":  # told of the disconnect by the protocol, not by receive()
        hook = scope["extensions"][DISCONNECT_HOOK]
        assert hook.watch(LOST.set)
        await asyncio.sleep(SLOW)
        hook.unwatch(LOST.set)
    body = f"{scope['path']} {size}".encode()
    if scope["path"] == "/headers":  # the request's header names, once its body was read
        body = b",".join(name for name, _ in scope["headers"])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    if scope["path"] == "/then-busy":  # what a request does after its answer (settling its quota)
        time.sleep(BUSY)  # noqa: ASYNC251  # blocking on purpose: the loop is busy


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=limited_protocol(MAX_HEADER_BYTES, HEADER_TIMEOUT), lifespan="off",
                            log_level="warning", access_log=False, timeout_keep_alive=int(KEEP_ALIVE))
    server = uvicorn.Server(config)

    def run() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


@contextlib.contextmanager
def connect(port: int, timeout: float = 5) -> Iterator[tuple[socket.socket, BinaryIO]]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock, sock.makefile("rb") as reader:
        yield sock, reader


def get(path: str = "/", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n"


def send_in_pieces(sock: socket.socket, request: bytes, pieces: int) -> None:
    """Sends ``request`` as ``pieces`` writes, a pause between them, so that each may be a read of its own."""
    step = -(-len(request) // pieces)
    for i in range(0, len(request), step):
        sock.sendall(request[i:i + step])
        time.sleep(0.05)


def closed_within(reader: BinaryIO, seconds: float) -> bytes:
    """What the server sends until it closes; fails if it is still open after ``seconds``."""
    started = time.monotonic()
    rest = reader.read()  # until EOF (or the socket's timeout raises)
    assert time.monotonic() - started < seconds
    return rest


# --- wiring ----------------------------------------------------------------------------


def test_limited_protocol_binds_the_limits_to_a_subclass() -> None:
    cls = limited_protocol(1234, 2.5, 4321)
    assert issubclass(cls, LimitedHttpToolsProtocol) and issubclass(cls, HttpToolsProtocol)
    assert (cls.max_header_bytes, cls.header_timeout, cls.linger_bytes) == (1234, 2.5, 4321)
    assert (LimitedHttpToolsProtocol.max_header_bytes, LimitedHttpToolsProtocol.header_timeout) == (65536, 10.0)
    config = uvicorn.Config(app, http=cls)
    config.load()
    assert config.http_protocol_class is cls


def test_the_gateway_serves_both_its_ports_with_the_configured_limits() -> None:
    admin_port = free_port()
    gw = GatewayProcess(f"""
admin_key: sk-admin-key-for-the-protocol-test
upstreams: [{{name: a, base_url: 'http://127.0.0.1:9/v1', models: [m]}}]
server: {{header_timeout: 0.5, max_header_bytes: 2048, admin_port: {admin_port}, shutdown_delay: 0}}
""")
    try:
        gw.start()
        for p in (gw.port, admin_port):
            with connect(p) as (sock, reader):
                sock.sendall(get("/healthz", b"X-Pad: " + b"p" * 3000 + b"\r\n"))
                assert read_response(reader)[0] == 431
            with connect(p) as (sock, reader):
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")
                started = time.monotonic()
                assert read_response(reader)[0] == 408
                assert time.monotonic() - started < 1.5
    finally:
        gw.close()


# --- what still works ------------------------------------------------------------------


def test_keep_alive_serves_requests_after_an_idle_pause_longer_than_the_header_timeout(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/one"))
        assert read_response(reader)[::2] == (200, b"/one 0")
        time.sleep(HEADER_TIMEOUT + 0.5)  # idle between requests: the keep-alive timeout's business
        sock.sendall(get("/two"))
        assert read_response(reader)[::2] == (200, b"/two 0")


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/a") + get("/b") + b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + get("/d"))
        assert [read_response(reader)[2] for _ in range(4)] == [b"/a 0", b"/b 0", b"/c 3", b"/d 0"]


def test_headers_dribbled_within_the_timeout_are_served(port: int) -> None:
    with connect(port) as (sock, reader):
        request = get("/dribbled", b"X-Pad: " + b"p" * 40 + b"\r\n")
        for i in range(0, len(request), 8):  # in 11 pieces over about a quarter of the timeout
            sock.sendall(request[i:i + 8])
            time.sleep(HEADER_TIMEOUT / 40)
        assert read_response(reader)[::2] == (200, b"/dribbled 0")
        sock.sendall(get("/again"))  # and the connection is kept
        assert read_response(reader)[::2] == (200, b"/again 0")


def test_a_header_block_under_the_limit_is_served(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/", b"X-Pad: " + b"p" * (MAX_HEADER_BYTES - 100) + b"\r\n"))
        assert read_response(reader)[0] == 200


def test_body_bytes_do_not_count_toward_the_header_limit(port: int) -> None:
    body = b"b" * (MAX_HEADER_BYTES * 50)
    with connect(port) as (sock, reader):
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert read_response(reader)[::2] == (200, b"/upload %d" % len(body))
        sock.sendall(get("/after"))
        assert read_response(reader)[::2] == (200, b"/after 0")


def test_a_head_that_starts_behind_a_large_body_is_measured_alone(port: int) -> None:
    body = b"b" * (MAX_HEADER_BYTES * 20)
    with connect(port) as (sock, reader):
        # One write: a body far over the header limit, then the start of the next request's head.
        sock.sendall(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                     + b"GET /next HTTP/1.1\r\n")
        time.sleep(0.2)
        sock.sendall(b"Host: x\r\n\r\n")
        assert [read_response(reader)[::2] for _ in range(2)] == [(200, b"/big %d" % len(body)), (200, b"/next 0")]


def test_an_answer_that_takes_longer_than_the_header_timeout_is_not_cut(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/slow"))
        assert read_response(reader)[::2] == (200, b"/slow 0")


# --- the limits ------------------------------------------------------------------------


def test_a_header_block_over_the_limit_is_431_and_the_sender_reads_it(port: int) -> None:
    with connect(port) as (sock, reader):
        # Far more than the limit, sent whole: the server drops the rest unread, and the client still
        # gets the answer rather than a reset.
        sock.sendall(get("/", b"X-Pad: " + b"p" * 2_000_000 + b"\r\n"))
        status, headers, body = read_response(reader)
        assert status == 431 and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_header_fields_too_large")
        assert str(MAX_HEADER_BYTES) in error["message"]
        sock.shutdown(socket.SHUT_WR)  # the client is done: the server stops lingering at once
        assert closed_within(reader, 1) == b""


def test_a_header_block_over_the_limit_is_431_however_it_arrives(port: int) -> None:
    pad = b"X-Pad: " + b"p" * (MAX_HEADER_BYTES + 100) + b"\r\n"
    for pieces in (1, 3):  # in one read, or in several
        with connect(port) as (sock, reader):
            request = get("/too-large", pad) + get("/pipelined")  # nothing behind a refused head is served
            send_in_pieces(sock, request, pieces)
            assert read_response(reader)[0] == 431
            sock.shutdown(socket.SHUT_WR)
            assert closed_within(reader, 1) == b""


def test_a_header_block_that_never_ends_is_431_before_the_timeout(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(MAX_HEADER_BYTES // 100 * 3):  # header lines, one at a time, never the blank line
            try:
                sock.sendall(b"X-Filler: " + b"v" * 90 + b"\r\n")
            except OSError:
                break
        assert read_response(reader)[0] == 431
        assert time.monotonic() - started < HEADER_TIMEOUT
        assert closed_within(reader, LINGER_SECONDS + 1) == b""  # the client neither closes nor sends


def test_headers_unfinished_at_the_timeout_get_408_then_the_close(port: int) -> None:
    with connect(port) as (sock, reader):
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(int(HEADER_TIMEOUT * 4)):  # still sending: bytes do not extend the deadline
            time.sleep(0.2)
            sock.sendall(b"X")
        status, headers, body = read_response(reader)
        assert status == 408 and headers["connection"] == "close"
        assert HEADER_TIMEOUT - 0.05 < time.monotonic() - started < HEADER_TIMEOUT + 1
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert closed_within(reader, 1) == b""


def test_headers_unfinished_on_a_kept_alive_connection_get_408(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/first"))
        assert read_response(reader)[0] == 200
        sock.sendall(b"GET /second HTTP/1.1\r\n")
        started = time.monotonic()
        assert read_response(reader)[0] == 408
        assert time.monotonic() - started < HEADER_TIMEOUT + 1


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port: int) -> None:
    with connect(port) as (_, reader):
        assert closed_within(reader, HEADER_TIMEOUT + 1) == b""


def test_bytes_that_start_no_request_do_not_hold_a_kept_alive_connection(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/"))
        assert read_response(reader)[0] == 200
        sock.settimeout(0.2)
        started = time.monotonic()
        while time.monotonic() - started < KEEP_ALIVE + 2:  # line breaks, each cancelling the keep-alive
            sock.sendall(b"\r\n")
            with contextlib.suppress(TimeoutError):
                if sock.recv(1024) == b"":
                    break
        assert time.monotonic() - started < HEADER_TIMEOUT + 1


def test_a_stalled_pipelined_head_ends_the_connection_after_the_answer_in_flight(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/slow") + b"GET /next HTTP/1.1\r\nHost: x\r\n")  # the second never ends
        assert read_response(reader)[::2] == (200, b"/slow 0")  # not cut, no 408 inside it
        assert closed_within(reader, 1) == b""



def test_a_pipelined_head_over_the_limit_ends_the_connection_after_the_answer_in_flight(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/slow") + get("/too-large", b"X-Pad: " + b"p" * (MAX_HEADER_BYTES * 2) + b"\r\n"))
        assert read_response(reader)[::2] == (200, b"/slow 0")  # not cut, no 431 inside it
        assert closed_within(reader, 1) == b""


def test_an_upgraded_connection_is_left_to_the_websocket_protocol(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"))
        assert read_response(reader)[0] == 101
        sock.settimeout(HEADER_TIMEOUT + 0.5)
        with pytest.raises(TimeoutError):  # neither 408 nor the close
            sock.recv(1024)


def test_the_application_is_told_at_once_when_its_client_goes(port: int) -> None:
    LOST.clear()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /watch HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(0.2)  # the request is in the application
    assert LOST.wait(SLOW / 2), "the disconnect callback was not called"


def test_a_closed_connection_is_freed_without_the_garbage_collector(port: int) -> None:
    """The hook in the scope must not tie the connection into a reference cycle: a gateway with
    thousands of streams would then keep every closed connection until a full collection."""
    def connections() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, LimitedHttpToolsProtocol))

    LOST.clear()
    gc.collect()
    before = connections()
    gc.disable()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /watch HTTP/1.1\r\nhost: x\r\n\r\n")
            time.sleep(0.2)
        assert LOST.wait(SLOW / 2)
        deadline = time.monotonic() + SLOW + 3  # the application ends its /watch wait first
        while connections() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert connections() == before, "a closed connection is kept until the garbage collector runs"
    finally:
        gc.enable()


def _data_segments_in(sock: socket.socket) -> int:
    """Linux's tcp_info.tcpi_data_segs_in: data segments this socket received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[152:156], "little")


def test_an_answers_head_and_body_reach_the_client_as_one_segment(port: int) -> None:
    """One send per answer: the client (and the kernel) are woken once, not once per part."""
    with connect(port) as (sock, reader):
        for _ in range(3):  # a kept-alive connection, answer after answer
            before = _data_segments_in(sock)
            sock.sendall(get("/"))
            assert read_response(reader)[2] == b"/ 0"
            assert _data_segments_in(sock) - before == 1


def test_a_finished_answer_leaves_before_the_work_its_request_does_next(port: int) -> None:
    with connect(port) as (sock, reader):
        started = time.monotonic()
        sock.sendall(get("/then-busy"))
        assert read_response(reader)[2] == b"/then-busy 0"
        assert time.monotonic() - started < BUSY / 2


# --- chunked trailers ---------------------------------------------------------------------


def chunked(path: str, *chunks: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks))


def test_a_trailer_under_the_limit_is_read_and_its_fields_are_not_headers(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(chunked("/headers", b"hello") + b"0\r\nX-Trailer: " + b"t" * (MAX_HEADER_BYTES // 2) + b"\r\n\r\n")
        assert read_response(reader)[::2] == (200, b"host,transfer-encoding")
        sock.sendall(get("/after"))  # and the connection is kept
        assert read_response(reader)[::2] == (200, b"/after 0")


def test_a_trailer_that_never_ends_is_431_and_the_sender_reads_it(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(chunked("/upload", b"hello") + b"0\r\n")
        with contextlib.suppress(OSError):  # refused at the limit: the rest may meet a closed socket
            for _ in range(MAX_HEADER_BYTES // 100 * 3):  # trailer lines, never the blank line
                sock.sendall(b"X-Filler: " + b"v" * 90 + b"\r\n")
        status, headers, body = read_response(reader)
        assert status == 431 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_header_fields_too_large")
        assert "trailer" in error["message"] and str(MAX_HEADER_BYTES) in error["message"]
        assert closed_within(reader, LINGER_SECONDS + 1) == b""


def test_a_trailer_over_the_limit_is_431_however_it_arrives(port: int) -> None:
    trailer = b"0\r\nX-T: " + b"v" * (MAX_HEADER_BYTES + 100) + b"\r\n\r\n"
    for pieces in (1, 3):  # in one read, or in several
        with connect(port) as (sock, reader):
            request = chunked("/upload", b"hello") + trailer + get("/pipelined")  # nothing behind it is served
            send_in_pieces(sock, request, pieces)
            assert read_response(reader)[0] == 431
            sock.shutdown(socket.SHUT_WR)
            assert closed_within(reader, 1) == b""


def test_a_trailer_unfinished_at_the_header_timeout_gets_408(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(chunked("/upload", b"hello") + b"0\r\nX-T: v")
        status, headers, body = read_response(reader)
        assert status == 408 and headers["connection"] == "close"
        assert "trailer" in json.loads(body)["error"]["message"]
        assert closed_within(reader, 1) == b""


def test_pauses_between_chunks_are_not_the_trailers_timeout(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(chunked("/upload", b"hello"))
        time.sleep(HEADER_TIMEOUT + 0.5)
        sock.sendall(b"6\r\n world\r\n")
        time.sleep(HEADER_TIMEOUT + 0.5)
        sock.sendall(b"0\r\n\r\n")
        assert read_response(reader)[::2] == (200, b"/upload 11")


# --- bodies left unread ------------------------------------------------------------------


def test_an_answer_before_the_body_is_read_ends_the_connection_without_reading_it(port: int) -> None:
    offered = 64  # MiB, of a body declared far larger
    with connect(port) as (sock, reader):
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000000\r\n\r\n")
        status, headers, body = read_response(reader)
        assert (status, body, headers["connection"]) == (401, b"refused", "close")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < offered:
                sock.sendall(b"b" * (1024 * 1024))
                sent += 1
        assert sent < offered  # the rest was not read: the connection was closed
        with contextlib.suppress(ConnectionResetError):
            assert reader.read() == b""


def test_an_early_answer_to_a_request_whose_body_arrived_keeps_the_connection(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, _ = read_response(reader)
        assert status == 401 and "connection" not in headers
        sock.sendall(get("/after"))
        assert read_response(reader)[::2] == (200, b"/after 0")


# --- malformed requests and pipelines --------------------------------------------------------


def test_malformed_http_gets_an_openai_format_400(port: int) -> None:
    for request in (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                    chunked("/upload", b"hello") + b"zz\r\nabc\r\n"):  # a broken chunk in a body being read
        with connect(port) as (sock, reader):
            sock.sendall(request)
            status, headers, body = read_response(reader)
            assert status == 400 and headers["connection"] == "close", body
            assert headers["content-type"] == "application/json"
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_http_request")
            assert closed_within(reader, LINGER_SECONDS + 1) == b""


def test_a_broken_pipelined_body_is_answered_after_the_answer_in_flight(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(get("/slow") + chunked("/upload", b"hello") + b"zz\r\n")
        assert read_response(reader)[::2] == (200, b"/slow 0")
        status, headers, body = read_response(reader)
        assert (status, headers["connection"]) == (400, "close")
        assert json.loads(body)["error"]["code"] == "invalid_http_request"
        assert closed_within(reader, LINGER_SECONDS + 1) == b""


def test_requests_pipelined_past_the_limit_are_not_taken(port: int) -> None:
    with connect(port) as (sock, reader):
        sock.sendall(b"".join(get(f"/{i}") for i in range(MAX_PIPELINED * 3)))  # one write: one read
        answers = [read_response(reader) for _ in range(MAX_PIPELINED + 1)]  # the one in flight, and those queued
        assert [body for _, _, body in answers] == [f"/{i} 0".encode() for i in range(MAX_PIPELINED + 1)]
        assert answers[-1][1]["connection"] == "close"
        assert closed_within(reader, LINGER_SECONDS + 1) == b""
