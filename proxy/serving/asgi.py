"""Small pure-ASGI helpers shared by the endpoints and middleware."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, MutableMapping
from types import TracebackType
from typing import Any, Literal, Protocol

from ..errors import Header, InvalidRequestError, ProxyError, RequestTooLargeError

Scope = MutableMapping[str, Any]
Message = dict[str, Any]
Receive = Any  # Callable[[], Awaitable[Message]]
Send = Any  # Callable[[Message], Awaitable[None]]


DISCONNECT_HOOK = "llm_proxy.on_disconnect"


class Abortable(Protocol):
    def abort_connection(self) -> None: ...

    def write_paused(self) -> bool: ...


class DisconnectSignal:
    """A connection's report of its own loss, offered to the application as an ASGI extension
    at ``scope["extensions"][DISCONNECT_HOOK]`` by the gateway's HTTP protocol
    (``http_protocol.py``), which calls ``fire`` when the connection is lost. The scope holds
    this, not the protocol: a scope holding the protocol would make a reference cycle that only
    the garbage collector frees. (The ``connection`` it may hold is the protocol, but only until
    the connection is lost, which breaks that cycle.)"""

    __slots__ = ("_callback", "_connection", "_lost", "write_timed_out")

    def __init__(self, connection: Abortable | None = None) -> None:
        self._callback: Callable[[], None] | None = None
        self._connection = connection
        self._lost = False
        self.write_timed_out = False  # set before the connection resets itself: an answer was left untaken

    def watch(self, callback: Callable[[], None]) -> bool:
        """Have ``callback`` called once when the connection is lost; False, and nothing
        registered, when it is lost already."""
        if self._lost:
            return False
        self._callback = callback
        return True

    def unwatch(self, callback: Callable[[], None]) -> None:
        """Withdraw ``callback`` if it is still the one registered."""
        if self._callback == callback:
            self._callback = None

    def abort(self) -> None:
        """Drop the connection now, with whatever is still buffered for the client."""
        if self._connection is not None:
            self._connection.abort_connection()

    def write_may_wait(self) -> bool:
        """Whether a send now may wait for the client to take what it was sent before (its
        connection's writing is paused). Unknown counts as may."""
        return self._connection is None or self._connection.write_paused()

    def fire(self) -> None:
        self._lost = True
        self._connection = None
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


class ClientGone(Exception):
    """The client disconnected before the answer was complete."""

    code = "client_closed_request"


class ClientTooSlow(ClientGone):
    """The client stopped reading: a write to it did not go out in time, and the gateway dropped
    the connection."""

    code = "client_write_timeout"


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
    abandoned request would keep its upstream busy to the end. Under the
    gateway's own protocol the connection calls back when it is lost; under
    any other server a watcher task waits for ``http.disconnect`` (a task and
    a pending ``receive`` per request, for the whole of a stream).

    ``with watch.watching(receive, scope):`` — a plain (not async) context
    manager: starting and stopping the watch needs no await.
    """

    __slots__ = ("_hook", "_receive", "_task", "_watcher", "finishing", "gone")

    def __init__(self) -> None:
        self.finishing = False
        self.gone = False
        self._receive: Receive = None
        self._hook: DisconnectSignal | None = None
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def watching(self, receive: Receive, scope: Scope) -> DisconnectWatch:
        self._receive = receive
        extensions = scope.get("extensions")
        self._hook = extensions.get(DISCONNECT_HOOK) if extensions else None
        return self

    def __enter__(self) -> DisconnectWatch:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        if self._hook is not None:
            if not self._hook.watch(self._lost):
                # Gone already: nothing is forwarded. (Cancelling the running task here would
                # leave a cancellation pending that a quick error in the body could not withdraw.)
                self.gone = True
                raise ClientGone
        else:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        assert self._task is not None
        if self._hook is not None:
            self._hook.unwatch(self._lost)
        if self._watcher is not None:
            self._watcher.cancel()
        if exc_type is asyncio.CancelledError and self.gone:
            self._task.uncancel()
            raise ClientGone from None
        return False

    @property
    def write_timed_out(self) -> bool:
        """The connection was reset because its client did not take an answer written to it in time
        (``send_timeout`` of the gateway's HTTP protocol): a send it held back returned unsent."""
        return self._hook is not None and self._hook.write_timed_out

    def abort(self) -> None:
        """Drop the connection (a client that does not read its answer). Under another server
        than the gateway's own this cannot be done; that server closes it once the request ends."""
        self.finishing = True  # the loss that follows is the gateway's doing, not the client's
        if self._hook is not None:
            self._hook.abort()

    def write_may_wait(self) -> bool:
        """Whether a send now may wait for the client (under another server: assume it may)."""
        return self._hook is None or self._hook.write_may_wait()

    async def _watch(self) -> None:
        receive = self._receive
        while (await receive())["type"] != "http.disconnect":
            pass
        self._lost()

    def _lost(self) -> None:
        if not self.finishing and not self.gone:
            self.gone = True
            assert self._task is not None
            self._task.cancel()
