"""Where the memory of an open idle stream goes: tracemalloc and gc in the gateway.

    python bench/stream_profile.py [--streams N] [--frames F] [--top K] [--no-quotas]

Starts the same stub, Redis and gateway config as ``bench/memory.py``, but the
gateway runs under tracemalloc (``F`` frames per allocation) and dumps a
snapshot and a count of live objects by type on SIGUSR1. The client opens N
slow streams, has the gateway dump, opens N more, dumps again: the difference,
divided by N, is what one more open stream holds, by allocation site (the
innermost frame in ``proxy/`` when there is one, else the innermost frame) and
by object type. tracemalloc sees the Python heap only (not the C library's own
mallocs, nor the allocator's slack), so its total is below the RSS slope.
Diagnostic only: not part of ``bench/run``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import stub
from memory import StreamClient
from procs import GATEWAY_ENV, ROOT, Procs, free_port, gateway_argv, layout, pin, start_backends, which

# Runs in the gateway process: tracemalloc from the first import, a dump on SIGUSR1.
_GATEWAY_MAIN = """
import gc, json, os, pickle, signal, sys, tracemalloc
from collections import Counter
tracemalloc.start(int(os.environ["PROFILE_FRAMES"]))
out = os.environ["PROFILE_OUT"]
dumps = [0]

def dump(signum, frame):
    gc.collect()
    dumps[0] += 1
    counts = Counter()
    for o in gc.get_objects():
        name = str(type(o))
        counts[name] += 1
        counts["size " + name] += sys.getsizeof(o)
        if name == "<class 'coroutine'>":
            counts["coroutine " + o.__qualname__] += sys.getsizeof(o)
    with open(f"{out}/types-{dumps[0]}.json", "w") as f:
        json.dump(counts, f)
    tracemalloc.take_snapshot().dump(f"{out}/snap-{dumps[0]}.bin")
    open(f"{out}/done-{dumps[0]}", "w").close()

signal.signal(signal.SIGUSR1, dump)
from proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _site(trace_frames: list[tuple[str, int]]) -> str:
    """The innermost frame in the gateway's own code, or the innermost one (most recent first)."""
    for filename, lineno in trace_frames:
        if "/proxy/" in filename and not filename.endswith("/proxy/cli.py"):
            return f"{filename.rsplit('/proxy/', 1)[1]}:{lineno}"
    filename, lineno = trace_frames[0]
    return f"{filename.rsplit('/', 1)[-1]}:{lineno}"


def _dump(pid: int, out: Path, n: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not (out / f"done-{n}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not dump its snapshot")
        time.sleep(0.2)


def analyse(out: Path, per: int, top: int) -> None:
    import tracemalloc

    a = tracemalloc.Snapshot.load(str(out / "snap-1.bin"))
    b = tracemalloc.Snapshot.load(str(out / "snap-2.bin"))
    total = sum(s.size_diff for s in b.compare_to(a, "filename"))
    print(f"tracemalloc: {total / per:.0f} B per stream ({total / 1024:.0f} KiB for {per} streams)")
    sites: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for stat in b.compare_to(a, "traceback"):
        # A Traceback lists its frames oldest first.
        key = _site([(f.filename, f.lineno) for f in reversed(list(stat.traceback))])
        sites[key] += stat.size_diff
        counts[key] += stat.count_diff
    print(f"\nby site (innermost proxy/ frame), bytes per stream (top {top}):")
    for key, size in sites.most_common(top):
        print(f"  {size / per:8.0f}  {counts[key] / per:6.2f} blocks  {key}")
    print(f"\nby line, bytes per stream (top {top}):")
    for stat in b.compare_to(a, "lineno")[:top]:
        f = stat.traceback[0]
        print(f"  {stat.size_diff / per:8.0f}  {stat.count_diff / per:6.2f} blocks  "
              f"{f.filename.rsplit('/', 2)[-2:]}:{f.lineno}")
    t1 = json.loads((out / "types-1.json").read_text())
    t2 = json.loads((out / "types-2.json").read_text())
    diff = Counter({k: t2.get(k, 0) - t1.get(k, 0) for k in set(t1) | set(t2)})
    print("\ngc-tracked objects per stream, by type: count, bytes (getsizeof, without GC header)")
    for name, n in diff.most_common():
        if n / per >= 0.5 and not name.startswith(("size ", "coroutine ")):
            print(f"  {n / per:6.2f}  {diff['size ' + name] / per:7.0f}  {name}")
    print("\ncoroutine frames per stream, bytes:")
    for name, n in diff.most_common():
        if name.startswith("coroutine ") and n / per >= 1:
            print(f"  {n / per:7.0f}  {name[10:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--no-quotas", action="store_true")
    a = p.parse_args()
    out_dir = ROOT / ".bench-out"
    workdir = out_dir / "work-stream-profile"
    if workdir.exists():
        for f in workdir.iterdir():
            if f.is_file():
                f.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Procs(workdir)
    with procs.session():
        backends = start_backends(procs, workdir, lambda port: stub.stub_conf(workdir, port, drip_rate=48),
                                  quotas=not a.no_quotas and which("redis-server") is not None)
        redis_port, stub_port = backends.redis_port, backends.stub_port
        cfg = workdir / "gateway.yaml"
        cfg.write_text(stub.gateway_config(stub_port, redis_port))
        port = free_port()
        argv = gateway_argv(cfg, port)
        argv = [argv[0], "-c", _GATEWAY_MAIN, *argv[3:]]
        env = {**GATEWAY_ENV, "PYTHONPATH": str(ROOT), "PROFILE_OUT": str(workdir),
               "PROFILE_FRAMES": str(a.frames)}
        gw = procs.start("gateway", pin(layout().gateway, argv), env, port, wait=30.0,
                         stop_signal=signal.SIGINT)
        warm = loadgen.post_script(workdir, "warm", stub.request_body(stub.MODEL, False),
                                   stub.HEADERS)
        loadgen.run_wrk(f"http://127.0.0.1:{port}/v1/chat/completions", warm, 2, 16)

        async def run() -> None:
            client = StreamClient(port, stub.request_body(stub.SLOW_MODEL, True))
            await client.open_many(a.streams // 2)  # warm the stream path itself
            await asyncio.sleep(1.0)
            await client.open_many(a.streams - a.streams // 2)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(_dump, gw.pid, workdir, 1)
            await client.open_many(a.streams)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(_dump, gw.pid, workdir, 2)
            print(f"open: {len(client.streams)}, failures {client.failures}, statuses {client.statuses}",
                  file=sys.stderr)
            await client.close_all()

        asyncio.run(run())
        procs.stop(gw)
    analyse(workdir, a.streams, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
