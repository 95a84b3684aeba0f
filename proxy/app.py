"""``create_app(config)``: builds every part and wires them; nothing global."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .config import Config
from .endpoints import ChatCompletions, Models, Probe
from .errors import MethodNotAllowedError, NotFoundError, ProxyError
from .gateway import Gateway
from .health_checks import ActiveChecks
from .middleware import ErrorMiddleware, RequestIdMiddleware
from .openapi import openapi_routes
from .quotas import QuotaService, build_quota_service
from .reload import ConfigWatcher


def create_app(config: Config, *, config_path: str | os.PathLike[str] | None = None,
               quotas: QuotaService | None = None, logger: logging.Logger | None = None) -> Starlette:
    """The ASGI app. With ``config_path``, the file is watched and reloaded on change or SIGHUP."""
    log = logger or logging.getLogger("llm_proxy")
    gateway = Gateway(config, quotas or build_quota_service(config), logger=log)
    checks = ActiveChecks(lambda: gateway.runtime.pool, log)
    watcher = (ConfigWatcher(config_path, gateway.reload, lambda outcome: None, log,
                             config.server.reload_interval or 3600 * 24)
               if config_path is not None else None)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        checks.start()
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            checks.stop()
            await gateway.close()

    app = Starlette(
        routes=_routes(gateway),
        middleware=[Middleware(RequestIdMiddleware), Middleware(ErrorMiddleware, logger=log)],
        exception_handlers={HTTPException: _http_error, ProxyError: _proxy_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


def _routes(gateway: Gateway) -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", ChatCompletions(gateway), methods=["POST"]),
        Route("/v1/models", Models(gateway), methods=["GET"]),
        Route("/healthz", Probe(gateway, readiness=False), methods=["GET"]),
        Route("/readyz", Probe(gateway, readiness=True), methods=["GET"]),
        *openapi_routes(),
    ]


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return Response(exc.body(), exc.status, headers={k.decode(): v.decode() for k, v in exc.headers},
                    media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    error: ProxyError
    if exc.status_code == 405:
        error = MethodNotAllowedError(f"Method not allowed ({where}).")
    elif exc.status_code == 404:
        error = NotFoundError(f"Invalid URL ({where}).", code="unknown_url")
    else:
        error = ProxyError(str(exc.detail) or "HTTP error")
        error.status = exc.status_code
    return await _proxy_error(request, error)
