"""Keys issued through the admin API or the CLI, and teams set there.

The directory (Redis; process memory without ``redis_url``) holds one record
per key with only the SHA-256 of its secret. Every replica keeps all of them
in memory, so authenticating a request never waits for Redis. The cache is
kept current by the directory's change channel (a revocation reaches every
replica within milliseconds) and reloaded in full every ``refresh_interval``
as a safety net for a missed message. Records carry a revision, so an older
snapshot never overwrites a newer change.

A replica that cannot reach the directory cannot learn of a revocation. So the
copy counts as current only as of its last confirmation (a full load, or an
answered PING on the change channel: see ``RedisDirectory.changes``); once
that is older than ``quotas.key_directory_max_age``, issued keys follow
``quotas.on_store_error``: ``fail_closed`` refuses them with a 503,
``fail_open`` serves them, logs and counts. Static keys are not affected (the
config is their truth), nor is a copy kept in process memory (it is the truth).

Secrets look like ``sk-<id>-<random>``; rotating one keeps the previous secret
working for an overlap period, then only the new one works.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson

from ..config.loader import utc_now
from ..config.types import Config, Limits, StoreErrorMode, TeamConfig
from ..errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from ..io.redis_client import connect
from .keys import KeyPolicy, hash_key
from .store import Directory, Live, MemoryDirectory
from .store_redis import RedisDirectory

UNCONFIRMED_LOG_EVERY = 10.0  # seconds between warnings about keys used on an unconfirmed copy
MAX_HEARTBEAT = 1.0  # seconds between PINGs on the change channel (fewer for a short max age)
DEFAULT_OVERLAP = timedelta(hours=24)
MAX_OVERLAP = timedelta(days=365)
_LIMIT_NAMES = ("rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month")
_MAX_NAME = 128
_MAX_METADATA = 4096


@dataclass(frozen=True)
class IssuedKey:
    id: str
    name: str
    team: str | None
    models: tuple[str, ...] | None
    limits: Limits
    expires_at: datetime | None
    metadata: Mapping[str, Any]
    secret_sha256: str = field(repr=False)
    created_at: datetime
    revoked_at: datetime | None = None
    previous_sha256: str | None = field(default=None, repr=False)
    previous_until: datetime | None = None
    rev: int = 1

    def policy(self) -> KeyPolicy:
        return KeyPolicy(id=self.id, name=self.name, team=self.team, models=self.models,
                         limits=self.limits, expires_at=self.expires_at)

    def public(self) -> dict[str, Any]:
        """The JSON view: everything but the secret and its digests."""
        return {
            "id": self.id, "object": "api_key", "name": self.name, "team": self.team,
            "models": list(self.models) if self.models is not None else None,
            "limits": limits_json(self.limits), "expires_at": _iso(self.expires_at),
            "metadata": dict(self.metadata), "created_at": _iso(self.created_at),
            "revoked": self.revoked_at is not None, "revoked_at": _iso(self.revoked_at),
            "previous_secret_valid_until": _iso(self.previous_until),
        }

    def record(self) -> dict[str, str]:
        return {
            "id": self.id, "name": self.name, "team": self.team or "",
            "models": orjson.dumps(self.models).decode(),
            "limits": orjson.dumps(limits_json(self.limits)).decode(),
            "expires_at": _iso(self.expires_at) or "", "metadata": orjson.dumps(self.metadata).decode(),
            "secret_sha256": self.secret_sha256, "created_at": _iso(self.created_at) or "",
            "revoked_at": _iso(self.revoked_at) or "", "previous_sha256": self.previous_sha256 or "",
            "previous_until": _iso(self.previous_until) or "", "rev": str(self.rev),
        }

    @classmethod
    def from_record(cls, r: Mapping[str, str]) -> IssuedKey:
        models = orjson.loads(r.get("models") or "null")
        return cls(
            id=r["id"], name=r["name"], team=r.get("team") or None,
            models=tuple(models) if models is not None else None,
            limits=Limits(**orjson.loads(r.get("limits") or "{}")),
            expires_at=_parse_time(r.get("expires_at")), metadata=orjson.loads(r.get("metadata") or "{}"),
            secret_sha256=r["secret_sha256"], created_at=_parse_time(r.get("created_at")) or utc_now(),
            revoked_at=_parse_time(r.get("revoked_at")), previous_sha256=r.get("previous_sha256") or None,
            previous_until=_parse_time(r.get("previous_until")), rev=int(r.get("rev") or 1),
        )


@dataclass(frozen=True)
class KeySpec:
    name: str
    team: str | None = None
    models: tuple[str, ...] | None = None
    limits: Limits = field(default_factory=Limits)
    expires_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


def limits_json(limits: Limits) -> dict[str, int | None]:
    return {name: getattr(limits, name) for name in _LIMIT_NAMES}


def team_record(team: TeamConfig, rev: int) -> dict[str, str]:
    return {"name": team.name, "models": orjson.dumps(team.models).decode(),
            "limits": orjson.dumps(limits_json(team.limits)).decode(), "rev": str(rev)}


def team_from_record(r: Mapping[str, str]) -> tuple[TeamConfig, int]:
    models = orjson.loads(r.get("models") or "null")
    team = TeamConfig(name=r["name"], models=tuple(models) if models is not None else None,
                      limits=Limits(**orjson.loads(r.get("limits") or "{}")))
    return team, int(r.get("rev") or 1)


class DirectoryEvents(Protocol):
    def unconfirmed_key(self, outcome: str) -> None: ...


class _NoEvents:
    def unconfirmed_key(self, outcome: str) -> None:
        return None


@dataclass(frozen=True)
class Freshness:
    """How long this replica's copy may go unconfirmed (None: it is the directory itself), and
    what an issued key gets after that (``quotas.on_store_error``)."""

    max_age: float | None = None
    on_unconfirmed: StoreErrorMode = "fail_closed"


@dataclass(frozen=True)
class _Entry:
    digest: str
    policy: KeyPolicy
    until: datetime | None  # the previous secret of a rotation stops working then


class IssuedKeys:
    def __init__(self, directory: Directory, *, refresh_interval: float = 30.0,
                 freshness: Freshness = Freshness(), events: DirectoryEvents | None = None,
                 clock: Callable[[], datetime] = utc_now, logger: logging.Logger | None = None) -> None:
        self._directory = directory
        self._refresh_interval = refresh_interval
        self._freshness = freshness
        self._events: DirectoryEvents = events or _NoEvents()
        self._clock = clock
        self._log = logger or logging.getLogger("llm_proxy.keys")
        self._keys: dict[str, IssuedKey] = {}
        self._by_digest: dict[str, _Entry] = {}
        self._teams: dict[str, tuple[TeamConfig, int]] = {}
        self._touched: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._confirmed = -math.inf  # time.monotonic() as of which the copy is known current
        self._warned = -math.inf

    # -- the request path: memory only

    def find(self, digest: str) -> KeyPolicy | None:
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            return None
        if entry.until is not None and self._clock() >= entry.until:
            return None
        max_age = self._freshness.max_age
        if max_age is not None and time.monotonic() - self._confirmed > max_age:
            return self._unconfirmed(entry.policy)
        return entry.policy

    def _unconfirmed(self, policy: KeyPolicy) -> KeyPolicy:
        """A key found in a copy too old to know whether it was revoked since."""
        serve = self._freshness.on_unconfirmed == "fail_open"
        self._events.unconfirmed_key("served" if serve else "refused")
        now = time.monotonic()
        if now - self._warned >= UNCONFIRMED_LOG_EVERY:
            self._warned = now
            age = "has never been confirmed" if self._confirmed == -math.inf \
                else f"was last confirmed {now - self._confirmed:.0f}s ago"
            self._log.warning("issued keys: this replica's copy of the key directory %s "
                              "(quotas.key_directory_max_age: %gs); issued keys are %s "
                              "(quotas.on_store_error: %s), e.g. %s (%s)", age, self._freshness.max_age,
                              "served" if serve else "refused", self._freshness.on_unconfirmed,
                              policy.id, policy.name)
        if serve:
            return policy
        raise ServiceUnavailableError(
            "The validity of this API key cannot be confirmed right now: this gateway cannot reach "
            "its key directory. Please retry shortly.", code="key_directory_unavailable")

    def _confirm(self, as_of: float) -> None:
        max_age = self._freshness.max_age
        if max_age is not None and self._confirmed != -math.inf and time.monotonic() - self._confirmed > max_age:
            self._log.info("issued keys: the key directory is confirmed again")
        self._confirmed = max(self._confirmed, as_of)

    def team(self, name: str) -> TeamConfig | None:
        found = self._teams.get(name)
        return found[0] if found else None

    # -- keeping the cache current

    async def start(self) -> None:
        """Load everything (a failing store is logged, not fatal) and follow changes."""
        with contextlib.suppress(ServiceUnavailableError):
            await self.refresh()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._refresh_forever())]

    async def close(self) -> None:
        pending = set(self._tasks)
        for _ in range(50):
            if not pending:
                break
            # Cancelled again until done: a cancel that lands as redis-py's own read
            # timeout fires can be swallowed (Python 3.11's asyncio.timeout).
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        self._tasks = []
        await self._directory.close()

    async def refresh(self) -> None:
        self._touched.clear()
        started = time.monotonic()
        try:
            keys = [IssuedKey.from_record(r) for r in await self._directory.all("key")]
            teams = [team_from_record(r) for r in await self._directory.all("team")]
        except ServiceUnavailableError as exc:
            self._log.warning("issued keys: reload failed, keeping the cached ones: %s", exc.message)
            raise
        fresh = {k.id: k for k in keys}
        for key_id in self._touched:  # changed while the snapshot was read: keep the newer one
            mine = self._keys.get(key_id)
            if mine is not None and (key_id not in fresh or fresh[key_id].rev < mine.rev):
                fresh[key_id] = mine
        fresh_teams = {t.name: (t, rev) for t, rev in teams}
        for name, (team, rev) in self._teams.items():
            if f"team:{name}" in self._touched and rev > fresh_teams.get(name, (team, 0))[1]:
                fresh_teams[name] = (team, rev)
        self._keys, self._teams = fresh, fresh_teams
        self._by_digest = {e.digest: e for k in fresh.values() for e in _entries(k)}
        self._confirm(started)

    def _apply(self, key: IssuedKey) -> None:
        self._touched.add(key.id)
        old = self._keys.get(key.id)
        if old is not None and old.rev > key.rev:
            return
        for entry in _entries(old) if old else ():
            self._by_digest.pop(entry.digest, None)
        self._keys[key.id] = key
        self._by_digest.update((e.digest, e) for e in _entries(key))

    def _apply_team(self, team: TeamConfig, rev: int) -> None:
        self._touched.add(f"team:{team.name}")
        if rev >= self._teams.get(team.name, (team, 0))[1]:
            self._teams[team.name] = (team, rev)

    async def _follow(self) -> None:
        delay = 0.1
        while True:
            try:
                async with contextlib.aclosing(self._directory.changes()) as changes:
                    async for change in changes:
                        delay = 0.1
                        if isinstance(change, Live):
                            self._confirm(change.since)  # every change before it is applied
                        else:
                            await self._on_change(change)
            except ServiceUnavailableError as exc:
                self._log.warning("issued keys: change feed lost (%s); retrying", exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _on_change(self, change: str) -> None:
        kind, _, name = change.partition(":")
        if not change:
            await self.refresh()
        elif kind == "key" and (record := await self._directory.get("key", name)):
            self._apply(IssuedKey.from_record(record))
        elif kind == "team" and (record := await self._directory.get("team", name)):
            self._apply_team(*team_from_record(record))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            with contextlib.suppress(ServiceUnavailableError):
                await self.refresh()

    # -- admin operations: each written to the directory, applied here at once, and audited

    async def create(self, spec: KeySpec, actor: str) -> tuple[IssuedKey, str]:
        key_id = "key_" + secrets.token_hex(8)
        secret = f"sk-{key_id}-{secrets.token_urlsafe(32)}"
        key = IssuedKey(id=key_id, name=spec.name, team=spec.team, models=spec.models, limits=spec.limits,
                        expires_at=spec.expires_at, metadata=spec.metadata, secret_sha256=hash_key(secret),
                        created_at=self._clock())
        await self._save(key, actor, "key.create", {"name": key.name, "team": key.team})
        return key, secret

    async def get(self, key_id: str) -> IssuedKey:
        record = await self._directory.get("key", key_id)
        if record is None:
            raise NotFoundError(f"No key with id '{key_id}'.", param="id")
        return IssuedKey.from_record(record)

    async def keys(self, team: str | None = None) -> list[IssuedKey]:
        keys = [IssuedKey.from_record(r) for r in await self._directory.all("key")]
        return sorted((k for k in keys if team is None or k.team == team), key=lambda k: k.created_at)

    async def update(self, key_id: str, changes: Mapping[str, Any], actor: str) -> IssuedKey:
        key = apply_changes(await self.get(key_id), changes)
        key = replace(key, rev=key.rev + 1)
        await self._save(key, actor, "key.update", {"fields": sorted(changes)})
        return key

    async def revoke(self, key_id: str, actor: str) -> IssuedKey:
        key = await self.get(key_id)
        if key.revoked_at is None:
            key = replace(key, revoked_at=self._clock(), rev=key.rev + 1)
            await self._save(key, actor, "key.revoke", {"name": key.name})
        return key

    async def rotate(self, key_id: str, overlap: timedelta, actor: str) -> tuple[IssuedKey, str]:
        key = await self.get(key_id)
        if key.revoked_at is not None:
            raise InvalidRequestError(f"The key '{key_id}' is revoked; it cannot be rotated.", param="id")
        secret = f"sk-{key.id}-{secrets.token_urlsafe(32)}"
        keeps = overlap > timedelta(0)
        key = replace(key, secret_sha256=hash_key(secret), rev=key.rev + 1,
                      previous_sha256=key.secret_sha256 if keeps else None,
                      previous_until=self._clock() + overlap if keeps else None)
        await self._save(key, actor, "key.rotate", {"previous_secret_valid_until": _iso(key.previous_until)})
        return key, secret

    async def put_team(self, team: TeamConfig, actor: str) -> TeamConfig:
        current = await self._directory.get("team", team.name)
        rev = (team_from_record(current)[1] if current else 0) + 1
        await self._directory.put("team", team.name, team_record(team, rev))
        self._apply_team(team, rev)
        await self._audit(actor, "team.put", team.name,
                          {"models": team.models, "limits": limits_json(team.limits)})
        return team

    async def get_team(self, name: str) -> TeamConfig | None:
        record = await self._directory.get("team", name)
        return team_from_record(record)[0] if record else None

    async def teams(self) -> list[TeamConfig]:
        teams = [team_from_record(r)[0] for r in await self._directory.all("team")]
        return sorted(teams, key=lambda t: t.name)

    async def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._directory.audit(limit)
        return [{**row, "detail": orjson.loads(row.get("detail") or "{}")} for row in rows]

    async def _save(self, key: IssuedKey, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        await self._directory.put("key", key.id, key.record())
        self._apply(key)
        await self._audit(actor, action, key.id, detail)

    async def _audit(self, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> None:
        await self._directory.append_audit({"at": _iso(self._clock()) or "", "actor": actor, "action": action,
                                            "target": target, "detail": orjson.dumps(detail).decode()})


def _entries(key: IssuedKey) -> list[_Entry]:
    if key.revoked_at is not None:
        return []
    policy = key.policy()
    entries = [_Entry(key.secret_sha256, policy, None)]
    if key.previous_sha256 and key.previous_until is not None:
        entries.append(_Entry(key.previous_sha256, policy, key.previous_until))
    return entries


def build_issued_keys(config: Config, *, refresh_interval: float = 30.0, events: DirectoryEvents | None = None,
                      logger: logging.Logger | None = None) -> IssuedKeys:
    """Redis when ``redis_url`` is set; otherwise process memory (issued keys end with the process)."""
    if not config.redis_url:
        return IssuedKeys(MemoryDirectory(), refresh_interval=refresh_interval, events=events, logger=logger)
    quotas = config.quotas
    # A few PINGs within the max age, so that one late answer does not make the copy unconfirmed.
    directory = RedisDirectory(connect(config.redis_url, quotas.store_timeout), max(quotas.store_timeout, 1.0),
                               heartbeat=min(MAX_HEARTBEAT, quotas.key_directory_max_age / 4))
    return IssuedKeys(directory, refresh_interval=refresh_interval,
                      freshness=Freshness(quotas.key_directory_max_age, quotas.on_store_error),
                      events=events, logger=logger)


# -- validating admin input (shared by the HTTP API and the CLI)


def parse_key_spec(body: Any) -> KeySpec:
    data = _object(body, None)
    _only(data, {"name", "team", "models", "limits", "expires_at", "metadata"})
    name = _name(data.get("name"), "name")
    if name is None:
        raise InvalidRequestError("'name' is required.", param="name")
    return KeySpec(name=name, team=_name(data.get("team"), "team"),
                   models=_globs(data.get("models"), "models"),
                   limits=_limits(data.get("limits"), Limits(), "limits"),
                   expires_at=_time(data.get("expires_at"), "expires_at"),
                   metadata=_metadata(data.get("metadata"), "metadata"))


def apply_changes(key: IssuedKey, changes: Mapping[str, Any]) -> IssuedKey:
    """PATCH: fields present replace; ``limits`` merges by limit (null removes one)."""
    _only(changes, {"name", "models", "limits", "expires_at", "metadata"})
    updated = key
    if "name" in changes:
        updated = replace(updated, name=_name(changes["name"], "name") or key.name)
    if "models" in changes:
        updated = replace(updated, models=_globs(changes["models"], "models"))
    if "limits" in changes:
        updated = replace(updated, limits=_limits(changes["limits"], key.limits, "limits"))
    if "expires_at" in changes:
        updated = replace(updated, expires_at=_time(changes["expires_at"], "expires_at"))
    if "metadata" in changes:
        updated = replace(updated, metadata=_metadata(changes["metadata"], "metadata"))
    return updated


def parse_team(name: str, body: Any) -> TeamConfig:
    data = _object(body, None)
    _only(data, {"name", "models", "limits"})
    if data.get("name", name) != name:
        raise InvalidRequestError("'name' must match the team in the URL.", param="name")
    return TeamConfig(name=_name(name, "name") or name, models=_globs(data.get("models"), "models"),
                      limits=_limits(data.get("limits"), Limits(), "limits"))


def parse_overlap(value: Any) -> timedelta:
    if value is None:
        return DEFAULT_OVERLAP
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= MAX_OVERLAP.total_seconds():
        raise InvalidRequestError(
            f"'overlap_seconds' must be a number from 0 to {int(MAX_OVERLAP.total_seconds())} (one year).",
            param="overlap_seconds")
    return timedelta(seconds=value)


def _object(value: Any, param: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param or 'The body'} must be a JSON object.", param=param)
    return value


def _only(data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequestError(f"Unknown field '{unknown[0]}' (expected: {', '.join(sorted(allowed))}).",
                                  param=unknown[0])


def _name(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME \
            or any(ord(c) < 32 for c in value):
        raise InvalidRequestError(f"'{param}' must be a non-empty string of at most {_MAX_NAME} characters.",
                                  param=param)
    return value


def _globs(value: Any, param: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise InvalidRequestError(f"'{param}' must be a list of model names or globs, or null.", param=param)
    return tuple(value)


def _limits(value: Any, base: Limits, param: str) -> Limits:
    data = _object(value, param)
    _only(data, set(_LIMIT_NAMES))
    merged = limits_json(base)
    for name, limit in data.items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidRequestError(f"'{param}.{name}' must be an integer ≥ 0, or null.",
                                      param=f"{param}.{name}")
        merged[name] = limit
    return Limits(**merged)


def _time(value: Any, param: str) -> datetime | None:
    if value is None:
        return None
    moment = _parse_time(value) if isinstance(value, str) else None
    if moment is None:
        raise InvalidRequestError(f"'{param}' must be an ISO 8601 time, e.g. 2027-01-01T00:00:00Z.",
                                  param=param)
    return moment


def _metadata(value: Any, param: str) -> dict[str, Any]:
    data = _object(value, param)
    try:
        encoded = orjson.dumps(data)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels)
        raise InvalidRequestError(f"'{param}' is nested too deeply.", param=param) from None
    if len(encoded) > _MAX_METADATA:
        raise InvalidRequestError(f"'{param}' must be at most {_MAX_METADATA} bytes of JSON.", param=param)
    return data


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None
