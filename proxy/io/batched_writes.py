"""A transport whose writes of one event-loop pass leave in one system call.

uvloop sends every ``transport.write`` at once, and on loopback or a LAN each
send also runs the receiver's side of TCP and wakes it. A response's head and
body, or the quota commands of every request that reached Redis in the same
pass, are written within microseconds of each other; joined, they cost one
send and one wake-up of the peer instead of several (``bench/README.md``).

The first write of a pass schedules the flush with ``call_soon``, so bytes
wait at most until the loop has run the callbacks already due, never for a
timer or for I/O; an owner that knows nothing more will follow (the HTTP
protocol, once an answer is complete) calls ``flush`` itself, so the answer
does not wait for what its task does next. Everything that ends or shuts the
stream (``close``, ``write_eof``) flushes first; ``abort`` drops what is held,
as it drops what the transport holds. Every other transport method is the
wrapped one's.
"""

from __future__ import annotations

import asyncio
from typing import Any


class BatchedTransport(asyncio.Transport):
    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        # No super().__init__(): its extra-info dict would go unused (get_extra_info is the wrapped one's).
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None  # None: nothing held, no flush scheduled

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        held = self._held
        if held is None:
            self._held = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            held.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Send what is held now (the loop calls this once per pass that wrote)."""
        held = self._held
        if held is None:
            return
        self._held = None
        if not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held or ()))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)
