"""``llm-proxy keys create|list|revoke|rotate`` and ``llm-proxy teams usage``.

Each command works against a running gateway's admin API (``--url``, with the
admin key from ``--admin-key-file`` or ``$LLM_PROXY_ADMIN_KEY``) or directly
against Redis (``--redis-url``, or ``--config FILE`` for its ``redis_url`` and
teams). Answers are printed as JSON on stdout, the same as the admin API's; a
secret is printed only by ``create`` and ``rotate``. Exit status: 0 done, 1 the
command failed (the reason on stderr, nothing on stdout), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import orjson

from ..access.issued_keys import IssuedKeys, parse_key_spec, parse_overlap
from ..access.quotas import QuotaService
from ..access.store_redis import RedisDirectory, RedisQuotaStore
from ..config.loader import ADMIN_KEY_ENV, admin_key_from_env, load_config
from ..config.types import QuotasConfig, TeamConfig
from ..errors import ConfigError, NotFoundError, ProxyError, ServiceUnavailableError
from ..io.redis_client import connect
from .api import key_view, usage_json

_LIMIT_FLAGS = ("rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month")
_HTTP_TIMEOUT = 10.0


class _Target(Protocol):
    def create(self, spec: dict[str, Any]) -> Any: ...

    def list(self, team: str | None) -> Any: ...

    def revoke(self, key_id: str) -> Any: ...

    def rotate(self, key_id: str, overlap: float | None) -> Any: ...

    def team_usage(self, name: str) -> Any: ...


class CommandError(Exception):
    """A message for stderr and exit status 1."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="issue, list, revoke and rotate keys")
    key_cmds = keys.add_subparsers(metavar="ACTION", required=True)
    create = _command(key_cmds, "create", "issue a key (its secret is printed once)", _create)
    create.add_argument("--name", required=True)
    create.add_argument("--team")
    create.add_argument("--model", action="append", dest="models", metavar="GLOB",
                        help="allowed model name or glob; repeat for more (default: all)")
    for flag in _LIMIT_FLAGS:
        create.add_argument("--" + flag.replace("_", "-"), type=int, dest=flag, metavar="N")
    create.add_argument("--expires-at", metavar="ISO8601")
    create.add_argument("--metadata", metavar="JSON", help="a JSON object kept with the key")
    listing = _command(key_cmds, "list", "list issued keys with their usage", _list)
    listing.add_argument("--team")
    revoke = _command(key_cmds, "revoke", "revoke a key on every replica at once", _revoke)
    revoke.add_argument("key_id", metavar="ID")
    rotate = _command(key_cmds, "rotate", "issue a new secret; the old one works for --overlap", _rotate)
    rotate.add_argument("key_id", metavar="ID")
    rotate.add_argument("--overlap", type=float, metavar="SECONDS",
                        help="how long the old secret keeps working (default 86400)")
    teams = subparsers.add_parser("teams", help="team usage")
    team_cmds = teams.add_subparsers(metavar="ACTION", required=True)
    usage = _command(team_cmds, "usage", "a team's usage against its limits", _usage)
    usage.add_argument("name")


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help_text: str,
             run: Callable[[_Target, argparse.Namespace], Any]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running gateway, e.g. http://127.0.0.1:8080")
    where.add_argument("--redis-url", help="the gateway's Redis, used directly")
    where.add_argument("--config", help="a gateway config file (its redis_url and teams)")
    parser.add_argument("--admin-key-file", help=f"file holding the admin key (default: ${ADMIN_KEY_ENV})")
    parser.add_argument("--actor", default="cli", help="who acts, for the audit log")
    parser.set_defaults(func=lambda args: _main(args, run))
    return parser


