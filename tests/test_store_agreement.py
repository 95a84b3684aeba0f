"""The Lua scripts and ``MemoryQuotaStore`` follow the same rules: random operations, one clock.

Redis's clock cannot be moved, so here the scripts read the time from a hash
that the test sets (the one line that calls ``TIME`` is swapped), and Redis's
expiry is played by the test: it records each TTL a script set and deletes
the key once the test's clock passes it, and a script that asks for a key's
TTL (``PTTL``) reads what is left of the recorded one. A second test steps the
clock back now and then, as Redis's does when a failover lands on a node
behind, and checks the invariants alone. After every operation both stores
must answer alike, and every bucket hash must keep its invariants: the total
is the sum of its buckets, no bucket at 0, the oldest is the oldest, every key
has a TTL, and no key expires while a bucket or a lease in it still counts.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from proxy.access import store_redis
from proxy.access.keys import KeyPolicy
from proxy.access.quotas import plan_for
from proxy.access.store import MemoryQuotaStore, Plan
from proxy.access.store_redis import PREFIX, RedisQuotaStore
from proxy.config.types import Limits
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401
from tests.test_store import check_total, tpm_fields

pytestmark = pytest.mark.timeout(120)
CLOCK_KEY = "test:clock"
REAL_TIME = "local t = redis.call('TIME')"
FAKE_TIME = f"local t = redis.call('HMGET', '{CLOCK_KEY}', 's', 'us')"
EXPIRY_KEY = "test:expiry"
REAL_PTTL = "redis.call('PTTL', key)"
# A key the test pinned has a real TTL; one a script deleted and wrote again has none yet (-1).
FAKE_PTTL = (f"(redis.call('PTTL', key) < 0 and -1 or "
             f"((tonumber(redis.call('HGET', '{EXPIRY_KEY}', key)) or (now - 1)) - now))")
HELD = 10**9  # ms: every TTL, once recorded, so that only the test's clock expires keys
TTL_MS = 30_000


@dataclass
class Clocked:
    """Both stores on the test's clock (ms), and the expiries Redis was asked for."""

    client: aioredis.Redis
    redis: RedisQuotaStore
    memory: MemoryQuotaStore
    now: list[int]
    expires: dict[str, int] = field(default_factory=dict)

    async def advance(self, ms: int) -> None:
        self.now[0] += ms
        for key, at in list(self.expires.items()):
            if at <= self.now[0]:
                await self.client.delete(key)
                await self.forget(key)
        now = self.now[0]
        await self.client.hset(CLOCK_KEY, mapping={"s": now // 1000, "us": now % 1000 * 1000})

    async def forget(self, key: str) -> None:
        del self.expires[key]
        await self.client.hdel(EXPIRY_KEY, key)

    async def check_keys(self, what: str) -> None:
        current = self.now[0] // 1000
        for raw in await self.client.keys(f"{PREFIX}*"):
            key = raw.decode()
            ttl = await self.client.pttl(key)
            assert ttl != -1, f"{what}: {key} has no TTL"
            if ttl < HELD // 2:  # set by this operation
                self.expires[key] = self.now[0] + ttl
                await self.client.hset(EXPIRY_KEY, key, self.expires[key])
            if key.endswith((":req", ":tpm")):
                fields = await tpm_fields(self.client, key)
                check_total(fields)
                counted = [b for b in fields if b >= current - 60]  # not TOTAL or OLDEST (below 0)
                if counted:
                    assert self.expires[key] >= (max(counted) + 61) * 1000, f"{what}: {key} expires early"
            if key.endswith(":concurrency"):
                leases = await self.client.zrange(key, -1, -1, withscores=True)
                if leases and leases[0][1] > self.now[0]:
                    # The recorded TTL is read back after the script set it, and real time passes
                    # meanwhile: a second's slack, as the buckets have (a step back is up to 5 s).
                    assert self.expires[key] >= leases[0][1] - 1000, f"{what}: {key} expires before its leases"
            await self.client.pexpire(key, HELD)
        for key in [k for k in self.expires if not await self.client.exists(k)]:
            await self.forget(key)


@pytest.fixture
async def clocked(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Clocked]:  # noqa: F811
    real = store_redis._lua

    def on_test_clock(name: str) -> str:
        text = real(name)
        # The one place a script reads the time (release.lua needs none).
        assert (REAL_TIME in text) == (name != "release.lua"), name
        assert (REAL_PTTL in text) == (name != "release.lua"), name
        return text.replace(REAL_TIME, FAKE_TIME).replace(REAL_PTTL, FAKE_PTTL)

    monkeypatch.setattr(store_redis, "_lua", on_test_clock)
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    now = [1_800_057_000_000]  # ten minutes before a UTC midnight: the day window turns
    made = Clocked(client, RedisQuotaStore.from_url(redis_server.url, 5.0),
                   MemoryQuotaStore(lambda: (now[0] + 0.5) / 1000), now)
    await made.advance(0)
    yield made
    await made.redis.close()
    await client.aclose()


def random_plan(rng: random.Random) -> Plan:
    key = Limits(rpm=rng.choice([None, 3, 8, 60]), tpm=rng.choice([30, 100, 400]), concurrency=rng.choice([5, 100]),
                 tokens_per_month=rng.choice([None, 600, 5000]))
    team = Limits(rpm=rng.choice([None, 12, 1000]), tpm=rng.choice([50, 200, 1000]),
                  tokens_per_day=rng.choice([None, 300, 2000]))
    made = plan_for(KeyPolicy(id="static:s", name="s", team="t", models=None, limits=key, team_limits=team))
    assert made is not None
    return made


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_redis_and_memory_stores_agree_and_keep_their_invariants(clocked: Clocked, seed: int) -> None:
    await random_operations(clocked, random.Random(seed), steps_back=False)


@pytest.mark.parametrize("seed", [5, 6, 7])
async def test_a_redis_clock_that_steps_back_breaks_no_invariant(clocked: Clocked, seed: int) -> None:
    # The two stores need not agree here: after a step back, a bucket that had left the window
    # counts again in Redis until a reserve drops it, and MemoryQuotaStore drops it at any read.
    await random_operations(clocked, random.Random(seed), steps_back=True)


async def random_operations(clocked: Clocked, rng: random.Random, steps_back: bool) -> None:
    """300 random reserves, settles, releases and reads; each store's answers compared unless the
    clock steps back, every key's invariants checked after each operation."""
    plan = random_plan(rng)
    memory = None if steps_back else clocked.memory
    open_leases: dict[str, tuple[int, ...]] = {}
    every_lease: list[str] = []
    outcomes: set[str] = set()
    for i in range(300):
        step = rng.random()
        await clocked.advance(rng.randint(20_000, 70_000) if step < 0.05
                              else -rng.choice([1, 600, 2_000, 5_000]) if steps_back and step < 0.1
                              else rng.choice([0, 0, 1, 7, 100, 400, 999, 1000, 1500]))
        action = rng.random()
        if action < 0.45:
            lease, estimate = f"l{i}", rng.choice([0, 1, 5, 40, 150])
            got = await clocked.redis.reserve(plan, lease, estimate, TTL_MS)
            assert memory is None or got == await memory.reserve(plan, lease, estimate, TTL_MS), f"#{i} reserve"
            if got.admitted:
                open_leases[lease] = got.windows
                every_lease.append(lease)
            outcomes.add("admitted" if got.admitted else f"{plan.checks[got.denied].kind} {got.reason}")
            what = f"#{i} reserve {lease} {estimate}"
        elif action < 0.7 and open_leases:
            lease = rng.choice(sorted(open_leases))
            windows, delta = open_leases.pop(lease), rng.choice([-40, -5, -1, 0, 3, 20])
            await clocked.redis.settle(plan, lease, windows, delta)
            if memory is not None:
                await memory.settle(plan, lease, windows, delta)
            what = f"#{i} settle {lease} {delta}"
        elif action < 0.85 and every_lease:
            lease = rng.choice(every_lease)
            undone = await clocked.redis.release(plan, lease, TTL_MS)
            assert memory is None or undone == await memory.release(plan, lease, TTL_MS), f"#{i} release"
            if undone:
                open_leases.pop(lease, None)
            what = f"#{i} release {lease}"
        else:
            what = f"#{i} usage"
        used = await clocked.redis.usage(plan)
        assert memory is None or used == await memory.usage(plan), what
        await clocked.check_keys(what)
    assert "admitted" in outcomes and len(outcomes) > 1  # it saw admissions and denials
