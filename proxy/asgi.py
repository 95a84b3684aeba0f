"""Small pure-ASGI helpers shared by the endpoints and middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from .errors import Header, InvalidRequestError, ProxyError, RequestTooLargeError

Scope = MutableMapping[str, Any]
Message = dict[str, Any]
Receive = Any  # Callable[[], Awaitable[Message]]
Send = Any  # Callable[[Message], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise InvalidRequestError("The Content-Length header is not a number.") from None
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"The request body is larger than the gateway accepts ({limit} bytes).")


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes,
                     headers: Iterable[Header] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ProxyError, headers: Iterable[Header] = ()) -> None:
    await send_bytes(send, error.status, error.body(), b"application/json",
                     [*error.headers, *headers])


class DisconnectWatch:
    """Cancels the request's task when the client goes away mid-answer.

    uvicorn does not fail ``send`` after a disconnect, so without this an
    abandoned request would keep its upstream busy to the end.
    """

    def __init__(self) -> None:
        self.finishing = False
        self.gone = False

    @asynccontextmanager
    async def watching(self, receive: Receive) -> AsyncIterator[DisconnectWatch]:
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not self.finishing:
                self.gone = True
                task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            yield self
        except asyncio.CancelledError:
            if self.gone:
                task.uncancel()
                raise ClientGone from None
            raise
        finally:
            watcher.cancel()
