#!/usr/bin/env python3
"""A bounded soak: steady traffic for minutes, then leaks and the ledger are checked.

    python bench/soak.py                       # 10 minutes at 50 requests/s
    python bench/soak.py --minutes 2 --rate 80
    python bench/soak.py --seconds 45 --json out.json   # what tests/test_soak_short.py runs

On loopback only: a real gateway process (``python -m proxy serve``), a real
Redis, and three stub upstreams (tests/stub_upstream.py), two healthy and one
answering 500 to everything (the healthy ones stream an event every 20 ms).
Traffic is open-loop at a fixed rate (at most
200 requests in flight): half streamed, several issued keys, 95% for a model
the healthy upstreams serve, 5% for a model only the failing one serves.

The first quarter (at least 10 s) is warm-up; then traffic pauses for 6 s,
long enough for idle client connections to close (uvicorn's keep-alive is
5 s), and the idle gateway is measured; the same is done after the last
request. Every 2 s the gateway's RSS, open file descriptors (/proc/PID/fd),
threads and in-flight gauge are sampled. At the end (exit status 1 if any
fails):

- memory flat: the median RSS of the last quarter of the main phase is
  within ``--rss-tolerance-mib`` (8 MiB) of the median of its first quarter;
- no fd or thread growth: idle after the run, the gateway holds at most 2
  more fds and no more threads than idle after warm-up, not counting its
  kept-alive connections to upstreams (as many as the busiest moment needed,
  up to each pool's limit, so they differ by chance between the two pauses;
  the report lists them by peer);
- no request left behind: the in-flight gauge is 0 and every concurrency
  lease is back;
- zero errors for requests that had a healthy upstream, and only OpenAI-format
  502/503 errors for those that had none, none slower than the deadline;
- the ledger is exact: for every key, the tokens the admin API says it used
  equal the usage the stubs reported for that key's answered requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gateway_process import GatewayProcess  # noqa: E402
from tests.redis_fixtures import RedisServer  # noqa: E402
from tests.stub_upstream import StubUpstream  # noqa: E402

ADMIN = "sk-soak-admin-0000000000000000000000"
MAX_IN_FLIGHT = 200
DEADLINE = 10.0
IDLE_PAUSE = 6.0  # > uvicorn's keep-alive (5 s): idle client connections are closed by then
MESSAGES = [{"role": "user", "content": "a steady request for the soak"}]


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int
    in_flight: float


@dataclass
class Outcome:
    key: str
    model: str
    stream: bool
    status: int
    seconds: float
    request_id: str
    error: str = ""


@dataclass
class Report:
    seconds: float
    rate: float
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    healthy_errors: int = 0
    max_latency_s: float = 0.0
    p50_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    rss_mib_after_warmup: float = 0.0
    rss_mib_end: float = 0.0
    rss_mib_max: float = 0.0
    fds_idle_after_warmup: int = 0
    fds_idle_end: int = 0
    fds_max: int = 0
    sockets_idle_after_warmup: dict[str, int] = field(default_factory=dict)
    sockets_idle_end: dict[str, int] = field(default_factory=dict)
    threads_idle_after_warmup: int = 0
    threads_idle_end: int = 0
    threads_max: int = 0
    in_flight_end: float = 0.0
    ledger: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def _sockets_by_peer(pid: int, names: dict[int, str]) -> dict[str, int]:
    """The process's TCP connections counted by whom they go to (a port's name, else 'clients')."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "01":  # ESTABLISHED
                port = int(fields[2].rsplit(":", 1)[1], 16)
                peers[names.get(port, "clients")] += 1
    return dict(sorted(peers.items()))


def _upstream_sockets(by_peer: dict[str, int]) -> int:
    return sum(n for peer, n in by_peer.items() if peer.startswith("upstream ") or peer == "failing upstream")


