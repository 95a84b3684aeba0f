"""Redis's own time per request for the quota scripts (reserve.lua + settle.lua).

Starts a private redis-server on a free loopback port, drives reserve+settle
pairs through ``RedisQuotaStore.from_url`` for the benchmark's plan (rpm + tpm
on a key and on its team, limits too large ever to deny: see bench/stub.py),
and reads ``INFO commandstats`` around a measured phase:

    python bench/lua_cost.py [--fill 20] [--fill-rate 450] [--count 3000] [--rate 150]

First ``--fill`` seconds at ``--fill-rate`` fill the window (the rpm and tpm
buckets of the last 60 s; by default as many requests as 150/s leaves in 60 s,
in 21 of the 61 buckets), then ``--count`` pairs are
measured at ``--rate`` (0: full speed, which shows the most one Redis core
does, but with hot caches: a paced call costs more), with the window as it
then is (the sizes are printed). Reported:
µs of Redis time per request (``cmdstat_evalsha`` usec over the measured
pairs; it includes the commands the scripts call), and which of those inner
commands cost what. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from proxy.access.keys import KeyPolicy
from proxy.access.quotas import plan_for
from proxy.access.store import Plan
from proxy.access.store_redis import RedisQuotaStore
from proxy.config.types import Limits

BENCH_LIMITS = Limits(rpm=100_000_000, tpm=100_000_000_000)  # as bench/stub.py: never denies
ESTIMATE, DELTA, LEASE_TTL_MS = 120, -40, 900_000
MAX_SECONDS = 300  # a hard bound on the whole run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, where: str) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", where],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def bench_plan() -> Plan:
    made = plan_for(KeyPolicy(id="static:bench", name="bench", team="bench-team", models=None,
                              limits=BENCH_LIMITS, team_limits=BENCH_LIMITS))
    assert made is not None
    return made


async def drive(store: RedisQuotaStore, plan: Plan, *, count: int, seconds: float, concurrency: int,
                tag: str, rate: float = 0.0) -> int:
    """Reserve+settle pairs until ``count`` are done or ``seconds`` have passed, at ``rate`` pairs/s
    (0: as fast as they go); returns how many."""
    done = started = 0
    begin = time.monotonic()
    deadline = begin + seconds

    async def worker(w: int) -> None:
        nonlocal done, started
        i = 0
        while started < count and time.monotonic() < deadline:
            slot = started
            started += 1
            if rate:
                await asyncio.sleep(max(0.0, begin + slot / rate - time.monotonic()))
            lease = f"{tag}-{w}-{i}"
            i += 1
            admission = await store.reserve(plan, lease, ESTIMATE, LEASE_TTL_MS)
            assert admission.admitted
            await store.settle(plan, lease, admission.windows, DELTA)
            done += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done


def commandstats(raw: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} from INFO commandstats."""
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in raw.items() if name.startswith("cmdstat_")}


async def window_sizes(client: aioredis.Redis, plan: Plan) -> str:
    parts = []
    for key in await client.keys("llmp:*"):
        name = key.decode()
        kind = await client.type(key)
        if kind == b"zset":
            parts.append(f"{name.split(':', 2)[2]}: {await client.zcard(key)} members")
        elif kind == b"hash" and ":lease:" not in name:
            parts.append(f"{name.split(':', 2)[2]}: {await client.hlen(key)} fields")
    return ", ".join(sorted(parts))


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    where = tempfile.mkdtemp(prefix="llmp-luacost-")
    proc = start_redis(port, where)
    url = f"redis://127.0.0.1:{port}/0"
    store = RedisQuotaStore.from_url(url, 5.0)
    client = aioredis.Redis.from_url(url)
    plan = bench_plan()
    try:
        started = time.monotonic()
        filled = await drive(store, plan, count=10**9, seconds=args.fill, concurrency=args.concurrency,
                             tag="fill", rate=args.fill_rate)
        print(f"fill: {filled} pairs in {time.monotonic() - started:.1f} s "
              f"({filled / max(time.monotonic() - started, 1e-9):.0f}/s)")
        print(f"window at start: {await window_sizes(client, plan)}")
        await client.config_resetstat()
        started = time.monotonic()
        measured = await drive(store, plan, count=args.count, seconds=MAX_SECONDS - args.fill,
                               concurrency=args.concurrency, tag="measure", rate=args.rate)
        elapsed = time.monotonic() - started
        stats = commandstats(await client.info("commandstats"))
        print(f"measured: {measured} pairs in {elapsed:.1f} s ({measured / elapsed:.0f}/s)")
        print(f"window at end: {await window_sizes(client, plan)}")
        calls, usec = stats.get("evalsha", (0, 0))
        print(f"evalsha: {calls} calls, {usec / max(calls, 1):.1f} µs per call")
        print(f"Redis time per request (reserve + settle): {usec / max(measured, 1):.1f} µs")
        inner = sorted(((u, c, name) for name, (c, u) in stats.items() if name not in ("evalsha", "eval")),
                       reverse=True)
        print("inner commands, µs per request (calls per request):")
        for u, c, name in inner[:12]:
            print(f"  {name:<18} {u / max(measured, 1):7.1f}  ({c / max(measured, 1):.2f})")
    finally:
        await client.aclose()
        await store.close()
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fill", type=float, default=20.0, help="seconds at full speed before measuring (≤ 120)")
    parser.add_argument("--count", type=int, default=3000, help="reserve+settle pairs measured (≤ 100000)")
    parser.add_argument("--fill-rate", type=float, default=450.0,
                        help="pairs/s while filling, 0 for full speed (450/s for 20 s: the 9,000 requests "
                             "of 150/s over 60 s)")
    parser.add_argument("--rate", type=float, default=150.0, help="pairs/s while measuring, 0 for full speed")
    parser.add_argument("--concurrency", type=int, default=16)
    parsed = parser.parse_args()
    parsed.fill = min(max(parsed.fill, 0.0), 120.0)
    parsed.count = min(max(parsed.count, 1), 100_000)
    asyncio.run(main(parsed))
