"""User-space instructions per request of the gateway, counted by callgrind.

    python bench/instructions.py [CHECKOUT ...] [--requests 1000]

CPU seconds on a shared VM drift by tens of per cent within minutes
(bench/README.md, "Comparing a change"); instructions do not: the same tree
counts the same within about 1 %. Each checkout's gateway runs under
``valgrind --tool=callgrind`` against the nginx stub and Redis; after 300
warm-up requests the counters are zeroed, ``--requests`` requests are sent one
at a time on one kept-alive connection (non-streamed, then streamed, each in a
fresh gateway), and the dump is divided by their number.

What it does not see: the kernel (system calls, the TCP stack, wake-ups),
which callgrind does not count, and anything that only happens with requests
in flight together (batched writes). ``bench/ab.py`` measures those.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stub
from procs import GATEWAY_ENV, ROOT, Procs, free_port, gateway_argv, start_backends, which

WARM_UP = 300


def send(port: int, body: bytes, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # loopback only
    try:
        for _ in range(count):
            conn.request("POST", "/v1/chat/completions", body, stub.HEADERS)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"the gateway answered {answer.status}")
    finally:
        conn.close()


def count(procs: Procs, workdir: Path, root: Path, config: Path, kind: str, requests: int) -> float:
    port = free_port()
    out = workdir / f"callgrind-{root.name}-{kind}"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *gateway_argv(config, port)]
    gateway = procs.start(f"gateway-{root.name}-{kind}", argv, {**GATEWAY_ENV, "PYTHONPATH": str(root)}, port,
                          wait=300.0, stop_signal=signal.SIGINT, cwd=root)
    body = stub.request_body(stub.MODEL if kind == "json" else stub.STREAM_MODEL, kind == "stream")
    send(port, body, WARM_UP)
    subprocess.run(["callgrind_control", "--zero", str(gateway.pid)], check=True, capture_output=True, timeout=60)
    send(port, body, requests)
    subprocess.run(["callgrind_control", "--dump", str(gateway.pid)], check=True, capture_output=True, timeout=60)
    dump = Path(f"{out}.{gateway.pid}.1")
    deadline = time.monotonic() + 30
    while not dump.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    totals = [line for line in dump.read_text().splitlines() if line.startswith("totals:")]
    gateway.popen.send_signal(signal.SIGINT)
    gateway.popen.wait(60)
    return int(totals[0].split()[1]) / requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkouts", nargs="*", help="trees whose proxy/ package to count (default: this one)")
    p.add_argument("--requests", type=int, default=1000)
    a = p.parse_args(argv)
    if which("valgrind") is None or which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    roots = [Path(c).resolve() for c in a.checkouts] or [ROOT]
    workdir = ROOT / ".bench-out" / "work-instructions"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    procs = Procs(workdir)
    rows = []
    with procs.session():
        backends = start_backends(procs, workdir, lambda port: stub.stub_conf(workdir, port), quotas=True)
        config = workdir / "gateway.yaml"
        config.write_text(stub.gateway_config(backends.stub_port, backends.redis_port))
        for root in roots:
            counts = [count(procs, workdir, root, config, kind, a.requests) for kind in ("json", "stream")]
            rows.append((root, *counts))
            print(f"[instructions] {root}: {counts[0]:,.0f} / {counts[1]:,.0f}", file=sys.stderr, flush=True)
    print("| checkout | non-streamed, instructions/request | streamed |")
    print("|---|---:|---:|")
    for root, json_count, stream_count in rows:
        print(f"| {root} | {json_count:,.0f} | {stream_count:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
