"""The Redis store for real: outages, hangs, restarts, Cluster, Sentinel, several processes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool

from proxy.access.issued_keys import IssuedKeys, KeySpec
from proxy.access.keys import KeyPolicy, hash_key
from proxy.access.quotas import PROBE_INTERVAL, QuotaService, plan_for
from proxy.access.store_redis import ClientRunner, RedisDirectory, RedisQuotaStore
from proxy.config.types import Limits, QuotasConfig, StoreErrorMode
from proxy.errors import RateLimitError, ServiceUnavailableError
from proxy.io.redis_client import connect, parse_redis_url
from tests.redis_fixtures import (  # noqa: F401
    REDIS_SENTINEL,
    LateReplies,
    RedisClusterNodes,
    RedisServer,
    free_port,
    redis_cluster,
    redis_server,
)

pytestmark = pytest.mark.timeout(90)
TIMEOUT = 0.25
ROOT = Path(__file__).resolve().parent.parent


def policy(key_id: str = "a", team: str | None = None, **limits: int) -> KeyPolicy:
    return KeyPolicy(id=f"static:{key_id}", name=key_id, team=team, models=None, limits=Limits(**limits),
                     team_limits=Limits(rpm=10_000) if team else None)


def service(url: str, mode: StoreErrorMode = "fail_closed") -> QuotaService:
    settings = QuotasConfig(on_store_error=mode, store_timeout=TIMEOUT)
    return QuotaService(RedisQuotaStore.from_url(url, TIMEOUT), settings)


@pytest.fixture
async def closing() -> AsyncIterator[list[QuotaService]]:
    made: list[QuotaService] = []
    yield made
    for s in made:
        await s.close()


async def timed(coro: object) -> tuple[float, object]:
    started = time.perf_counter()
    try:
        result: object = await coro  # type: ignore[misc]
    except (ServiceUnavailableError, RateLimitError) as exc:
        result = exc
    return time.perf_counter() - started, result


async def until_reachable(quotas: QuotaService, within: float = 10.0) -> None:
    """The first contact with a Cluster or a Sentinel takes a few round trips (slot map, master
    address) that may not fit one short store timeout on a busy machine; later calls do."""
    deadline = time.monotonic() + within
    while True:
        try:
            await quotas.key_usage(policy("warm-up", rpm=1))
            return
        except ServiceUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_outage_fail_closed_is_a_fast_503_then_recovers(redis_server: RedisServer,  # noqa: F811
                                                              closing: list[QuotaService]) -> None:
    quotas = service(redis_server.url)
    closing.append(quotas)
    p = policy(rpm=100)
    await (await quotas.reserve(p, 1)).settle(1)
    redis_server.stop()
    for _ in range(3):
        elapsed, result = await timed(quotas.reserve(p, 1))
        assert isinstance(result, ServiceUnavailableError) and result.code == "quota_store_unavailable"
        assert result.status == 503 and elapsed < TIMEOUT + 0.2
    assert not quotas.ready() and not quotas.store_healthy()
    redis_server.restart()  # empty, and without the scripts: NOSCRIPT must be handled
    reservation = await quotas.reserve(p, 1)
    assert quotas.ready() and quotas.store_healthy()
    assert dict(reservation.headers)[b"x-ratelimit-remaining-requests"] == b"99"


async def test_readiness_recovers_without_traffic(redis_server: RedisServer,  # noqa: F811
                                                  closing: list[QuotaService]) -> None:
    # An unready replica gets no requests (Kubernetes takes it out of its Service), so
    # nothing but the background probe can notice that Redis is back.
    quotas = service(redis_server.url)
    closing.append(quotas)
    redis_server.stop()
    with pytest.raises(ServiceUnavailableError):
        await quotas.reserve(policy(rpm=10), 1)
    assert not quotas.ready()
    await asyncio.sleep(PROBE_INTERVAL * 2)
    assert not quotas.ready()  # still down: the probe keeps failing
    redis_server.restart()
    for _ in range(int((PROBE_INTERVAL * 4 + 1) / 0.05)):
        if quotas.ready():
            break
        await asyncio.sleep(0.05)
    assert quotas.ready() and quotas.store_healthy()


async def test_outage_fail_open_admits_without_counting(redis_server: RedisServer,  # noqa: F811
                                                        closing: list[QuotaService]) -> None:
    quotas = service(redis_server.url, "fail_open")
    closing.append(quotas)
    p = policy(rpm=1)
    held = await quotas.reserve(p, 1)
    redis_server.stop()
    results = await asyncio.gather(*(quotas.reserve(p, 1) for _ in range(20)))
    assert all(r.headers == () for r in results)
    assert quotas.ready() and not quotas.store_healthy()
    await held.settle(1)  # fails quietly: the lease expires by itself
    for r in results:
        await r.settle(1)


async def test_a_hung_redis_never_hangs_a_request(redis_server: RedisServer,  # noqa: F811
                                                  closing: list[QuotaService]) -> None:
    quotas = service(redis_server.url)
    closing.append(quotas)
    p = policy(rpm=1000, concurrency=100)
    held = await quotas.reserve(p, 1)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(timed(quotas.reserve(p, 1)) for _ in range(50)))
        elapsed = time.perf_counter() - started
        assert all(isinstance(r, ServiceUnavailableError) for _, r in results)
        assert elapsed < TIMEOUT * 2 + 0.3  # waited at most about one timeout, all together
        started = time.perf_counter()
        await held.settle(1)  # a settle does not hang either
        assert time.perf_counter() - started < TIMEOUT * 2 + 0.3
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            await quotas.reserve(p, 1)
            break
        except ServiceUnavailableError:
            await asyncio.sleep(0.05)
    assert quotas.store_healthy()


async def test_one_round_trip_per_reserve_and_per_settle(redis_server: RedisServer,  # noqa: F811
                                                         closing: list[QuotaService]) -> None:
    quotas = service(redis_server.url)
    closing.append(quotas)
    p = KeyPolicy(id="static:a", name="a", team="t", models=None,
                  limits=Limits(rpm=100, tpm=10**6, concurrency=10, tokens_per_day=10**7, tokens_per_month=10**8),
                  team_limits=Limits(rpm=1000, tpm=10**7, concurrency=100, tokens_per_day=10**8,
                                     tokens_per_month=10**9))
    await (await quotas.reserve(p, 10)).settle(5)  # first use: connection set-up, script load
    watcher = aioredis.Redis.from_url(redis_server.url)
    seen: list[str] = []

    async def watch(monitor: object) -> None:
        while True:
            event = await monitor.next_command()  # type: ignore[attr-defined]
            if event.get("client_type") != "lua":  # commands inside a script are not round trips
                seen.append(event["command"].split()[0].upper())

    try:
        async with watcher.monitor() as monitor:
            task = asyncio.create_task(watch(monitor))
            await asyncio.sleep(0.1)
            for _ in range(10):
                reservation = await quotas.reserve(p, 10)
                await reservation.settle(5)
            await asyncio.sleep(0.2)
            task.cancel()
    finally:
        await watcher.aclose()
    assert seen == ["EVALSHA"] * 20  # per request: one to reserve, one to settle


async def test_lua_runs_on_a_three_node_cluster(redis_cluster: RedisClusterNodes,  # noqa: F811
                                                closing: list[QuotaService]) -> None:
    quotas = service(redis_cluster.url)
    closing.append(quotas)
    quotas_b = service(redis_cluster.url)
    closing.append(quotas_b)
    for s in (quotas, quotas_b):
        await until_reachable(s)
    for team in ("alpha", "beta", "gamma", None):  # different slots, so different nodes
        p = policy(f"k-{team}", team, rpm=5, tpm=1000, concurrency=3, tokens_per_day=10**6)
        admitted = 0
        for s in (quotas, quotas_b, quotas):
            for _ in range(3):
                try:
                    await (await s.reserve(p, 10)).settle(7)
                    admitted += 1
                except RateLimitError:
                    pass
        assert admitted == 5
        usage = {u.limit: u.used for u in await quotas.key_usage(p)}
        assert usage == {"rpm": 5, "tpm": 35, "concurrency": 0, "tokens_per_day": 35}


async def test_issued_keys_on_a_three_node_cluster(redis_cluster: RedisClusterNodes) -> None:  # noqa: F811
    # The directory (hashes, an index set, an audit stream under one hash tag) and its
    # change channel must work on Cluster too: a key issued by one replica reaches another.
    a = IssuedKeys(RedisDirectory(connect(redis_cluster.url, 1.0), 1.0))
    b = IssuedKeys(RedisDirectory(connect(redis_cluster.url, 1.0), 1.0))
    try:
        await a.start()
        await b.start()
        key, secret = await a.create(KeySpec(name="on-cluster", limits=Limits(rpm=1)), "test")
        for _ in range(200):
            if b.find(hash_key(secret)) is not None:
                break
            await asyncio.sleep(0.01)
        found = b.find(hash_key(secret))
        assert found is not None and found.limits.rpm == 1
        await a.revoke(key.id, "test")
        for _ in range(200):
            if b.find(hash_key(secret)) is None:
                break
            await asyncio.sleep(0.01)
        assert b.find(hash_key(secret)) is None
        assert [e["action"] for e in await b.audit(2)] == ["key.revoke", "key.create"]
    finally:
        await a.close()
        await b.close()


@pytest.fixture
def sentinel_port(tmp_path: Path) -> Iterator[int]:
    """A master and one Sentinel monitoring it as 'mymaster'; both stopped even if set-up fails."""
    master = RedisServer()
    sentinel: subprocess.Popen[bytes] | None = None
    try:
        master.start()
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master.port} 1\n")
        sentinel = subprocess.Popen([REDIS_SENTINEL, str(conf)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        yield port
    finally:
        if sentinel is not None:
            sentinel.terminate()
            sentinel.wait(5)
        master.close()


async def test_sentinel_url_finds_the_master(sentinel_port: int, closing: list[QuotaService]) -> None:
    quotas = service(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster")
    closing.append(quotas)
    await until_reachable(quotas)
    await quotas.reserve(policy(rpm=5), 1)
    assert [u.used for u in await quotas.key_usage(policy(rpm=5))] == [1]


_WORKER = textwrap.dedent("""
    import asyncio, json, sys
    from proxy.config.types import Limits, QuotasConfig
    from proxy.errors import RateLimitError
    from proxy.access.keys import KeyPolicy
    from proxy.access.quotas import QuotaService
    from proxy.access.store_redis import RedisQuotaStore
    from proxy.io.redis_client import connect

    async def main(url, n):
        quotas = QuotaService(RedisQuotaStore.from_url(url, 2.0), QuotasConfig(store_timeout=2.0))
        rpm = KeyPolicy(id="static:p", name="p", team="t", models=None, limits=Limits(rpm=25),
                        team_limits=Limits(tokens_per_day=10_000))
        async def one():
            try:
                await quotas.reserve(rpm, 700)
                return 1
            except RateLimitError:
                return 0
        results = await asyncio.gather(*(one() for _ in range(n)))
        await quotas.close()
        print(json.dumps(sum(results)))

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def test_two_processes_share_every_limit(redis_server: RedisServer) -> None:  # noqa: F811
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, redis_server.url, "40"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    totals = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        totals.append(json.loads(out))
    # The team's 10,000-token day admits what fits in it: 14 × 700 = 9,800, which binds before
    # the key's 25 rpm does.
    assert sum(totals) == 14


