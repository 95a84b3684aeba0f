"""Memory of one gateway process: RSS per open idle stream, and a leak check.

    bench/run memory [--smoke] [--streams N] [--leak-seconds S]

1. Slow streams. An nginx stub drips a 21-event stream at a few hundred bytes
   per second (``limit_rate``), so every stream stays open for tens of seconds
   with an event arriving about every second. A client in this process opens
   ``--streams`` of them through the gateway (on a core of its own) in steps; after
   each step, once every stream has its headers, the gateway's RSS and open
   file descriptors are read. The slope of RSS against open streams is the
   memory per open idle stream. Then the client drops every connection
   mid-stream: the gateway must cancel the upstream requests and give the
   descriptors (and most of the memory) back.
2. Leak check. A bounded run of mixed traffic (wrk cycling through answered,
   streamed, 401, 400, 404 and /v1/models requests, and a side loop of
   streams the client abandons after a moment), RSS sampled every second: RSS
   after the warm-up against RSS at the end must be flat within a tolerance.

Writes .bench-out/memory.json and .bench-out/memory.md. Bounded: the streams
phase by ``--streams`` and its timeouts, the leak phase by ``--leak-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import stub
from procs import (
    GATEWAY_ENV,
    REST,
    ROOT,
    Proc,
    Procs,
    cpu_seconds,
    free_port,
    layout,
    machine,
    open_fds,
    rss_bytes,
    start_backends,
    start_gateway,
    tcp_ports,
    which,
)

MIB = 2**20


def log(msg: str) -> None:
    print(f"[memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    events: int = 0
    task: asyncio.Task[None] | None = None


@dataclass
class StreamClient:
    """Raw HTTP/1.1 streams: cheap enough that one client core holds thousands."""

    port: int
    body: bytes
    streams: list[Stream] = field(default_factory=list)
    failures: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def _request(self) -> bytes:
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + stub.KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(self.body)).encode() + b"\r\n\r\n" + self.body
        )

    async def open_one(self, wait: float = 30.0) -> Stream | None:
        try:
            async with asyncio.timeout(wait):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**16)
                writer.write(self._request())
                head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            self.failures += 1
            return None
        status = int(head.split(b" ", 2)[1])
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:  # only answered streams are counted as open
            writer.transport.abort()
            return None
        s = Stream(reader, writer)
        s.task = asyncio.get_running_loop().create_task(self._drain(s))
        self.streams.append(s)
        return s

    async def _drain(self, s: Stream) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            while data := await s.reader.read(65536):
                s.events += data.count(b"data: ")

    async def open_many(self, n: int, per_second: int = 1000) -> None:
        """Open n streams paced at per_second (a burst of hundreds at once would measure how the
        gateway copes with a burst, not what an open stream costs)."""
        tasks = []
        for i in range(n):
            tasks.append(asyncio.get_running_loop().create_task(self.open_one()))
            if i % 10 == 9:
                await asyncio.sleep(10 / per_second)
        await asyncio.gather(*tasks)

    def events(self) -> int:
        return sum(s.events for s in self.streams)

    async def close_all(self) -> None:
        for s in self.streams:
            if s.task:
                s.task.cancel()
            s.writer.transport.abort()
        await asyncio.sleep(0)
        self.streams.clear()


def settle_rss(pid: int, seconds: float) -> float:
    """Median of RSS readings over a short window (RSS moves as buffers come and go)."""
    readings = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readings.append(rss_bytes([pid]))
        time.sleep(0.1)
    return statistics.median(readings) / MIB


def fit_slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def connections(pid: int, gw_port: int, stub_port: int) -> dict[str, int]:
    """The gateway's established connections: from clients, to the stub, anything else (Redis)."""
    out = {"client": 0, "upstream": 0, "other": 0}
    for local, remote in tcp_ports(pid):
        out["client" if local == gw_port else "upstream" if remote == stub_port else "other"] += 1
    return out


