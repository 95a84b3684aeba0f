"""The config's typed, frozen model (parsed and validated in ``config``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Literal

Provider = Literal["openai", "azure", "mock"]
Strategy = Literal["round_robin", "weighted", "least_requests", "latency"]
StoreErrorMode = Literal["fail_closed", "fail_open"]

PROVIDERS: tuple[Provider, ...] = ("openai", "azure", "mock")
STRATEGIES: tuple[Strategy, ...] = ("round_robin", "weighted", "least_requests", "latency")


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``first_byte`` covers headers and the first body chunk."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True)
class MockSettings:
    """Behaviour of the built-in ``mock`` provider (demo and tests)."""

    latency: float = 0.0  # seconds before the first byte
    tokens_per_second: float = 0.0  # 0: as fast as possible
    completion_tokens: int = 16  # generated when the request sets no max_tokens


@dataclass(frozen=True)
class HealthCheck:
    """Optional active check: ``GET {base_url}/models``, never a paid completion."""

    interval: float = 10.0
    timeout: float = 3.0
    unhealthy_threshold: int = 2  # consecutive failed checks that eject


@dataclass(frozen=True)
class ForwardProxy:
    """The HTTP forward proxy one upstream's connections go through.

    ``url`` names it without credentials (logs, spans, errors show that);
    ``authorization`` is the ``Proxy-Authorization`` value built from the
    URL's user and password, never shown."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)
    source: str = "proxy"  # where it came from: the upstream's ``proxy`` or an environment variable's name

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards an https upstream; the files are PEM. Without ``ca_file`` the
    system's CAs (and ``SSL_CERT_FILE``) are trusted."""

    ca_file: str | None = None
    cert_file: str | None = None  # a client certificate, for servers that ask for one (mTLS)
    key_file: str | None = None  # its private key, unless cert_file holds it too
    verify: bool = True


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    models: Mapping[str, str]  # public model name → the upstream's own name
    provider: Provider = "openai"
    api_key: str | None = field(default=None, repr=False)
    api_version: str | None = None
    weight: float = 1.0
    priority: int = 0
    max_concurrency: int | None = None
    timeout: Timeouts = Timeouts()
    mock: MockSettings = MockSettings()
    health_check: HealthCheck | None = None
    proxy: ForwardProxy | None = None  # the effective one: ``proxy``, else the environment's, NO_PROXY applied
    tls: TlsSettings = TlsSettings()


@dataclass(frozen=True)
class RoutingConfig:
    strategy: Strategy = "least_requests"
    max_attempts: int = 3
    deadline: float = 120.0
    retry_budget: float = 0.2  # retries may add at most this fraction of requests...
    min_retries_per_second: float = 5.0  # ...plus this floor, so a quiet gateway can still retry
    wait_for_cooldown: bool = False  # all cooling down: wait for the first to recover, within the deadline


@dataclass(frozen=True)
class HealthConfig:
    """Passive health (circuit breaker) policy; see upstreams/health.py for the states."""

    failure_threshold: int = 5
    base_ejection: float = 5.0
    max_ejection: float = 300.0
    credentials_recheck: float = 60.0
    max_cooldown: float = 3600.0


# The largest output of the common chat models (gpt-4o, gpt-4o-mini): a request cannot get more
# than its model writes, so no larger max_tokens is worth reserving for a model not configured.
DEFAULT_MAX_OUTPUT_TOKENS = 16384


@dataclass(frozen=True)
class ModelConfig:
    fallbacks: tuple[str, ...] = ()
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS  # bounds the completion part of the quota estimate


@dataclass(frozen=True)
class Limits:
    """``None`` means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.concurrency,
                                            self.tokens_per_day, self.tokens_per_month))


@dataclass(frozen=True)
class KeyConfig:
    """A static key from the config; only its SHA-256 is kept."""

    name: str
    key_sha256: str = field(repr=False)
    team: str | None = None
    models: tuple[str, ...] | None = None
    limits: Limits = Limits()
    expires_at: datetime | None = None


@dataclass(frozen=True)
class TeamConfig:
    name: str
    models: tuple[str, ...] | None = None
    limits: Limits = Limits()


@dataclass(frozen=True)
class QuotasConfig:
    on_store_error: StoreErrorMode = "fail_closed"
    default_max_tokens: int = 4096  # estimate when a request sets no max_tokens
    store_timeout: float = 0.25  # seconds for any one store call
    lease_ttl: float = 900.0  # a concurrency lease expires after this if never released
    # Issued keys whose copy on this replica was not confirmed against the directory (Redis)
    # for longer than this follow on_store_error: a revocation this replica missed ends here.
    key_directory_max_age: float = 30.0


@dataclass(frozen=True)
class ServerConfig:
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout: float = 30.0  # a client must deliver its whole body within this (slow-body defence)
    send_timeout: float = 60.0  # a client must take a finished answer within this, or the connection is reset
    header_timeout: float = 10.0  # request line + headers within this of the connection or request starting (408)
    max_header_bytes: int = 64 * 1024  # request line and headers together; larger blocks get 431
    shutdown_delay: float = 5.0  # after SIGTERM: not ready, still serving
    shutdown_grace: float = 30.0  # then: in-flight requests and streams may finish for this long
    reload_interval: float = 2.0  # seconds between config file checks; 0: only on SIGHUP
    admin_port: int | None = None  # serve /admin/* only on this port (and nothing else there)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    access_log: bool = True  # one line per request
    access_format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class Config:
    upstreams: tuple[UpstreamConfig, ...]
    routing: RoutingConfig = RoutingConfig()
    keys: tuple[KeyConfig, ...] = ()
    teams: tuple[TeamConfig, ...] = ()
    quotas: QuotasConfig = QuotasConfig()
    server: ServerConfig = ServerConfig()
    health: HealthConfig = HealthConfig()
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))
    pricing: Mapping[str, ModelPrice] = field(default_factory=lambda: MappingProxyType({}))
    logging: LoggingConfig = LoggingConfig()
    redis_url: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)

    def public_models(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for upstream in self.upstreams:
            seen.update(dict.fromkeys(upstream.models))
        return tuple(seen)

    def team(self, name: str | None) -> TeamConfig | None:
        return next((t for t in self.teams if t.name == name), None)



@dataclass(frozen=True)
class ModelPrice:
    """Estimated price of one model, in USD per million tokens."""

    input: float
    output: float


@dataclass(frozen=True)
class TelemetryConfig:
    """Only whether things are set; the OTel SDK reads the other ``OTEL_*`` itself."""

    otlp_endpoint: str | None = None  # the traces endpoint, or the general one
    sdk_disabled: bool = False
    multiprocess_dir: str | None = None  # several gateway processes reporting as one target
    traces_exporter: str = "otlp"  # OTEL_TRACES_EXPORTER; "none" turns tracing off

    @property
    def tracing(self) -> bool:
        return self.otlp_endpoint is not None and not self.sdk_disabled and self.traces_exporter != "none"
