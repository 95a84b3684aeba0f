"""The lease record and ``release``: one suite, run against the Redis store (the Lua) and the in-process store.

A reservation whose answer never reached the gateway is released: exactly what
it charged is undone, once, and a reserve that comes after its own release
(or is run a second time) charges nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from proxy.access.keys import KeyPolicy
from proxy.access.quotas import plan_for
from proxy.access.store import MemoryQuotaStore, Plan, QuotaStore
from proxy.access.store_redis import PREFIX, RedisQuotaStore
from proxy.config.types import Limits
from proxy.errors import ServiceUnavailableError
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
        in_flight_until = fields.pop("x")  # the lease's expiry, in seconds
        assert fields == {"e": 12, **{str(i + 1): w for i, w in enumerate(reservation.windows)}}
        assert 0 <= in_flight_until - (time.time() * 1000 + TTL_MS) / 1000 < 2
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


@dataclass
class Lua:
    """The Redis store and a plain client of the same server: for tests that look at what the
    scripts stored."""

    store: RedisQuotaStore
    client: aioredis.Redis

    @staticmethod
    def plan(name: str, limits: Limits) -> Plan:
        """A key of its own, in no team, with these limits."""
        made = plan_for(KeyPolicy(id=f"static:{name}", name=name, team=None, models=None, limits=limits))
        assert made is not None
        return made

    @staticmethod
    def counter(p: Plan, kind: str) -> str:
        """The Redis key of the plan's counter of one kind (``req``, ``tpm``, ...)."""
        return f"{PREFIX}{{{p.shard}}}:{p.checks[0].subject}:{kind}"


@pytest.fixture
async def lua(redis_server: RedisServer) -> AsyncIterator[Lua]:  # noqa: F811
    made = Lua(RedisQuotaStore.from_url(redis_server.url, 1.0), aioredis.Redis.from_url(redis_server.url))
    yield made
    await made.client.aclose()
    await made.store.close()


# --- the bucket hashes' running totals (reserve.lua): exact, whatever the order of charges and refunds

TOTAL, OLDEST = "-1", "-2"  # the fields reserve.lua keeps besides the buckets (rpm and tpm)


async def tpm_fields(client: aioredis.Redis, key: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (await client.hgetall(key)).items()}


def check_total(fields: dict[int, int]) -> None:
    buckets = {b: v for b, v in fields.items() if b >= 0}
    assert all(v > 0 for v in buckets.values()), fields  # no bucket is kept at 0
    assert fields.get(int(TOTAL), 0) == sum(buckets.values()), fields
    if int(OLDEST) in fields:  # when it is not, the next reserve finds it again
        assert fields[int(OLDEST)] == min(buckets), fields


async def test_the_totals_follow_every_charge_refund_and_release(lua: Lua) -> None:
    store, client = lua.store, lua.client
    p = lua.plan("s", Limits(rpm=10**9, tpm=10**9))
    requests_key, tokens_key = (lua.counter(p, kind) for kind in ("req", "tpm"))
    rng = random.Random(7)
    open_leases: dict[str, tuple[int, tuple[int, ...]]] = {}
    requests = tokens = 0
    first_second = await _redis_second(client)
    for i in range(300):  # at least 3 s of sleeps, so across bucket boundaries
        await asyncio.sleep(0.01)
        if await _redis_second(client) - first_second > 45:
            break  # a very busy machine: stop well inside the window, which the counts below assume
        action = rng.random()
        if action < 0.5 or not open_leases:
            estimate = rng.choice([0, 1, 5, 40])
            admission = await store.reserve(p, f"l{i}", estimate, TTL_MS)
            open_leases[f"l{i}"] = (estimate, admission.windows)
            requests, tokens = requests + 1, tokens + estimate
        else:
            lease = rng.choice(sorted(open_leases))
            estimate, windows = open_leases.pop(lease)
            if action < 0.85:
                delta = rng.choice([-estimate, -1, 0, 3]) if estimate else rng.choice([0, 3])
                await store.settle(p, lease, windows, delta)
                tokens += delta
            else:
                assert await store.release(p, lease, TTL_MS)
                requests, tokens = requests - 1, tokens - estimate
        # A bucket a second of Redis's clock, however long the run takes: not one per request.
        seconds = range(first_second, await _redis_second(client) + 1)
        for key in (requests_key, tokens_key):
            fields = await tpm_fields(client, key)
            check_total(fields)
            # A bucket a second of the run, TOTAL and OLDEST, and (tpm) the estimates in flight by the
            # second their leases expire: not one field per request.
            assert {f for f in fields if f >= 0} <= set(seconds), fields
            in_flight = {f for f in fields if f < int(OLDEST)}
            assert len(in_flight) <= (len(seconds) + 1 if key == tokens_key else 0), fields
            assert not fields or await client.pttl(key) > 0  # never left without a TTL
        if i % 25 == 0:
            assert [s.used for s in await store.usage(p)] == [requests, tokens]
    assert [s.used for s in await store.usage(p)] == [requests, tokens]  # nothing left the window yet


