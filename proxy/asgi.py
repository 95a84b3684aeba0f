"""Small pure-ASGI helpers shared by the endpoints and middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, MutableMapping
from types import TracebackType
from typing import Any, Literal

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

    ``with watch.watching(receive):`` — a plain (not async) context manager:
    starting and stopping the watcher needs no await, and a generator-based
    one costs more per request.
    """

    __slots__ = ("_receive", "_task", "_watcher", "finishing", "gone")

    def __init__(self) -> None:
        self.finishing = False
        self.gone = False
        self._receive: Receive = None
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def watching(self, receive: Receive) -> DisconnectWatch:
        self._receive = receive
        return self

    def __enter__(self) -> DisconnectWatch:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        assert self._watcher is not None and self._task is not None
        self._watcher.cancel()
        if exc_type is asyncio.CancelledError and self.gone:
            self._task.uncancel()
            raise ClientGone from None
        return False

    async def _watch(self) -> None:
        receive = self._receive
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.finishing:
            self.gone = True
            assert self._task is not None
            self._task.cancel()