def test_redis_url_forms() -> None:
    assert parse_redis_url("redis://localhost:6379/0") is None
    assert parse_redis_url("unix:///run/redis.sock") is None
    s = parse_redis_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/mymaster/2")
    assert s is not None and s.scheme == "sentinel" and s.service == "mymaster" and s.db == 2
    assert s.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379)) and s.password == "pw"
    c = parse_redis_url("rediss+cluster://user:p%40ss@[::1]:7000,h2:7001")
    assert c is not None and c.tls and c.hosts == (("::1", 7000), ("h2", 7001))
    assert c.username == "user" and c.password == "p@ss"
    with pytest.raises(ValueError):
        parse_redis_url("redis+sentinel://h:26379")


async def test_unix_socket_url(tmp_path: Path, closing: list[QuotaService]) -> None:
    sock = tmp_path / "r.sock"
    server = RedisServer(None, "--unixsocket", str(sock))
    try:
        server.start()
        quotas = service(f"unix://{sock}?db=0")
        closing.append(quotas)
        await quotas.reserve(policy(rpm=1), 1)
        with pytest.raises(RateLimitError):
            await quotas.reserve(policy(rpm=1), 1)
    finally:
        server.close()


# --- the edge: whatever a call raises or answers, a request gets a 503 or its answer, never a 500


