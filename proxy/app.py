"""``create_app(config)``: builds every part and wires them; nothing global."""

from __future__ import annotations

import asyncio
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
from starlette.types import ASGIApp, Receive, Scope, Send

from .access.budgets import BudgetGauges
from .access.issued_keys import build_issued_keys
from .access.keys import Authenticator
from .access.quotas import QuotaService, build_quota_service
from .admin.api import AdminContext, admin_routes
from .apis.endpoints import ChatCompletions, MetricsEndpoint, Models, Probe
from .apis.gateway import Gateway
from .apis.openapi import openapi_routes
from .config.reload import ConfigWatcher
from .config.types import Config, TelemetryConfig
from .errors import MethodNotAllowedError, NotFoundError, ProxyError
from .io.redis_client import connect
from .serving.middleware import AdminPortMiddleware, ErrorMiddleware, RequestIdMiddleware
from .telemetry.hub import Telemetry
from .upstreams.health_checks import ActiveChecks
from .upstreams.health_sync import HealthSync, RedisHealthShare

CHAT_PATH = "/v1/chat/completions"
STATE_EXPORT_INTERVAL = 2.0
BUDGET_EVERY_TICKS = 5  # budgets from the store every 10 s


def create_app(config: Config, *, config_path: str | os.PathLike[str] | None = None,
               quotas: QuotaService | None = None, telemetry: Telemetry | None = None,
               logger: logging.Logger | None = None) -> FastPath:
    """The ASGI app. With ``config_path``, the file is watched and reloaded on change or SIGHUP."""
    log = logger or logging.getLogger("llm_proxy")
    tel = telemetry or Telemetry.build(TelemetryConfig())
    issued = build_issued_keys(config, events=tel.metrics, logger=log)
    gateway = Gateway(config, quotas or build_quota_service(config, tel.metrics, log), tel,
                      make_auth=lambda static: Authenticator(static, issued), logger=log)
    background = _Background(gateway, log, config_path, BudgetGauges(gateway.quotas, tel.metrics, issued))
    admin = AdminContext(config=lambda: gateway.runtime.config, quotas=gateway.quotas, keys=issued,
                         upstreams=gateway.upstream_states)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await issued.start()
        background.start()
        try:
            yield
        finally:
            await background.stop()
            await issued.close()
            await gateway.close()
            tel.tracing.shutdown()
            tel.access.flush()

    chat = ChatCompletions(gateway)
    app = Starlette(
        routes=[Route(CHAT_PATH, chat, methods=["POST"]), *_routes(gateway), *admin_routes(admin)],
        middleware=_middleware(config, log),
        exception_handlers={HTTPException: _http_error, ProxyError: _proxy_error},
        lifespan=lifespan,
    )
    # Starlette would answer a path with a stray slash with a redirect built from the client's Host
    # header (an open redirect); an unknown path is a 404, as OpenAI's API answers it.
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    return FastPath(app, _wrap(chat, config, log))


class FastPath:
    """``POST /v1/chat/completions`` goes straight to its handler, through the
    same middleware but not Starlette's router and exception layers, which
    cost about 7% of a request's CPU (bench/README.md). Everything else,
    lifespan included, is the Starlette app's."""

    def __init__(self, app: Starlette, chat: ASGIApp) -> None:
        self.app = app
        self.state = app.state
        self._chat = chat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            await self._chat(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _wrap(app: ASGIApp, config: Config, log: logging.Logger) -> ASGIApp:
    for layer in reversed(_middleware(config, log)):
        app = layer.cls(app, *layer.args, **layer.kwargs)
    return app


class _Background:
    """The gateway's periodic work: active checks, the config watcher, state export."""

    def __init__(self, gateway: Gateway, log: logging.Logger,
                 config_path: str | os.PathLike[str] | None, budgets: BudgetGauges) -> None:
        self.gateway = gateway
        self.budgets = budgets
        self.checks = ActiveChecks(lambda: gateway.runtime.pool, log)
        config = gateway.runtime.config
        self.sync = (HealthSync(RedisHealthShare(connect(config.redis_url, config.quotas.store_timeout),
                                                 config.quotas.store_timeout),
                                lambda: gateway.runtime.pool, log)
                     if config.redis_url else None)
        self.watcher = (ConfigWatcher(config_path, gateway.reload, gateway.telemetry.metrics.config_reload,
                                      log, config.server.reload_interval or 3600 * 24)
                        if config_path is not None else None)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.checks.start()
        if self.sync is not None:
            self.sync.start()
        if self.watcher is not None:
            self.watcher.start()
        self._task = asyncio.get_running_loop().create_task(self._export())

    async def _export(self) -> None:
        ticks = 0
        while True:
            self.gateway.export_state()
            if ticks % BUDGET_EVERY_TICKS == 0:
                rt = self.gateway.runtime
                await self.budgets.refresh(rt.keys.policies(), rt.config.teams)
            ticks += 1
            await asyncio.sleep(STATE_EXPORT_INTERVAL)

    async def stop(self) -> None:
        if self.sync is not None:
            await self.sync.stop()
        if self._task is not None:
            self._task.cancel()
        if self.watcher is not None:
            self.watcher.stop()
        self.checks.stop()


def _middleware(config: Config, log: logging.Logger) -> list[Middleware]:
    stack = [Middleware(RequestIdMiddleware), Middleware(ErrorMiddleware, logger=log)]
    if config.server.admin_port is not None:
        stack.append(Middleware(AdminPortMiddleware, admin_port=config.server.admin_port))
    return stack


def _routes(gateway: Gateway) -> list[BaseRoute]:
    return [
        Route("/v1/models", Models(gateway), methods=["GET"]),
        Route("/healthz", Probe(gateway, readiness=False), methods=["GET"]),
        Route("/readyz", Probe(gateway, readiness=True), methods=["GET"]),
        Route("/metrics", MetricsEndpoint(gateway), methods=["GET"]),
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
