"""Quotas: reserve a request's estimate against every limit of its key and team, then settle.

``QuotaService.reserve`` makes one store call that checks and charges all the
limits at once (see ``store.py`` for their exact rules); ``Reservation.settle``
makes one more that replaces the estimate with the actual usage and releases
the concurrency lease. A policy without limits costs no store call at all.

A reserve that fails after it was sent may still have been run by the store
(its answer came after ``store_timeout``, or the connection dropped after the
write): the request is refused or admitted uncounted, so a background
``release`` undoes that charge, if there is one (see ``store.py``), rather
than leave the estimate and the lease charged until ``lease_ttl``. It is
retried a few times while the store is failing; a release given up is logged
(``quota release failed``) and its lease expires by itself.

When the store fails, ``quotas.on_store_error`` decides: ``fail_closed``
answers 503, ``fail_open`` admits without counting. While the store is
failing, one request at a time probes it and the others do not wait, so an
outage slows nothing down and the first success puts the store back in use.
A background probe also pings the store every ``PROBE_INTERVAL`` until it
answers: an unready replica gets no traffic (Kubernetes takes it out of its
Service), so without it ``/readyz`` would never recover on its own.

``/readyz`` asks the store itself (``check_ready``): a replica without
traffic must not stay ready while its Redis is gone. A store call that
succeeded within ``READY_CHECK_EVERY`` answers for it; otherwise one PING,
bounded like every store call, answers every probe that arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..config.types import Config, Limits, QuotasConfig
from ..errors import Header, RateLimitError, ServiceUnavailableError
from .keys import KeyPolicy
from .store import Admission, Check, CheckState, Kind, MemoryQuotaStore, Plan, QuotaStore
from .store_redis import RedisQuotaStore

T = TypeVar("T")
PROBE_INTERVAL = 0.5  # seconds between background pings of a failing store
READY_CHECK_EVERY = 2.0  # seconds a store call's success answers /readyz without another PING
RELEASE_ATTEMPTS = 6  # a release that keeps failing is given up after these...
RELEASE_BACKOFF = 0.1  # ...with this wait before the second, doubled before each next (3.1 s in all)
MAX_CACHED_PLANS = 10_000
MAX_PENDING_RELEASES = 1000  # beyond this, a release is dropped (logged) and its lease expires by itself
_FIELDS: tuple[tuple[str, Kind], ...] = (
    ("rpm", "rpm"), ("tpm", "tpm"), ("concurrency", "concurrency"),
    ("tokens_per_day", "day"), ("tokens_per_month", "month"),
)
_TOKEN_KINDS = ("tpm", "day", "month")
_DESCRIPTIONS: dict[Kind, str] = {
    "rpm": "requests per min (RPM)", "tpm": "tokens per min (TPM)",
    "concurrency": "concurrent requests", "day": "tokens per day", "month": "tokens per month",
}
LIMIT_NAMES: dict[Kind, str] = {kind: name for name, kind in _FIELDS}


class StoreEvents(Protocol):
    def store_error(self, operation: str) -> None: ...

    def store_latency(self, operation: str, seconds: float) -> None: ...


class _NoEvents:
    def store_error(self, operation: str) -> None:
        return None

    def store_latency(self, operation: str, seconds: float) -> None:
        return None


@dataclass(frozen=True)
class Usage:
    """One limit's standing, for the admin API."""

    scope: str  # "key" | "team"
    limit: str  # the config name: rpm, tpm, concurrency, tokens_per_day, tokens_per_month
    value: int
    used: int
    remaining: int
    reset_seconds: float


class Reservation:
    """What ``reserve`` admitted; ``settle`` once when the request is over (later calls do nothing).

    ``async with reservation.charging(used):`` around what the request does with it settles it
    when the block ends, whatever ended it: with ``used()``, or with what ``charge_at_least`` last
    set when that is more.

    Kept for a request's whole life (a stream's too): a slotted object with just what settling
    needs, not a closure over the store's answer (bench/README.md, memory per open stream)."""

    __slots__ = ("_at_least", "_estimate", "_lease", "_plan", "_service", "_used", "_windows", "headers")
    _plan: Plan
    _lease: str
    _windows: tuple[int, ...]
    _estimate: int

    def __init__(self, headers: tuple[Header, ...] = ()) -> None:
        """Nothing to settle: no limits apply, or the store failed open."""
        self.headers = headers
        self._service: QuotaService | None = None
        self._used: Callable[[], int] = _nothing
        self._at_least = 0

    @classmethod
    def charged(cls, service: QuotaService, headers: tuple[Header, ...], plan: Plan, lease: str,
                windows: tuple[int, ...], estimate: int) -> Reservation:
        """A reservation the store charged: settling replaces ``estimate`` with the usage."""
        reservation = cls(headers)
        reservation._service = service
        reservation._plan, reservation._lease = plan, lease
        reservation._windows, reservation._estimate = windows, estimate
        return reservation

    def charging(self, used: Callable[[], int]) -> Reservation:
        """For ``async with``: settle at the block's end with ``used()``, what the request recorded."""
        self._used = used
        return self

    def charge_at_least(self, tokens: int) -> None:
        """The least the settle charges from now on, whatever was recorded."""
        self._at_least = tokens

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.settle(max(self._used(), self._at_least))

    async def settle(self, used_tokens: int) -> None:
        service, self._service = self._service, None
        if service is not None:
            # Shielded: a cancelled request must still give its lease back.
            await asyncio.shield(service._settle(self._plan, self._lease, self._windows,
                                                 max(0, used_tokens) - self._estimate))


