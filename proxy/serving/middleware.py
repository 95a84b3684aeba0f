"""Pure ASGI middleware: request ids, and the one top-level error handler."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable

from ..errors import InternalError, NotFoundError, ProxyError
from .asgi import Message, Receive, Scope, Send, header, send_error

_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Every response carries ``x-request-id``: the client's when it sent a
    sane one, otherwise a new one. Stored in ``scope["state"]["request_id"]``."""

    def __init__(self, app: object) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: it hands back the app's own, so a stream waits in one frame fewer. Hence
        # never the app given to a server itself (uvicorn would take it for an ASGI 2 app).
        if scope["type"] != "http":
            return self.app(scope, receive, send)  # type: ignore[operator,no-any-return]
        given = header(scope, b"x-request-id")
        request_id = given if given is not None and _SAFE_ID.match(given) else secrets.token_hex(16).encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        return self.app(scope, receive, send_with_id)  # type: ignore[operator,no-any-return]


class ErrorMiddleware:
    """The last line: a ProxyError that escaped becomes its OpenAI-format
    answer; anything else is logged with its traceback and becomes a plain
    500 that reveals nothing."""

    def __init__(self, app: object, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[operator]
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)  # type: ignore[operator]
        except ProxyError as exc:
            if not started:
                await send_error(send, exc)
        except Exception:  # the top-level handler: the only place a blanket catch belongs
            self.logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, InternalError("The gateway hit an internal error."))


class AdminPortMiddleware:
    """With ``server.admin_port``: ``/admin/*`` answers only on that port, and
    that port answers nothing else, so the admin API can stay off the
    network path clients use (a NetworkPolicy can then close it)."""

    def __init__(self, app: object, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            on_admin_port = server is not None and server[1] == self.admin_port
            if on_admin_port != scope["path"].startswith("/admin"):
                await send_error(send, NotFoundError(f"Invalid URL ({scope['method']} {scope['path']}).",
                                                     code="unknown_url"))
                return
        await self.app(scope, receive, send)  # type: ignore[operator]
