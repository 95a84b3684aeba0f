"""Cooldowns and ejections shared by every replica (with Redis configured).

Each replica publishes the holds its own traffic caused (a 429's cooldown,
an ejection, bad credentials) with their end as wall-clock time; the others
apply them to their local health, so one replica's 429 keeps all of them
off that upstream for exactly as long as it asked. Replicas' clocks are
assumed NTP-synchronised (an error of a few milliseconds shifts a hold by as
much). Ejections by an active health check stay local: every replica runs
its own checks.

Redis: one hash ``llmp:{health}:holds`` (upstream → "state|until") for
replicas that start later, and the channel ``llmp:health`` for changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from ..errors import ServiceUnavailableError
from ..io.redis_client import Client, bounded
from .health import State
from .pool import Pool

SHARED_STATES: tuple[State, ...] = ("cooling_down", "ejected", "credentials_bad")
HOLDS_KEY = "llmp:{health}:holds"
CHANNEL = "llmp:health"

Hold = tuple[str, State, float]  # upstream, state, until (epoch seconds)


class HealthShare(Protocol):
    async def publish(self, hold: Hold) -> None: ...

    def changes(self) -> AsyncGenerator[Hold, None]:
        """Every hold in force when (re)subscribed, then each new one."""
        ...

    async def close(self) -> None: ...


def encode(hold: Hold) -> str:
    return f"{hold[0]}|{hold[1]}|{hold[2]:.3f}"


def decode(text: str) -> Hold | None:
    name, _, rest = text.rpartition("|")
    name, _, state = name.rpartition("|")
    try:
        until = float(rest)
    except ValueError:
        return None
    if state not in SHARED_STATES or not name:
        return None
    return name, state, until


class RedisHealthShare:
    def __init__(self, client: Client, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def publish(self, hold: Hold) -> None:
        async def write() -> None:
            await self._client.hset(HOLDS_KEY, hold[0], f"{hold[1]}|{hold[2]:.3f}")
            await self._client.publish(CHANNEL, encode(hold))

        await bounded(write(), self._timeout, "health publish")

    async def snapshot(self) -> list[Hold]:
        raw = await bounded(self._client.hgetall(HOLDS_KEY), self._timeout, "health snapshot")
        holds = (decode(f"{_text(k)}|{_text(v)}") for k, v in (raw or {}).items())
        return [h for h in holds if h is not None]

    async def changes(self) -> AsyncGenerator[Hold, None]:
        pubsub = self._client.pubsub()
        try:
            await bounded(pubsub.subscribe(CHANNEL), self._timeout, "health subscribe")
            while True:
                message = await bounded(pubsub.get_message(timeout=1.0), self._timeout + 1.0, "health changes")
                kind = message.get("type") if message else None
                if kind == "subscribe":
                    # Also after redis-py reconnected by itself: holds published in the gap
                    # are in the hash, not in the channel.
                    for hold in await self.snapshot():
                        yield hold
                elif kind == "message" and message is not None:
                    change = decode(_text(message["data"]))
                    if change is not None:
                        yield change
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class HealthSync:
    """Publishes local holds and applies remote ones (a loop per replica)."""

    def __init__(self, share: HealthShare, pool: Callable[[], Pool], logger: logging.Logger,
                 interval: float = 0.25) -> None:
        self._share = share
        self._pool = pool
        self._log = logger
        self._interval = interval
        self._seen: dict[str, tuple[str, float]] = {}  # last hold published or applied, per upstream
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._publish_forever())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._share.close()

    def apply(self, hold: Hold) -> None:
        name, state, until_epoch = hold
        up = self._pool().upstreams.get(name)
        now = time.monotonic()
        until = now + (until_epoch - time.time())
        if up is None or until <= now:
            return
        up.health.hold(state, until)
        self._seen[name] = (up.health.state(now), round(up.health.blocked_until(), 3))

    def local_holds(self) -> list[Hold]:
        """Holds of this replica not yet published (nor learnt from another)."""
        now, wall = time.monotonic(), time.time()
        fresh: list[Hold] = []
        for up in self._pool().upstreams.values():
            state, until = up.health.state(now), up.health.blocked_until()
            if state not in SHARED_STATES or until == math.inf:
                continue
            key = (state, round(until, 3))
            if self._seen.get(up.name) != key:
                self._seen[up.name] = key
                fresh.append((up.name, state, wall + until - now))
        return fresh

    async def _publish_forever(self) -> None:
        while True:
            for hold in self.local_holds():
                with contextlib.suppress(ServiceUnavailableError):
                    await self._share.publish(hold)
            await asyncio.sleep(self._interval)

    async def _follow(self) -> None:
        delay = 0.1
        while True:
            try:
                async for hold in self._share.changes():
                    delay = 0.1
                    self.apply(hold)
            except ServiceUnavailableError as exc:
                self._log.warning("shared upstream health: Redis unavailable (%s); retrying", exc.message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
