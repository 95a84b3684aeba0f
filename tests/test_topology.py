"""The Kubernetes topology on loopback: three gateway processes behind an nginx
load balancer (the Service), one Redis (docs/kubernetes.md).

- quotas hold globally: a key's rpm is the same budget on every replica;
- a replica killed (SIGKILL) mid-traffic loses no request that had not started
  streaming: nginx retries a failed connection on another replica, and a
  stream cut half-way ends without ``data: [DONE]``, so it never looks complete;
- a rolling restart (SIGTERM one replica at a time, a new one on its port)
  drops nothing: the draining replica serves for ``shutdown_delay``, then
  closes its listener (nginx moves on) and finishes its streams.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import orjson
import pytest

from proxy.upstreams import mock
from tests.gateway_process import GatewayProcess
from tests.nginx_lb import NginxLB, nginx_binary
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401  (fixture)
from tests.stub_upstream import StubUpstream

pytestmark = pytest.mark.skipif(
    nginx_binary() is None,
    reason="nginx is not installed (Debian package `nginx`; scripts/test installs it)")

LIMITED = "sk-topology-limited"
FREE = "sk-topology-free"
REPLICAS = 3


def _config(stub: StubUpstream, redis: RedisServer, rpm: int = 1000) -> str:
    return f"""
redis_url: {redis.url}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m], timeout: {{connect: 2, first_byte: 10, idle: 10}}}}]
routing: {{max_attempts: 1}}
keys:
  - {{name: limited, key: {LIMITED}, limits: {{rpm: {rpm}}}}}
  - {{name: free, key: {FREE}}}
quotas: {{on_store_error: fail_closed}}
server: {{shutdown_delay: 1, shutdown_grace: 20}}
"""


class Topology:
    def __init__(self, config_text: str) -> None:
        self.config_text = config_text
        self.gateways = [GatewayProcess(config_text) for _ in range(REPLICAS)]
        self.retired: list[GatewayProcess] = []
        self.lb = NginxLB([g.port for g in self.gateways], max_fails=1, fail_timeout=2)

    def start(self) -> Topology:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(GatewayProcess.start, self.gateways))
        for g in self.gateways:
            wait_ready(g)
        self.lb.start()
        return self

    def replace(self, index: int) -> GatewayProcess:
        """A new replica on the old one's port (the old one has exited)."""
        old = self.gateways[index]
        self.retired.append(old)
        new = GatewayProcess(self.config_text, port=old.port)
        self.gateways[index] = new
        for _ in range(50):  # the port can linger for a moment
            try:
                new.start()
                break
            except RuntimeError:
                if "address already in use" not in new.log().lower():
                    raise
                time.sleep(0.1)
        wait_ready(new)
        return new

    def logs(self) -> str:
        parts = [f"--- gateway :{g.port}\n{g.log()[-4000:]}" for g in self.retired + self.gateways]
        return "\n".join(parts) + f"\n--- nginx\n{self.lb.log()[-4000:]}"

    def close(self) -> None:
        self.lb.close()
        for g in self.gateways + self.retired:
            g.close()


