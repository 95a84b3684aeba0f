"""A replica cut off from Redis: revoked keys it cannot learn of, and ``/readyz``.

Gateway A reaches Redis directly; gateway B goes through ``Partition``, a TCP
proxy that can cut B off as a network would (nothing arrives, nothing fails),
while A, and the admin who revokes a key there, still reach Redis. The openai
SDK and plain HTTP are the clients. ``quotas.key_directory_max_age`` is short
here so that the tests are quick; every wait polls a state with a generous
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import httpx
import openai
import pytest
import redis

from proxy.access.issued_keys import Freshness, IssuedKeys, KeySpec
from proxy.access.keys import hash_key
from proxy.access.quotas import QuotaService
from proxy.access.store_redis import RedisDirectory, RedisQuotaStore
from proxy.config.types import QuotasConfig, StoreErrorMode
from proxy.errors import ServiceUnavailableError
from proxy.io.redis_client import connect
from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401
from tests.stub_upstream import StubUpstream
from tests.tcp_partition import Partition

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")
ADMIN = "sk-admin-partition-test"
STATIC = "sk-static-partition-test"
MAX_AGE = 2.0  # quotas.key_directory_max_age of the gateways here
DEADLINE = 30.0  # for any state to be reached, however busy the machine
MESSAGES = [{"role": "user", "content": "hello"}]


def config(stub: StubUpstream, redis_url: str, mode: StoreErrorMode) -> str:
    return f"""
