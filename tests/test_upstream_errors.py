"""What a failed upstream connection says: the kind for the client, the reason and where for the operator.

Real sockets on loopback: a closed port, a name that cannot resolve, a server
that resets the connection, one that closes it without answering.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.config.loader import parse_config
from proxy.errors import UpstreamConnectionError
from proxy.upstreams.transport import HttpTransport
from tests.stub_upstream import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _transport(base_url: str) -> HttpTransport:
    config = parse_config(f"upstreams: [{{name: a, base_url: '{base_url}', models: [m], timeout: {{connect: 10}}}}]",
                          {})
    return HttpTransport(config.upstreams[0])


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        servers.append(srv := await asyncio.start_server(handler, "127.0.0.1", 0))
        return int(srv.sockets[0].getsockname()[1])

    yield start
    for srv in servers:
        srv.close()


async def _failure(base_url: str) -> UpstreamConnectionError:
    transport = _transport(base_url)
    try:
        with pytest.raises(UpstreamConnectionError) as caught:
            await transport.get(base_url + "/models", {})
        return caught.value
    finally:
        await transport.close()


async def test_a_closed_port_is_refused() -> None:
    port = free_port()
    error = await _failure(f"http://127.0.0.1:{port}/v1")
    assert error.message == "cannot reach upstream: connection refused"
    assert error.detail == f"connection refused (127.0.0.1:{port})"


async def test_a_name_that_does_not_resolve_is_a_dns_failure() -> None:
    error = await _failure("https://no-such-upstream.invalid/v1")
    assert error.message == "cannot reach upstream: DNS lookup failed"
    assert error.detail.startswith("DNS lookup failed: ")
    assert error.detail.endswith("(no-such-upstream.invalid:443)")


async def test_a_reset_and_a_close_before_the_answer(server: Callable[[Handler], Awaitable[int]]) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    port = await server(reset)
    error = await _failure(f"http://127.0.0.1:{port}/v1")
    assert (error.message, error.detail) == ("cannot reach upstream: connection reset by peer",
                                             f"connection reset by peer (127.0.0.1:{port})")
    port = await server(close)
    error = await _failure(f"http://127.0.0.1:{port}/v1")
    assert error.detail == f"the upstream closed the connection (127.0.0.1:{port})"