def _in_flight(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("llm_proxy_requests_in_flight"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def sample(gw: GatewayProcess, started: float) -> Sample:
    assert gw.proc is not None
    status = _proc_status(gw.proc.pid)
    try:
        in_flight = _in_flight(httpx.get(gw.url + "/metrics", timeout=5).text)
    except httpx.HTTPError:
        in_flight = float("nan")
    return Sample(round(time.monotonic() - started, 1), int(status["VmRSS"].split()[0]),
                  len(os.listdir(f"/proc/{gw.proc.pid}/fd")), int(status["Threads"]), in_flight)


def _config(healthy: list[StubUpstream], failing: StubUpstream, redis: RedisServer) -> str:
    ups = [(f"ok{i}", s, "[m]") for i, s in enumerate(healthy)] + [("failing", failing, "[m, broken]")]
    lines = "\n".join(f"  - {{name: {name}, base_url: '{s.url}', models: {models}, "
                      "timeout: {connect: 1, first_byte: 3, idle: 3, total: 5}}" for name, s, models in ups)
    return f"""redis_url: {redis.url}
admin_key: {ADMIN}
upstreams:
{lines}
routing: {{strategy: round_robin, max_attempts: 3, deadline: {DEADLINE}}}
quotas: {{on_store_error: fail_closed, store_timeout: 1.0}}
logging: {{access_log: false}}
server: {{shutdown_delay: 0}}
"""


def _issue_keys(gw: GatewayProcess, count: int) -> dict[str, str]:
    """name → secret, each with limits so that every request is reserved and settled."""
    keys = {}
    for i in range(count):
        resp = httpx.post(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5,
                          json={"name": f"soak-{i}", "team": f"team-{i % 2}",
                                "limits": {"rpm": 10**7, "tokens_per_day": 10**12, "concurrency": 10**4}})
        resp.raise_for_status()
        keys[resp.json()["id"]] = resp.json()["key"]
    return keys


async def _one(session: aiohttp.ClientSession, url: str, key_id: str, secret: str, model: str,
               stream: bool) -> Outcome:
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    body = {"model": model, "messages": MESSAGES, "stream": stream, "max_tokens": 64}
    try:
        async with session.post(url, json=body, headers={"Authorization": f"Bearer {secret}",
                                                         "X-Request-Id": request_id}) as resp:
            data = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(key_id, model, stream, 0, time.monotonic() - started, request_id, type(exc).__name__)
    outcome = Outcome(key_id, model, stream, status, time.monotonic() - started, request_id)
    if status == 200 and stream and not data.endswith(b"data: [DONE]\n\n"):
        outcome.error = "stream without [DONE]"
    elif status == 200 and not stream and b'"choices"' not in data:
        outcome.error = "body without choices"
    elif status != 200:
        try:
            error = json.loads(data)["error"]
            outcome.error = str(error.get("code") or error.get("type"))
        except (ValueError, KeyError, TypeError):
            outcome.error = "not an OpenAI error: " + data[:100].decode("latin-1")
    return outcome


async def drive(gw: GatewayProcess, keys: dict[str, str], seconds: float, rate: float,
                on_tick: Callable[[], None]) -> list[Outcome]:
    """Open-loop traffic at ``rate`` per second for ``seconds``; ``on_tick`` every 2 s."""
    url = gw.url + "/v1/chat/completions"
    outcomes: list[Outcome] = []
    pending: set[asyncio.Task[Outcome]] = set()
    key_list = list(keys.items())
    timeout = aiohttp.ClientTimeout(total=DEADLINE + 5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT), timeout=timeout) as s:
        started = time.monotonic()
        next_tick = started
        n = 0
        while (now := time.monotonic()) < started + seconds:
            if now >= next_tick:
                await asyncio.get_running_loop().run_in_executor(None, on_tick)
                next_tick += 2.0
            due = int((time.monotonic() - started) * rate)
            while n < due and len(pending) < MAX_IN_FLIGHT:
                key_id, secret = key_list[n % len(key_list)]
                model = "broken" if n % 21 == 7 else "m"  # 1 in 21: every key gets some
                task = asyncio.create_task(_one(s, url, key_id, secret, model, stream=n % 2 == 1))
                pending.add(task)
                task.add_done_callback(lambda t: (pending.discard(t), outcomes.append(t.result())))
                n += 1
            await asyncio.sleep(min(0.01, 1 / rate))
        if pending:
            await asyncio.wait(pending, timeout=DEADLINE + 10)
    return outcomes


def _usage_of(sent: bytes) -> int | None:
    """prompt + completion tokens the stub reported in what it sent (a body or a stream)."""
    if sent.startswith(b"{"):
        usage = json.loads(sent).get("usage")
        return int(usage["prompt_tokens"]) + int(usage["completion_tokens"]) if usage else None
    for event in sent.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage":{' in event:
            usage = json.loads(event[6:])["usage"]
            return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])
    return None


