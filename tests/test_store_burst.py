"""A burst larger than the Redis connection cap waits for connections instead of failing."""

from __future__ import annotations

import asyncio

from proxy.access.keys import KeyPolicy
from proxy.access.quotas import QuotaService
from proxy.access.store_redis import RedisQuotaStore
from proxy.config.types import Limits, QuotasConfig
from proxy.io.redis_client import MAX_CONNECTIONS
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401


async def test_burst_beyond_the_pool_cap_is_admitted_not_503(redis_server: RedisServer) -> None:  # noqa: F811
    service = QuotaService(RedisQuotaStore.from_url(redis_server.url, 2.0), QuotasConfig(store_timeout=2.0))
    policy = KeyPolicy(id="burst", name="burst", team=None, models=None, limits=Limits(rpm=10_000))
    try:
        reservations = await asyncio.gather(*(service.reserve(policy, 10) for _ in range(MAX_CONNECTIONS * 2)))
        await asyncio.gather(*(r.settle(5) for r in reservations))
    finally:
        await service.close()
    assert len(reservations) == MAX_CONNECTIONS * 2
