"""YAML config → frozen, typed objects.

This is the only module that reads the environment: ``${NAME}`` and
``${NAME:-default}`` in string values are replaced here, once. Every problem
found is reported with its path (``upstreams[2].timeout.first_byte: must be >
0``), all of them at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from ..errors import ConfigError
from .egress import upstream_proxy, upstream_tls
from .reader import Reader
from .types import (
    DEFAULT_MAX_OUTPUT_TOKENS,
    PROVIDERS,
    STRATEGIES,
    Config,
    HealthCheck,
    HealthConfig,
    KeyConfig,
    Limits,
    LoggingConfig,
    MockSettings,
    ModelConfig,
    ModelPrice,
    QuotasConfig,
    RoutingConfig,
    ServerConfig,
    TeamConfig,
    TelemetryConfig,
    Timeouts,
    UpstreamConfig,
)

_T = TypeVar("_T")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, substitute and validate a config file; raise ConfigError listing every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, os.environ if environ is None else environ)


def parse_config(text: str, environ: Mapping[str, str]) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"]) from None
    except ValueError as exc:  # a value YAML itself builds, e.g. the date 2027-02-30
        raise ConfigError([f"not valid YAML: {exc}"]) from None
    reader = Reader(environ)
    config = _config(reader, {} if raw is None else raw)
    if reader.problems:
        raise ConfigError(reader.problems)
    assert config is not None
    return config


def _config(r: Reader, raw: Any) -> Config | None:
    d = r.mapping(raw, "", {"upstreams", "routing", "keys", "teams", "quotas", "server", "health",
                            "models", "pricing", "logging", "redis_url", "admin_key"})
    if d is None:
        return None
    upstreams = _each(r, d.get("upstreams"), "upstreams", _upstream, required=True)
    _check_unique(r, "upstreams", [u.name for u in upstreams])
    if not r.problems and not upstreams:
        r.problem("upstreams", "at least one upstream is required")
    keys = _each(r, d.get("keys"), "keys", _key)
    _check_unique(r, "keys", [k.name for k in keys])
    teams = _each(r, d.get("teams"), "teams", _team)
    _check_unique(r, "teams", [t.name for t in teams])
    return Config(
        upstreams=upstreams,
        routing=_routing(r, d.get("routing"), "routing"),
        keys=keys,
        teams=teams,
        quotas=_quotas(r, d.get("quotas"), "quotas"),
        server=_server(r, d.get("server"), "server"),
        health=_health(r, d.get("health"), "health"),
        models=_model_settings(r, d.get("models"), "models", {m for u in upstreams for m in u.models}),
        pricing=_pricing(r, d.get("pricing"), "pricing"),
        logging=_logging(r, d.get("logging"), "logging"),
        redis_url=r.string(d.get("redis_url"), "redis_url", empty_is_none=True),
        admin_key=r.secret(d.get("admin_key"), "admin_key"),
    )


def _each(r: Reader, raw: Any, path: str, parse: Callable[[Reader, Any, str], _T | None],
          required: bool = False) -> tuple[_T, ...]:
    parsed = (parse(r, item, f"{path}[{i}]") for i, item in enumerate(r.seq(raw, path, required)))
    return tuple(item for item in parsed if item is not None)


def _check_unique(r: Reader, path: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            r.problem(path, f"duplicate name {name!r}")
        seen.add(name)


def _upstream(r: Reader, raw: Any, path: str) -> UpstreamConfig | None:
    d = r.mapping(raw, path, {"name", "provider", "base_url", "api_key", "api_version", "models",
                              "weight", "priority", "max_concurrency", "timeout", "mock",
                              "health_check", "proxy", "tls"})
    if d is None:
        return None
    provider = r.choice(d.get("provider", "openai"), f"{path}.provider", PROVIDERS)
    name = r.string(d.get("name"), f"{path}.name", required=True)
    base_url = r.string(d.get("base_url"), f"{path}.base_url", required=provider != "mock")
    if base_url and not re.match(r"^https?://[^/\s]+", base_url):
        r.problem(f"{path}.base_url", "must be an http:// or https:// URL")
    api_version = r.string(d.get("api_version"), f"{path}.api_version")
    if provider == "azure" and not api_version:
        r.problem(f"{path}.api_version", "is required for provider azure")
    models = _models(r, d.get("models"), f"{path}.models")
    # Every field is read before giving up on one that failed, so each problem is reported.
    api_key = r.secret(d.get("api_key"), f"{path}.api_key")
    weight = r.number(d.get("weight", 1.0), f"{path}.weight", minimum=0, exclusive=True)
    priority = r.integer(d.get("priority", 0), f"{path}.priority", minimum=0)
    max_concurrency = r.optional_int(d.get("max_concurrency"), f"{path}.max_concurrency", minimum=1)
    timeout = _timeouts(r, d.get("timeout"), f"{path}.timeout")
    mock = _mock(r, d.get("mock"), f"{path}.mock")
    health_check = _health_check(r, d.get("health_check"), f"{path}.health_check")
    if name is None or provider is None or models is None:
        return None
    return UpstreamConfig(
        name=name,
        provider=provider,
        base_url=(base_url or "mock://" + name).rstrip("/"),
        api_key=api_key,
        api_version=api_version,
        models=models,
        weight=weight,
        priority=priority,
        max_concurrency=max_concurrency,
        timeout=timeout,
        mock=mock,
        health_check=health_check,
        proxy=upstream_proxy(r, d, path, base_url if provider != "mock" else None),
        tls=upstream_tls(r, d.get("tls"), f"{path}.tls", base_url),
    )


def _models(r: Reader, raw: Any, path: str) -> Mapping[str, str] | None:
    if isinstance(raw, list):
        names = [r.string(m, f"{path}[{i}]", required=True) for i, m in enumerate(raw)]
        pairs = {n: n for n in names if n}
    elif isinstance(raw, dict):
        pairs = {}
        for public, upstream_name in raw.items():
            value = r.string(upstream_name, f"{path}.{public}", required=True)
            if value:
                pairs[str(public)] = value
    else:
        r.problem(path, "must be a list of model names or a map of public name → upstream name")
        return None
    if not pairs:
        r.problem(path, "must name at least one model")
        return None
    return MappingProxyType(pairs)


def _timeouts(r: Reader, raw: Any, path: str) -> Timeouts:
    d = r.mapping(raw, path, {"connect", "first_byte", "idle", "total"}, optional=True) or {}
    dflt = Timeouts()
    return Timeouts(**{
        name: r.number(d.get(name, getattr(dflt, name)), f"{path}.{name}", minimum=0, exclusive=True)
        for name in ("connect", "first_byte", "idle", "total")
    })


def _mock(r: Reader, raw: Any, path: str) -> MockSettings:
    d = r.mapping(raw, path, {"latency", "tokens_per_second", "completion_tokens"}, optional=True) or {}
    dflt = MockSettings()
    return MockSettings(
        latency=r.number(d.get("latency", dflt.latency), f"{path}.latency", minimum=0),
        tokens_per_second=r.number(d.get("tokens_per_second", dflt.tokens_per_second),
                                   f"{path}.tokens_per_second", minimum=0),
        completion_tokens=r.integer(d.get("completion_tokens", dflt.completion_tokens),
                                    f"{path}.completion_tokens", minimum=1),
    )


def _health_check(r: Reader, raw: Any, path: str) -> HealthCheck | None:
    if raw is None or raw is False:
        return None
    d = r.mapping({} if raw is True else raw, path, {"interval", "timeout", "unhealthy_threshold"}) or {}
    dflt = HealthCheck()
    return HealthCheck(
        interval=r.number(d.get("interval", dflt.interval), f"{path}.interval", minimum=0.1),
        timeout=r.number(d.get("timeout", dflt.timeout), f"{path}.timeout", minimum=0, exclusive=True),
        unhealthy_threshold=r.integer(d.get("unhealthy_threshold", dflt.unhealthy_threshold),
                                      f"{path}.unhealthy_threshold", minimum=1),
    )


def _health(r: Reader, raw: Any, path: str) -> HealthConfig:
    names = ("failure_threshold", "base_ejection", "max_ejection", "credentials_recheck", "max_cooldown")
    d = r.mapping(raw, path, set(names), optional=True) or {}
    dflt = HealthConfig()
    return HealthConfig(
        failure_threshold=r.integer(d.get("failure_threshold", dflt.failure_threshold),
                                    f"{path}.failure_threshold", minimum=1),
        **{n: r.number(d.get(n, getattr(dflt, n)), f"{path}.{n}", minimum=0, exclusive=True)
           for n in names[1:]},
    )


def _model_settings(r: Reader, raw: Any, path: str, known: set[str]) -> Mapping[str, ModelConfig]:
    d = r.mapping(raw, path, known, optional=True) or {}
    out: dict[str, ModelConfig] = {}
    for model, settings in d.items():
        s = r.mapping(settings, f"{path}.{model}", {"fallbacks", "max_output_tokens"}) or {}
        fallbacks = tuple(f for i, f in enumerate(r.seq(s.get("fallbacks"), f"{path}.{model}.fallbacks"))
                          if r.string(f, f"{path}.{model}.fallbacks[{i}]", required=True))
        for i, name in enumerate(fallbacks):
            if name not in known or name == model:
                r.problem(f"{path}.{model}.fallbacks[{i}]",
                          f"must be another configured model (got {name!r})")
        out[str(model)] = ModelConfig(
            fallbacks=fallbacks,
            max_output_tokens=r.integer(s.get("max_output_tokens", DEFAULT_MAX_OUTPUT_TOKENS),
                                        f"{path}.{model}.max_output_tokens", minimum=1))
    return MappingProxyType(out)


def _pricing(r: Reader, raw: Any, path: str) -> Mapping[str, ModelPrice]:
    d = r.mapping(raw, path, set(raw) if isinstance(raw, dict) else set(), optional=True) or {}
    out: dict[str, ModelPrice] = {}
    for model, price in d.items():
        p = r.mapping(price, f"{path}.{model}", {"input", "output"}) or {}
        out[str(model)] = ModelPrice(
            input=r.number(p.get("input", 0), f"{path}.{model}.input", minimum=0),
            output=r.number(p.get("output", 0), f"{path}.{model}.output", minimum=0))
    return MappingProxyType(out)


def _logging(r: Reader, raw: Any, path: str) -> LoggingConfig:
    d = r.mapping(raw, path, {"level", "access_log", "access_format"}, optional=True) or {}
    dflt = LoggingConfig()
    return LoggingConfig(
        level=r.choice(d.get("level", dflt.level), f"{path}.level",
                       ("debug", "info", "warning", "error")) or dflt.level,
        access_log=r.boolean(d.get("access_log", dflt.access_log), f"{path}.access_log"),
        access_format=r.choice(d.get("access_format", dflt.access_format), f"{path}.access_format",
                               ("json", "text")) or dflt.access_format,
    )


def _routing(r: Reader, raw: Any, path: str) -> RoutingConfig:
    d = r.mapping(raw, path, {"strategy", "max_attempts", "deadline", "retry_budget",
                              "min_retries_per_second", "wait_for_cooldown"}, optional=True) or {}
    dflt = RoutingConfig()
    return RoutingConfig(
        retry_budget=r.number(d.get("retry_budget", dflt.retry_budget), f"{path}.retry_budget", minimum=0),
        min_retries_per_second=r.number(d.get("min_retries_per_second", dflt.min_retries_per_second),
                                        f"{path}.min_retries_per_second", minimum=0),
        wait_for_cooldown=r.boolean(d.get("wait_for_cooldown", dflt.wait_for_cooldown),
                                    f"{path}.wait_for_cooldown"),
        strategy=r.choice(d.get("strategy", dflt.strategy), f"{path}.strategy", STRATEGIES)
        or dflt.strategy,
        max_attempts=r.integer(d.get("max_attempts", dflt.max_attempts), f"{path}.max_attempts",
                               minimum=1),
        deadline=r.number(d.get("deadline", dflt.deadline), f"{path}.deadline", minimum=0,
                          exclusive=True),
    )


def _limits(r: Reader, raw: Any, path: str) -> Limits:
    names = ("rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month")
    d = r.mapping(raw, path, set(names), optional=True) or {}
    return Limits(**{n: r.optional_int(d.get(n), f"{path}.{n}", minimum=0) for n in names})


def _model_globs(r: Reader, raw: Any, path: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    items = r.seq(raw, path)
    return tuple(s for i, m in enumerate(items) if (s := r.string(m, f"{path}[{i}]", required=True)))


def _key(r: Reader, raw: Any, path: str) -> KeyConfig | None:
    d = r.mapping(raw, path, {"name", "key", "key_sha256", "team", "models", "limits", "expires_at"})
    if d is None:
        return None
    name = r.string(d.get("name"), f"{path}.name", required=True)
    digest = _key_digest(r, d, path)
    team = r.string(d.get("team"), f"{path}.team")
    models = _model_globs(r, d.get("models"), f"{path}.models")
    limits = _limits(r, d.get("limits"), f"{path}.limits")
    expires_at = r.timestamp(d.get("expires_at"), f"{path}.expires_at")
    if name is None or digest is None:
        return None
    return KeyConfig(name=name, key_sha256=digest, team=team, models=models, limits=limits,
                     expires_at=expires_at)


def _key_digest(r: Reader, d: dict[str, Any], path: str) -> str | None:
    import hashlib

    if ("key" in d) == ("key_sha256" in d):
        r.problem(path, "needs exactly one of key or key_sha256")
        return None
    if "key" in d:
        secret = r.secret(d["key"], f"{path}.key", required=True)
        return hashlib.sha256(secret.encode()).hexdigest() if secret else None
    digest = r.secret(d["key_sha256"], f"{path}.key_sha256", required=True)
    if digest is not None and not _SHA256_HEX.fullmatch(digest.lower()):
        r.problem(f"{path}.key_sha256", "must be 64 hexadecimal digits")
        return None
    return digest.lower() if digest else None


def _team(r: Reader, raw: Any, path: str) -> TeamConfig | None:
    d = r.mapping(raw, path, {"name", "models", "limits"})
    if d is None:
        return None
    name = r.string(d.get("name"), f"{path}.name", required=True)
    if name is None:
        return None
    return TeamConfig(name=name, models=_model_globs(r, d.get("models"), f"{path}.models"),
                      limits=_limits(r, d.get("limits"), f"{path}.limits"))


def _quotas(r: Reader, raw: Any, path: str) -> QuotasConfig:
    d = r.mapping(raw, path, {"on_store_error", "default_max_tokens", "store_timeout", "lease_ttl",
                              "key_directory_max_age"}, optional=True) or {}
    dflt = QuotasConfig()
    return QuotasConfig(
        on_store_error=r.choice(d.get("on_store_error", dflt.on_store_error),
                                f"{path}.on_store_error", ("fail_closed", "fail_open"))
        or dflt.on_store_error,
        default_max_tokens=r.integer(d.get("default_max_tokens", dflt.default_max_tokens),
                                     f"{path}.default_max_tokens", minimum=1),
        store_timeout=r.number(d.get("store_timeout", dflt.store_timeout), f"{path}.store_timeout",
                               minimum=0, exclusive=True),
        lease_ttl=r.number(d.get("lease_ttl", dflt.lease_ttl), f"{path}.lease_ttl", minimum=1),
        key_directory_max_age=r.number(d.get("key_directory_max_age", dflt.key_directory_max_age),
                                       f"{path}.key_directory_max_age", minimum=0, exclusive=True),
    )


def _server(r: Reader, raw: Any, path: str) -> ServerConfig:
    d = r.mapping(raw, path, {"max_body_bytes", "body_timeout", "header_timeout", "max_header_bytes",
                              "shutdown_delay", "shutdown_grace", "reload_interval", "admin_port", "send_timeout"},
                  optional=True) or {}
    dflt = ServerConfig()
    return ServerConfig(
        max_body_bytes=r.integer(d.get("max_body_bytes", dflt.max_body_bytes),
                                 f"{path}.max_body_bytes", minimum=1024),
        body_timeout=r.number(d.get("body_timeout", dflt.body_timeout), f"{path}.body_timeout",
                              minimum=0, exclusive=True),
        send_timeout=r.number(d.get("send_timeout", dflt.send_timeout), f"{path}.send_timeout",
                              minimum=0, exclusive=True),
        header_timeout=r.number(d.get("header_timeout", dflt.header_timeout), f"{path}.header_timeout",
                                minimum=0, exclusive=True),
        max_header_bytes=r.integer(d.get("max_header_bytes", dflt.max_header_bytes),
                                   f"{path}.max_header_bytes", minimum=1024),
        admin_port=r.optional_int(d.get("admin_port"), f"{path}.admin_port", minimum=1),
        **{n: r.number(d.get(n, getattr(dflt, n)), f"{path}.{n}", minimum=0)
           for n in ("shutdown_delay", "shutdown_grace", "reload_interval")},
    )


def utc_now() -> datetime:
    return datetime.now(UTC)


# --- Telemetry (what the environment says about metrics and tracing) --------


def telemetry_from_process_env() -> TelemetryConfig:
    return telemetry_from_env(os.environ)


def telemetry_from_env(environ: Mapping[str, str]) -> TelemetryConfig:
    endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return TelemetryConfig(otlp_endpoint=endpoint, sdk_disabled=disabled,
                           multiprocess_dir=environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
                           traces_exporter=environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
                           or "otlp")


ADMIN_KEY_ENV = "LLM_PROXY_ADMIN_KEY"


def admin_key_from_env() -> str | None:
    """The admin key for the CLI's admin commands, if the environment has one."""
    return os.environ.get(ADMIN_KEY_ENV) or None