def _main(args: argparse.Namespace, run: Callable[[_Target, argparse.Namespace], Any]) -> int:
    try:
        result = run(_target(args), args)
    except (CommandError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ProxyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _create(target: _Target, args: argparse.Namespace) -> Any:
    try:
        metadata = orjson.loads(args.metadata) if args.metadata else None
    except orjson.JSONDecodeError:
        raise CommandError("--metadata must be a JSON object") from None
    spec = {"name": args.name, "team": args.team, "models": args.models, "expires_at": args.expires_at,
            "metadata": metadata, "limits": {f: getattr(args, f) for f in _LIMIT_FLAGS
                                             if getattr(args, f) is not None}}
    return target.create({k: v for k, v in spec.items() if v is not None})


def _list(target: _Target, args: argparse.Namespace) -> Any:
    return target.list(args.team)


def _revoke(target: _Target, args: argparse.Namespace) -> Any:
    return target.revoke(args.key_id)


def _rotate(target: _Target, args: argparse.Namespace) -> Any:
    return target.rotate(args.key_id, args.overlap)


def _usage(target: _Target, args: argparse.Namespace) -> Any:
    return target.team_usage(args.name)


def _target(args: argparse.Namespace) -> _Target:
    if args.url:
        return _Http(args.url.rstrip("/"), _admin_key(args.admin_key_file), args.actor)
    if args.config:
        config = load_config(args.config)
        if not config.redis_url:
            raise CommandError(f"{args.config} has no redis_url; use --url to reach a running gateway")
        return _Direct(config.redis_url, config.quotas, config.teams, args.actor)
    return _Direct(args.redis_url, QuotasConfig(), (), args.actor)


def _admin_key(path: str | None) -> str:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    key = admin_key_from_env()
    if key is None:
        raise CommandError(f"no admin key: pass --admin-key-file or set {ADMIN_KEY_ENV}")
    return key


class _Http:
    """The admin API of a running gateway."""

    def __init__(self, url: str, admin_key: str, actor: str) -> None:
        self._url = url
        self._headers = {"authorization": f"Bearer {admin_key}", "content-type": "application/json",
                         "x-llm-proxy-actor": actor}

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(self._url + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise CommandError(_http_error(exc.code, exc.read(), self._url)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CommandError(f"cannot reach {self._url}: {exc}") from None

    def create(self, spec: dict[str, Any]) -> Any:
        return self._call("POST", "/admin/keys", spec)

    def list(self, team: str | None) -> Any:
        return self._call("GET", "/admin/keys" + (f"?{urlencode({'team': team})}" if team else ""))

    def revoke(self, key_id: str) -> Any:
        return self._call("DELETE", f"/admin/keys/{quote(key_id, safe='')}")

    def rotate(self, key_id: str, overlap: float | None) -> Any:
        body = {"overlap_seconds": overlap} if overlap is not None else {}
        return self._call("POST", f"/admin/keys/{quote(key_id, safe='')}/rotate", body)

    def team_usage(self, name: str) -> Any:
        return self._call("GET", f"/admin/teams/{quote(name, safe='')}/usage")


def _http_error(status: int, body: bytes, url: str) -> str:
    try:
        error = orjson.loads(body)["error"]
        message, code = str(error["message"]), error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        message, code = body.decode(errors="replace")[:200], None
    if status == 404 and code == "unknown_url":
        # The gateway answers every admin path with 404 while its config has no admin_key.
        return f"404: {url} has no admin API (its config sets no admin_key)"
    return f"{status}: {message}"


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    def hide(match: re.Match[str]) -> str:
        user, colon, _ = match.group(1).partition(":")
        return f"//{user}:***@" if colon else match.group(0)

    return re.sub(r"//([^/@]*)@", hide, url)


class _Direct:
    """Redis itself, through the same code the gateway runs (changes reach every replica at once)."""

    def __init__(self, redis_url: str, settings: QuotasConfig, teams: tuple[TeamConfig, ...],
                 actor: str) -> None:
        self._url = redis_url
        self._settings = settings
        self._teams = {t.name: t for t in teams}
        self._actor = actor

    def _run(self, action: Callable[[IssuedKeys, QuotaService], Awaitable[Any]]) -> Any:
        # Admin-paced: a slower Redis may do here, unlike on the request path.
        timeout = max(self._settings.store_timeout, 1.0)

        async def run() -> Any:
            keys = IssuedKeys(RedisDirectory(connect(self._url, timeout), timeout))
            quotas = QuotaService(RedisQuotaStore.from_url(self._url, timeout), self._settings)
            try:
                return await action(keys, quotas)
            finally:
                await keys.close()
                await quotas.close()

        try:
            return asyncio.run(run())
        except ServiceUnavailableError as exc:
            raise CommandError(f"cannot reach Redis at {redact(self._url)}: {exc.message}") from None

    def create(self, spec: dict[str, Any]) -> Any:
        async def create(keys: IssuedKeys, quotas: QuotaService) -> Any:
            key, secret = await keys.create(parse_key_spec(spec), self._actor)
            return {**key.public(), "key": secret}

        return self._run(create)

    def list(self, team: str | None) -> Any:
        async def listing(keys: IssuedKeys, quotas: QuotaService) -> Any:
            return {"object": "list", "data": [await key_view(quotas, k) for k in await keys.keys(team)]}

        return self._run(listing)

    def revoke(self, key_id: str) -> Any:
        async def revoke(keys: IssuedKeys, quotas: QuotaService) -> Any:
            return (await keys.revoke(key_id, self._actor)).public()

        return self._run(revoke)

    def rotate(self, key_id: str, overlap: float | None) -> Any:
        async def rotate(keys: IssuedKeys, quotas: QuotaService) -> Any:
            key, secret = await keys.rotate(key_id, parse_overlap(overlap), self._actor)
            return {**key.public(), "key": secret}

        return self._run(rotate)

    def team_usage(self, name: str) -> Any:
        async def usage(keys: IssuedKeys, quotas: QuotaService) -> Any:
            team = await keys.get_team(name) or self._teams.get(name)
            if team is None:
                raise NotFoundError(f"No team named '{name}' (pass --config for the config's teams).")
            rows = await quotas.team_usage(team.name, team.limits)
            return {"object": "team.usage", "team": team.name, "usage": usage_json(rows)}

        return self._run(usage)
