"""A/B: the gateway of this checkout against the gateway of another, same stub, same run.

    python bench/ab.py OTHER_CHECKOUT [--base CHECKOUT] [--rounds 3] [--seconds 8] [--no-quotas]
                       [--rate 200 --rate-seconds 10]

To record what a hot-path change buys: copy the tree, change it, and compare.
Each round measures A then B (then B then A in the next round, so drift and
neighbours' load hit both alike): saturation requests/s (wrk, -c 32, from
the others' core) and CPU µs per request of the gateway process (on a core of its own),
non-streamed and streamed. Prints the medians and B's change against A.
With ``--rate``, each round also measures latency at that constant rate (k6,
open loop): p50 and p99 of the whole answer, medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import stub
from procs import GATEWAY_ENV, ROOT, Procs, cpu_seconds, free_port, layout, start_backends, start_gateway, which

HEADERS = stub.HEADERS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", help="the checkout to compare (its proxy/ package is started)")
    p.add_argument("--base", help="the checkout A (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--no-quotas", action="store_true")
    p.add_argument("--rate", type=int, default=0, help="also latency at this constant rate (k6)")
    p.add_argument("--rate-seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    roots = {"A": Path(a.base).resolve() if a.base else ROOT, "B": Path(a.other).resolve()}
    workdir = ROOT / ".bench-out" / "work-ab"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    procs = Procs(workdir)
    with procs.session():
        backends = start_backends(procs, workdir, lambda port: stub.stub_conf(workdir, port),
                                  quotas=not a.no_quotas and which("redis-server") is not None)
        redis_port, stub_port = backends.redis_port, backends.stub_port
        cfg = workdir / "gateway.yaml"
        cfg.write_text(stub.gateway_config(stub_port, redis_port))
        gateways = {}
        for name, root in roots.items():
            os.environ["BENCH_GATEWAY_ROOT"] = str(root)
            port = free_port()
            gateways[name] = start_gateway(procs, f"gateway-{name}", cfg, port, layout().gateway, GATEWAY_ENV)
        os.environ.pop("BENCH_GATEWAY_ROOT", None)
        bodies = {"json": stub.request_body(stub.MODEL, False), "stream": stub.request_body(stub.STREAM_MODEL, True)}
        scripts = {kind: loadgen.post_script(workdir, kind, body, HEADERS) for kind, body in bodies.items()}
        latency: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for rnd in range(a.rounds):
            order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            for kind, script in scripts.items():
                for name in order:
                    gw = gateways[name]
                    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
                    loadgen.run_wrk(url, script, 2, a.connections)
                    cpu0 = cpu_seconds([gw.pid])
                    r = loadgen.run_wrk(url, script, a.seconds, a.connections)
                    cpu_us = (cpu_seconds([gw.pid]) - cpu0) * 1e6 / max(1, r.requests)
                    results.setdefault((name, kind), []).append((r.rps, cpu_us))
                    if a.rate:
                        k = loadgen.run_k6(workdir, f"{name}-{kind}", url, bodies[kind], HEADERS, a.rate,
                                           a.rate_seconds)
                        latency.setdefault((name, kind), []).append((k.p50_ms, k.p99_ms))
                        print(f"[ab] {rnd + 1} {name} {kind:6} @{a.rate}/s p50 {k.p50_ms:.3f} ms "
                              f"p99 {k.p99_ms:.3f} ms failed {k.failed}", file=sys.stderr, flush=True)
                    print(
                        f"[ab {time.strftime('%H:%M:%S')}] {rnd + 1} {name} {kind:6} {r.rps:8.0f} req/s "
                        f"{cpu_us:7.1f} µs/req errors {r.errors}",
                        file=sys.stderr,
                        flush=True,
                    )
    print(f"A = {roots['A']}\nB = {roots['B']}\n")
    print("| case | A req/s | B req/s | A CPU µs/req | B CPU µs/req | B vs A (CPU/req) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("json", "stream"):
        ra = [x for x, _ in results[("A", kind)]]
        rb = [x for x, _ in results[("B", kind)]]
        ca = statistics.median(c for _, c in results[("A", kind)])
        cb = statistics.median(c for _, c in results[("B", kind)])
        print(
            f"| {kind} | {statistics.median(ra):,.0f} | {statistics.median(rb):,.0f} | {ca:.0f} | {cb:.0f} | "
            f"{100 * (cb - ca) / ca:+.1f}% |"
        )
    if latency:
        print(f"\n| case @{a.rate}/s | A p50 ms | B p50 ms | A p99 ms | B p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for kind in ("json", "stream"):
            la, lb = latency[("A", kind)], latency[("B", kind)]
            print(f"| {kind} | {statistics.median(x for x, _ in la):.3f} | {statistics.median(x for x, _ in lb):.3f} | "
                  f"{statistics.median(y for _, y in la):.3f} | {statistics.median(y for _, y in lb):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