def _nothing() -> int:
    return 0


def plan_for(policy: KeyPolicy, *, team: bool = True) -> Plan | None:
    """The checks that apply to a key (and, with ``team``, to its team); None when there are none."""
    checks = _checks("k:" + policy.id, policy.limits)
    if team and policy.team is not None and policy.team_limits is not None:
        checks += _checks("t:" + policy.team, policy.team_limits)
    return Plan(_shard(policy.team, policy.id), tuple(checks)) if checks else None


def team_plan(name: str, limits: Limits) -> Plan | None:
    checks = _checks("t:" + name, limits)
    return Plan(_shard(name, ""), tuple(checks)) if checks else None


def _shard(team: str | None, key_id: str) -> str:
    # Tagged by team so a key's counters and its team's share one Redis Cluster slot.
    return f"t:{team}" if team is not None else f"k:{key_id}"


def _checks(subject: str, limits: Limits) -> list[Check]:
    return [Check(subject, kind, value) for name, kind in _FIELDS
            if (value := getattr(limits, name)) is not None]


class QuotaService:
    def __init__(self, store: QuotaStore, settings: QuotasConfig, events: StoreEvents | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._store = store
        self._settings = settings
        self._events: StoreEvents = events or _NoEvents()
        self._log = logger or logging.getLogger("llm_proxy.quotas")
        self._healthy = True
        self._answered = -math.inf  # time.perf_counter() of the store's last answer
        self._probing = False
        self._prober: asyncio.Task[None] | None = None
        self._ready_check: asyncio.Task[bool] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._plans: dict[str, tuple[KeyPolicy, tuple[Plan, RateHeaders] | None]] = {}
        self._closing = False

    async def reserve(self, policy: KeyPolicy, estimate_tokens: int) -> Reservation:
        planned = self._plan(policy)
        if planned is None:
            return Reservation()
        plan, rate_headers = planned
        lease = secrets.token_hex(8)
        estimate = max(0, estimate_tokens)
        sent = False

        def call() -> Awaitable[Admission]:
            nonlocal sent
            sent = True
            return self._store.reserve(plan, lease, estimate, self._lease_ttl_ms())

        try:
            admission = await self._call("reserve", call, probe=True)
        except ServiceUnavailableError:
            if sent:  # the store may have run it all the same
                self._release_later(plan, lease)
            if self._settings.on_store_error == "fail_open":
                return Reservation()
            raise
        except asyncio.CancelledError:
            if sent:
                self._release_later(plan, lease)
            raise
        headers = rate_headers(admission.states)
        if not admission.admitted:
            raise denial(policy, plan, admission, headers, estimate)

        return Reservation.charged(self, headers, plan, lease, admission.windows, estimate)

    async def _settle(self, plan: Plan, lease: str, windows: tuple[int, ...], delta: int) -> None:
        try:
            await self._call("settle", lambda: self._store.settle(plan, lease, windows, delta), probe=False)
        except ServiceUnavailableError as exc:
            # The lease expires by itself (lease_ttl) and the estimate stays charged.
            self._log.warning("quota settle failed: %s", exc.message)

    def _plan(self, policy: KeyPolicy) -> tuple[Plan, RateHeaders] | None:
        # Policies are frozen and long-lived (config, issued-key cache): the same object
        # gets the same plan. A changed policy is a new object and gets a new one.
        hit = self._plans.get(policy.id)
        if hit is not None and hit[0] is policy:
            return hit[1]
        if len(self._plans) >= MAX_CACHED_PLANS:
            self._plans.clear()
        plan = plan_for(policy)
        planned = (plan, RateHeaders.of(plan)) if plan is not None else None
        self._plans[policy.id] = (policy, planned)
        return planned

    def _lease_ttl_ms(self) -> int:
        return int(self._settings.lease_ttl * 1000)

    def _release_later(self, plan: Plan, lease: str) -> None:
        """Undo a reservation whose answer was lost, in the background (the request does not wait)."""
        if len(self._releases) >= MAX_PENDING_RELEASES:
            self._log.warning("quota release failed: %d releases pending already; the lease expires "
                              "by itself (lease_ttl)", len(self._releases))
            return
        task = asyncio.get_running_loop().create_task(self._release(plan, lease))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, plan: Plan, lease: str) -> None:
        wait = RELEASE_BACKOFF
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                await self._call("release", lambda: self._store.release(plan, lease, self._lease_ttl_ms()),
                                 probe=False)
                return
            except ServiceUnavailableError as exc:
                if attempt == RELEASE_ATTEMPTS or self._closing:
                    self._log.warning("quota release failed: %s; the lease expires by itself (lease_ttl)",
                                      exc.message)
                    return
            await asyncio.sleep(wait)
            wait *= 2

    async def key_usage(self, policy: KeyPolicy) -> list[Usage]:
        """The key's own limits (not its team's), read without charging anything."""
        return await self._usage(plan_for(policy, team=False), "key")

    async def team_usage(self, name: str, limits: Limits) -> list[Usage]:
        return await self._usage(team_plan(name, limits), "team")

    async def _usage(self, plan: Plan | None, scope: str) -> list[Usage]:
        if plan is None:
            return []
        states = await self._call("usage", lambda: self._store.usage(plan), probe=True)
        return [Usage(scope, LIMIT_NAMES[c.kind], c.limit, s.used, s.remaining, s.reset_ms / 1000)
                for c, s in zip(plan.checks, states, strict=True)]

    async def _call(self, operation: str, make: Callable[[], Awaitable[T]], *, probe: bool) -> T:
        owns_probe = False
        if probe and not self._healthy:
            if self._probing:
                self._events.store_error(operation)
                raise ServiceUnavailableError("The quota store is unavailable.",
                                              code="quota_store_unavailable")
            self._probing = owns_probe = True
        started = time.perf_counter()
        try:
            result = await make()
        except ServiceUnavailableError:
            self._failed(operation)
            raise
        finally:
            if owns_probe:
                self._probing = False
        self._healthy = True
        self._answered = time.perf_counter()
        self._events.store_latency(operation, self._answered - started)
        return result

    def _failed(self, operation: str) -> None:
        self._healthy = False
        self._events.store_error(operation)
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        while not self._healthy:
            await asyncio.sleep(PROBE_INTERVAL)
            if self._healthy or self._probing:
                continue  # a request is probing already
            self._probing = True
            try:
                await self._store.ping()
            except ServiceUnavailableError:
                self._events.store_error("probe")
                continue
            finally:
                self._probing = False
            self._healthy = True
            self._answered = time.perf_counter()
            self._log.info("quota store reachable again")

    def ready(self) -> bool:
        """Readiness as last seen, without asking the store (``check_ready`` asks it)."""
        return self._healthy or self._settings.on_store_error == "fail_open"

    async def check_ready(self) -> bool:
        """``/readyz``: whether the store answers now (fail_open: always ready)."""
        if self._settings.on_store_error == "fail_open":
            return True
        if not self._healthy or time.perf_counter() - self._answered < READY_CHECK_EVERY:
            return self._healthy  # a failing store is pinged by the background probe already
        if self._ready_check is None or self._ready_check.done():
            self._ready_check = asyncio.get_running_loop().create_task(self._ping_for_readiness())
        # Shielded: a probe that gives up must not cancel the PING that other probes await.
        return await asyncio.shield(self._ready_check)

    async def _ping_for_readiness(self) -> bool:
        try:
            await self._call("ping", self._store.ping, probe=False)
        except ServiceUnavailableError:
            return False
        return True

    def store_healthy(self) -> bool:
        return self._healthy

    async def close(self) -> None:
        self._closing = True
        if self._releases:  # an attempt under way may finish (one store timeout); none is retried
            await asyncio.wait(set(self._releases), timeout=self._settings.store_timeout)
        pending = [*self._releases, *(task for task in (self._prober, self._ready_check) if task is not None)]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._store.close()