def wait_ready(gw: GatewayProcess, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(gw.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"gateway :{gw.port} not ready within {timeout}s:\n{gw.log()[-4000:]}")


@pytest.fixture
def topology(redis_server: RedisServer) -> Iterator[Callable[..., Topology]]:  # noqa: F811
    made: list[Topology] = []

    def make(stub: StubUpstream, **kwargs: int) -> Topology:
        topo = Topology(_config(stub, redis_server, **kwargs))
        made.append(topo)
        return topo.start()

    yield make
    for topo in made:
        topo.close()


@dataclass
class Outcome:
    stream: bool
    started: float
    ended: float
    status: int | None = None  # None: no response header reached the client
    upstream: str = ""  # nginx's $upstream_addr: the replicas tried
    ok: bool = False  # a complete, correct answer (a stream: its text, then [DONE])
    done: bool = False  # a stream carried `data: [DONE]`
    error: str = ""

    @property
    def retried(self) -> bool:
        return "," in self.upstream


def _expected(body: dict[str, object], tokens: int) -> str:
    return "".join(mock.plan(body, tokens).choices[0])


def call(client: httpx.Client, url: str, key: str, stream: bool, tag: str, tokens: int) -> Outcome:
    """One chat completion; every failure is recorded, never raised."""
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": f"request {tag}"}],
                               "stream": stream}
    expected = _expected(body, tokens)
    out = Outcome(stream, time.monotonic(), 0.0)
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}"}) as resp:
            out.status = resp.status_code
            out.upstream = resp.headers.get("x-upstream-addr", "")
            if not stream or resp.status_code != 200:
                raw = resp.read()
                if resp.status_code == 200:
                    text = orjson.loads(raw)["choices"][0]["message"]["content"]
                    out.ok = text == expected
                    out.error = "" if out.ok else f"wrong answer {text!r} != {expected!r}"
                else:
                    out.error = f"{resp.status_code} {raw[:200]!r}"
                return out
            text, after_done = "", False
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                if out.done:
                    after_done = True
                if line == "data: [DONE]":
                    out.done = True
                    continue
                for choice in orjson.loads(line[6:]).get("choices", []):
                    text += choice["delta"].get("content") or ""
            out.ok = out.done and not after_done and text == expected
            if not out.ok:
                out.error = f"stream done={out.done} after_done={after_done} text={text!r} != {expected!r}"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended = time.monotonic()
    return out


def port_of(gw: GatewayProcess) -> str:
    return f"127.0.0.1:{gw.port}"


def test_a_key_rpm_holds_across_all_replicas(topology: Callable[..., Topology]) -> None:
    rpm = 10
    stub = StubUpstream().start()
    try:
        topo = topology(stub, rpm=rpm)
        with httpx.Client(timeout=10) as client:  # every replica's Redis connection warm
            for g in topo.gateways:
                assert call(client, g.url, FREE, False, "warm", stub.completion_tokens).ok
        total = 6 * rpm  # round-robin: 2 * rpm to each replica, so a per-replica limit would admit 3 * rpm

        def one(i: int) -> Outcome:
            with httpx.Client(timeout=10) as client:
                return call(client, topo.lb.url, LIMITED, i % 2 == 1, f"q{i}", stub.completion_tokens)

        # One request after another first: round-robin sends one to each replica, and each admits it.
        outcomes = [one(i) for i in range(REPLICAS)]
        assert sorted(o.upstream for o in outcomes) == sorted(port_of(g) for g in topo.gateways), outcomes
        assert all(o.ok for o in outcomes), outcomes
        # Then all the rest at once.
        with ThreadPoolExecutor(20) as pool:
            outcomes += pool.map(one, range(REPLICAS, total))
        ok = [o for o in outcomes if o.status == 200]
        limited = [o for o in outcomes if o.status == 429]
        assert len(ok) == rpm, (len(ok), [o.error for o in outcomes if o.status not in (200, 429)], topo.logs())
        assert all(o.ok for o in ok), [o.error for o in ok if not o.ok]
        assert len(limited) == total - rpm, [o.error for o in outcomes if o.status != 429][:5]
        assert not any(o.retried for o in outcomes)
        for g in topo.gateways:
            received = sum(o.upstream == port_of(g) for o in outcomes)
            served = sum(o.upstream == port_of(g) for o in ok)
            assert received > rpm, (port_of(g), received)  # alone it would have admitted rpm of them
            assert served >= 1, (port_of(g), [o.upstream for o in ok])
        with httpx.Client(timeout=10) as client:  # and every replica still refuses the key
            for g in topo.gateways:
                assert call(client, g.url, LIMITED, False, "after", stub.completion_tokens).status == 429
    finally:
        stub.stop()