redis_url: {redis_url}
admin_key: {ADMIN}
upstreams: [{{name: stub, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: static-key, key: {STATIC}}}]
quotas: {{on_store_error: {mode}, key_directory_max_age: {MAX_AGE}}}
logging: {{level: debug}}   # the secret must stay out of even the most talkative log
"""


@dataclass
class Replicas:
    redis: RedisServer
    partition: Partition  # between B and Redis
    a: GatewayProcess
    b: GatewayProcess
    http: httpx.Client

    def create_key(self) -> tuple[str, str]:
        """A key without limits (so no quota call can refuse it) issued on A: (id, secret)."""
        made = self.http.post(self.a.url + "/admin/keys", headers=bearer(ADMIN), json={"name": "ci"})
        assert made.status_code == 201, made.text
        return made.json()["id"], made.json()["key"]

    def revoke_on_a(self, key_id: str) -> None:
        answer = self.http.delete(self.a.url + f"/admin/keys/{key_id}", headers=bearer(ADMIN))
        assert answer.status_code == 200 and answer.json()["revoked"] is True

    def chat(self, gw: GatewayProcess, secret: str) -> httpx.Response:
        return self.http.post(gw.url + "/v1/chat/completions", headers=bearer(secret),
                              json={"model": "m", "messages": MESSAGES, "max_tokens": 3})

    def status(self, gw: GatewayProcess, secret: str) -> int:
        return self.chat(gw, secret).status_code

    def readyz(self, gw: GatewayProcess) -> httpx.Response:
        return self.http.get(gw.url + "/readyz")

    def unconfirmed(self, gw: GatewayProcess, outcome: str) -> float:
        text = self.http.get(gw.url + "/metrics").text
        found = re.search(rf'^llm_proxy_key_directory_unconfirmed_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
        assert found is not None, text
        return float(found.group(1))


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def wait_for(produce: Callable[[], T], done: Callable[[T], bool], within: float = DEADLINE) -> T:
    """Call ``produce`` until ``done`` holds for its result; that result."""
    deadline = time.monotonic() + within
    while True:
        value = produce()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s; last: {value!r}")
        time.sleep(0.05)


@contextlib.contextmanager
def replicas(mode: StoreErrorMode) -> Iterator[Replicas]:
    with contextlib.ExitStack() as stack:
        server = RedisServer()
        stack.callback(server.close)
        server.start()
        partition = Partition(server.port).start()
        stack.callback(partition.stop)
        stub = StubUpstream().start()
        stack.callback(stub.stop)
        gateways = []
        for url in (server.url, partition.url):
            gw = GatewayProcess(config(stub, url, mode))
            stack.callback(gw.close)
            gateways.append(gw.start())
        http = stack.enter_context(httpx.Client(timeout=10))
        yield Replicas(server, partition, gateways[0], gateways[1], http)


def _revoked_while_b_is_cut_off(r: Replicas) -> tuple[str, str]:
    """A key B has seen, revoked on A once B is cut off from Redis: its id and its secret."""
    key_id, secret = r.create_key()
    wait_for(lambda: r.status(r.b, secret), lambda s: s == 200)
    r.partition.cut()
    r.revoke_on_a(key_id)
    assert r.status(r.a, secret) == 401
    return key_id, secret


def test_a_cut_off_replica_refuses_a_key_it_cannot_confirm_and_learns_of_its_revocation_later() -> None:
    with replicas("fail_closed") as r:
        key_id, secret = _revoked_while_b_is_cut_off(r)

        # B cannot hear of the revocation; once its copy is older than the max age it
        # stops honouring the key (before that, for at most the max age, it still does).
        refused = wait_for(lambda: r.chat(r.b, secret), lambda a: a.status_code != 200)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "key_directory_unavailable" and error["type"] == "server_error"
        assert "cannot be confirmed" in error["message"] and secret not in refused.text
        with pytest.raises(openai.InternalServerError) as raised:  # what a team's code sees
            openai.OpenAI(base_url=r.b.url + "/v1", api_key=secret, max_retries=0).chat.completions.create(
                model="m", messages=MESSAGES)  # type: ignore[arg-type]
        assert raised.value.status_code == 503
        assert [r.status(r.b, secret) for _ in range(5)] == [503] * 5  # and it stays refused
        assert r.status(r.b, STATIC) == 200  # a key from the config is true without Redis
        assert r.unconfirmed(r.b, "refused") >= 7 and r.unconfirmed(r.b, "served") == 0

        # No traffic touches the quota store here, yet B says it is not ready, and A is.
        answer = wait_for(lambda: r.readyz(r.b), lambda a: a.status_code == 503)
        assert answer.json()["checks"]["quota_store"] is False
        assert r.readyz(r.a).status_code == 200

        r.partition.heal()
        wait_for(lambda: r.status(r.b, secret), lambda s: s == 401)  # the revocation, at last
        wait_for(lambda: r.readyz(r.b).status_code, lambda s: s == 200)
        _, fresh = r.create_key()
        wait_for(lambda: r.status(r.b, fresh), lambda s: s == 200)
        log = r.b.log()
        assert re.search(rf"key directory .* refused .*{key_id}", log) and secret not in log


def test_fail_open_serves_a_key_it_cannot_confirm_and_counts_and_logs_it() -> None:
    with replicas("fail_open") as r:
        key_id, secret = _revoked_while_b_is_cut_off(r)

        def served() -> float:
            assert r.status(r.b, secret) == 200  # served throughout, as fail_open says
            return r.unconfirmed(r.b, "served")

        wait_for(served, lambda count: count > 0)  # ...and counted once the copy is too old
        assert r.unconfirmed(r.b, "refused") == 0
        assert r.readyz(r.b).status_code == 200  # fail_open: the replica stays ready
        log = wait_for(r.b.log, lambda text: re.search(rf"key directory .* served .*{key_id}", text) is not None)
        assert secret not in log

        r.partition.heal()
        wait_for(lambda: r.status(r.b, secret), lambda s: s == 401)


def test_readyz_fails_while_redis_is_down_though_no_request_came_and_recovers(
        redis_server: RedisServer, stub: StubUpstream) -> None:  # noqa: F811
    gw = GatewayProcess(config(stub, redis_server.url, "fail_closed")).start()
    try:
        with httpx.Client(timeout=10) as http:
            wait_for(lambda: http.get(gw.url + "/readyz").status_code, lambda s: s == 200)
            redis_server.stop()
            answer = wait_for(lambda: http.get(gw.url + "/readyz"), lambda a: a.status_code == 503)
            assert answer.json()["checks"]["quota_store"] is False
            assert http.get(gw.url + "/healthz").status_code == 200  # alive, only not ready
            redis_server.restart()
            wait_for(lambda: http.get(gw.url + "/readyz").status_code, lambda s: s == 200)
    finally:
        gw.close()


def calls(server: RedisServer, command: str) -> int:
    """How many times Redis has run ``command``."""
    client = redis.Redis(port=server.port)
    try:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
    finally:
        client.close()


async def test_a_storm_of_readiness_probes_sends_one_ping(redis_server: RedisServer) -> None:  # noqa: F811
    quotas = QuotaService(RedisQuotaStore.from_url(redis_server.url, 0.25), QuotasConfig(store_timeout=0.25))
    try:
        before = calls(redis_server, "ping")
        assert all(await asyncio.gather(*(quotas.check_ready() for _ in range(200))))
        assert calls(redis_server, "ping") - before == 1
        redis_server.stop()
        # The answer is kept for a moment; then a probe asks Redis and finds it gone.
        deadline = time.monotonic() + DEADLINE
        while await quotas.check_ready():
            assert time.monotonic() < deadline, "still ready with Redis gone"
            await asyncio.sleep(0.05)
    finally:
        await quotas.close()


async def test_a_replica_that_reaches_redis_keeps_its_keys_beyond_the_max_age_without_a_reload(
        redis_server: RedisServer) -> None:  # noqa: F811
    # A full load only every hour: the PINGs on the change channel alone keep the copy confirmed.
    partition = Partition(redis_server.port).start()
    keys = IssuedKeys(RedisDirectory(connect(partition.url, 1.0), 1.0, heartbeat=0.1), refresh_interval=3600,
                      freshness=Freshness(max_age=0.5))
    try:
        await keys.start()
        _, secret = await keys.create(KeySpec(name="idle"), "test")
        # Two full loads (at the start, and when the subscription is confirmed), each of which
        # reads the key and the team index; then only the change channel.
        assert await until(lambda: calls(redis_server, "smembers") >= 4)
        loads = calls(redis_server, "smembers")
        await asyncio.sleep(2.0)  # four max ages
        assert await until(lambda: outcome(keys, secret) == "served")
        assert calls(redis_server, "smembers") == loads  # confirmed without loading everything again
        partition.cut()
        assert await until(lambda: outcome(keys, secret) == "refused")
        partition.heal()
        assert await until(lambda: outcome(keys, secret) == "served")
    finally:
        await keys.close()
        partition.stop()


def outcome(keys: IssuedKeys, secret: str) -> str:
    try:
        found = keys.find(hash_key(secret))
    except ServiceUnavailableError as exc:
        assert exc.code == "key_directory_unavailable"
        return "refused"
    return "served" if found is not None else "unknown"


async def until(condition: Callable[[], bool], within: float = DEADLINE) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