class FakeScript:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class FakeClient:
    """Scripts answer what each test says (by file name); no socket."""

    def __init__(self, **answers: Any) -> None:
        self.scripts: dict[str, FakeScript] = {}
        self.answers = answers

    def register_script(self, text: str) -> FakeScript:
        first_words = {"-- Check every": "reserve", "-- Replace": "settle", "-- Undo": "release"}
        name = next(name for start, name in first_words.items() if text.startswith(start))
        self.scripts[name] = FakeScript(self.answers.get(name))
        return self.scripts[name]

    async def aclose(self) -> None:
        return None


# What uvloop raises for a write to a transport the peer has just closed (a Redis being killed):
# it escaped the old edge (redis-py passes it through) and became a 500.
CLOSED = RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False 0x55>; "
                      "the handler is closed")
ONE = policy("edge", rpm=10)


def fake_store(**answers: Any) -> RedisQuotaStore:
    return RedisQuotaStore(ClientRunner(FakeClient(**answers), TIMEOUT))  # type: ignore[arg-type]


def admitted(checks: int = 1) -> list[int]:
    return [1, 0, 0, 0, *[1, 9, 60_000, 0] * checks]


@pytest.mark.parametrize("answer", [
    # whatever a call raises...
    CLOSED, ConnectionResetError(104, "reset"), TimeoutError(), redis_errors.ConnectionError("gone"),
    # ...or answers out of the script's shape
    None, b"OK", 2, [], [1, 0, 0], [1, 0, 0, 0, 1, 9, 60_000], [*admitted(), 0], [1, 0, 0, 0, b"1", 9, 60_000, 0],
    [2, 0, 0, 0, 1, 9, 0, 0], [0, 2, 10, 2, 1, 9, 0, 0], [1.5, 0, 0, 0, 1, 9, 0, 0], [True, 0, 0, 0, 1, 9, 0, 0],
    [0, 1, 10, 4, 1, 9, 0, 0], [0, 1, 10, 0, 1, 9, 0, 0], [1, 0, 0, 2, 1, 9, 60_000, 0],
])
async def test_a_failed_call_or_a_reply_of_another_shape_is_a_503(answer: Any) -> None:
    store = fake_store(reserve=answer, settle=answer, release=answer)
    plan = plan_for(ONE)
    assert plan is not None
    for call in (store.reserve(plan, "l", 1, 1000), store.usage(plan), store.settle(plan, "l", (0,), 0),
                 store.release(plan, "l", 1000)):
        with pytest.raises(ServiceUnavailableError) as err:
            await call
        assert err.value.code == "quota_store_unavailable" and err.value.status == 503


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_an_unexpected_error_is_the_store_failing_not_a_500(mode: StoreErrorMode) -> None:
    client = FakeClient(reserve=admitted(), settle=CLOSED, release=CLOSED)
    quotas = QuotaService(RedisQuotaStore(ClientRunner(client, TIMEOUT)),  # type: ignore[arg-type]
                          QuotasConfig(on_store_error=mode, store_timeout=TIMEOUT))
    try:
        reservation = await quotas.reserve(ONE, 1)
        await reservation.settle(1)  # fails quietly, as a settle does while Redis is away
        assert not quotas.store_healthy()
        client.scripts["reserve"].answer = CLOSED
        if mode == "fail_open":
            assert (await quotas.reserve(ONE, 1)).headers == ()
        else:
            with pytest.raises(ServiceUnavailableError):
                await quotas.reserve(ONE, 1)
    finally:
        await quotas.close()