async def _redis_second(client: aioredis.Redis) -> int:
    seconds, _ = await client.time()
    return int(seconds)


async def test_expired_buckets_leave_the_total_and_the_reset(lua: Lua) -> None:
    # Redis's clock cannot move: plant buckets of the past instead, as the previous layout
    # (no total) and as this one (a total whose oldest bucket has expired).
    store, client = lua.store, lua.client
    p = lua.plan("x", Limits(tpm=1000))
    key = lua.counter(p, "tpm")
    for with_total in (False, True):
        await client.delete(key)
        second = int(time.time())
        planted = {second - 90: 500, second - 30: 200, second - 20: 0, second - 10: 100}
        await client.hset(key, mapping=planted)
        if with_total:
            await client.hset(key, mapping={TOTAL: 800, OLDEST: second - 90})
        assert (await store.usage(p))[0].used == 300  # a peek: counted buckets only
        admission = await store.reserve(p, f"now-{with_total}", 5, TTL_MS)
        assert admission.admitted and admission.states[0].used == 305
        reset = admission.states[0].reset_ms
        assert 29_000 < reset <= 32_000  # the bucket of 30 s ago leaves in 31 s
        fields = await tpm_fields(client, key)
        check_total(fields)
        assert {b for b in fields if b >= 0} == {second - 30, second - 10, admission.windows[0]}


async def test_a_step_back_of_redis_clock_keeps_the_oldest_bucket_right(lua: Lua) -> None:
    # After a failover to a Redis whose clock is behind, the current bucket is older than
    # buckets already counted: it becomes the oldest, and the reset follows it.
    store, client = lua.store, lua.client
    p = lua.plan("b", Limits(rpm=100, tpm=1000))
    keys = [lua.counter(p, kind) for kind in ("req", "tpm")]
    ahead = int(time.time()) + 5
    for key in keys:
        await client.hset(key, mapping={ahead: 3, TOTAL: 3, OLDEST: ahead})
        await client.pexpireat(key, (ahead + 62) * 1000)  # as set when that bucket appeared
    admission = await store.reserve(p, "behind", 10, TTL_MS)
    assert [s.used for s in admission.states] == [4, 13]
    for key in keys:
        fields = await tpm_fields(client, key)
        check_total(fields)
        assert fields[int(OLDEST)] == admission.windows[0] < ahead
        # The current bucket's 62 s would cut the newer bucket short: the expiry stays.
        assert await client.pttl(key) > (ahead + 61) * 1000 - time.time() * 1000
    assert all(59_000 < s.reset_ms <= 61_000 for s in admission.states)


async def test_a_late_settle_into_a_bucket_newer_than_the_clock_keeps_it_counted(lua: Lua) -> None:
    # After a step back of Redis's clock, a settle may bring back a bucket charged before the
    # step (a refund had emptied it, and the hash had gone): newer than the current second.
    # Its hash lives until that bucket leaves the window, not 62 s from Redis's earlier now.
    store, client = lua.store, lua.client
    p = lua.plan("n", Limits(tpm=1000))
    key = lua.counter(p, "tpm")
    ahead = int(time.time()) + 5
    await store.settle(p, "late", (ahead,), 20)
    fields = await tpm_fields(client, key)
    check_total(fields)
    assert fields[ahead] == 20
    assert await client.pttl(key) > (ahead + 61) * 1000 - time.time() * 1000


