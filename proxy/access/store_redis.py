"""The Redis store: quotas in Lua (one round trip per reserve or settle) and the key directory.

The quota scripts go down one pipelined connection (``redis_pipe.py``) for a
plain Redis URL, through redis-py for Sentinel and Cluster; the directory
(admin-paced) always uses redis-py. Every call is bounded by the store
timeout, and every Redis failure becomes a ``ServiceUnavailableError`` (code
``quota_store_unavailable``) here, at the edge, as does a reply that does not
have the shape the script returns. A reply that comes after its caller gave up
is dropped by the pipe (it keeps the order); redis-py disconnects a connection
whose command was interrupted, so neither can hand a stale reply to the next
caller. Both reconnect by themselves once Redis is back, and reload a script
that a restarted or failed-over Redis lost (NOSCRIPT): nothing needs a restart.

The client, its URL forms, the bound on each call and the translation of
Redis failures: ``io/redis_client.py``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from importlib import resources
from typing import Any, Protocol

from redis.commands.core import AsyncScript

from ..io.redis_client import Client, bounded, connect, parse_redis_url, translated, unavailable
from .redis_pipe import RedisPipe, Script
from .store import AUDIT_MAX, DENIALS, Admission, CheckState, Kind, Live, Plan, Record, lease_seen

PREFIX = "llmp:"
CHANNEL = PREFIX + "directory"


def _lua(name: str) -> str:
    return resources.files("proxy.access").joinpath("lua", name).read_text(encoding="utf-8")


# Each kind's counter, by key suffix. rpm is "req": a hash of 1-second buckets like tpm's; "rpm"
# was a sorted set (one member per request), which a replica of an earlier release may still
# write during a rolling upgrade or after a rollback, so the new layout must not share its key
# (docs/kubernetes.md, "Upgrade").
_SUFFIX: dict[Kind, str] = {"rpm": "req", "tpm": "tpm", "concurrency": "concurrency", "day": "day",
                            "month": "month"}


def _keys(plan: Plan) -> list[str]:
    # The hash tag puts every counter of one request (its key's and its team's) in one slot.
    return [f"{PREFIX}{{{plan.shard}}}:{c.subject}:{_SUFFIX[c.kind]}" for c in plan.checks]


def _lease_key(plan: Plan, lease: str) -> str:
    return f"{PREFIX}{{{plan.shard}}}:lease:{lease}"


def _checked(raw: Any, plan: Plan, operation: str) -> list[int]:
    """reserve.lua's reply for this plan, {admitted, denied, retry, why, then 4 integers per check};
    anything else (a stale or garbled reply) is the store failing."""
    if (not isinstance(raw, list) or len(raw) != 4 + 4 * len(plan.checks) or any(type(v) is not int for v in raw)
            or raw[0] not in (0, 1) or not 0 <= raw[1] <= len(plan.checks) or not 0 <= raw[3] <= len(DENIALS)
            or (raw[1] == 0) != (raw[3] == 0)):
        raise unavailable(operation, "unexpected reply")
    return raw


class ScriptRunner(Protocol):
    """Runs the quota scripts: the pipelined connection, or a redis-py client (Sentinel, Cluster).
    Each call is bounded by the store timeout (the pipe keeps one timer per connection)."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class ClientRunner:
    """A redis-py client as a ``ScriptRunner`` (it reloads a script on NOSCRIPT by itself)."""

    def __init__(self, client: Client, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._scripts: dict[str, AsyncScript] = {}

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        registered = self._scripts.get(script.sha)
        if registered is None:
            registered = self._scripts[script.sha] = self._client.register_script(script.body)
        async with asyncio.timeout(self._timeout):
            return await registered(keys=keys, args=args)

    async def ping(self) -> None:
        async with asyncio.timeout(self._timeout):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


def quota_runner(url: str, timeout: float) -> ScriptRunner:
    """The pipelined connection for a plain Redis URL; redis-py for Sentinel and Cluster."""
    if parse_redis_url(url) is None:
        return RedisPipe(url, timeout)
    return ClientRunner(connect(url, timeout), timeout)


class RedisQuotaStore:
    def __init__(self, runner: ScriptRunner) -> None:
        self._runner = runner
        self._reserve, self._settle, self._release = (Script(_lua(name)) for name in
                                                      ("reserve.lua", "settle.lua", "release.lua"))

    @classmethod
    def from_url(cls, url: str, timeout: float) -> RedisQuotaStore:
        return cls(quota_runner(url, timeout))

    async def reserve(self, plan: Plan, lease: str, estimate: int, lease_ttl_ms: int) -> Admission:
        raw = await self._run("reserve", plan, [_lease_key(plan, lease)], "reserve", lease, estimate,
                              lease_ttl_ms)
        if raw == [0, 0, 0]:
            raise lease_seen()
        values = _checked(raw, plan, "reserve")
        states = tuple(CheckState(*values[i:i + 3]) for i in range(4, len(values), 4))
        windows = tuple(values[i + 3] for i in range(4, len(values), 4))
        return Admission(bool(values[0]), values[1] - 1, values[2], states, windows if values[0] else (),
                         DENIALS[values[3] - 1] if values[1] else None)

    async def settle(self, plan: Plan, lease: str, windows: tuple[int, ...], delta: int) -> None:
        args: list[str | int] = [lease, delta]
        for check, window in zip(plan.checks, windows, strict=True):
            args += [check.kind, window]
        keys = [*_keys(plan), _lease_key(plan, lease)]
        if await translated(self._runner.run(self._settle, keys, args), "settle") != 1:
            raise unavailable("settle", "unexpected reply")

    async def release(self, plan: Plan, lease: str, lease_ttl_ms: int) -> bool:
        args: list[str | int] = [lease, lease_ttl_ms, *(c.kind for c in plan.checks)]
        keys = [*_keys(plan), _lease_key(plan, lease)]
        undone = await translated(self._runner.run(self._release, keys, args), "release")
        if type(undone) is not int or undone not in (0, 1):
            raise unavailable("release", "unexpected reply")
        return bool(undone)

    async def usage(self, plan: Plan) -> tuple[CheckState, ...]:
        values = _checked(await self._run("usage", plan, [], "peek", "", 0, 0), plan, "usage")
        return tuple(CheckState(*values[i:i + 3]) for i in range(4, len(values), 4))

    async def _run(self, operation: str, plan: Plan, extra_keys: list[str], *head: str | int) -> Any:
        args: list[str | int] = list(head)
        for check in plan.checks:
            args += [check.kind, check.limit]
        return await translated(self._runner.run(self._reserve, [*_keys(plan), *extra_keys], args), operation)

    async def ping(self) -> None:
        await translated(self._runner.ping(), "ping")

    async def close(self) -> None:
        await self._runner.close()


def _text(record: dict[Any, Any]) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in record.items()}


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Pinger:
    """PINGs on a subscribed connection: one at a time, ``interval`` after the last was answered.

    The SUBSCRIBE counts as the first: until Redis confirms it, no PING is sent, and
    a confirmation that does not come within ``patience`` fails the feed like a PING's.
    """

    def __init__(self, interval: float, patience: float) -> None:
        self._interval = interval
        self._patience = patience  # an answer later than this means the connection is dead
        self._sent = 0
        # The request awaiting its answer (a PING's token; None: the SUBSCRIBE), and when it was sent.
        self._waiting: tuple[str | None, float] | None = (None, time.monotonic())
        self._next = math.inf

    def restart(self) -> None:
        """The subscription is (re)confirmed: ping at once; a PING sent before it is lost."""
        self._waiting, self._next = None, time.monotonic()

    def due(self) -> str | None:
        """The token of a PING to send now, if one is due; fails when an answer is overdue."""
        now = time.monotonic()
        if self._waiting is not None:
            if now - self._waiting[1] > self._patience:
                raise unavailable("directory changes", "no answer from Redis")
            return None
        if now < self._next:
            return None
        self._sent += 1
        token = f"live-{self._sent}"
        self._waiting = (token, now)
        return token

    def answered(self, data: Any) -> Live | None:
        """A ``Live`` for the answer to the waiting PING; None for anything else."""
        if self._waiting is None or self._waiting[0] is None or _str(data) != self._waiting[0]:
            return None
        sent = self._waiting[1]
        self._waiting, self._next = None, sent + self._interval
        return Live(sent)