@dataclass(frozen=True, slots=True)
class _HeaderGroup:
    """One family of x-ratelimit-* headers: its names, and the checks it may report."""

    names: tuple[bytes, bytes, bytes]  # limit, remaining, reset
    checks: tuple[int, ...]  # indices into the plan's checks
    limits: tuple[bytes, ...]  # their limits, as sent


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """OpenAI's x-ratelimit-* headers of one plan: from its tightest rpm and its tightest token
    limit. Built once per plan (the names and limits never change), filled per request."""

    groups: tuple[_HeaderGroup, ...]

    @classmethod
    def of(cls, plan: Plan) -> RateHeaders:
        groups = []
        for suffix, kinds in (("requests", ("rpm",)), ("tokens", _TOKEN_KINDS)):
            indices = tuple(i for i, c in enumerate(plan.checks) if c.kind in kinds)
            if indices:
                names = tuple(f"x-ratelimit-{n}-{suffix}".encode() for n in ("limit", "remaining", "reset"))
                limits = tuple(str(plan.checks[i].limit).encode() for i in indices)
                groups.append(_HeaderGroup(names, indices, limits))  # type: ignore[arg-type]
        return cls(tuple(groups))

    def __call__(self, states: tuple[CheckState, ...]) -> tuple[Header, ...]:
        headers: list[Header] = []
        for group in self.groups:
            tightest = 0
            for n, i in enumerate(group.checks[1:], 1):
                if states[i].remaining < states[group.checks[tightest]].remaining:
                    tightest = n
            state = states[group.checks[tightest]]
            limit, remaining, reset = group.names
            headers += ((limit, group.limits[tightest]), (remaining, b"%d" % state.remaining),
                        (reset, duration(state.reset_ms).encode()))
        return tuple(headers)


