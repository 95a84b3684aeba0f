"""Who gives back what a request holds: its upstream slot and connection, its quota reservation.

Each is released by leaving the block that holds it, whatever ends the block. The upstream is a
real server on loopback (the ``stub`` fixture); the quotas run on the in-process store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest

from proxy.access.keys import KeyPolicy
from proxy.access.quotas import QuotaService
from proxy.access.store import MemoryQuotaStore
from proxy.apis.schema import ChatRequest, parse_chat_request
from proxy.config.loader import parse_config
from proxy.config.types import Config, Limits, QuotasConfig
from proxy.errors import UpstreamError
from proxy.io.watchdog import Watchdog
from proxy.upstreams.forwarding import Forwarder, Route
from proxy.upstreams.pool import Pool, make_selector
from tests.stub_upstream import StubUpstream

pytestmark = pytest.mark.timeout(60)


def _config(stub: StubUpstream) -> Config:
    # One failure ejects: a test sees how the upstream was judged in its state.
    return parse_config(f"health: {{failure_threshold: 1}}\n"
                        f"upstreams:\n  - {{name: up, base_url: '{stub.url}', models: [m], max_concurrency: 1}}\n",
                        {})


def _request(stream: bool) -> ChatRequest:
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hello"}]}
    return parse_chat_request(orjson.dumps(body), "application/json")


async def _wait_until(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.01)


async def test_an_attempt_that_fails_unexpectedly_gives_its_upstream_slot_back(stub: StubUpstream) -> None:
    config = _config(stub)
    pool = Pool(config, make_selector(config.routing.strategy), config.health)
    route = Route((("m", pool.candidates("m")),))
    # A header the upstream client refuses to send: not a failure the failover loop expects.
    with pytest.raises(ValueError, match="cannot be sent"):
        await Forwarder().forward(pool, config.routing, _request(stream=False), route,
                                  {"X-Request-Id": "a\r\nb"}, Watchdog())
    upstream = pool.upstreams["up"]
    assert upstream.in_flight == 0
    assert upstream.available(time.monotonic())  # max_concurrency 1: the next request may have it
    await upstream.transport.close()


async def test_a_relay_that_raises_gives_the_slot_and_the_connection_back(stub: StubUpstream) -> None:
    stub.behave("endless", delay=0.05, seconds=30)
    config = _config(stub)
    pool = Pool(config, make_selector(config.routing.strategy), config.health)
    forwarded = await Forwarder().forward(pool, config.routing, _request(stream=True),
                                          Route((("m", pool.candidates("m")),)), {}, Watchdog())
    upstream = forwarded.candidate.upstream
    assert upstream.in_flight == 1 and stub.in_flight == 1
    with pytest.raises(RuntimeError), forwarded:
        raise RuntimeError("the relay failed")
    assert upstream.in_flight == 0
    assert upstream.health.state(time.monotonic()) == "healthy"  # the relay's failure is not the upstream's
    await _wait_until(lambda: stub.in_flight == 0)  # the stream's connection was closed, not left open
    await upstream.transport.close()


async def test_an_upstream_that_breaks_off_its_answer_is_judged_failed(stub: StubUpstream) -> None:
    stub.behave("endless", delay=0.05, seconds=30)
    config = _config(stub)
    pool = Pool(config, make_selector(config.routing.strategy), config.health)
    forwarded = await Forwarder().forward(pool, config.routing, _request(stream=True),
                                          Route((("m", pool.candidates("m")),)), {}, Watchdog())
    with forwarded:
        forwarded.upstream_failed = True
    assert forwarded.candidate.upstream.in_flight == 0
    assert forwarded.candidate.upstream.health.state(time.monotonic()) == "ejected"
    await forwarded.candidate.upstream.transport.close()


def _policy() -> KeyPolicy:
    return KeyPolicy(id="static:k", name="k", team=None, models=None,
                     limits=Limits(concurrency=1, tokens_per_month=1_000_000), team_limits=None)


async def _used_this_month(service: QuotaService, policy: KeyPolicy) -> int:
    return next(u.used for u in await service.key_usage(policy) if u.limit == "tokens_per_month")


async def test_a_reservation_settles_what_was_recorded_when_its_block_raises() -> None:
    service = QuotaService(MemoryQuotaStore(), QuotasConfig())
    policy = _policy()
    recorded = {"tokens": 0}
    reservation = await service.reserve(policy, 500)
    with pytest.raises(RuntimeError):
        async with reservation.charging(lambda: recorded["tokens"]):
            recorded["tokens"] = 42
            raise RuntimeError("the relay failed")
    assert await _used_this_month(service, policy) == 42
    await (await service.reserve(policy, 1)).settle(0)  # concurrency 1: the lease was given back


async def test_an_abandoned_reservation_charges_at_least_what_it_was_told() -> None:
    service = QuotaService(MemoryQuotaStore(), QuotasConfig())
    policy = _policy()
    reservation = await service.reserve(policy, 500)

    async def abandoned() -> None:
        async with reservation.charging(lambda: 0):
            reservation.charge_at_least(120)  # the prompt went upstream
            await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(abandoned())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _used_this_month(service, policy) == 120
    failed = await service.reserve(policy, 500)
    with pytest.raises(UpstreamError):
        async with failed.charging(lambda: 0):
            failed.charge_at_least(120)
            failed.charge_at_least(0)  # every attempt failed: nothing is charged
            raise UpstreamError("every attempt failed")
    assert await _used_this_month(service, policy) == 120
