"""Quota semantics: one suite, run against the Redis store and the in-process store.

Tests that need to move the clock run on the in-process store only (Redis's
clock cannot be moved); the Lua calendar is checked against Python's instead.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.access import quotas
from proxy.access.keys import KeyPolicy
from proxy.access.quotas import QuotaService, Reservation, duration, plan_for, retry_seconds
from proxy.access.store import DAY_MS, Admission, CheckState, MemoryQuotaStore, Plan, QuotaStore, month_window
from proxy.access.store_redis import RedisQuotaStore
from proxy.config.types import Limits, QuotasConfig, StoreErrorMode
from proxy.errors import RateLimitError, ServiceUnavailableError
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)
MakeService = Callable[..., QuotaService]


def policy(key_id: str = "a", team: str | None = None, team_limits: Limits | None = None,
           **limits: int) -> KeyPolicy:
    return KeyPolicy(id=f"static:{key_id}", name=key_id, team=team, models=None, limits=Limits(**limits),
                     team_limits=team_limits)


class CountingStore:
    """Counts store calls, passing them on."""

    def __init__(self, inner: QuotaStore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    async def reserve(self, *args: Any) -> Any:
        self.calls.append("reserve")
        return await self.inner.reserve(*args)

    async def settle(self, *args: Any) -> Any:
        self.calls.append("settle")
        return await self.inner.settle(*args)

    async def release(self, *args: Any) -> Any:
        self.calls.append("release")
        return await self.inner.release(*args)

    async def usage(self, *args: Any) -> Any:
        self.calls.append("usage")
        return await self.inner.usage(*args)

    async def ping(self) -> None:
        self.calls.append("ping")
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(params=["memory", "redis"])
async def make_service(request: pytest.FixtureRequest) -> AsyncIterator[MakeService]:
    made: list[QuotaService] = []
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    def make(settings: QuotasConfig | None = None, counting: list[CountingStore] | None = None) -> QuotaService:
        store: QuotaStore = RedisQuotaStore.from_url(url, 1.0) if url else MemoryQuotaStore()
        if counting is not None:
            counting.append(CountingStore(store))
            store = counting[-1]
        made.append(QuotaService(store, settings or QuotasConfig()))
        return made[-1]

    yield make
    for service in made:
        await service.close()


def header(headers: Any, name: str) -> str | None:
    return next((v.decode() for k, v in headers if k.decode() == name), None)


async def outcomes(service: QuotaService, p: KeyPolicy, n: int, estimate: int = 1) -> list[Reservation | None]:
    async def one() -> Reservation | None:
        try:
            return await service.reserve(p, estimate)
        except RateLimitError:
            return None

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_no_limits_cost_no_store_call(make_service: MakeService) -> None:
    counting: list[CountingStore] = []
    service = make_service(counting=counting)
    reservation = await service.reserve(policy(team="t"), 100)
    await reservation.settle(50)
    assert counting[0].calls == [] and reservation.headers == ()


async def test_one_store_call_to_reserve_and_one_to_settle(make_service: MakeService) -> None:
    counting: list[CountingStore] = []
    service = make_service(counting=counting)
    p = policy(team="t", team_limits=Limits(rpm=100, tokens_per_month=10**6), rpm=10, tpm=1000,
               concurrency=5, tokens_per_day=10**5)
    reservation = await service.reserve(p, 100)
    await reservation.settle(80)
    await reservation.settle(80)
    assert counting[0].calls == ["reserve", "settle"]


async def test_rpm_admits_exactly_the_limit_under_concurrency(make_service: MakeService) -> None:
    service = make_service()
    admitted = [r for r in await outcomes(service, policy(rpm=10), 60) if r is not None]
    assert len(admitted) == 10


async def test_changed_limits_apply_to_the_next_request(make_service: MakeService) -> None:
    service = make_service()
    one = policy("changing", rpm=1)
    await service.reserve(one, 1)
    with pytest.raises(RateLimitError):
        await service.reserve(one, 1)
    raised = replace(one, limits=Limits(rpm=3))  # as a PATCH makes it: a new object
    assert len([r for r in await outcomes(service, raised, 5) if r is not None]) == 2


async def test_rpm_denial_names_the_limit_with_retry_after(make_service: MakeService) -> None:
    service = make_service()
    p = policy(rpm=2)
    first = await service.reserve(p, 1)
    await service.reserve(p, 1)
    assert header(first.headers, "x-ratelimit-limit-requests") == "2"
    assert header(first.headers, "x-ratelimit-remaining-requests") == "1"
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 1)
    exc = err.value
    assert exc.status == 429 and exc.type == "requests" and exc.code == "rate_limit_exceeded"
    assert "key 'a'" in exc.message and "(RPM)" in exc.message and "Limit 2" in exc.message
    # until the first request's 1-second bucket leaves the window: 60 to 61 s
    assert 59 <= int(header(exc.headers, "retry-after") or 0) <= 61
    assert header(exc.headers, "x-ratelimit-remaining-requests") == "0"


async def test_concurrency_never_exceeds_and_settle_releases(make_service: MakeService) -> None:
    service = make_service()
    p = policy(concurrency=3)
    held = [r for r in await outcomes(service, p, 20) if r is not None]
    assert len(held) == 3
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 1)
    assert err.value.type == "requests" and "concurrent" in err.value.message
    await held[0].settle(0)
    again = await service.reserve(p, 1)
    assert again is not None
    for r in [*held[1:], again]:
        await r.settle(1)
    assert len([r for r in await outcomes(service, p, 10) if r is not None]) == 3


async def test_concurrency_holds_across_overlapping_requests(make_service: MakeService) -> None:
    service = make_service()
    p = policy(concurrency=4)
    in_flight = peak = admitted = 0

    async def request() -> None:
        nonlocal in_flight, peak, admitted
        try:
            reservation = await service.reserve(p, 1)
        except RateLimitError:
            return
        in_flight += 1
        admitted += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        await reservation.settle(1)

    for _ in range(5):
        await asyncio.gather(*(request() for _ in range(25)))
    assert peak == 4 and admitted >= 5 * 4


async def test_a_token_budget_admits_what_fits_then_says_who_holds_the_rest(make_service: MakeService) -> None:
    service = make_service()
    p = policy(tokens_per_day=1000)
    admitted = [r for r in await outcomes(service, p, 50, estimate=300) if r is not None]
    assert len(admitted) == 3  # 900; a fourth would end at 1200
    # Held only by requests in flight, which may settle lower: retry soon, not tomorrow.
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 300)
    busy = err.value
    assert busy.code == "rate_limit_exceeded" and busy.type == "tokens" and "in flight" in busy.message
    assert header(busy.headers, "retry-after") == "1" and header(busy.headers, "x-should-retry") == "true"
    for reservation in admitted:
        await reservation.settle(300)
    # Settled usage leaves 100: this request does not fit until the day ends, but a smaller one does.
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 300)
    short = err.value
    assert short.code == "insufficient_quota" and "Requested 300" in short.message
    assert header(short.headers, "x-should-retry") == "false"
    await (await service.reserve(p, 100)).settle(100)
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 1)
    exc = err.value
    assert exc.code == "insufficient_quota" and exc.type == "tokens" and "per day" in exc.message
    assert "You exceeded" in exc.message and header(exc.headers, "x-should-retry") == "false"
    now = datetime.now(UTC).timestamp()
    to_midnight = (now // 86400 + 1) * 86400 - now
    assert abs(int(header(exc.headers, "retry-after") or 0) - to_midnight) <= 3
    usage = await service.key_usage(p)
    assert usage[0].used == 1000 and usage[0].remaining == 0


async def test_a_request_larger_than_its_teams_budget_is_refused_and_locks_nobody_out(
        make_service: MakeService) -> None:
    service = make_service()
    team = Limits(tokens_per_day=10_000)
    greedy, other = policy("greedy", "t", team), policy("other", "t", team)
    with pytest.raises(RateLimitError) as err:
        await service.reserve(greedy, 2**31 - 1)
    exc = err.value
    assert exc.status == 429 and exc.code == "estimate_exceeds_limit" and exc.limit == "tokens_per_day"
    assert "Request too large for team 't'" in exc.message and "Limit 10000" in exc.message
    assert header(exc.headers, "x-should-retry") == "false" and header(exc.headers, "retry-after") is None
    assert [u.used for u in await service.team_usage("t", team)] == [0]  # it charged nothing
    await (await service.reserve(other, 500)).settle(500)


async def test_a_denial_only_by_requests_in_flight_is_retryable(make_service: MakeService) -> None:
    service = make_service()
    team = Limits(tokens_per_day=10_000)
    holder, waiting = policy("holder", "t", team), policy("waiting", "t", team)
    held = await service.reserve(holder, 10_000)  # a whole day's budget, estimated
    with pytest.raises(RateLimitError) as err:
        await service.reserve(waiting, 200)
    exc = err.value
    assert exc.code == "rate_limit_exceeded" and exc.type == "tokens" and "team 't'" in exc.message
    assert header(exc.headers, "retry-after") == "1" and header(exc.headers, "x-should-retry") == "true"
    await held.settle(300)  # it used far less
    await (await service.reserve(waiting, 200)).settle(200)
    assert [u.used for u in await service.team_usage("t", team)] == [500]


async def test_settle_replaces_the_estimate_with_actual_usage(make_service: MakeService) -> None:
    service = make_service()
    p = policy(tpm=1000, tokens_per_day=5000, tokens_per_month=9000)
    reservation = await service.reserve(p, 400)
    assert header(reservation.headers, "x-ratelimit-remaining-tokens") == "600"
    await reservation.settle(150)
    assert [u.used for u in await service.key_usage(p)] == [150, 150, 150]
    big = await service.reserve(p, 100)
    await big.settle(700)  # more than estimated: charged as used
    assert [u.used for u in await service.key_usage(p)] == [850, 850, 850]


async def test_upstream_failure_releases_and_charges_nothing(make_service: MakeService) -> None:
    service = make_service()
    p = policy(tpm=1000, concurrency=1, tokens_per_month=10_000)
    reservation = await service.reserve(p, 900)
    await reservation.settle(0)
    usage = {u.limit: u.used for u in await service.key_usage(p)}
    assert usage == {"tpm": 0, "concurrency": 0, "tokens_per_month": 0}


async def test_tpm_denial_is_a_tokens_limit(make_service: MakeService) -> None:
    service = make_service()
    p = policy(tpm=100)
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 150)  # never fits in 100
    assert err.value.code == "estimate_exceeds_limit" and "(TPM)" in err.value.message
    await (await service.reserve(p, 100)).settle(95)
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 10)
    exc = err.value
    assert exc.type == "tokens" and exc.code == "rate_limit_exceeded" and "(TPM)" in exc.message
    assert "Requested 10" in exc.message and header(exc.headers, "x-should-retry") is None
    assert 59 <= int(header(exc.headers, "retry-after") or 0) <= 61
    assert header(exc.headers, "x-ratelimit-remaining-tokens") == "5"


async def test_team_limit_is_shared_by_its_keys_and_named(make_service: MakeService) -> None:
    service = make_service()
    team = Limits(rpm=3)
    a, b = policy("a", "t", team, rpm=10), policy("b", "t", team, rpm=10)
    for p in (a, b, a):
        await service.reserve(p, 1)
    for p in (a, b):
        with pytest.raises(RateLimitError) as err:
            await service.reserve(p, 1)
        assert "team 't'" in err.value.message
    assert [u.used for u in await service.team_usage("t", team)] == [3]


async def test_denial_charges_nothing(make_service: MakeService) -> None:
    service = make_service()
    team = Limits(tokens_per_day=10)
    p = policy("a", "t", team, rpm=5, tpm=1000)
    await service.reserve(p, 8)
    for _ in range(3):
        with pytest.raises(RateLimitError):
            await service.reserve(p, 5)
    usage = {u.limit: u.used for u in await service.key_usage(p)}
    assert usage == {"rpm": 1, "tpm": 8}


async def test_headers_use_openai_formats(make_service: MakeService) -> None:
    service = make_service()
    reservation = await service.reserve(policy(rpm=60, tpm=1000), 10)
    names = [k.decode() for k, _ in reservation.headers]
    assert names == [f"x-ratelimit-{w}-{u}" for u in ("requests", "tokens") for w in ("limit", "remaining", "reset")]
    pattern = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")
    assert all(pattern.match(v.decode()) for k, v in reservation.headers if b"reset" in k)


async def test_zero_limit_denies_everything(make_service: MakeService) -> None:
    service = make_service()
    with pytest.raises(RateLimitError) as err:
        await service.reserve(policy(rpm=0), 1)
    assert int(header(err.value.headers, "retry-after") or 0) >= 1


def test_plans_tag_a_key_and_its_team_together() -> None:
    p = policy("a", "t", Limits(rpm=1), rpm=2)
    plan = plan_for(p)
    assert plan is not None and plan.shard == "t:t"
    assert [c.subject for c in plan.checks] == ["k:static:a", "t:t"]
    lone = plan_for(policy("b", rpm=1))
    assert lone is not None and lone.shard == "k:static:b"
    assert plan_for(policy("c", "t")) is None


def test_durations_and_retry_seconds() -> None:
    assert [duration(ms) for ms in (0, 120, 1000, 1500, 360_000, 7_200_000)] == \
        ["0ms", "120ms", "1s", "1.5s", "6m0s", "2h0m0s"]
    assert [retry_seconds(ms) for ms in (0, 1, 999, 1000, 1001)] == [1, 1, 1, 1, 2]


# --- the in-process store with a movable clock: the exact edges


class Clock:
    def __init__(self, at: float) -> None:
        self.now = at

    def __call__(self) -> float:
        return self.now


def clocked(at: float) -> tuple[QuotaService, Clock]:
    clock = Clock(at)
    return QuotaService(MemoryQuotaStore(clock), QuotasConfig(lease_ttl=30)), clock


async def test_rpm_never_lets_a_60_second_span_hold_more_than_the_limit() -> None:
    service, clock = clocked(1_000_000.5)
    p = policy(rpm=3)
    for offset in (0.0, 10.0, 20.0):
        clock.now = 1_000_000.5 + offset
        await service.reserve(p, 1)
    clock.now = 1_000_060.4  # 59.9 s after the first: it still counts
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 1)
    assert header(err.value.headers, "retry-after-ms") == "600"  # when its bucket [..00, ..01) leaves
    clock.now = 1_000_061.0
    await service.reserve(p, 1)  # the first left the window
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 1)
    assert header(err.value.headers, "retry-after") == "10"
    assert header(err.value.headers, "x-ratelimit-reset-requests") == "10s"


async def test_tpm_counts_tokens_for_60_to_61_seconds() -> None:
    service, clock = clocked(2_000_000.5)
    p = policy(tpm=100)
    await service.reserve(p, 100)
    clock.now = 2_000_060.4  # 59.9 s later: still counted
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 1)
    assert header(err.value.headers, "retry-after-ms") == "600"
    clock.now = 2_000_061.0  # its bucket [..00, ..01) stopped counting
    await service.reserve(p, 1)


async def test_leases_expire_by_themselves() -> None:
    service, clock = clocked(3_000_000.0)
    p = policy(concurrency=1)
    await service.reserve(p, 1)  # never settled: its replica died
    clock.now += 29.9
    with pytest.raises(RateLimitError):
        await service.reserve(p, 1)
    clock.now += 0.2
    await service.reserve(p, 1)


async def test_an_estimate_whose_lease_expired_counts_as_settled() -> None:
    service, clock = clocked(3_500_000.0)
    p = policy(tokens_per_day=1000)
    await service.reserve(p, 900)  # never settled: its replica died
    clock.now += 29.0
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 200)
    assert err.value.code == "rate_limit_exceeded"  # in flight still: it may settle lower
    clock.now += 2.0  # past lease_ttl (30 s): the estimate stays charged, as used
    with pytest.raises(RateLimitError) as err:
        await service.reserve(p, 200)
    assert err.value.code == "insufficient_quota"


async def test_day_and_month_windows_are_utc_calendar() -> None:
    start = datetime(2025, 1, 31, 23, 59, 0, tzinfo=UTC).timestamp()
    service, clock = clocked(start)
    day, month = policy("d", tokens_per_day=10), policy("m", tokens_per_month=10)
    for p in (day, month):
        await (await service.reserve(p, 10)).settle(10)
        with pytest.raises(RateLimitError) as err:
            await service.reserve(p, 1)
        assert header(err.value.headers, "retry-after") == "60"
    clock.now = datetime(2025, 2, 1, 0, 0, 0, tzinfo=UTC).timestamp()
    await service.reserve(day, 10)
    await service.reserve(month, 10)


async def test_a_late_settle_corrects_the_right_window() -> None:
    service, clock = clocked(datetime(2025, 3, 1, 23, 59, 59, tzinfo=UTC).timestamp())
    p = policy(tokens_per_day=1000, tpm=1000)
    reservation = await service.reserve(p, 500)
    clock.now += 120  # the next day, and past the minute
    await reservation.settle(700)
    usage = {u.limit: u.used for u in await service.key_usage(p)}
    assert usage == {"tpm": 200, "tokens_per_day": 0}  # late extra tokens count now; yesterday is gone


def test_month_window_matches_the_calendar() -> None:
    index, end = month_window(int(datetime(2024, 12, 15, tzinfo=UTC).timestamp() * 1000))
    assert index == 2024 * 12 + 11 and end == int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)


async def test_lua_calendar_agrees_with_python(redis_server: RedisServer) -> None:  # noqa: F811
    from importlib import resources

    text = resources.files("proxy.access").joinpath("lua", "reserve.lua").read_text()
    helpers = text[text.index("-- Days since"):text.index("-- Buckets of")]
    probe = ("local DAY = 86400000\nlocal now = tonumber(ARGV[1])\n" + helpers
             + "\nlocal i, e = calendar('month')\nreturn {i, e}")
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        firsts = [int(datetime(y, m, 1, tzinfo=UTC).timestamp() * 1000)
                  for y in (1970, 1999, 2000, 2024, 2025, 2100) for m in range(1, 13)]
        for ms in [t + d for t in firsts for d in (-1, 0, 1, 14 * DAY_MS)]:
            got = await client.eval(probe, 0, ms)  # type: ignore[no-untyped-call]
            assert tuple(got) == month_window(ms), ms
    finally:
        await client.aclose()


# --- answers that never came: the reservation is released in the background


class Faulty:
    """The in-process store with faults: reserves that run but whose answer is lost, releases that fail,
    calls that hang until an event is set."""

    def __init__(self) -> None:
        self.inner = MemoryQuotaStore()
        self.calls: list[tuple[str, str]] = []  # (operation, lease)
        self.lose_reserves = 0
        self.fail_releases = 0
        self.hold_reserves: asyncio.Event | None = None
        self.hold_releases: asyncio.Event | None = None

    async def reserve(self, plan: Plan, lease: str, estimate: int, lease_ttl_ms: int) -> Admission:
        self.calls.append(("reserve", lease))
        admission = await self.inner.reserve(plan, lease, estimate, lease_ttl_ms)  # it ran...
        if self.hold_reserves is not None:
            await self.hold_reserves.wait()
        if self.lose_reserves:
            self.lose_reserves -= 1
            raise ServiceUnavailableError("The quota store is unavailable (reserve: TimeoutError).",
                                          code="quota_store_unavailable")  # ...but its answer came too late
        return admission

    async def settle(self, *args: Any) -> None:
        await self.inner.settle(*args)

    async def release(self, plan: Plan, lease: str, lease_ttl_ms: int) -> bool:
        self.calls.append(("release", lease))
        if self.hold_releases is not None:
            await self.hold_releases.wait()
        if self.fail_releases:
            self.fail_releases -= 1
            raise ServiceUnavailableError("The quota store is unavailable (release: ConnectionError).",
                                          code="quota_store_unavailable")
        return await self.inner.release(plan, lease, lease_ttl_ms)

    async def usage(self, plan: Plan) -> tuple[CheckState, ...]:
        return await self.inner.usage(plan)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def count(self, operation: str) -> int:
        return sum(op == operation for op, _ in self.calls)


class Events:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def store_error(self, operation: str) -> None:
        self.errors.append(operation)

    def store_latency(self, operation: str, seconds: float) -> None:
        return None


LOST = policy("lost", rpm=100, tpm=10_000, concurrency=2, tokens_per_day=10**6)


def faulty(mode: StoreErrorMode = "fail_closed") -> tuple[QuotaService, Faulty, Events]:
    store, events = Faulty(), Events()
    return QuotaService(store, QuotasConfig(on_store_error=mode, store_timeout=0.05), events), store, events


async def drained(service: QuotaService) -> None:
    """Wait for the background releases."""
    while service._releases:
        await asyncio.gather(*service._releases, return_exceptions=True)


async def used(service: QuotaService, p: KeyPolicy = LOST) -> list[int]:
    return [u.used for u in await service.key_usage(p)]


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotas, "RELEASE_BACKOFF", 0.001)


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_a_reservation_whose_answer_was_lost_is_released(mode: StoreErrorMode) -> None:
    service, store, events = faulty(mode)
    store.lose_reserves = 1
    if mode == "fail_closed":
        with pytest.raises(ServiceUnavailableError):
            await service.reserve(LOST, 100)
    else:
        assert (await service.reserve(LOST, 100)).headers == ()  # admitted uncounted...
    assert await used(service) == [1, 100, 1, 100]  # ...though the store ran it
    await drained(service)
    assert await used(service) == [0, 0, 0, 0]  # released
    assert store.calls == [("reserve", store.calls[0][1]), ("release", store.calls[0][1])]
    assert events.errors == ["reserve"] and service.store_healthy()
    held = [await service.reserve(LOST, 1) for _ in range(2)]  # concurrency 2: not locked out
    for reservation in held:
        await reservation.settle(1)


async def test_a_failing_release_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    service, store, events = faulty()
    store.lose_reserves, store.fail_releases = 1, 2
    with pytest.raises(ServiceUnavailableError):
        await service.reserve(LOST, 100)
    await drained(service)
    assert store.count("release") == 3 and events.errors == ["reserve", "release", "release"]
    assert await used(service) == [0, 0, 0, 0]
    assert "quota release failed" not in caplog.text


async def test_a_release_that_keeps_failing_is_given_up_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    service, store, _ = faulty()
    store.lose_reserves, store.fail_releases = 1, 1000
    with pytest.raises(ServiceUnavailableError):
        await service.reserve(LOST, 100)
    await drained(service)
    assert store.count("release") == quotas.RELEASE_ATTEMPTS
    assert "quota release failed" in caplog.text
    assert await used(service) == [1, 100, 1, 100]  # left to expire with its lease, as before


async def test_a_reserve_that_was_never_sent_is_not_released() -> None:
    service, store, _ = faulty()
    store.lose_reserves, store.fail_releases = 1, 1000  # the store is failing: unhealthy
    with pytest.raises(ServiceUnavailableError):
        await service.reserve(LOST, 1)
    await drained(service)  # its release given up
    assert not service.store_healthy()
    store.hold_reserves = asyncio.Event()
    probing = asyncio.create_task(service.reserve(LOST, 1))  # one request tries the store...
    await asyncio.sleep(0)
    with pytest.raises(ServiceUnavailableError):
        await service.reserve(LOST, 1)  # ...the others do not wait for it: no store call, nothing to release
    store.lose_reserves, store.fail_releases = 1, 0
    store.hold_reserves.set()
    with pytest.raises(ServiceUnavailableError):
        await probing
    await drained(service)
    reserved = [lease for op, lease in store.calls if op == "reserve"]
    assert len(reserved) == 2 and {lease for op, lease in store.calls if op == "release"} == set(reserved)
    assert await used(service) == [1, 1, 1, 1]  # the first one's release was given up, the second's not


async def test_a_cancelled_reserve_is_released() -> None:
    service, store, _ = faulty()
    store.hold_reserves = asyncio.Event()
    request = asyncio.create_task(service.reserve(LOST, 10))
    await asyncio.sleep(0.01)
    assert store.calls
    request.cancel()  # the store ran it; nobody will read its answer
    with pytest.raises(asyncio.CancelledError):
        await request
    await drained(service)
    assert await used(service) == [0, 0, 0, 0]


async def test_a_denied_reserve_is_not_released() -> None:
    service, store, _ = faulty()
    p = policy("denied", rpm=1)
    await service.reserve(p, 1)
    with pytest.raises(RateLimitError):
        await service.reserve(p, 1)
    await drained(service)
    assert store.count("release") == 0


async def test_pending_releases_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(quotas, "MAX_PENDING_RELEASES", 2)
    service, store, _ = faulty()
    p = policy("many", rpm=100, concurrency=10)
    store.hold_releases = asyncio.Event()
    store.lose_reserves = 3
    for _ in range(3):
        with pytest.raises(ServiceUnavailableError):
            await service.reserve(p, 10)
    assert len(service._releases) == 2 and "2 releases pending already" in caplog.text
    store.hold_releases.set()
    await drained(service)
    assert await used(service, p) == [1, 1]  # the one dropped expires with its lease


async def test_close_ends_the_pending_releases() -> None:
    service, store, _ = faulty()
    store.hold_releases = asyncio.Event()  # a release that never finishes
    store.lose_reserves = 1
    with pytest.raises(ServiceUnavailableError):
        await service.reserve(LOST, 10)
    (task,) = service._releases
    started = time.perf_counter()
    await service.close()
    assert time.perf_counter() - started < 1.0  # one store timeout (0.05 s), then cancelled
    assert task.cancelled() and not service._releases


async def test_headers_report_the_tightest_limit_of_key_and_team(make_service: MakeService) -> None:
    service = make_service()
    p = policy("a", "t", Limits(rpm=5, tpm=100_000), rpm=100, tpm=1000)
    reservation = await service.reserve(p, 10)
    got = {k.decode(): v.decode() for k, v in reservation.headers}
    assert (got["x-ratelimit-limit-requests"], got["x-ratelimit-remaining-requests"]) == ("5", "4")  # the team's
    assert (got["x-ratelimit-limit-tokens"], got["x-ratelimit-remaining-tokens"]) == ("1000", "990")  # the key's