def denial(policy: KeyPolicy, plan: Plan, admission: Admission, headers: tuple[Header, ...],
           estimate: int) -> RateLimitError:
    check, state = plan.checks[admission.denied], admission.states[admission.denied]
    owner = f"team '{policy.team}'" if check.subject.startswith("t:") else f"key '{policy.name}'"
    what, limit = _DESCRIPTIONS[check.kind], LIMIT_NAMES[check.kind]
    if admission.reason == "too_large":
        # No wait makes it fit: the request must change, and the SDKs must not retry it.
        return RateLimitError(
            f"Request too large for {owner} on {what}: Limit {check.limit}, Requested {estimate}. "
            f"The request may use up to {estimate} tokens (its prompt, plus max_tokens for each of its "
            f"n choices); lower max_tokens or n, or shorten the prompt.",
            limit_type="tokens", code="estimate_exceeds_limit", limit=limit,
            headers=[(b"x-should-retry", b"false"), *headers])
    wait = duration(admission.retry_ms)
    retry = [(b"retry-after", str(retry_seconds(admission.retry_ms)).encode()),
             (b"retry-after-ms", str(max(admission.retry_ms, 1)).encode())]
    if admission.reason == "in_flight":
        return RateLimitError(
            f"Rate limit reached for {owner} on {what}: Limit {check.limit}, Used {state.used}, "
            f"Requested {estimate}. Requests still in flight hold part of it and may settle lower. "
            f"Please try again in {wait}.", limit_type="tokens", limit=limit,
            headers=[*retry, (b"x-should-retry", b"true"), *headers])
    if check.kind in ("day", "month"):
        # Settled usage leaves too little: retrying within seconds cannot help; tell the SDKs not to.
        spent = (f"You exceeded the {what} budget of {owner}: Limit {check.limit}, Used {state.used}. "
                 f"It resets in {wait}." if state.used >= check.limit else
                 f"The {what} budget of {owner} has less left than this request may use: Limit "
                 f"{check.limit}, Used {state.used}, Requested {estimate}. It resets in {wait}; a lower "
                 f"max_tokens may fit what is left.")
        return RateLimitError(spent, limit_type="tokens", code="insufficient_quota", limit=limit,
                              headers=[*retry, (b"x-should-retry", b"false"), *headers])
    requested = 1 if check.kind in ("rpm", "concurrency") else estimate
    return RateLimitError(
        f"Rate limit reached for {owner} on {what}: Limit {check.limit}, Used {state.used}, "
        f"Requested {requested}. Please try again in {wait}.",
        limit_type="tokens" if check.kind == "tpm" else "requests", limit=limit,
        headers=[*retry, *headers])


def retry_seconds(retry_ms: int) -> int:
    """Whole seconds for ``Retry-After``: rounded up, at least 1."""
    return max(1, -(-retry_ms // 1000))


def duration(ms: int) -> str:
    """OpenAI's reset format: ``120ms``, ``1s``, ``1.5s``, ``6m0s``, ``2h0m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def build_quota_service(config: Config, events: StoreEvents | None = None,
                        logger: logging.Logger | None = None) -> QuotaService:
    """Redis when ``redis_url`` is set; otherwise an in-process store valid for one replica only."""
    log = logger or logging.getLogger("llm_proxy.quotas")
    store: QuotaStore
    if config.redis_url:
        store = RedisQuotaStore.from_url(config.redis_url, config.quotas.store_timeout)
    else:
        log.warning("no redis_url: quotas are kept in this process, valid for ONE replica only")
        store = MemoryQuotaStore()
    return QuotaService(store, config.quotas, events, log)
