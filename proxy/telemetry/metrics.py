"""Prometheus metrics: the names are a contract with the dashboards (docs/observability.md).

Every metric object is built by ``Metrics.__init__`` into the registry it is
given, so two apps in one process (tests) never share a series. Labels are
bounded: only configured names (model, upstream, team, key name) and small
fixed sets (status, outcome, limit, state) ever become label values.

The hot path never calls ``.labels()``: it hashes its arguments and takes a
lock on every call, so label children are bound once and kept in dicts here.

With several gateway processes reporting as one target, ``PROMETHEUS_MULTIPROC_DIR`` must be set before
``prometheus_client`` is imported (the library picks its value storage then);
each process writes its own files there and ``render`` merges them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from ..config.types import ModelPrice

# Text format 0.0.4: what every Prometheus 2.x scrapes (newer clients default to 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# LLM answers span a cached 5 ms reply to a five-minute long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                   120.0, 300.0)
# First tokens cluster between 100 ms and a few seconds: finer there.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
                300.0)
# The gateway's own time should be well under a millisecond.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

UPSTREAM_STATES = ("healthy", "cooling_down", "ejected", "half_open", "credentials_bad")
ATTEMPT_OUTCOMES = ("ok", "429", "5xx", "4xx", "timeout", "connect_error", "auth_error", "cut")
QUOTA_LIMITS = ("rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month")
RELOAD_OUTCOMES = ("ok", "error")
# How a stream ended after its first byte without its [DONE]; the code its error event and access log carry.
STREAM_ERROR_CODES = ("upstream_stream_cut", "upstream_stream_error", "upstream_idle_timeout",
                      "upstream_total_timeout", "client_write_timeout", "server_shutting_down")
UNCONFIRMED_OUTCOMES = ("served", "refused")

_M = TypeVar("_M", Counter, Gauge, Histogram)


class _Bound(Generic[_M]):
    """The label children of one metric, each bound on first use."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _M) -> None:
        self._metric: _M = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def __call__(self, *label_values: str) -> _M:
        child = self._children.get(label_values)
        if child is None:
            child = self._children[label_values] = self._metric.labels(*label_values)
        return child


@dataclass(frozen=True)
class Pricing:
    """Per-model prices (USD per million tokens); a model without one costs nothing here."""

    prices: Mapping[str, ModelPrice] = field(default_factory=dict)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        price = self.prices.get(model)
        if price is None:
            return None
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000


@dataclass(frozen=True, slots=True)
class _RequestSeries:
    """Everything one kind of finished request touches, bound together: one dict lookup per request."""

    requests: Counter
    duration: Histogram
    usage: _UsageSeries | None  # None when no upstream answered: no empty series for those


