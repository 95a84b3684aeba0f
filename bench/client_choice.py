"""Which upstream HTTP client costs the gateway least? (the hot path's edge)

Runs a fixed-answer HTTP server in a child process on loopback, then drives
it from this process with each candidate client: the same number of POSTs at
the same concurrency, non-streamed and streamed (20 SSE events), measuring
this process's CPU time per request. Bounded: ``--requests`` per case.
With ``--tls`` the server also listens over TLS (a throwaway certificate from
``openssl``), and the table compares the gateway's client on plain HTTP and on
TLS (its connections kept alive, as in the gateway) with aiohttp on TLS.

    python bench/client_choice.py [--requests 4000] [--concurrency 32] [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}')
EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


STREAM = b"".join(_chunk(EVENT) for _ in range(20)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class _Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(rest) < length:
                return
            body, self.buf = rest[:length], rest[length:]
            if b'"stream":true' in body:
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"  # type: ignore[attr-defined]
                             b"transfer-encoding: chunked\r\n\r\n" + STREAM)
            else:
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"  # type: ignore[attr-defined]
                             b"content-length: " + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)


def _serve(port: int, tls_port: int | None, cert: str | None, key: str | None) -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.create_server(_Server, "127.0.0.1", port))
    if tls_port is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)  # type: ignore[arg-type]
        loop.run_until_complete(loop.create_server(_Server, "127.0.0.1", tls_port, ssl=context))
    loop.run_forever()


async def _drive(call: Callable[[bytes], Awaitable[int]], body: bytes, requests: int, concurrency: int) -> float:
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call(body)

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu) / requests * 1e6


async def _aiohttp(url: str, body: bytes, n: int, c: int, ca_file: str | None = None) -> float:
    tls = ssl.create_default_context(cafile=ca_file) if ca_file else True
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=tls)) as s:
        async def call(b: bytes) -> int:
            async with s.post(url, data=b, headers={"content-type": "application/json"}) as r:
                while await r.content.readany():
                    pass
                return r.status
        await _drive(call, body, 200, c)
        return await _drive(call, body, n, c)


async def _httpx(url: str, body: bytes, n: int, c: int) -> float:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=c, max_keepalive_connections=c)) as s:
        async def call(b: bytes) -> int:
            async with s.stream("POST", url, content=b, headers={"content-type": "application/json"}) as r:
                async for _ in r.aiter_raw():
                    pass
                return r.status_code
        await _drive(call, body, 200, c)
        return await _drive(call, body, n, c)


async def _own(url: str, body: bytes, n: int, c: int, ca_file: str | None = None) -> float:
    """The gateway's own client (proxy/upstreams/transport.py), as the forwarder uses it."""
    from proxy.config.loader import parse_config
    from proxy.upstreams.transport import make_transport

    base = url.rsplit("/chat/completions", 1)[0]
    tls = f", tls: {{ca_file: '{ca_file}'}}" if ca_file else ""
    config = parse_config(f"upstreams: [{{name: a, base_url: '{base}', models: [m]{tls}}}]\n", {})
    transport = make_transport(config.upstreams[0])

    async def call(b: bytes) -> int:
        r = await transport.post(url, {"content-type": "application/json"}, b)
        try:
            while await r.read_chunk():
                pass
        finally:
            r.close()
        return r.status

    try:
        await _drive(call, body, 200, c)
        return await _drive(call, body, n, c)
    finally:
        await transport.close()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the proxy package of this checkout
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tls", action="store_true", help="the gateway's client on plain HTTP and on TLS")
    args = parser.parse_args()
    port, tls_port = _free_port(), _free_port()
    workdir = tempfile.TemporaryDirectory(prefix="client-choice-")
    cert, key = _certificate(Path(workdir.name)) if args.tls else (None, None)
    server = multiprocessing.Process(target=_serve, args=(port, tls_port if args.tls else None, cert, key),
                                     daemon=True)
    server.start()
    time.sleep(0.3)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    tls_url = f"https://127.0.0.1:{tls_port}/v1/chat/completions"
    stream_body = BODY[:-1] + b',"stream":true}'
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    cases: list[tuple[str, Callable[..., Awaitable[float]], str, str | None]] = [
        ("own", _own, url, None), ("aiohttp", _aiohttp, url, None), ("httpx", _httpx, url, None)]
    if args.tls:
        cases = [("own", _own, url, None), ("own TLS", _own, tls_url, cert), ("aiohttp TLS", _aiohttp, tls_url, cert)]
    print(f"{'client':12} {'non-stream CPU us/req':>22} {'stream CPU us/req':>18}")
    for name, fn, target, ca_file in cases:
        extra = (ca_file,) if ca_file else ()
        plain = asyncio.run(fn(target, BODY, args.requests, args.concurrency, *extra))
        stream = asyncio.run(fn(target, stream_body, args.requests, args.concurrency, *extra))
        print(f"{name:12} {plain:22.0f} {stream:18.0f}")
    server.terminate()
    workdir.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _certificate(workdir: Path) -> tuple[str, str]:
    from stub import tls_files  # bench/stub.py

    cert, key = tls_files(workdir)
    return str(cert), str(key)


if __name__ == "__main__":
    main()
