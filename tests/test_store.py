"""The lease record and ``release``: one suite, run against the Redis store (the Lua) and the in-process store.

A reservation whose answer never reached the gateway is released: exactly what
it charged is undone, once, and a reserve that comes after its own release
(or is run a second time) charges nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.config import Limits
from proxy.errors import ServiceUnavailableError
from proxy.keys import KeyPolicy
from proxy.quotas import plan_for
from proxy.store import MemoryQuotaStore, Plan, QuotaStore
from proxy.store_redis import PREFIX, RedisQuotaStore
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)
TTL_MS = 30_000
EVERY_LIMIT = Limits(rpm=100, tpm=10**6, concurrency=10, tokens_per_day=10**7, tokens_per_month=10**8)


def plan(key_id: str = "a") -> Plan:
    """A key and its team, each with every limit: ten checks in one hash tag."""
    made = plan_for(KeyPolicy(id=f"static:{key_id}", name=key_id, team=f"team-{key_id}", models=None,
                              limits=EVERY_LIMIT, team_limits=EVERY_LIMIT))
    assert made is not None
    return made


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    made: QuotaStore
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
        made = RedisQuotaStore.from_url(url, 1.0)
    else:
        made = MemoryQuotaStore()
    yield made
    await made.close()


async def used(store: QuotaStore, p: Plan) -> list[int]:
    return [s.used for s in await store.usage(p)]


def charged(requests: int, tokens: int) -> list[int]:
    """What ``requests`` reservations of ``tokens`` each show, per check of ``plan()``."""
    return [requests, tokens, requests, tokens, tokens] * 2


async def test_release_undoes_exactly_what_the_reserve_charged(store: QuotaStore) -> None:
    p = plan()
    kept = await store.reserve(p, "kept", 70, TTL_MS)
    assert kept.admitted
    await store.reserve(p, "lost", 30, TTL_MS)  # its answer "never came"
    assert await used(store, p) == charged(2, 100)
    assert await store.release(p, "lost", TTL_MS) is True
    assert await used(store, p) == charged(1, 70)  # the other reservation untouched
    await store.settle(p, "kept", kept.windows, -20)
    assert await used(store, p) == [1, 50, 0, 50, 50] * 2


async def test_a_release_run_twice_or_for_nothing_changes_nothing(store: QuotaStore) -> None:
    p = plan()
    await store.reserve(p, "one", 10, TTL_MS)
    await store.reserve(p, "two", 10, TTL_MS)
    assert await store.release(p, "one", TTL_MS) is True
    assert await store.release(p, "one", TTL_MS) is False
    assert await store.release(p, "never-made", TTL_MS) is False
    assert await used(store, p) == charged(1, 10)


async def test_a_reserve_after_its_release_charges_nothing(store: QuotaStore) -> None:
    # With a pool of connections, the release can reach the store before the reserve it undoes.
    p = plan()
    assert await store.release(p, "late", TTL_MS) is False
    with pytest.raises(ServiceUnavailableError) as err:
        await store.reserve(p, "late", 10, TTL_MS)
    assert err.value.code == "quota_store_unavailable"
    assert await used(store, p) == charged(0, 0)


async def test_a_reserve_run_twice_charges_once(store: QuotaStore) -> None:
    # A re-sent call (the client's retry after a connection dropped once the script had run).
    p = plan()
    first = await store.reserve(p, "twice", 10, TTL_MS)
    with pytest.raises(ServiceUnavailableError):
        await store.reserve(p, "twice", 10, TTL_MS)
    assert await used(store, p) == charged(1, 10)
    await store.settle(p, "twice", first.windows, 0)
    assert await used(store, p) == [1, 10, 0, 10, 10] * 2


async def test_a_release_after_settle_changes_nothing(store: QuotaStore) -> None:
    p = plan()
    reservation = await store.reserve(p, "done", 40, TTL_MS)
    await store.settle(p, "done", reservation.windows, -15)
    assert await store.release(p, "done", TTL_MS) is False
    assert await used(store, p) == [1, 25, 0, 25, 25] * 2


async def test_a_denied_reserve_leaves_nothing_to_release(store: QuotaStore) -> None:
    p = plan_for(KeyPolicy(id="static:d", name="d", team=None, models=None, limits=Limits(rpm=1, concurrency=5)))
    assert p is not None
    await store.reserve(p, "in", 1, TTL_MS)
    denied = await store.reserve(p, "out", 1, TTL_MS)
    assert not denied.admitted
    assert await store.release(p, "out", TTL_MS) is False
    assert await used(store, p) == [1, 1]


async def test_a_release_spares_a_counter_that_moved_to_another_window() -> None:
    # The in-process store with a clock: a release a day later leaves the new day alone.
    clock = Clock(1_700_000_000.0)
    store = MemoryQuotaStore(clock)
    p = plan()
    await store.reserve(p, "old", 10, 10 * 86_400_000)
    clock.now += 86_400
    await store.reserve(p, "new", 7, TTL_MS)
    assert await store.release(p, "old", TTL_MS) is True
    assert await used(store, p) == [1, 7, 1, 7, 7] * 2  # rpm, tpm: yesterday's aged out; day: only today's


async def test_lease_records_live_as_long_as_the_lease() -> None:
    clock = Clock(1_700_000_000.0)
    store = MemoryQuotaStore(clock)
    p = plan()
    await store.reserve(p, "expired", 10, TTL_MS)
    clock.now += TTL_MS / 1000
    assert await store.release(p, "expired", TTL_MS) is False  # the record went with the lease
    clock.now += TTL_MS / 1000 + 1
    await store.reserve(p, "other", 1, TTL_MS)  # sweeps what expired
    assert list(store._records) == [f"{p.shard}|lease|other"]


class Clock:
    def __init__(self, at: float) -> None:
        self.now = at

    def __call__(self) -> float:
        return self.now


async def test_the_lua_lease_record_shares_the_hash_tag_and_expires(redis_server: RedisServer) -> None:  # noqa: F811
    store = RedisQuotaStore.from_url(redis_server.url, 1.0)
    client = aioredis.Redis.from_url(redis_server.url)
    p = plan()
    record = f"{PREFIX}{{{p.shard}}}:lease:abc"
    try:
        reservation = await store.reserve(p, "abc", 12, TTL_MS)
        fields = {k.decode(): int(v) for k, v in (await client.hgetall(record)).items()}
        assert fields == {"e": 12, **{str(i + 1): w for i, w in enumerate(reservation.windows)}}
        assert TTL_MS - 2000 < await client.pttl(record) <= TTL_MS
        await store.settle(p, "abc", reservation.windows, 0)
        assert await client.exists(record) == 0
        await store.release(p, "abc", 5000)  # a tombstone, for the ttl given
        assert await client.hgetall(record) == {b"released": b"1"}
        assert 3000 < await client.pttl(record) <= 5000
        keys = {k.decode() for k in await client.keys("*")}
        assert all(k.startswith(f"{PREFIX}{{{p.shard}}}:") for k in keys), keys
        assert all([await client.pttl(k) > 0 for k in keys])  # nothing left without a TTL
    finally:
        await client.aclose()
        await store.close()