def ledger(gw: GatewayProcess, keys: dict[str, str], outcomes: list[Outcome],
           stubs: list[StubUpstream]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per key: tokens used per the admin API, and per the stubs; they must be equal."""
    served: dict[str, int] = {}
    for stub in stubs:
        for seen in stub.chat_requests:
            tokens = _usage_of(seen.sent)
            if tokens is not None:
                request_id = seen.headers.get("x-request-id", "")
                served[request_id] = served.get(request_id, 0) + tokens
    expected: Counter[str] = Counter()
    for o in outcomes:
        if o.status == 200:
            expected[o.key] += served.get(o.request_id, 0)
    result, failures = {}, []
    for key_id in keys:
        resp = httpx.get(f"{gw.url}/admin/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
        used = {row["limit"]: row["used"] for row in resp.json()["usage"]}
        result[key_id] = {"tokens_used": used["tokens_per_day"], "tokens_served": expected[key_id],
                          "leases_held": used["concurrency"]}
        if used["tokens_per_day"] != expected[key_id]:
            failures.append(f"ledger of {key_id}: admin API says {used['tokens_per_day']}, "
                            f"the stubs served {expected[key_id]}")
        if used["concurrency"]:
            failures.append(f"{key_id} still holds {used['concurrency']} concurrency lease(s)")
    return result, failures


def judge(report: Report, samples: list[Sample], outcomes: list[Outcome], rss_tolerance_kib: int,
          main_from: float) -> None:
    failures = report.failures
    latencies = sorted(o.seconds for o in outcomes)
    report.requests = len(outcomes)
    report.by_status = {str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())}
    report.max_latency_s = round(latencies[-1], 3) if latencies else 0.0
    report.p50_latency_ms = round(latencies[len(latencies) // 2] * 1000, 1) if latencies else 0.0
    report.p99_latency_ms = round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else 0.0
    healthy_errors = [o for o in outcomes if o.model == "m" and (o.status != 200 or o.error)]
    report.healthy_errors = len(healthy_errors)
    if healthy_errors:
        failures.append(f"{len(healthy_errors)} errors with a healthy upstream, e.g. {healthy_errors[:3]}")
    bad = [o for o in outcomes if o.model == "broken" and (o.status not in (502, 503) or o.error.startswith("not"))]
    if bad:
        failures.append(f"{len(bad)} requests without a healthy upstream got no clean error, e.g. {bad[:3]}")
    if report.max_latency_s > DEADLINE + 1:
        failures.append(f"a request took {report.max_latency_s}s, past the deadline")
    expected = int(report.seconds * report.rate * 0.9)
    if len(outcomes) < expected:
        failures.append(f"only {len(outcomes)} requests were made (wanted about {expected})")
    # Memory over the main phase: its last quarter against its first.
    main = [s for s in samples if s.t >= main_from]
    if len(main) >= 8:
        quarter = (main[-1].t - main[0].t) / 4
        first = [s.rss_kib for s in main if s.t < main[0].t + quarter]
        last = [s.rss_kib for s in main if s.t >= main[-1].t - quarter]
        report.rss_mib_after_warmup = round(statistics.median(first) / 1024, 1)
        report.rss_mib_end = round(statistics.median(last) / 1024, 1)
        if statistics.median(last) - statistics.median(first) > rss_tolerance_kib:
            failures.append(f"RSS grew from {report.rss_mib_after_warmup} MiB to {report.rss_mib_end} MiB")
    else:
        failures.append("too few samples to judge memory")
    report.rss_mib_max = round(max(s.rss_kib for s in samples) / 1024, 1)
    report.threads_max = max(s.threads for s in samples)
    report.fds_max = max(s.fds for s in samples)


def soak(seconds: float, rate: float, keys_count: int, rss_tolerance_mib: float) -> Report:
    report = Report(seconds=seconds, rate=rate)
    redis = RedisServer().start()
    healthy = [StubUpstream().start() for _ in range(2)]
    for stub in healthy:
        stub.behave("slow", delay=0.02)  # streams of ~12 events take ~0.25 s: requests overlap
    failing = StubUpstream().start()
    failing.behave("status", status=500)
    gw = GatewayProcess(_config(healthy, failing, redis))
    try:
        gw.start()
        keys = _issue_keys(gw, keys_count)
        samples: list[Sample] = []
        started = time.monotonic()

        def tick() -> None:
            samples.append(sample(gw, started))

        warm_up = max(10.0, seconds / 4)
        outcomes = asyncio.run(drive(gw, keys, warm_up, rate, tick))
        peers = {redis.port: "redis", failing.port: "failing upstream",
                 **{stub.port: f"upstream {i}" for i, stub in enumerate(healthy)}}
        time.sleep(IDLE_PAUSE)
        idle_before = sample(gw, started)
        assert gw.proc is not None
        report.sockets_idle_after_warmup = _sockets_by_peer(gw.proc.pid, peers)
        main_from = time.monotonic() - started
        outcomes += asyncio.run(drive(gw, keys, seconds - warm_up, rate, tick))
        time.sleep(IDLE_PAUSE)
        idle_after = sample(gw, started)
        report.sockets_idle_end = _sockets_by_peer(gw.proc.pid, peers)
        judge(report, samples, outcomes, int(rss_tolerance_mib * 1024), main_from)
        report.fds_idle_after_warmup, report.fds_idle_end = idle_before.fds, idle_after.fds
        report.threads_idle_after_warmup, report.threads_idle_end = idle_before.threads, idle_after.threads
        report.in_flight_end = idle_after.in_flight
        # Kept-alive upstream connections number the peak concurrency each upstream saw (bounded by
        # its pool, closed after 30 s idle), which differs by chance between the two pauses.
        pooled_before = _upstream_sockets(report.sockets_idle_after_warmup)
        pooled_after = _upstream_sockets(report.sockets_idle_end)
        if idle_after.fds - pooled_after > idle_before.fds - pooled_before + 2:
            report.failures.append(
                f"open fds grew: {idle_before.fds} idle after warm-up ({pooled_before} to upstreams), "
                f"{idle_after.fds} at the end ({pooled_after} to upstreams)")
        if idle_after.threads > idle_before.threads:
            report.failures.append(f"threads grew: {idle_before.threads} → {idle_after.threads}")
        if idle_after.in_flight != 0:
            report.failures.append(f"{idle_after.in_flight} requests still in flight after the traffic stopped")
        report.ledger, problems = ledger(gw, keys, outcomes, [*healthy, failing])
        report.failures += problems
        assert gw.proc is not None
        if gw.proc.poll() is not None:
            report.failures.append(f"the gateway exited with {gw.proc.returncode}")
    finally:
        gw.close()
        for stub in [*healthy, failing]:
            stub.stop()
        redis.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--rss-tolerance-mib", type=float, default=8.0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    report = soak(seconds, args.rate, args.keys, args.rss_tolerance_mib)
    text = json.dumps(asdict(report), indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    print("PASS" if not report.failures else "FAIL:\n  " + "\n  ".join(report.failures))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