class RedisDirectory:
    """Issued keys and teams as one hash each, plus an index set, a change channel and an audit stream.

    All under one hash tag: the directory is small and admin-paced, and one
    slot keeps it simple on Cluster.
    """

    def __init__(self, client: Client, timeout: float, heartbeat: float = 1.0) -> None:
        self._client = client
        self._timeout = timeout
        self._heartbeat = heartbeat

    @staticmethod
    def _key(kind: str, name: str = "") -> str:
        return f"{PREFIX}{{dir}}:{kind}:{name}" if name else f"{PREFIX}{{dir}}:{kind}s"

    async def put(self, kind: str, name: str, record: Record) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(self._key(kind, name), mapping=dict[Any, Any](record))
                pipe.sadd(self._key(kind), name)
                await pipe.execute()
            await self._client.publish(CHANNEL, f"{kind}:{name}")

        await bounded(write(), self._timeout, "directory write")

    async def get(self, kind: str, name: str) -> dict[str, str] | None:
        raw = await bounded(self._client.hgetall(self._key(kind, name)), self._timeout, "directory read")
        return _text(raw) if raw else None

    async def all(self, kind: str) -> list[dict[str, str]]:
        async def read() -> list[dict[str, str]]:
            names = sorted(_str(n) for n in await self._client.smembers(self._key(kind)))
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._key(kind, name))
                rows: Iterable[dict[Any, Any]] = await pipe.execute()
            return [_text(r) for r in rows if r]

        # A full load may be larger than one request's worth; give it a few timeouts.
        return await bounded(read(), self._timeout * 8, "directory load")

    async def append_audit(self, entry: Record) -> None:
        await bounded(self._client.xadd(self._key("audit", "log"), dict[Any, Any](entry), maxlen=AUDIT_MAX,
                                        approximate=True), self._timeout, "audit write")

    async def audit(self, limit: int) -> list[dict[str, str]]:
        rows = await bounded(self._client.xrevrange(self._key("audit", "log"), count=limit),
                             self._timeout, "audit read")
        return [_text(fields) for _, fields in rows or [] if fields]

    async def changes(self) -> AsyncGenerator[str | Live, None]:
        """The change channel, and a ``Live`` for each PING answered on it (one per heartbeat).

        A silent subscription proves nothing: a Redis that is frozen or cut off by the
        network sends no error, only nothing. A PING on the subscribed connection is
        answered after every message published before it reached Redis, so its answer
        says the feed was complete when it was sent. One unanswered for several
        timeouts means the connection is dead: the feed fails and its reader resubscribes.
        """
        pubsub = self._client.pubsub()
        pinger = _Pinger(self._heartbeat, patience=self._timeout * 8)
        try:
            await bounded(pubsub.subscribe(CHANNEL), self._timeout, "subscribe")
            while True:
                token = pinger.due()
                if token is not None:
                    await bounded(pubsub.ping(token), self._timeout, "directory ping")
                message = await bounded(pubsub.get_message(timeout=self._heartbeat),
                                        self._timeout + self._heartbeat, "directory changes")
                kind = message.get("type") if message else None
                if kind == "subscribe":
                    # Also after redis-py reconnected by itself (a Redis restart): whatever was
                    # published meanwhile is lost, so the reader reloads everything.
                    pinger.restart()
                    yield ""
                elif kind == "message":
                    assert message is not None
                    yield _str(message["data"])
                elif kind == "pong" and message is not None and (live := pinger.answered(message["data"])):
                    yield live
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def close(self) -> None:
        await self._client.aclose()
