"""Holds shared between replicas: the plain logic, then two real gateways on one Redis."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator, Callable

import httpx

from proxy.config.loader import parse_config
from proxy.upstreams.health_sync import HealthSync, Hold, decode, encode
from proxy.upstreams.pool import Pool, make_selector
from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401
from tests.stub_upstream import Behaviour, StubUpstream


class _NoShare:
    async def publish(self, hold: Hold) -> None: ...

    async def changes(self) -> AsyncGenerator[Hold, None]:
        return
        yield

    async def close(self) -> None: ...


def _pool() -> Pool:
    config = parse_config("upstreams: [{name: a, base_url: 'http://a/v1', models: [m]}]", {})
    return Pool(config, make_selector("round_robin"))


def test_encoding_roundtrip_and_garbage() -> None:
    assert decode(encode(("up|with|bars", "cooling_down", 12.5))) == ("up|with|bars", "cooling_down", 12.5)
    assert decode("a|healthy|1") is None and decode("nonsense") is None


def test_local_holds_are_published_once_and_remote_ones_not_echoed() -> None:
    pool = _pool()
    sync = HealthSync(_NoShare(), lambda: pool, logging.getLogger("t"))
    assert sync.local_holds() == []
    pool.upstreams["a"].health.cool_down(time.monotonic(), 30)
    (hold,) = sync.local_holds()
    assert hold[:2] == ("a", "cooling_down") and abs(hold[2] - (time.time() + 30)) < 1
    assert sync.local_holds() == []  # already published
    sync.apply(("a", "ejected", time.time() + 60))
    assert pool.upstreams["a"].health.state(time.monotonic()) == "ejected"
    assert sync.local_holds() == []  # learnt from another replica: not sent back


def test_check_ejections_stay_local() -> None:
    pool = _pool()
    sync = HealthSync(_NoShare(), lambda: pool, logging.getLogger("t"))
    pool.upstreams["a"].health.eject()
    assert pool.upstreams["a"].health.blocked_until() == math.inf
    assert sync.local_holds() == []


def test_a_429_on_one_replica_cools_the_upstream_on_all(
        gateway: Callable[..., GatewayProcess], stub: StubUpstream, stub2: StubUpstream,
        redis_server: RedisServer) -> None:  # noqa: F811
    config = f"""
redis_url: {redis_server.url}
upstreams:
  - {{name: a, base_url: '{stub.url}', models: [m]}}
  - {{name: b, base_url: '{stub2.url}', models: [m], priority: 1}}
keys: [{{name: t, key: sk-sync}}]
"""
    first, second = gateway(config), gateway(config)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": "Bearer sk-sync"}
    stub.queue(Behaviour("429", {"retry_after": 3}))
    assert httpx.post(first.url + "/v1/chat/completions", json=body, headers=auth).headers[
        "x-llm-proxy-upstream"] == "b"
    time.sleep(0.5)  # the hold reaches the other replica within a publish interval and a pub/sub hop
    served = {httpx.post(second.url + "/v1/chat/completions", json=body, headers=auth).headers[
        "x-llm-proxy-upstream"] for _ in range(5)}
    assert served == {"b"} and len(stub.chat_requests) == 1
    time.sleep(2.6)
    assert httpx.post(second.url + "/v1/chat/completions", json=body, headers=auth).headers[
        "x-llm-proxy-upstream"] == "a"
