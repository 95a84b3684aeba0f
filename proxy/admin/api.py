"""The admin API under ``/admin``: issued keys, teams, usage and the audit log.

Enabled by ``admin_key`` (``Authorization: Bearer <admin_key>``, compared in
constant time); without it every admin path answers 404 as if it did not
exist. Errors use the OpenAI format. A secret appears in exactly two answers,
the one that creates a key and the one that rotates it, and nowhere else:
not in listings, not in the audit log, not in logs.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..access.issued_keys import IssuedKey, IssuedKeys, limits_json, parse_key_spec, parse_overlap, parse_team
from ..access.keys import bearer_token
from ..access.quotas import QuotaService, Usage
from ..config.types import Config, TeamConfig
from ..errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    ProxyError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from ..serving.asgi import ClientGone, read_body
from ..serving.auth_guard import AuthFailureGuard

_MAX_BODY = 64 * 1024
_ACTOR_HEADER = "x-llm-proxy-actor"


@dataclass(frozen=True)
class AdminContext:
    config: Callable[[], Config]  # the live config (it may be reloaded)
    quotas: QuotaService
    keys: IssuedKeys
    upstreams: Callable[[], list[dict[str, Any]]] = list  # each upstream's live state
    # Stricter than the API's guard: the admin key is one secret that unlocks everything.
    guard: AuthFailureGuard = field(default_factory=lambda: AuthFailureGuard(burst=10, per_second=0.2))


Handler = Callable[[AdminContext, Request, str], Awaitable[Response]]


def admin_routes(admin: AdminContext) -> list[BaseRoute]:
    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, _guarded(admin, handler), methods=[method])

    return [
        route("/admin/keys", _create_key, "POST"),
        route("/admin/keys", _list_keys, "GET"),
        route("/admin/keys/{key_id}", _get_key, "GET"),
        route("/admin/keys/{key_id}", _update_key, "PATCH"),
        route("/admin/keys/{key_id}", _revoke_key, "DELETE"),
        route("/admin/keys/{key_id}/rotate", _rotate_key, "POST"),
        route("/admin/teams", _list_teams, "GET"),
        route("/admin/teams/{name}", _get_team, "GET"),
        route("/admin/teams/{name}", _put_team, "PUT"),
        route("/admin/teams/{name}", _patch_team, "PATCH"),
        route("/admin/teams/{name}/usage", _team_usage, "GET"),
        route("/admin/audit", _audit, "GET"),
        route("/admin/upstreams", _upstreams, "GET"),
    ]


def _guarded(admin: AdminContext, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            actor = _authorize(admin.config(), request, admin.guard)
            return await handler(admin, request, actor)
        except ProxyError as exc:
            return Response(exc.body(), exc.status, headers={k.decode(): v.decode() for k, v in exc.headers},
                            media_type="application/json")
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: the client left while sending its body

    return endpoint


def _authorize(config: Config, request: Request, guard: AuthFailureGuard) -> str:
    """The acting admin's name for the audit log, or a 404 (API disabled) / 401 / 429."""
    if not config.admin_key:
        raise NotFoundError(f"Invalid URL ({request.method} {request.url.path}).", code="unknown_url")
    header = request.headers.get("authorization")
    token = bearer_token(header.encode("latin-1") if header is not None else None)
    if not hmac.compare_digest(token.encode(), config.admin_key.encode()):
        wait = guard.failed(request.client.host if request.client else "unknown")
        if wait:
            raise RateLimitError("Too many failed admin authentication attempts from this address.",
                                 code="auth_failures", headers=[(b"retry-after", b"%d" % wait)])
        raise AuthenticationError("Incorrect admin key provided.")
    name = "".join(c for c in request.headers.get(_ACTOR_HEADER, "admin")[:64] if c.isprintable()) or "admin"
    return f"{name}@{request.client.host if request.client else 'unknown'}"


async def _body(admin: AdminContext, request: Request) -> Any:
    """The JSON body, or None when there is none. Its declared length (and, chunked, what has
    arrived) is held to ``_MAX_BODY`` before more is read (413), and the whole of it must
    arrive within ``server.body_timeout`` (408): an admin call holds no more than the API's."""
    timeout = admin.config().server.body_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await read_body(request.receive, request.scope, _MAX_BODY)
    except TimeoutError:
        raise RequestTimeoutError(f"The request body did not arrive within {timeout:g} s.") from None
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequestError("The body is not valid JSON.") from None


def _json(data: Any, status: int = 200, secret: bool = False) -> Response:
    headers = {"cache-control": "no-store"} if secret else None
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def usage_json(rows: list[Usage] | None) -> list[dict[str, Any]] | None:
    if rows is None:
        return None
    return [{"scope": u.scope, "limit": u.limit, "value": u.value, "used": u.used, "remaining": u.remaining,
             "reset_seconds": u.reset_seconds} for u in rows]