@dataclass(frozen=True, slots=True)
class _UsageSeries:
    ttft: Histogram
    prompt: Counter
    completion: Counter
    cost: tuple[Counter, ModelPrice] | None  # only models with a price get a cost series


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None,
                 pricing: Pricing | None = None) -> None:
        if multiprocess_dir is not None and not getattr(values.ValueClass, "_multiprocess", False):
            raise ValueError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before "
                             "prometheus_client is first imported")
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self._exposed = self._exposition_registry(multiprocess_dir)
        self._pricing = pricing or Pricing()
        self._series: dict[tuple[str, str, str, str, int, bool], _RequestSeries] = {}
        self._states: dict[str, tuple[Gauge, ...]] = {}
        self._create(self.registry)
        for outcome in RELOAD_OUTCOMES:  # so that increase() sees the first error
            self._reloads(outcome)
        for code in STREAM_ERROR_CODES:
            self._stream_errors(code)
        self._reload_ok.set(1)  # the gateway does not start on a bad config

    def _exposition_registry(self, multiprocess_dir: str | None) -> CollectorRegistry:
        if multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        return merged

    def _create(self, r: CollectorRegistry) -> None:
        p = "llm_proxy_"
        self._requests = Counter(p + "requests", "Requests answered, by outcome.",
                                 ("model", "upstream", "team", "key_name", "status_class", "status"),
                                 registry=r)
        self._in_flight = Gauge(p + "requests_in_flight", "Requests being served now.",
                                registry=r, multiprocess_mode="livesum")
        self._duration = Histogram(p + "request_duration_seconds",
                                   "Whole request time, up to the last byte sent to the client.",
                                   ("model", "stream"), buckets=LATENCY_BUCKETS, registry=r)
        self._ttft = Histogram(p + "time_to_first_token_seconds",
                               "From the request's arrival to the upstream's first token.",
                               ("model", "upstream"), buckets=TTFT_BUCKETS, registry=r)
        self._overhead = Histogram(p + "gateway_overhead_seconds",
                                   "Time a request spent in the gateway itself, outside upstream calls.",
                                   buckets=OVERHEAD_BUCKETS, registry=r)
        self._tokens = Counter(p + "tokens", "Tokens used, as the upstream reported them.",
                               ("model", "team", "key_name", "kind"), registry=r)
        self._cost = Counter(p + "cost_usd", "Estimated cost from the configured per-model prices.",
                             ("model", "team", "key_name"), registry=r)
        self._stream_errors = _Bound(Counter(p + "stream_errors", "Streams ended after their first byte "
                                             "without their end, by the error code.", ("code",), registry=r))
        self._create_upstream(r, p)
        self._create_quota(r, p)

    def _create_upstream(self, r: CollectorRegistry, p: str) -> None:
        self._attempts = _Bound(Counter(p + "upstream_attempts", "Calls to upstreams, by outcome.",
                                        ("upstream", "outcome"), registry=r))
        self._attempt_seconds = _Bound(Histogram(
            p + "upstream_attempt_duration_seconds",
            "Time of one upstream attempt until its first byte or its failure.",
            ("upstream", "outcome"), buckets=LATENCY_BUCKETS, registry=r))
        self._failovers = _Bound(Counter(p + "failovers", "Moves to another upstream after a failure.",
                                         ("model",), registry=r))
        # livemax across workers: 1 when any live worker sees the upstream in that state.
        self._state = Gauge(p + "upstream_state", "1 for the upstream's current health state.",
                            ("upstream", "state"), registry=r, multiprocess_mode="livemax")
        self._cooldowns = _Bound(Counter(p + "upstream_cooldowns",
                                         "Cool-downs an upstream asked for (429 with Retry-After).",
                                         ("upstream",), registry=r))
        self._cooldown_seconds = _Bound(Counter(p + "upstream_cooldown_seconds",
                                                "Seconds of cool-down upstreams asked for.",
                                                ("upstream",), registry=r))

    def _create_quota(self, r: CollectorRegistry, p: str) -> None:
        self._rejections = _Bound(Counter(p + "quota_rejections", "Requests denied by a quota (429).",
                                          ("limit", "team", "key_name"), registry=r))
        self._budget = _Bound(Gauge(p + "budget_remaining_tokens",
                                    "Tokens left in a day or month budget, as last read from the store.",
                                    ("scope", "name", "limit"), registry=r,
                                    multiprocess_mode="mostrecent"))
        self._budget_limit = _Bound(Gauge(p + "budget_limit_tokens",
                                          "The limit that budget_remaining_tokens counts down from.",
                                          ("scope", "name", "limit"), registry=r,
                                          multiprocess_mode="mostrecent"))
        self._store_errors = _Bound(Counter(p + "store_errors", "Quota store calls that failed.",
                                            ("operation",), registry=r))
        self._store_latency = _Bound(Histogram(p + "store_latency_seconds", "Quota store call time.",
                                               ("operation",), buckets=STORE_BUCKETS, registry=r))
        self._unconfirmed = _Bound(Counter(p + "key_directory_unconfirmed",
                                           "Requests with an issued key while this replica's copy of the "
                                           "key directory was older than quotas.key_directory_max_age.",
                                           ("outcome",), registry=r))
        for outcome in UNCONFIRMED_OUTCOMES:  # from 0, so that rate() sees the first one
            self._unconfirmed(outcome)
        self._reloads = _Bound(Counter(p + "config_reloads", "Config reloads, by outcome.",
                                       ("outcome",), registry=r))
        # A gauge, so an alert holds while the file stays bad, however long ago it failed.
        self._reload_ok = Gauge(p + "config_last_reload_successful",
                                "1 when the last config reload (or the start) succeeded.",
                                registry=r, multiprocess_mode="livemin")
        self._auth_failures = _Bound(Counter(p + "auth_failures", "Requests refused at authentication.",
                                             ("reason",), registry=r))

    # --- the request path ---------------------------------------------------

    def request_started(self) -> None:
        self._in_flight.inc()

    def stream_error(self, code: str) -> None:
        """A stream ended after its first byte without its end (``code``: one of STREAM_ERROR_CODES)."""
        self._stream_errors(code).inc()

    def request_finished(self, *, model: str, upstream: str, team: str, key_name: str, status: int,
                         duration: float, ttft: float | None, overhead: float | None,
                         prompt_tokens: int, completion_tokens: int, stream: bool) -> None:
        self._in_flight.dec()
        key = (model, upstream, team, key_name, status, stream)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._bind_request(*key)
        series.requests.inc()
        series.duration.observe(duration)
        if overhead is not None:
            self._overhead.observe(overhead)
        usage = series.usage
        if usage is None:
            return
        if ttft is not None:
            usage.ttft.observe(ttft)
        if prompt_tokens:
            usage.prompt.inc(prompt_tokens)
        if completion_tokens:
            usage.completion.inc(completion_tokens)
        if usage.cost is not None and (prompt_tokens or completion_tokens):
            cost, price = usage.cost
            cost.inc((prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000)

    def _bind_request(self, model: str, upstream: str, team: str, key_name: str, status: int,
                      stream: bool) -> _RequestSeries:
        usage = _UsageSeries(
            ttft=self._ttft.labels(model, upstream),
            prompt=self._tokens.labels(model, team, key_name, "prompt"),
            completion=self._tokens.labels(model, team, key_name, "completion"),
            cost=self._priced(model, team, key_name),
        ) if upstream else None
        return _RequestSeries(
            requests=self._requests.labels(model, upstream, team, key_name, status_class(status),
                                           str(status)),
            duration=self._duration.labels(model, "true" if stream else "false"),
            usage=usage,
        )

    def _priced(self, model: str, team: str, key_name: str) -> tuple[Counter, ModelPrice] | None:
        price = self._pricing.prices.get(model)
        return None if price is None else (self._cost.labels(model, team, key_name), price)

    def use_pricing(self, pricing: Pricing) -> None:
        """New prices (a config reload): the bound series carry the old ones."""
        self._pricing = pricing
        self._series = {}

    def attempt(self, upstream: str, outcome: str, seconds: float) -> None:
        self._attempts(upstream, outcome).inc()
        self._attempt_seconds(upstream, outcome).observe(seconds)

    def failover(self, model: str, from_upstream: str) -> None:
        # from_upstream is in the attempt outcomes already; a model label is enough here.
        self._failovers(model).inc()

    def upstream_state(self, upstream: str, state: str) -> None:
        gauges = self._states.get(upstream)
        if gauges is None:
            gauges = self._states[upstream] = tuple(self._state.labels(upstream, s)
                                                    for s in UPSTREAM_STATES)
        for name, gauge in zip(UPSTREAM_STATES, gauges, strict=True):
            gauge.set(1 if name == state else 0)

    def cooldown(self, upstream: str, seconds: float) -> None:
        self._cooldowns(upstream).inc()
        self._cooldown_seconds(upstream).inc(max(seconds, 0.0))

    def configured(self, upstreams: Iterable[str], models: Iterable[str]) -> None:
        """At start and after a reload: series of configured names start at 0, so
        ``rate()`` and ``increase()`` see their first event; a removed upstream
        stops reporting a state (all 0), so it cannot keep an alert firing."""
        names = set(upstreams)
        for upstream in names:
            self._attempts(upstream, "ok")
            self._cooldowns(upstream)
        for model in models:
            self._failovers(model)
        for gone in set(self._states) - names:
            for gauge in self._states.pop(gone):
                gauge.set(0)

    # --- quotas and the store -----------------------------------------------

    def quota_rejected(self, limit: str, team: str, key_name: str) -> None:
        self._rejections(limit, team, key_name).inc()

    def budget_remaining(self, scope: str, name: str, limit: str, remaining: float,
                         total: float | None = None) -> None:
        """scope: team|key; limit: tokens_per_day|tokens_per_month. With ``total``
        (the configured limit) alerts can tell how much of it is left."""
        self._budget(scope, name, limit).set(remaining)
        if total is not None:
            self._budget_limit(scope, name, limit).set(total)

    def store_error(self, operation: str) -> None:
        self._store_errors(operation).inc()

    def store_latency(self, operation: str, seconds: float) -> None:
        self._store_latency(operation).observe(seconds)

    def unconfirmed_key(self, outcome: str) -> None:
        """outcome: served (fail_open) | refused (fail_closed)."""
        self._unconfirmed(outcome).inc()

    def config_reload(self, outcome: str) -> None:
        self._reloads(outcome).inc()
        self._reload_ok.set(1 if outcome == "ok" else 0)

    def auth_failure(self, reason: str) -> None:
        self._auth_failures(reason).inc()

    # --- exposition ---------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self._exposed), CONTENT_TYPE


def status_class(status: int) -> str:
    # A request that ended without a status (0) is the gateway's failure.
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


def clear_multiprocess_dir(path: str | os.PathLike[str]) -> None:
    """Call once before workers start: files of an earlier run would be merged in."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