async def streams_phase(
    gw_port: int, gw_pid: int, stub_port: int, total: int, steps: int, hold: float
) -> dict[str, Any]:
    client = StreamClient(gw_port, stub.request_body(stub.SLOW_MODEL, True))
    base_rss = settle_rss(gw_pid, 1.0)
    base_fds = open_fds(gw_pid)
    base_conns = connections(gw_pid, gw_port, stub_port)  # idle keep-alive ones from the warm-up
    points = [{"streams": 0, "rss_mib": base_rss, "fds": base_fds}]
    log(f"  0 streams: RSS {base_rss:.1f} MiB, {base_fds} fds")
    per_step = total // steps
    for _ in range(steps):
        await client.open_many(per_step)
        await asyncio.sleep(1.0)
        rss = await asyncio.to_thread(settle_rss, gw_pid, 1.0)
        point = {"streams": len(client.streams), "rss_mib": rss, "fds": open_fds(gw_pid)}
        points.append(point)
        log(
            f"  {point['streams']} streams: RSS {rss:.1f} MiB, {point['fds']} fds, "
            f"failures {client.failures}, statuses {client.statuses}"
        )
    # The streams drip: measure the gateway's CPU per relayed event while they are all open.
    ev0, cpu0 = client.events(), cpu_seconds([gw_pid])
    await asyncio.sleep(hold)
    events, cpu = client.events() - ev0, cpu_seconds([gw_pid]) - cpu0
    peak_rss = await asyncio.to_thread(settle_rss, gw_pid, 0.5)
    opened = len(client.streams)
    await client.close_all()
    await asyncio.sleep(3.0)
    after_rss = await asyncio.to_thread(settle_rss, gw_pid, 1.0)
    after_fds = open_fds(gw_pid)
    after_conns = connections(gw_pid, gw_port, stub_port)
    log(f"  closed all mid-stream: RSS {after_rss:.1f} MiB, {after_fds} fds, connections {after_conns}")
    xs = [p["streams"] for p in points]
    ys = [p["rss_mib"] for p in points]
    slope_kib = fit_slope(xs, ys) * 1024
    return {
        "streams_open": opened,
        "failures": client.failures,
        "statuses": client.statuses,
        "points": points,
        "kib_per_stream": slope_kib,
        "kib_per_stream_endpoints": (ys[-1] - ys[0]) * 1024 / xs[-1] if xs[-1] else 0.0,
        "rss_base_mib": base_rss,
        "rss_peak_mib": peak_rss,
        "rss_after_close_mib": after_rss,
        "fds_base": base_fds,
        "fds_after_close": after_fds,
        "connections_after_close": after_conns,
        "connections_base": base_conns,
        "events_relayed_in_hold": events,
        "hold_s": hold,
        "cpu_us_per_dripped_event": cpu * 1e6 / events if events else 0.0,
        "cpu_share_while_dripping": cpu / hold,
    }


async def abandon_loop(gw_port: int, until: float, workers: int = 8) -> int:
    """Streams the client walks away from right after the headers: the cancel path, under load."""
    body = stub.request_body(stub.SLOW_MODEL, True)
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < until:
            client = StreamClient(gw_port, body)
            s = await client.open_one(wait=10)
            await asyncio.sleep(0.05)
            await client.close_all()
            done += s is not None

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


