"""BatchedTransport: the writes of one loop pass leave together, in order, and nothing is lost
or sent after the end. A recording transport counts the sends; tests/test_http_protocol.py and
tests/test_redis_pipe.py check the same over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.io.batched_writes import BatchedTransport


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: Any) -> None:
        assert not self.closing, "written after close"
        self.sent.append(bytes(data))
        self.events.append("write")

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def write_eof(self) -> None:
        self.events.append("eof")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


def batched() -> tuple[BatchedTransport, Recording]:
    inner = Recording()
    return BatchedTransport(inner, asyncio.get_running_loop()), inner


async def next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_pass_leave_in_one_send_in_order() -> None:
    transport, inner = batched()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(bytearray(b"body"))
    transport.writelines([b"-", memoryview(b"end")])
    assert inner.sent == [] and transport.get_write_buffer_size() == 27
    await next_pass()
    assert inner.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody-end"]
    assert transport.get_write_buffer_size() == 0


async def test_each_pass_sends_its_own_writes() -> None:
    transport, inner = batched()
    for part in (b"a", b"b", b"c"):
        transport.write(part)
        await next_pass()
    assert inner.sent == [b"a", b"b", b"c"]


async def test_a_held_write_is_not_changed_by_its_caller_reusing_the_buffer() -> None:
    transport, inner = batched()
    buffer = bytearray(b"first")
    transport.write(buffer)
    buffer[:] = b"other"
    await next_pass()
    assert inner.sent == [b"first"]


async def test_close_and_write_eof_send_what_is_held_first() -> None:
    transport, inner = batched()
    transport.write(b"last words")
    transport.write_eof()
    transport.close()
    assert inner.events == ["write", "eof", "close"] and inner.sent == [b"last words"]
    await next_pass()  # the scheduled flush finds nothing left
    assert inner.sent == [b"last words"]


async def test_abort_drops_what_is_held() -> None:
    transport, inner = batched()
    transport.write(b"never")
    transport.abort()
    await next_pass()
    assert inner.events == ["abort"] and inner.sent == []


async def test_nothing_is_written_once_the_peer_closed() -> None:
    transport, inner = batched()
    transport.write(b"too late")
    inner.closing = True  # the connection was lost before the loop came round
    await next_pass()
    assert inner.sent == []


async def test_an_empty_write_schedules_nothing() -> None:
    transport, inner = batched()
    transport.write(b"")
    await next_pass()
    assert inner.events == []