def test_a_redis_that_resets_connections_gives_503s_on_uvloop() -> None:
    """The CI failure, for real: a peer that accepts and resets at once (as a Redis being killed does),
    and the gateway's event loop, uvloop, which raises RuntimeError for a write to the closed transport
    (HELLO, right after the connect) where asyncio's own loop stays silent."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    stop = threading.Event()

    def reset_all() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST

    thread = threading.Thread(target=reset_all, daemon=True)
    thread.start()
    url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    plan = plan_for(ONE)
    assert plan is not None

    async def main() -> dict[str, int]:
        store = RedisQuotaStore.from_url(url, TIMEOUT)
        seen: dict[str, int] = {}

        async def one() -> None:
            try:
                await store.reserve(plan, "l", 1, 1000)
            except ServiceUnavailableError as exc:
                name = type(exc.__cause__).__name__
                seen[name] = seen.get(name, 0) + 1

        try:
            for _ in range(20):
                await asyncio.gather(*(one() for _ in range(32)))
        finally:
            await store.close()
        return seen

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            seen = runner.run(main())  # anything but a ServiceUnavailableError fails the test
    finally:
        stop.set()
        listener.close()
        thread.join(5)
    assert sum(seen.values()) == 20 * 32, seen


async def test_an_interrupted_command_never_leaves_its_reply_to_the_next(
        redis_server: RedisServer) -> None:  # noqa: F811
    """A reserve whose reply comes after the timeout: its connection must not be reused with that reply
    still on its way, or the next command on it (here the only one in the pool) reads it as its own."""
    proxy = LateReplies(redis_server.port).start()
    pool = BlockingConnectionPool.from_url(proxy.url, max_connections=1, timeout=TIMEOUT, socket_timeout=TIMEOUT,
                                           socket_connect_timeout=TIMEOUT)
    store = RedisQuotaStore(ClientRunner(aioredis.Redis(connection_pool=pool), TIMEOUT))
    first, second = plan_for(policy("first", rpm=5)), plan_for(policy("second", rpm=7))
    assert first is not None and second is not None
    try:
        await store.usage(first)  # connected
        proxy.delay = TIMEOUT * 3
        with pytest.raises(ServiceUnavailableError):
            await store.reserve(first, "late", 1, 1000)  # Redis runs it; its reply comes late
        proxy.delay = 0
        for n in range(5):
            assert [(s.used, s.remaining) for s in await store.usage(second)] == [(n, 7 - n)]
            admission = await store.reserve(second, f"l{n}", 1, 1000)
            assert admission.admitted and admission.states[0].remaining == 6 - n
        await asyncio.sleep(TIMEOUT * 3)  # the late reply has arrived by now, wherever it went
        assert [(s.used, s.remaining) for s in await store.usage(first)] == [(1, 4)]
        assert [(s.used, s.remaining) for s in await store.usage(second)] == [(5, 2)]
    finally:
        await store.close()
        proxy.stop()
