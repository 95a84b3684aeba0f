"""The gateway against a direct call and an nginx proxy hop, in one run, on one table.

    bench/run [--smoke] [--profile] [--no-quotas] [--tls-upstream]    (bench/run installs the tools)

Layout on a 2-core machine (``taskset``, ``procs.Layout``): core 0 carries the
load generators (wrk, k6), the nginx stub upstream and Redis; core 1 carries the
system under test — nothing (direct), one nginx worker (proxy hop) or one
gateway process. With more cores, the generators, the stub and Redis get every
core but the first two, and the two-process run has the first two to itself.
Three paths to the same stub:

    direct   client → stub
    hop      client → nginx (proxy_pass, proxy_buffering off, keep-alive) → stub
    gateway  client → gateway (auth, validation, Redis quotas, metrics) → stub

With ``--tls-upstream`` the gateway reaches the stub over TLS (its https
listener, a throwaway certificate as the upstream's ``tls.ca_file``); direct
and hop stay plain, so the gateway's column is what a TLS upstream costs.

Measured per path, for non-streamed and streamed (20 chunk events) requests:
saturation requests/s (wrk, closed loop, fixed connections); CPU µs per request
of the process on the gateway's core (utime+stime deltas from /proc/PID/stat over the
run); latency p50/p99 at a constant rate (k6 constant-arrival-rate, open loop)
— for streams, time to first byte and to last byte; RSS after the run. Then
two gateway processes (one per core) against one, and Redis commands and
round trips per request. Prints one table and writes it as markdown and JSON
under .bench-out/.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import stub
from procs import (
    GATEWAY_ENV,
    REST,
    ROOT,
    SCRIPT_COMMANDS,
    Layout,
    Proc,
    Procs,
    core_busy_seconds,
    cores_awake,
    cpu_list,
    cpu_seconds,
    free_port,
    gateway_root,
    http_get,
    layout,
    machine,
    pin,
    redis_counters,
    rss_bytes,
    start_backends,
    start_gateway,
    which,
)

KINDS = ("json", "stream")
# (row label, kind, Measure field, limit over direct in ms) at the constant rate
LATENCY_ROWS = (
    ("non-stream p50", "json", "p50_ms", 0.5),
    ("non-stream p99", "json", "p99_ms", 2.0),
    ("stream TTFB p50", "stream", "ttfb_p50_ms", 0.5),
    ("stream TTFB p99", "stream", "ttfb_p99_ms", 2.0),
    ("stream last byte p50", "stream", "p50_ms", 0.5),
    ("stream last byte p99", "stream", "p99_ms", 2.0),
)
HEADERS = stub.HEADERS


@dataclass
class Settings:
    smoke: bool
    saturate_s: float
    warmup_s: float
    rate_s: float
    rate: int
    connections: int
    quotas: bool
    profile: bool
    lb: bool
    awake: bool
    cores: Layout
    tls_upstream: bool = False


@dataclass
class Target:
    name: str
    port: int
    paths: dict[str, str]
    bodies: dict[str, bytes]
    pids: Callable[[], list[int]]

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}{self.paths[kind]}"


@dataclass
class Measure:
    rps: float = 0.0
    requests: int = 0
    errors: int = 0
    cpu_us_sat: float = 0.0
    cpu_us_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ttfb_p50_ms: float = 0.0
    ttfb_p99_ms: float = 0.0
    rate_requests: int = 0
    rate_failed: int = 0
    rate_dropped: int = 0
    rss_mib: float = 0.0
    foreign_gateway_core_sat: float = 0.0  # share of the gateway's core busy with processes not under test
    foreign_gateway_core_rate: float = 0.0
    redis: dict[str, float] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settings(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few seconds per case (CI: it still works)")
    p.add_argument("--profile", action="store_true", help="also py-spy the gateway under saturation")
    p.add_argument("--no-quotas", action="store_true", help="no Redis, no limits on the key")
    p.add_argument("--no-lb", action="store_true", help="skip the two-processes-behind-nginx case")
    p.add_argument("--no-awake", action="store_true", help="skip the constant rate with the cores kept awake")
    p.add_argument("--seconds", type=float, help="saturation seconds per case (default 10; smoke 2)")
    p.add_argument("--rate-seconds", type=float, help="constant-rate seconds per case (default 20; smoke 2)")
    p.add_argument("--rate", type=int, default=200, help="constant rate, requests/s (default 200)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections per process (default 32)")
    p.add_argument("--gateway-root", help="benchmark the proxy package of another checkout (A/B)")
    p.add_argument("--tls-upstream", action="store_true", help="the gateway reaches the stub over TLS")
    a = p.parse_args(argv)
    if a.gateway_root:
        os.environ["BENCH_GATEWAY_ROOT"] = a.gateway_root
    return Settings(
        smoke=a.smoke,
        saturate_s=a.seconds or (2.0 if a.smoke else 10.0),
        warmup_s=1.0 if a.smoke else 2.0,
        rate_s=a.rate_seconds or (2.0 if a.smoke else 20.0),
        rate=a.rate,
        connections=a.connections,
        quotas=not a.no_quotas and which("redis-server") is not None,
        profile=a.profile,
        lb=not a.no_lb,
        awake=not a.no_awake,
        cores=layout(),
        tls_upstream=a.tls_upstream,
    )


def check_answer(target: Target, kind: str) -> str:
    """One request, its answer checked: the benchmark must measure working requests."""
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    try:
        conn.request("POST", target.paths[kind], body=target.bodies[kind], headers=HEADERS)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{target.name} {kind}: status {resp.status}: {body[:500]!r}")
    if kind == "json":
        parsed = json.loads(body)
        assert parsed["object"] == "chat.completion", parsed
        return "ok"
    assert resp.getheader("content-type", "").startswith("text/event-stream"), resp.getheaders()
    events = [e for e in body.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]", events[-1:]
    return f"ok ({len(events) - 1} events + [DONE], {len(body)} bytes)"


def saturate(s: Settings, t: Target, kind: str, script: Path, m: Measure) -> None:
    loadgen.run_wrk(t.url(kind), script, s.warmup_s, s.connections)
    pids = t.pids()
    cpu0, busy0, wall0 = cpu_seconds(pids), core_busy_seconds(s.cores.gateway), time.monotonic()
    r = loadgen.run_wrk(t.url(kind), script, s.saturate_s, s.connections)
    cpu = cpu_seconds(pids) - cpu0
    busy = core_busy_seconds(s.cores.gateway) - busy0
    m.foreign_gateway_core_sat = max(0.0, (busy - cpu) / (time.monotonic() - wall0))
    m.rps, m.requests, m.errors = r.rps, r.requests, r.errors
    m.cpu_us_sat = cpu * 1e6 / r.requests if r.requests else 0.0
    m.rss_mib = rss_bytes(pids) / 2**20
    log(
        f"  {t.name:8} {kind:6} saturation {r.rps:9.0f} req/s  cpu {m.cpu_us_sat:7.1f} µs/req  "
        f"errors {r.errors}  gateway's core foreign {100 * m.foreign_gateway_core_sat:.0f}%"
    )


def constant_rate(s: Settings, workdir: Path, t: Target, kind: str, m: Measure, redis_port: int | None,
                  spinners: Sequence[int] = ()) -> None:
    pids = t.pids()
    cpu0, busy0, wall0 = cpu_seconds(pids), core_busy_seconds(s.cores.gateway), time.monotonic()
    spun0 = cpu_seconds(spinners[:1])  # the spinner on the gateway's core is not foreign load
    before = redis_counters(redis_port) if redis_port else None
    r = loadgen.run_k6(workdir, f"{t.name}-{kind}", t.url(kind), t.bodies[kind], HEADERS, s.rate, s.rate_s)
    after = redis_counters(redis_port) if redis_port else None
    cpu = cpu_seconds(pids) - cpu0
    spun = cpu_seconds(spinners[:1]) - spun0
    busy = core_busy_seconds(s.cores.gateway) - busy0
    m.foreign_gateway_core_rate = max(0.0, (busy - cpu - spun) / (time.monotonic() - wall0))
    m.cpu_us_rate = cpu * 1e6 / r.requests if r.requests else 0.0
    m.p50_ms, m.p99_ms, m.ttfb_p50_ms, m.ttfb_p99_ms = r.p50_ms, r.p99_ms, r.ttfb_p50_ms, r.ttfb_p99_ms
    m.rate_requests, m.rate_failed, m.rate_dropped = r.requests, r.failed, r.dropped
    m.rss_mib = rss_bytes(pids) / 2**20
    if before is not None and after is not None and r.requests:
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta.pop("info", None)  # ours
        delta["__reads__"] -= 1  # our INFO's read
        m.redis = {k: v / r.requests for k, v in delta.items() if v > 0}
    log(
        f"  {t.name:8} {kind:6} @{s.rate}/s{' awake' if spinners else ''} "
        f"p50 {r.p50_ms:6.2f} ms p99 {r.p99_ms:6.2f} ms  "
        f"ttfb p50 {r.ttfb_p50_ms:6.2f} p99 {r.ttfb_p99_ms:6.2f}  cpu {m.cpu_us_rate:7.1f} µs/req  "
        f"failed {r.failed} dropped {r.dropped}  gateway's core foreign {100 * m.foreign_gateway_core_rate:.0f}%"
    )


def scaling(
    s: Settings,
    procs: Procs,
    workdir: Path,
    gw_config: Path,
    one: dict[str, Measure],
    scripts: dict[str, Path],
    gw_b: Proc,
    env: dict[str, list[int]],
) -> dict[str, Any]:
    """Two gateway processes, one per core, each driven by its own wrk (no balancer in between),
    and, unless --no-lb, the same two behind an nginx balancer.

    On two cores the load generators, the stub and Redis share the cores with the two gateways,
    so the measured ratio also reflects them (and anything else running); on more, they run on
    cores of their own (``procs.Layout``). Reported with it: the gateways' CPU per request, the
    ratio it projects for two full cores, what the others cost per request and the ceiling that
    puts on the ratio where they share the cores, and the share of the gateways' two cores that
    went to processes outside the benchmark. Full mode keeps the better of two rounds."""
    cores = s.cores
    gateway_cores = sorted({cores.gateway, cores.second_gateway})
    # On two cores every process may use both (the kernel balances them); on more, the rest's.
    others: str | None = None if cores.shared else REST
    port_a = free_port()
    gw_a = start_gateway(procs, "gateway-a", gw_config, port_a, cores.second_gateway, GATEWAY_ENV)
    out: dict[str, Any] = {}
    ports = [gw_a.port, gw_b.port]
    path = "/v1/chat/completions"
    rounds = 1 if s.smoke else 2
    for kind in KINDS:
        script = scripts[f"gateway-{kind}"]
        for port in ports:
            loadgen.run_wrk(f"http://127.0.0.1:{port}{path}", script, s.warmup_s, s.connections, cpus=others)
        best: dict[str, Any] = {}
        for _ in range(rounds):
            pids = [gw_a.pid, gw_b.pid]
            cpu0, env0 = cpu_seconds(pids), {name: cpu_seconds(ps) for name, ps in env.items()}
            kids0 = _children_cpu()
            busy0, wall0 = sum(map(core_busy_seconds, gateway_cores)), time.monotonic()
            runs = [
                loadgen.start_wrk(f"http://127.0.0.1:{port}{path}", script, s.saturate_s, s.connections,
                                  cpus=others)
                for port in ports
            ]
            results = [loadgen.finish_wrk(r, s.saturate_s) for r in runs]
            wall = time.monotonic() - wall0
            cpu = cpu_seconds(pids) - cpu0
            each = {name: cpu_seconds(ps) - env0[name] for name, ps in env.items()}
            each["wrk"] = _children_cpu() - kids0
            ours = cpu + sum(each.values()) if cores.shared else cpu  # on the gateways' cores
            foreign = max(0.0, sum(map(core_busy_seconds, gateway_cores)) - busy0 - ours) / (len(gateway_cores) * wall)
            total = sum(r.rps for r in results)
            requests = sum(r.requests for r in results)
            cpu_us = cpu * 1e6 / requests if requests else 0.0
            # wrk, the stub and Redis on the same two cores: per request they cost `others_us`, so
            # two cores can serve at most 2 s / (gateway + others) per second, whatever the gateway.
            others_us = sum(each.values()) * 1e6 / requests if requests else 0.0
            # Where they run on cores of their own there is no such ceiling (0: none).
            ceiling = 2e6 / (cpu_us + others_us) if cores.shared and cpu_us + others_us else 0.0
            round_ = {
                "rps": total,
                "ratio": total / one[kind].rps if one[kind].rps else 0.0,
                "errors": sum(r.errors for r in results),
                "cpu_us": cpu_us,
                "gateway_cores": cpu / wall,
                "projected_ratio": one[kind].cpu_us_sat * 2 / cpu_us if cpu_us else 0.0,
                "foreign_share": foreign,
                "others_us": others_us,
                "others_each_us": {name: v * 1e6 / requests if requests else 0.0 for name, v in each.items()},
                "ceiling_ratio": ceiling / one[kind].rps if one[kind].rps else 0.0,
                "per_process": [r.rps for r in results],
            }
            log(
                f"  2 gateways {kind:6} (one wrk each) {total:9.0f} req/s = {round_['ratio']:.2f}× one; "
                f"gateways used {round_['gateway_cores']:.2f} cores at {cpu_us:.0f} µs/req "
                f"(projects {round_['projected_ratio']:.2f}×); wrk+stub+Redis {others_us:.0f} µs/req "
                f"({_split(round_['others_each_us'])}) "
                + (f"(ceiling {round_['ceiling_ratio']:.2f}×)" if cores.shared else "on cores of their own")
                + f"; others {100 * foreign:.0f}% of the gateways' cores"
            )
            if not best or total > best["rps"]:
                best = round_
        out[f"{kind}_direct"] = best
    if s.lb:
        lb_port = free_port()
        conf = stub.hop_conf(workdir, "lb", lb_port, [gw_a.port, gw_b.port], workers=1)
        lb = procs.start("lb", pin(others, [which("nginx") or "nginx", "-c", str(conf), "-p", str(workdir)]),
                         port=lb_port)
        for kind in KINDS:
            url = f"http://127.0.0.1:{lb_port}/v1/chat/completions"
            loadgen.run_wrk(url, scripts[f"gateway-{kind}"], s.warmup_s, s.connections * 2, cpus=others)
            r = loadgen.run_wrk(url, scripts[f"gateway-{kind}"], s.saturate_s, s.connections * 2, cpus=others)
            out[f"{kind}_lb"] = {
                "rps": r.rps,
                "ratio": r.rps / one[kind].rps if one[kind].rps else 0.0,
                "errors": r.errors,
            }
            ratio = out[f"{kind}_lb"]["ratio"]
            log(f"  2 gateways {kind:6} (nginx balancer)  {r.rps:9.0f} req/s = {ratio:.2f}×")
        procs.stop(lb)
    procs.stop(gw_a)
    return out


def _split(each: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.0f}" for name, us in each.items())


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def profile(s: Settings, workdir: Path, out_dir: Path, gw: Target, scripts: dict[str, Path]) -> dict[str, Any]:
    """py-spy over a saturation run of each kind: collapsed stacks and a summary (self, inclusive)."""
    pyspy = which("py-spy")
    if pyspy is None:
        log("py-spy is not installed (pip install py-spy): no profile")
        return {}
    result: dict[str, Any] = {}
    for kind in KINDS:
        raw = out_dir / f"profile-{kind}.txt"
        seconds = max(5, round(s.saturate_s))
        # Blocking sampling (the default): each sample pauses the process briefly (~1 % at 200 Hz),
        # but the stacks are consistent; --nonblocking gives torn coroutine stacks.
        argv = [pyspy, "record", "--pid", str(gw.pids()[0]), "--duration", str(seconds)]
        argv += ["--rate", "200", "--format", "raw", "-o", str(raw)]
        spy = subprocess.Popen(pin(REST, argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        loadgen.run_wrk(gw.url(kind), scripts[f"gateway-{kind}"], seconds, s.connections)
        _, err = spy.communicate(timeout=seconds + 60)
        if not raw.exists():
            log(f"py-spy failed: {err[-500:]}")
            continue
        summary = summarize_profile(raw)
        (out_dir / f"profile-{kind}-summary.txt").write_text(format_profile(summary))
        result[kind] = summary
        log(f"  profile {kind}: {raw} ({summary['samples']} samples)")
    return result


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    func, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    path = path.replace(str(ROOT) + "/", "")
    return f"{func} ({path})" if func else frame


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    total = threads = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_frame_name(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        if frames[0].startswith("Thread._bootstrap "):
            # Another thread (the OpenTelemetry exporter's): counted apart, not in the shares.
            threads += count
            continue
        total += count
        self_time[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
        leaf_path = frames[-1].rpartition("(")[2].rstrip(")")
        modules[leaf_path.split("/")[0] if "/" in leaf_path else leaf_path] += count

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "other_thread_samples": threads,
        "self": pct(self_time),
        "inclusive": pct(inclusive),
        "by_module": pct(modules),
    }


def format_profile(summary: dict[str, Any]) -> str:
    lines = [
        f"samples: {summary['samples']} of the event loop's thread "
        f"(+ {summary.get('other_thread_samples', 0)} of other threads, left out)",
        "",
        "self time (leaf frame):",
    ]
    lines += [f"  {p:5.1f}%  {name}" for name, p in summary["self"]]
    lines += ["", "inclusive time:"] + [f"  {p:5.1f}%  {name}" for name, p in summary["inclusive"]]
    lines += ["", "self time by module:"] + [f"  {p:5.1f}%  {name}" for name, p in summary["by_module"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the table


def _f(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def build_table(
    s: Settings,
    res: dict[str, dict[str, Measure]],
    awake: dict[str, dict[str, Measure]],
    scale: dict[str, Any],
    redis_on: bool,
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    d, h, g = res["direct"], res["hop"], res["gateway"]
    rows: list[list[str]] = []
    targets: list[dict[str, Any]] = []

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if b else "–"

    def add(
        metric: str,
        vd: str,
        vh: str,
        vg: str,
        rd: str,
        rh: str,
        target: str = "",
        met: bool | None = None,
        value: float | None = None,
    ) -> None:
        verdict = "" if met is None else ("met" if met else "NOT met")
        rows.append([metric, vd, vh, vg, rd, rh, target, verdict])
        if met is not None:
            targets.append({"metric": metric, "gateway": vg, "value": value, "target": target, "met": met})

    for kind, goal in (("json", 3000), ("stream", 2000)):
        label = "non-stream" if kind == "json" else "stream (20 chunks)"
        add(
            f"{label}: req/s at saturation",
            _f(d[kind].rps),
            _f(h[kind].rps),
            _f(g[kind].rps),
            ratio(g[kind].rps, d[kind].rps),
            ratio(g[kind].rps, h[kind].rps),
            f"≥ {goal:,}",
            g[kind].rps >= goal,
            g[kind].rps,
        )
    def cpu(rs: dict[str, dict[str, Measure]], attr: str, when: str, limit: float | None = None) -> None:
        for kind in KINDS:
            label = "non-stream" if kind == "json" else "stream"
            vd, vh, vg = (getattr(rs[t][kind], attr) for t in ("direct", "hop", "gateway"))
            goal = (f"≤ {limit:.0f}", vg <= limit, vg) if limit is not None else ()
            add(f"{label}: CPU µs/req {when}", _f(vd, 1), _f(vh, 1), _f(vg, 1), ratio(vg, vd), ratio(vg, vh), *goal)

    cpu(res, "cpu_us_sat", "at saturation (the gateway's core)", 300)

    def at_rate(rs: dict[str, dict[str, Measure]], how: str) -> None:
        rd, rh, rg = rs["direct"], rs["hop"], rs["gateway"]
        cpu(rs, "cpu_us_rate", f"at {s.rate}/s{how}")
        for label, kind, attr, limit in LATENCY_ROWS:
            vd, vh, vg = getattr(rd[kind], attr), getattr(rh[kind], attr), getattr(rg[kind], attr)
            add(
                f"{label} at {s.rate}/s{how}, ms",
                _f(vd, 3),
                _f(vh, 3),
                _f(vg, 3),
                f"+{vg - vd:.3f} ms",
                f"+{vg - vh:.3f} ms",
                f"≤ +{limit} ms vs direct",
                vg - vd <= limit,
                vg - vd,
            )

    at_rate(res, "")
    if awake:
        at_rate(awake, ", cores kept awake")
    rss_d = max(d[k].rss_mib for k in KINDS)
    rss_h = max(h[k].rss_mib for k in KINDS)
    rss_g = max(g[k].rss_mib for k in KINDS)
    add(
        "RSS after the runs, MiB (nginx: master + worker)",
        _f(rss_d, 1),
        _f(rss_h, 1),
        _f(rss_g, 1),
        ratio(rss_g, rss_d),
        ratio(rss_g, rss_h),
        "≤ 80",
        rss_g <= 80,
        rss_g,
    )
    for kind in KINDS:
        label = "non-stream" if kind == "json" else "stream"
        two = scale.get(f"{kind}_direct")
        if two:
            add(
                f"{label}: 2 processes on 2 cores (one wrk each), req/s — gateways at "
                f"{two['cpu_us']:.0f} µs/req project {two['projected_ratio']:.2f}×; wrk, stub and "
                f"Redis at {two.get('others_us', 0):.0f} µs/req ({_split(two.get('others_each_us', {}))}) "
                + (f"cap it at {two.get('ceiling_ratio', 0):.2f}×; " if s.cores.shared
                   else "on cores of their own; ")
                + f"other processes took {100 * two['foreign_share']:.0f}% of the 2 cores",
                "–",
                "–",
                _f(two["rps"]),
                "–",
                "–",
                "≥ 1.8× one process",
                two["ratio"] >= 1.8,
                two["ratio"],
            )
            rows[-1][4] = f"{two['ratio']:.2f}× of 1 process"
        lb = scale.get(f"{kind}_lb")
        if lb:
            add(
                f"{label}: 2 processes behind an nginx balancer, req/s",
                "–",
                "–",
                _f(lb["rps"]),
                f"{lb['ratio']:.2f}× of 1 process",
                "–",
            )
    if redis_on:
        for kind in KINDS:
            label = "non-stream" if kind == "json" else "stream"
            redis = g[kind].redis
            reads = redis.get("__reads__", 0.0)
            top = {k: v for k, v in redis.items() if k in SCRIPT_COMMANDS}
            trips = sum(top.values())
            inner = sum(v for k, v in redis.items() if k not in SCRIPT_COMMANDS and not k.startswith("__"))
            detail = ", ".join(f"{k} {v:.2f}" for k, v in sorted(top.items())) or "no script calls"
            detail += f"; {inner:.1f} other commands, inside the scripts or not; "
            detail += f"{reads:.2f} server read events (calls of requests that meet in one loop pass share one); "
            detail += f"Redis busy {redis.get('__script_usec__', 0.0):.0f} µs in scripts"
            add(
                f"{label}: Redis round trips per request (script calls: {detail})",
                "–",
                "–",
                f"{trips:.2f}",
                "–",
                "–",
                "= 2 (1 before + 1 after)",
                abs(trips - 2.0) < 0.05 and reads < 2.05,
                trips,
            )
    else:
        add("Redis round trips per request", "–", "–", "quotas off", "–", "–")
    foreign = max(max(m.foreign_gateway_core_sat, m.foreign_gateway_core_rate)
                  for rs in (res, awake) for t in rs.values() for m in t.values())
    add(
        "noise: most of the gateway's core busy outside the process under test in any run (other processes, irq)",
        "",
        "",
        f"{100 * foreign:.0f}%",
        "",
        "",
    )
    errors = sum(m.errors + m.rate_failed for rs in (res, awake) for t in rs.values() for m in t.values())
    errors += sum(v.get("errors", 0) for v in scale.values())
    add("errors (non-2xx, socket) over all runs", "", "", str(errors), "", "")
    return rows, targets


def markdown(rows: list[list[str]], info: dict[str, Any]) -> str:
    head = ["metric", "direct", "nginx hop", "gateway", "gateway vs direct", "gateway vs hop", "target", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", *["---:"] * 5, "---", "---"]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    meta = (
        f"{info['machine']['cpu']}, {info['machine']['cores']} cores, kernel {info['machine']['kernel']}, "
        f"Python {info['machine']['python']}; mode {info['mode']}; wrk -c {info['connections']}, "
        f"{info['saturate_s']} s per case; k6 {info['rate']}/s for {info['rate_s']} s; "
        f"quotas {'on (Redis)' if info['quotas'] else 'off'}; metrics endpoint {info['metrics']}; "
        f"gateway to stub {info.get('upstream', 'http')}; "
        f"cores: {info['cores']}; "
        f"{info['date']}"
    )
    return meta + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    s = settings(argv)
    for tool in ("nginx", "wrk"):
        if which(tool) is None:
            print(f"{tool} is not installed; bench/run installs it", file=sys.stderr)
            return 2
    out_dir = ROOT / ".bench-out"
    workdir = out_dir / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    info: dict[str, Any] = {
        "machine": machine(),
        "mode": "smoke" if s.smoke else "full",
        "connections": s.connections,
        "saturate_s": s.saturate_s,
        "rate": s.rate,
        "rate_s": s.rate_s,
        "quotas": s.quotas,
        "upstream": "https (TLS)" if s.tls_upstream else "http",
        "gateway_root": str(gateway_root()),
        "cores": f"gateway {s.cores.gateway}, second gateway {s.cores.second_gateway}, "
                 f"the rest {cpu_list(s.cores.rest)}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    log(f"machine: {info['machine']}")
    nginx = which("nginx") or "nginx"
    procs = Procs(workdir)
    with procs.session():
        tls_port = free_port() if s.tls_upstream else None
        backends = start_backends(procs, workdir, lambda port: stub.stub_conf(workdir, port, tls_port=tls_port),
                                  quotas=s.quotas)
        redis_port, redis_p = backends.redis_port, backends.redis
        stub_port, stub_p = backends.stub_port, backends.stub
        hop_port = free_port()
        hop_p = procs.start(
            "hop",
            pin(
                s.cores.gateway,
                [nginx, "-c", str(stub.hop_conf(workdir, "hop", hop_port, [stub_port])), "-p", str(workdir)],
            ),
            port=hop_port,
        )
        gw_config = workdir / "gateway.yaml"
        tls = (tls_port, stub.tls_files(workdir)[0]) if tls_port is not None else None
        gw_config.write_text(stub.gateway_config(stub_port, redis_port, tls))
        gw_port = free_port()
        gw_p = start_gateway(procs, "gateway", gw_config, gw_port, s.cores.gateway, GATEWAY_ENV)

        nginx_paths = {"json": "/v1/chat/completions", "stream": "/stream/v1/chat/completions"}
        nginx_bodies = {
            "json": stub.request_body(stub.MODEL, False),
            "stream": stub.request_body(stub.MODEL, True),
        }
        targets = [
            Target("direct", stub_port, nginx_paths, nginx_bodies, lambda: [stub_p.pid, *stub_p.workers()]),
            Target("hop", hop_port, nginx_paths, nginx_bodies, lambda: [hop_p.pid, *hop_p.workers()]),
            Target(
                "gateway",
                gw_port,
                {"json": "/v1/chat/completions", "stream": "/v1/chat/completions"},
                {
                    "json": stub.request_body(stub.MODEL, False),
                    "stream": stub.request_body(stub.STREAM_MODEL, True),
                },
                lambda: [gw_p.pid],
            ),
        ]
        scripts = {
            f"{t.name}-{k}": loadgen.post_script(workdir, f"{t.name}-{k}", t.bodies[k], HEADERS)
            for t in targets
            for k in KINDS
        }
        for t in targets:
            for k in KINDS:
                log(f"check {t.name} {k}: {check_answer(t, k)}")

        res: dict[str, dict[str, Measure]] = {t.name: {k: Measure() for k in KINDS} for t in targets}
        log("saturation (wrk, closed loop)")
        for k in KINDS:
            for t in targets:
                saturate(s, t, k, scripts[f"{t.name}-{k}"], res[t.name][k])
        log(f"constant rate (k6, {s.rate}/s, open loop)")
        for k in KINDS:
            for t in targets:
                constant_rate(s, workdir, t, k, res[t.name][k], redis_port if t.name == "gateway" else None)
        awake: dict[str, dict[str, Measure]] = {}
        if s.awake:
            log("constant rate again, cores kept awake (a SCHED_IDLE spinner on each core)")
            awake = {t.name: {k: Measure() for k in KINDS} for t in targets}
            with cores_awake(procs, s.cores.awake_order()) as spinners:
                for k in KINDS:
                    for t in targets:
                        constant_rate(s, workdir, t, k, awake[t.name][k],
                                      redis_port if t.name == "gateway" else None, spinners)
        metrics_status, _ = http_get(f"http://127.0.0.1:{gw_port}/metrics")
        info["metrics"] = "on" if metrics_status == 200 else f"absent ({metrics_status})"
        log("two gateway processes")
        env = {"stub": [stub_p.pid, *stub_p.workers()], **({"Redis": [redis_p.pid]} if redis_p else {})}
        scale = scaling(s, procs, workdir, gw_config, {k: res["gateway"][k] for k in KINDS}, scripts, gw_p, env)
        prof = profile(s, workdir, out_dir, targets[2], scripts) if s.profile else {}
        if gw_p.popen.poll() is not None:
            raise RuntimeError(f"the gateway died:\n{gw_p.tail()}")

    redis_on = redis_port is not None and any(k != "__reads__" for m in res["gateway"].values() for k in m.redis)
    if redis_port is not None and not redis_on:
        info["quotas"] = False
        info["quotas_note"] = "redis_url was configured but the gateway sent Redis no commands"
    rows, verdicts = build_table(s, res, awake, scale, redis_on)
    md = markdown(rows, info)
    out_dir.mkdir(exist_ok=True)
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "info": info,
                "settings": asdict(s),
                "table": rows,
                "targets": verdicts,
                "measures": {t: {k: asdict(m) for k, m in v.items()} for t, v in res.items()},
                "measures_awake": {t: {k: asdict(m) for k, m in v.items()} for t, v in awake.items()},
                "redis_per_request": {k: {kk: vv for kk, vv in v.redis.items()} for k, v in res["gateway"].items()},
                "scaling": scale,
                "profile": prof,
                "elapsed_s": time.monotonic() - started,
            },
            indent=2,
        )
    )
    print(md)
    log(f"wrote {out_dir / 'results.md'} and results.json in {time.monotonic() - started:.0f} s")
    if os.environ.get("BENCH_STRICT") == "1" and not all(v["met"] for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