async def test_a_tpm_denial_retries_when_enough_buckets_leave(lua: Lua) -> None:
    store, client = lua.store, lua.client
    p = lua.plan("r", Limits(tpm=1000))
    key = lua.counter(p, "tpm")
    second = int(time.time())
    await client.hset(key, mapping={second - 40: 600, second - 20: 300, second - 5: 200,
                                    TOTAL: 1100, OLDEST: second - 40})
    denied = await store.reserve(p, "over", 1, TTL_MS)
    assert not denied.admitted and denied.states[0].used == 1100
    assert 19_000 < denied.retry_ms <= 22_000  # once the 600 of 40 s ago leave: 500 < 1000
    assert 19_000 < denied.states[0].reset_ms <= 22_000
    check_total(await tpm_fields(client, key))


async def test_settle_and_release_into_old_or_gone_buckets_keep_the_total(lua: Lua) -> None:
    store, client = lua.store, lua.client
    p = lua.plan("o", Limits(tpm=10**6))
    key = lua.counter(p, "tpm")
    second = int(time.time())
    await client.hset(key, mapping={second - 10: 100, TOTAL: 100, OLDEST: second - 10})
    # A reservation of 0 tokens 30 s ago (no bucket) whose usage came late: a new oldest bucket.
    await store.settle(p, "late", (second - 30,), 7)
    check_total(await tpm_fields(client, key))
    assert (await store.usage(p))[0].used == 107
    reset = (await store.reserve(p, "next", 1, TTL_MS)).states[0].reset_ms
    assert 29_000 < reset <= 31_000  # from the bucket of 30 s ago, not 10 s ago
    # A lost reservation whose bucket has gone meanwhile: nothing left to undo there.
    await client.hset(f"{PREFIX}{{{p.shard}}}:lease:gone", mapping={"e": 40, "1": second - 50})
    assert await store.release(p, "gone", TTL_MS)
    check_total(await tpm_fields(client, key))
    assert (await store.usage(p))[0].used == 108
    # A full refund empties the oldest bucket: the reset moves to the next one.
    await store.settle(p, "late", (second - 30,), -7)
    check_total(await tpm_fields(client, key))
    state = (await store.reserve(p, "after", 1, TTL_MS)).states[0]
    assert state.used == 102 and 49_000 < state.reset_ms <= 51_000
    # Usage that comes after its counter expired altogether brings the counter back, with a TTL.
    await client.delete(key)
    await store.settle(p, "after", (second - 5,), 3)
    assert (await store.usage(p))[0].used == 3 and 0 < await client.pttl(key) <= 62_000


async def test_estimates_in_flight_leave_with_their_settle_release_or_lease(lua: Lua) -> None:
    store, client = lua.store, lua.client
    p = lua.plan("f", Limits(tpm=1000, tokens_per_day=1000))
    keys = [lua.counter(p, kind) for kind in ("tpm", "day")]

    async def in_flight() -> list[dict[int, int]]:
        fields = [await client.hgetall(key) for key in keys]
        return [{int(k): int(v) for k, v in f.items() if k.lstrip(b"-").isdigit() and int(k) < int(OLDEST)}
                for f in fields]

    admitted = [await store.reserve(p, name, 300, TTL_MS) for name in ("settled", "released", "lost")]
    assert [sum(held.values()) for held in await in_flight()] == [900, 900]
    await store.settle(p, "settled", admitted[0].windows, -100)
    assert await store.release(p, "released", TTL_MS)
    assert [sum(held.values()) for held in await in_flight()] == [300, 300]
    # The third one's replica died: move its lease's expiry into the past, as time would.
    for key, held in zip(keys, await in_flight(), strict=True):
        (field,) = held
        await client.hdel(key, field)
        await client.hset(key, -(int(time.time()) - 1), 300)
    denied = await store.reserve(p, "next", 600, TTL_MS)  # 200 settled + 300 no longer in flight + 600
    assert not denied.admitted and denied.reason == "limit"
    assert await in_flight() == [{}, {}]  # the denial dropped what no longer counts
    assert [s.used for s in await store.usage(p)] == [500, 500]