async def key_view(quotas: QuotaService, key: IssuedKey) -> dict[str, Any]:
    try:
        usage: list[Usage] | None = await quotas.key_usage(key.policy())
    except ServiceUnavailableError:
        usage = None  # the key is still worth showing while the quota store is down
    return {**key.public(), "usage": usage_json(usage)}


async def _create_key(admin: AdminContext, request: Request, actor: str) -> Response:
    key, secret = await admin.keys.create(parse_key_spec(await _body(admin, request)), actor)
    return _json({**key.public(), "key": secret}, 201, secret=True)


async def _list_keys(admin: AdminContext, request: Request, actor: str) -> Response:
    keys = await admin.keys.keys(request.query_params.get("team"))
    return _json({"object": "list", "data": [await key_view(admin.quotas, k) for k in keys]})


async def _get_key(admin: AdminContext, request: Request, actor: str) -> Response:
    return _json(await key_view(admin.quotas, await admin.keys.get(request.path_params["key_id"])))


async def _update_key(admin: AdminContext, request: Request, actor: str) -> Response:
    body = await _body(admin, request)
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    key = await admin.keys.update(request.path_params["key_id"], body, actor)
    return _json(await key_view(admin.quotas, key))


async def _revoke_key(admin: AdminContext, request: Request, actor: str) -> Response:
    return _json((await admin.keys.revoke(request.path_params["key_id"], actor)).public())


async def _rotate_key(admin: AdminContext, request: Request, actor: str) -> Response:
    body = await _body(admin, request) or {}
    if not isinstance(body, dict) or set(body) - {"overlap_seconds"}:
        raise InvalidRequestError("The body may only hold 'overlap_seconds'.")
    key, secret = await admin.keys.rotate(request.path_params["key_id"],
                                          parse_overlap(body.get("overlap_seconds")), actor)
    return _json({**key.public(), "key": secret}, secret=True)


async def _team(admin: AdminContext, name: str) -> tuple[TeamConfig, str]:
    team = await admin.keys.get_team(name)
    if team is not None:
        return team, "admin"
    configured = admin.config().team(name)
    if configured is None:
        raise NotFoundError(f"No team named '{name}'.", param="name")
    return configured, "config"


def _team_json(team: TeamConfig, source: str) -> dict[str, Any]:
    return {"object": "team", "name": team.name, "source": source,
            "models": list(team.models) if team.models is not None else None,
            "limits": limits_json(team.limits)}


async def _list_teams(admin: AdminContext, request: Request, actor: str) -> Response:
    teams = {t.name: _team_json(t, "config") for t in admin.config().teams}
    teams.update({t.name: _team_json(t, "admin") for t in await admin.keys.teams()})
    return _json({"object": "list", "data": [teams[name] for name in sorted(teams)]})


async def _get_team(admin: AdminContext, request: Request, actor: str) -> Response:
    team, source = await _team(admin, request.path_params["name"])
    usage = await _team_usage_rows(admin, team)
    return _json({**_team_json(team, source), "usage": usage_json(usage)})


async def _put_team(admin: AdminContext, request: Request, actor: str) -> Response:
    team = await admin.keys.put_team(parse_team(request.path_params["name"], await _body(admin, request)), actor)
    return _json(_team_json(team, "admin"))


async def _patch_team(admin: AdminContext, request: Request, actor: str) -> Response:
    """Change some of a team's settings: the limits named in the body (null removes one) and its
    models when the body names them; everything else stays. (PUT replaces the whole team.)"""
    changes = await _body(admin, request)
    if not isinstance(changes, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    team, _ = await _team(admin, request.path_params["name"])
    merged: dict[str, Any] = {"models": list(team.models) if team.models is not None else None,
                              "limits": limits_json(team.limits), **changes}
    if isinstance(changes.get("limits"), dict):
        merged["limits"] = {**limits_json(team.limits), **changes["limits"]}
    saved = await admin.keys.put_team(parse_team(team.name, merged), actor)
    return _json(_team_json(saved, "admin"))


async def _team_usage(admin: AdminContext, request: Request, actor: str) -> Response:
    team, _ = await _team(admin, request.path_params["name"])
    return _json({"object": "team.usage", "team": team.name,
                  "usage": usage_json(await admin.quotas.team_usage(team.name, team.limits))})


async def _team_usage_rows(admin: AdminContext, team: TeamConfig) -> list[Usage] | None:
    try:
        return await admin.quotas.team_usage(team.name, team.limits)
    except ServiceUnavailableError:
        return None


async def _audit(admin: AdminContext, request: Request, actor: str) -> Response:
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidRequestError("'limit' must be an integer from 1 to 1000.", param="limit")
    return _json({"object": "list", "data": await admin.keys.audit(int(raw))})


async def _upstreams(admin: AdminContext, request: Request, actor: str) -> Response:
    return _json({"object": "list", "data": admin.upstreams()})
