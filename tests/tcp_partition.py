"""``Partition``: a TCP proxy on loopback that can cut one client off from a server, as a network would.

A network partition sends no error, only nothing: while ``cut()`` holds,
connections (open ones and new ones alike) stay open and whatever either side
sends is lost. ``heal()`` closes the connections that lost data, as their
peers' TCP stacks eventually would, and forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.loopback_proxy import LoopbackProxy


class Partition(LoopbackProxy):
    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._cut = False
        self._links: set[_Link] = set()

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_cut(True), self._loop).result(5)

    def heal(self) -> None:
        asyncio.run_coroutine_threadsafe(self._set_cut(False), self._loop).result(5)

    async def _set_cut(self, cut: bool) -> None:
        self._cut = cut
        for link in [link for link in self._links if link.lost_data]:
            link.close()  # a connection that lost data cannot carry on, once the network is back

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        link = _Link(client_w)
        self._links.add(link)
        try:
            if self._cut:  # no connection to the server while cut: its SYN would be lost
                link.lost_data = True
                await client_r.read()  # hold the connection, silently, until it is closed
                return
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            link.server = server_w
            await asyncio.gather(self._pipe(client_r, server_w, link), self._pipe(server_r, client_w, link))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            link.close()
            self._links.discard(link)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        try:
            while data := await reader.read(65536):
                if self._cut:
                    link.lost_data = True
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            link.close()


class _Link:
    """One client connection and, once made, its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.lost_data = False

    def close(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                with contextlib.suppress(RuntimeError):  # the loop may be closing
                    writer.close()