def test_killing_a_replica_mid_traffic_loses_no_request_that_had_not_started_streaming(
        topology: Callable[..., Topology]) -> None:
    stub = StubUpstream(completion_tokens=12).start()
    stub.behave("slow", delay=0.03, delay_headers=0.05)  # ~0.05 s per answer, ~0.4 s per stream
    try:
        topo = topology(stub)
        victim = topo.gateways[1]
        threads, per_thread = 8, 25
        finished = [0]
        lock = threading.Lock()

        def worker(t: int) -> list[Outcome]:
            outs = []
            with httpx.Client(timeout=30) as client:
                for i in range(per_thread):
                    outs.append(call(client, topo.lb.url, FREE, (t + i) % 2 == 0, f"k{t}-{i}",
                                     stub.completion_tokens))
                    with lock:
                        finished[0] += 1
            return outs

        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(worker, t) for t in range(threads)]
            deadline = time.monotonic() + 20
            while finished[0] < threads * per_thread // 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            victim.wait(5)
            outcomes = [o for f in futures for o in f.result()]

        assert len(outcomes) == threads * per_thread
        failed = [o for o in outcomes if not o.ok]
        # A request that failed had started streaming: 200 and event-stream headers reached the
        # client, it was in flight on the killed replica, and it did not end with [DONE].
        not_started = [o for o in failed if not (o.stream and o.status == 200)]
        assert not_started == [], (not_started, topo.logs())
        for o in failed:
            assert not o.done, o
            assert o.upstream == port_of(victim), o
            assert o.started < killed_at < o.ended, o
        assert len(failed) <= threads
        # nginx noticed: some request met the dead replica and was passed on to a live one.
        retried = [o for o in outcomes if o.retried]
        assert retried and all(o.ok for o in retried), retried
        assert all(port_of(victim) in o.upstream.split(", ")[0] for o in retried)
        after = [o for o in outcomes if o.started > killed_at + 0.1]
        assert after and all(o.ok for o in after)
        print(f"\nkill: {len(outcomes)} requests, {len(failed)} cut streams, {len(retried)} retried by nginx "
              f"({sum(o.started < killed_at for o in retried)} of them in flight at the kill)")
    finally:
        stub.stop()


def test_a_rolling_restart_drops_nothing(topology: Callable[..., Topology]) -> None:
    stub = StubUpstream(completion_tokens=20).start()
    stub.behave("slow", delay=0.06, delay_headers=0.02)  # streams take ~1.3 s
    try:
        topo = topology(stub)
        stop = threading.Event()

        def worker(t: int) -> list[Outcome]:
            outs, i = [], 0
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    outs.append(call(client, topo.lb.url, FREE, (t + i) % 3 != 0, f"r{t}-{i}",
                                     stub.completion_tokens))
                    i += 1
            return outs

        drains: list[tuple[str, float, float]] = []  # (replica, SIGTERM at, exited at)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(worker, t) for t in range(6)]
            try:
                time.sleep(1.0)
                for index in range(REPLICAS):
                    old = topo.gateways[index]
                    termed = time.monotonic()
                    old.signal(signal.SIGTERM)
                    assert old.wait(25) == 0, old.log()[-4000:]
                    drains.append((port_of(old), termed, time.monotonic()))
                    topo.replace(index)
                    time.sleep(0.5)
                time.sleep(1.0)
            finally:
                stop.set()
            outcomes = [o for f in futures for o in f.result()]

        failed = [o for o in outcomes if not o.ok]
        assert failed == [], (failed[:10], topo.logs())
        streams = [o for o in outcomes if o.stream]
        assert streams and all(o.done for o in streams)
        # The drains were real: each replica had streams it finished after it stopped accepting.
        finished_in_drain = {
            port: sum(o.stream and o.upstream.endswith(port) and o.started < termed + 1 < o.ended
                      for o in outcomes)
            for port, termed, _ in drains}
        assert sum(finished_in_drain.values()) >= 1, finished_in_drain
        for g in topo.retired:
            assert "draining: no new connections" in g.log()
        print(f"\nrolling restart: {len(outcomes)} requests ({len(streams)} streams), 0 failed; "
              f"streams finished while draining: {finished_in_drain}; "
              f"drain times: {[round(e - s, 2) for _, s, e in drains]} s; "
              f"retried by nginx: {sum(o.retried for o in outcomes)}")
    finally:
        stub.stop()