def leak_phase(workdir: Path, gw_port: int, gw_pid: int, seconds: float, connections: int) -> dict[str, Any]:
    body_ok = stub.request_body(stub.MODEL, False)
    body_stream = stub.request_body(stub.STREAM_MODEL, True)
    auth = stub.HEADERS
    bad_key = {**auth, "Authorization": "Bearer sk-wrong"}
    invalid = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"temperature":7}'
    unknown = b'{"model":"no-such-model","messages":[{"role":"user","content":"hi"}]}'
    script = loadgen.mixed_script(
        workdir,
        "mixed",
        [
            ("POST", "/v1/chat/completions", auth, body_ok),
            ("POST", "/v1/chat/completions", auth, body_stream),
            ("POST", "/v1/chat/completions", auth, body_ok),
            ("POST", "/v1/chat/completions", auth, body_stream),
            ("POST", "/v1/chat/completions", bad_key, body_ok),
            ("POST", "/v1/chat/completions", auth, invalid),
            ("POST", "/v1/chat/completions", auth, unknown),
            ("GET", "/v1/models", auth, b""),
        ],
    )
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    wrk = loadgen.start_wrk(f"http://127.0.0.1:{gw_port}/", script, seconds, connections, cpus=REST)

    async def side() -> int:
        return await abandon_loop(gw_port, start + seconds - 1)

    import threading

    abandoned: list[int] = []
    t = threading.Thread(target=lambda: abandoned.append(asyncio.run(side())), daemon=True)
    t.start()
    while wrk.poll() is None and time.monotonic() - start < seconds + 30:
        samples.append((time.monotonic() - start, rss_bytes([gw_pid]) / MIB))
        time.sleep(1.0)
    result = loadgen.finish_wrk(wrk, seconds)
    t.join(30)
    warm = max(5.0, seconds * 0.25)
    after_warm = [r for ts, r in samples if ts >= warm]
    head = statistics.median(after_warm[:5]) if after_warm else 0.0
    tail = statistics.median(after_warm[-5:]) if after_warm else 0.0
    xs = [ts for ts, _ in samples if ts >= warm]
    slope = fit_slope(xs, after_warm) * 60 if len(xs) > 2 else 0.0
    tolerance = 2.0 + 0.02 * head
    return {
        "seconds": seconds,
        "requests": result.requests,
        "rps": result.rps,
        "non_2xx_expected": result.status_errors,
        "socket_errors": result.errors - result.status_errors,
        "abandoned_streams": abandoned[0] if abandoned else 0,
        "warmup_s": warm,
        "rss_after_warmup_mib": head,
        "rss_end_mib": tail,
        "growth_mib": tail - head,
        "slope_mib_per_min": slope,
        "tolerance_mib": tolerance,
        "flat": tail - head <= tolerance,
        "samples": samples,
    }


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(result: dict[str, Any]) -> str:
    st, lk, m = result["streams"], result["leak"], result["machine"]
    rows = [
        (
            "open slow streams (one gateway process)",
            f"{st['streams_open']:,} (refused: {st['failures']} connects, statuses {st['statuses']})",
            f"{result['streams_requested']:,}",
            "",
        ),
        (
            f"RSS with 0 → {st['streams_open']:,} open streams, MiB",
            f"{st['rss_base_mib']:.1f} → {st['points'][-1]['rss_mib']:.1f}",
            "",
            "",
        ),
        (
            "RSS per open idle stream, KiB (slope)",
            f"{st['kib_per_stream']:.1f}",
            "≤ 20",
            _verdict(st["kib_per_stream"] <= 20),
        ),
        (
            "gateway CPU while they drip (stub: a burst per stream per second)",
            f"{100 * st['cpu_share_while_dripping']:.1f} % of a core; {st['cpu_us_per_dripped_event']:.0f} µs "
            "per relayed event",
            "",
            "",
        ),
        (
            "after the client dropped them all: RSS MiB / fds / client and upstream connections (base)",
            f"{st['rss_after_close_mib']:.1f} / {st['fds_after_close']} ({st['fds_base']}) / "
            f"{st['connections_after_close']['client']} and {st['connections_after_close']['upstream']} "
            f"({st['connections_base']['client']} and {st['connections_base']['upstream']} idle keep-alive)",
            "none left beyond base",
            _verdict(
                st["connections_after_close"]["client"] == 0
                and st["connections_after_close"]["upstream"] <= st["connections_base"]["upstream"]
            ),
        ),
        (
            "leak run: requests (mixed) / abandoned streams",
            f"{lk['requests']:,} / {lk['abandoned_streams']}",
            "",
            "",
        ),
        (
            "leak run: RSS after warm-up → end, MiB",
            f"{lk['rss_after_warmup_mib']:.1f} → {lk['rss_end_mib']:.1f} ({lk['growth_mib']:+.2f}; "
            f"slope {lk['slope_mib_per_min']:+.2f}/min)",
            f"flat ± {lk['tolerance_mib']:.1f}",
            _verdict(lk["flat"]),
        ),
        (
            "RSS at the end of the leak run, MiB",
            f"{result['rss_end_mib']:.1f}",
            "≤ 80",
            _verdict(result["rss_end_mib"] <= 80),
        ),
    ]
    head = (
        f"{m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}; "
        f"mode {result['mode']}; quotas {'on' if result['quotas'] else 'off'}"
    )
    lines = [head, "", "| metric | value | target | |", "|---|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="1,000 streams, 20 s leak run")
    p.add_argument("--streams", type=int, help="concurrent slow streams (default 5,000; smoke 1,000)")
    p.add_argument("--leak-seconds", type=float, help="leak-check run (default 180; smoke 20)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections in the leak run")
    p.add_argument("--no-quotas", action="store_true")
    a = p.parse_args(argv)
    total = a.streams or (1000 if a.smoke else 5000)
    leak_s = a.leak_seconds or (20.0 if a.smoke else 180.0)
    for tool in ("nginx", "wrk"):
        if which(tool) is None:
            print(f"{tool} is not installed; bench/run installs it", file=sys.stderr)
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * total + 1000
    if soft < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        total = max(100, (soft - 1000) // 2)
        log(f"open files limited to {soft}: {total} streams")
    out_dir = ROOT / ".bench-out"
    workdir = out_dir / "work-memory"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    quotas = not a.no_quotas and which("redis-server") is not None
    result: dict[str, Any] = {
        "machine": machine(),
        "mode": "smoke" if a.smoke else "full",
        "streams_requested": total,
        "quotas": quotas,
        "nofile": soft,
    }
    procs = Procs(workdir)
    with procs.session():
        # ~5.5 KB of stream at 48 B/s: about 2 minutes per stream (longer than the phase), a burst
        # every second, an event every ~5 s; the first body bytes after ~3 s (headers count too).
        backends = start_backends(procs, workdir, lambda port: stub.stub_conf(workdir, port, drip_rate=48),
                                  quotas=quotas)
        redis_port, stub_port = backends.redis_port, backends.stub_port
        cfg = workdir / "gateway.yaml"
        cfg.write_text(stub.gateway_config(stub_port, redis_port))
        warm = loadgen.post_script(
            workdir,
            "warm",
            stub.request_body(stub.MODEL, False),
            stub.HEADERS,
        )

        def fresh_gateway(name: str) -> Proc:
            """A new gateway process, warmed up (imports, pools, first allocations)."""
            port = free_port()
            gw = start_gateway(procs, name, cfg, port, layout().gateway, GATEWAY_ENV)
            loadgen.run_wrk(f"http://127.0.0.1:{port}/v1/chat/completions", warm, 2, 16)
            return gw

        # Each phase gets its own process: memory freed by one phase but kept by the
        # allocator would hide growth in the other.
        gw = fresh_gateway("gateway-leak")
        log(f"leak check: {leak_s:.0f} s of mixed traffic (gateway pid {gw.pid})")
        result["leak"] = leak_phase(workdir, gw.port, gw.pid, leak_s, a.connections)
        lk = result["leak"]
        log(
            f"  → RSS {lk['rss_after_warmup_mib']:.1f} → {lk['rss_end_mib']:.1f} MiB "
            f"({lk['growth_mib']:+.1f}, tolerance {lk['tolerance_mib']:.1f}); {lk['requests']} requests, "
            f"{lk['abandoned_streams']} abandoned streams"
        )
        if gw.popen.poll() is not None:
            raise RuntimeError(f"the gateway died:\n{gw.tail()}")
        result["rss_end_mib"] = rss_bytes([gw.pid]) / MIB
        procs.stop(gw)

        gw = fresh_gateway("gateway-streams")
        log(f"slow streams: {total} in 5 steps (gateway pid {gw.pid})")
        result["streams"] = asyncio.run(streams_phase(gw.port, gw.pid, stub_port, total, 5, 5.0 if a.smoke else 10.0))
        log(f"  → {result['streams']['kib_per_stream']:.1f} KiB per open stream")
        if gw.popen.poll() is not None:
            raise RuntimeError(f"the gateway died:\n{gw.tail()}")
    md = report(result)
    (out_dir / "memory.json").write_text(json.dumps(result, indent=2))
    (out_dir / "memory.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
