"""Cost per request of the telemetry the request path adds (µs, this machine).

    python3 bench/bench_telemetry.py [--multiprocess]

metrics: one request_started + request_finished + attempt, labels already bound
(the steady state: a gateway sees the same few label sets again and again).
tracing: one server span with one attempt span inside, attributes set and
traceparent injected, as the request path does it; off (no provider), on but
not sampled (the client sent a traceparent with sampled=0), and on and sampled
(exported to a no-op exporter through the BatchSpanProcessor, as in production).
access log: one JSON line rendered and handed to a handler that drops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N = 20_000


def per_call_us(fn: Callable[[], None], n: int = N, repeat: int = 5) -> float:
    for _ in range(n // 10):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def metrics_case() -> Callable[[], None]:
    from proxy.config.types import ModelPrice
    from proxy.telemetry.metrics import Metrics, Pricing

    multiproc = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    m = Metrics(multiprocess_dir=multiproc, pricing=Pricing({"gpt-4o": ModelPrice(2.5, 10.0)}))

    def one() -> None:
        m.request_started()
        m.attempt("openai", "ok", 0.31)
        m.request_finished(model="gpt-4o", upstream="openai", team="team-a", key_name="ci", status=200,
                           duration=1.23, ttft=0.31, overhead=0.0004, prompt_tokens=120,
                           completion_tokens=350, stream=True)
    return one


def tracing_case(mode: str) -> Callable[[], None]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from proxy.telemetry.tracing import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Sequence[object]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = None
    if mode != "off":
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=65536))
    tracing = Tracing(provider)
    flag = "00" if mode == "not_sampled" else "01"
    headers = [(b"host", b"x"), (b"traceparent",
                                 f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flag}".encode())]

    def one() -> None:
        with tracing.server_span("POST /v1/chat/completions", headers) as span:
            span.request(model="gpt-4o", stream=True, team="team-a", key_name="ci", max_tokens=512)
            with tracing.attempt_span(upstream="openai", provider="openai", model="gpt-4o",
                                      upstream_model="gpt-4o", attempt=1) as attempt:
                out: dict[str, str] = {}
                attempt.inject(out)
                attempt.result("ok", 200)
            span.response(status=200, upstream="openai", model="gpt-4o", input_tokens=120,
                          output_tokens=350)
    return one


def access_case() -> Callable[[], None]:
    from proxy.telemetry.accesslog import AccessLog

    logger = logging.getLogger("bench.access")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.INFO)
    log = AccessLog(logger)
    record = {"request_id": "3f2a9c0b1d", "trace_id": "0af7651916cd43dd8448eb211c80319c", "status": 200,
              "team": "team-a", "key_name": "ci", "model": "gpt-4o", "upstream": "openai",
              "stream": True, "prompt_tokens": 120, "completion_tokens": 350, "duration_ms": 1234.5,
              "ttft_ms": 310.2, "overhead_ms": 0.41}

    def one() -> None:
        log.write(record)
    return one


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--multiprocess", action="store_true",
                        help="metrics in multiprocess mode (mmap-backed values)")
    args = parser.parse_args()
    if args.multiprocess and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # The library picks its value storage at import: re-run with the variable set.
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="bench-mp-")}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    mode = "multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "single process"
    print(f"µs per request (best of 5 × {N}), Python {sys.version.split()[0]}")
    print(f"  metrics ({mode}): started+attempt+finished  {per_call_us(metrics_case()):7.2f}")
    for tmode in ("off", "not_sampled", "sampled"):
        print(f"  tracing {tmode:<12} server+attempt span     {per_call_us(tracing_case(tmode)):7.2f}")
    print(f"  access log (json line)                       {per_call_us(access_case()):7.2f}")


if __name__ == "__main__":
    main()
