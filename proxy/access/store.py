"""The store behind quotas and issued keys: its interfaces, and the in-process store.

A ``Plan`` lists the limits that apply to one request (``Check``: whose, which
kind, how many). The store checks them all and, only when every one has room,
charges them all, in one atomic step. The Redis store does it in one Lua call
(``lua/reserve.lua``); ``MemoryQuotaStore`` here does the same in Python for a
single replica. Both follow these rules, and one test suite runs against both:

- ``rpm`` and ``tpm``: requests (one each) and tokens in 1-second buckets;
  the last 61 buckets are summed, so a use counts for 60 to 61 s. No 60-second
  span ever holds more than ``limit``; a check may deny for up to 1 s longer
  than an exact log would. The state is 61 numbers whatever the rate (a log
  held one entry per request: 240,000 for one key at 4,000 requests/s).
- ``concurrency``: leases that expire by themselves after ``lease_ttl``.
- ``day`` / ``month``: counters of UTC calendar windows.

An admitted reservation also leaves a *lease record* (its estimate and the
windows it charged) that lives as long as its lease. ``settle`` deletes it;
``release`` undoes exactly what the reservation charged if the record is still
there, for a reservation whose answer never reached the gateway (a store
timeout, a dropped connection), and then leaves a tombstone for the lease's
ttl. A reserve that finds its lease's record or tombstone charges nothing and
raises ``ServiceUnavailableError``: it is a re-sent call, or one that Redis ran
only after its release. So a release is harmless run twice, run for a
reservation never made, or run before the reservation it undoes.

A check has room when what the request adds (one request; for a token limit
its estimate, at least 1) fits within the limit, so a counter goes above its
limit only by usage that came out larger than its estimate. A token limit
that has no room says why (``Denial``): the estimate alone is larger than
the limit (``too_large``: it never fits); it would fit but for the estimates
of other requests still in flight (``in_flight``: they may settle lower, so
the request may retry soon); or settled usage leaves too little (``limit``).
For that, every token counter also keeps the estimates of its reservations
in flight, by the second their lease expires (for ``tpm``, no later than the
second their bucket leaves the window): a settle or a release takes an
estimate out again, and one whose lease expired without either stays charged
as settled usage.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from ..errors import ServiceUnavailableError

Kind = Literal["rpm", "tpm", "concurrency", "day", "month"]
KINDS: tuple[Kind, ...] = ("rpm", "tpm", "concurrency", "day", "month")
TOKEN_KINDS: tuple[Kind, ...] = ("tpm", "day", "month")
Denial = Literal["in_flight", "limit", "too_large"]  # why a check had no room, gravest last
DENIALS: tuple[Denial, ...] = ("in_flight", "limit", "too_large")  # reserve.lua's 1, 2, 3

WINDOW_MS = 60_000
BUCKET_MS = 1_000
BUCKETS = WINDOW_MS // BUCKET_MS  # rpm and tpm sum buckets b-BUCKETS..b, i.e. BUCKETS + 1 of them
DAY_MS = 86_400_000
UNKNOWN_RETRY_MS = 1_000  # concurrency: nobody knows when a lease comes back
AUDIT_MAX = 10_000


@dataclass(frozen=True)
class Check:
    subject: str  # "k:<key id>" or "t:<team>"
    kind: Kind
    limit: int


@dataclass(frozen=True)
class Plan:
    shard: str  # everything one request touches lives together (the Redis hash tag)
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class CheckState:
    used: int
    remaining: int
    reset_ms: int  # until the oldest counted bucket leaves (rpm/tpm), or the window ends


@dataclass(frozen=True)
class Admission:
    admitted: bool
    denied: int  # index of the check that denied (the one with room last); -1 when admitted
    retry_ms: int
    states: tuple[CheckState, ...]
    windows: tuple[int, ...]  # per check: where the estimate went; settle needs it back
    reason: Denial | None = None  # why the check that denied had no room; None when admitted


class QuotaStore(Protocol):
    """Every method returns within the store's timeout or raises ServiceUnavailableError."""

    async def reserve(self, plan: Plan, lease: str, estimate: int, lease_ttl_ms: int) -> Admission: ...

    async def settle(self, plan: Plan, lease: str, windows: tuple[int, ...], delta: int) -> None: ...

    async def release(self, plan: Plan, lease: str, lease_ttl_ms: int) -> bool:
        """Undo the reservation of ``lease`` if it was made and not settled; True if it undid one."""
        ...

    async def usage(self, plan: Plan) -> tuple[CheckState, ...]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


Record = Mapping[str, str]


@dataclass(frozen=True)
class Live:
    """The change feed is live: every change announced before ``since`` (``time.monotonic()``) has
    been yielded already, so a reader that applied them all is current as of then."""

    since: float


class Directory(Protocol):
    """Issued keys, admin-set teams and the audit log; flat string records.

    ``changes()`` yields the name of each changed record (``key:<id>``,
    ``team:<name>``) as writers announce it, ``""`` each time it has
    (re)subscribed, after which a reader should reload everything, and, from
    a remote store, a ``Live`` now and then while the feed is known to work.
    """

    async def put(self, kind: str, name: str, record: Record) -> None: ...

    async def get(self, kind: str, name: str) -> dict[str, str] | None: ...

    async def all(self, kind: str) -> list[dict[str, str]]: ...

    async def append_audit(self, entry: Record) -> None: ...

    async def audit(self, limit: int) -> list[dict[str, str]]: ...

    def changes(self) -> AsyncGenerator[str | Live, None]: ...

    async def close(self) -> None: ...


def month_window(now_ms: int) -> tuple[int, int]:
    """(year * 12 + month - 1, start of next month in ms) for a UTC instant."""
    moment = datetime.fromtimestamp(now_ms / 1000, UTC)
    index = moment.year * 12 + moment.month - 1
    year, month = divmod(index + 1, 12)
    return index, int(datetime(year, month + 1, 1, tzinfo=UTC).timestamp() * 1000)


def lease_seen() -> ServiceUnavailableError:
    """What a reserve raises for a lease id the store has seen already (see the module doc)."""
    return ServiceUnavailableError("The quota store is unavailable (reserve: lease already seen).",
                                   code="quota_store_unavailable")


@dataclass
class _Window:
    index: int
    used: int


@dataclass(frozen=True)
class _LeaseRecord:
    expires: int  # ms
    estimate: int = 0
    windows: tuple[int, ...] = ()
    released: bool = False  # a tombstone

    @property
    def second(self) -> int:
        """The lease's expiry in whole seconds, rounded up: where its estimate is held in flight."""
        return -(-self.expires // BUCKET_MS)


class MemoryQuotaStore:
    """The Redis store's rules in one process; valid for a single replica only.

    Each method runs without awaiting, so on one event loop it is atomic.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[str, dict[int, int]] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._windows: dict[str, _Window] = {}
        self._held: dict[str, dict[int, int]] = {}  # a token counter's estimates in flight, by second
        self._records: dict[str, _LeaseRecord] = {}
        self._next_sweep = 0

    def _now(self) -> int:
        return int(self._clock() * 1000)

    async def reserve(self, plan: Plan, lease: str, estimate: int, lease_ttl_ms: int) -> Admission:
        now = self._now()
        self._sweep(now)
        record = _lease_key(plan, lease)
        if self._record(record, now) is not None:
            raise lease_seen()
        keys = [_key(plan, c) for c in plan.checks]
        states = [self._state(k, c, now) for k, c in zip(keys, plan.checks, strict=True)]
        denied, reason, retry = -1, 0, 0
        for i, (check, state) in enumerate(zip(plan.checks, states, strict=True)):
            need = max(_amount(check.kind, estimate), 1)
            if state.used + need > check.limit:
                why, wait = self._denial(keys[i], check, state, need, now)
                if why > reason or (why == reason and wait > retry):
                    denied, reason, retry = i, why, wait
        if denied >= 0:
            return Admission(False, denied, max(retry, 1), tuple(states), (), DENIALS[reason - 1])
        windows = tuple(self._charge(k, c, now, lease, estimate, lease_ttl_ms)
                        for k, c in zip(keys, plan.checks, strict=True))
        made = self._records[record] = _LeaseRecord(now + lease_ttl_ms, estimate, windows)
        for key, check, window in zip(keys, plan.checks, windows, strict=True):
            self._hold(key, check.kind, window, made, estimate)
        after = tuple(self._state(k, c, now) for k, c in zip(keys, plan.checks, strict=True))
        return Admission(True, -1, 0, after, windows)

    def _denial(self, key: str, check: Check, state: CheckState, need: int, now: int) -> tuple[int, int]:
        """Why a check has no room for ``need`` (1-based in ``DENIALS``), and the retry for it."""
        if check.kind in TOKEN_KINDS:
            if 0 < check.limit < need:
                return DENIALS.index("too_large") + 1, 0
            if state.used - self._in_flight(key, check, now) + need <= check.limit:
                return DENIALS.index("in_flight") + 1, UNKNOWN_RETRY_MS  # nobody knows when they settle
        return DENIALS.index("limit") + 1, self._retry(key, check, state, need, now)

    def _in_flight(self, key: str, check: Check, now: int) -> int:
        """Tokens of a counter that reservations in flight hold; drops what no longer counts."""
        if check.kind != "tpm":
            counter = self._windows.get(key)
            if counter is None or counter.index != _calendar(check.kind, now)[0]:
                return 0
        held = self._held.get(key, {})
        for second in [s for s in held if s * BUCKET_MS <= now]:
            del held[second]
        return sum(held.values())

    def _hold(self, key: str, kind: Kind, window: int, record: _LeaseRecord, tokens: int) -> None:
        """Add ``tokens`` (or, negative, take them out) to a reservation's in-flight field."""
        if kind not in TOKEN_KINDS or not record.estimate:
            return
        second = min(record.second, window + BUCKETS + 1) if kind == "tpm" else record.second
        held = self._held.setdefault(key, {})
        left = held.get(second, 0) + tokens
        if left > 0:
            held[second] = left
        else:
            held.pop(second, None)

    async def settle(self, plan: Plan, lease: str, windows: tuple[int, ...], delta: int) -> None:
        now = self._now()
        record = self._record(_lease_key(plan, lease), now)
        self._records.pop(_lease_key(plan, lease), None)
        for check, window in zip(plan.checks, windows, strict=True):
            key = _key(plan, check)
            if record is not None and not record.released and self._current(key, check, window):
                self._hold(key, check.kind, window, record, -record.estimate)
            if check.kind == "concurrency":
                self._leases.get(key, {}).pop(lease, None)
            elif check.kind == "tpm" and delta:
                buckets = self._buckets.setdefault(key, {})
                current = now // BUCKET_MS
                # A late positive correction still counts, now; a late refund has nothing left to refund.
                target = window if window >= current - BUCKETS else (current if delta > 0 else None)
                if target is not None:
                    buckets[target] = max(0, buckets.get(target, 0) + delta)
            elif check.kind in ("day", "month") and delta:
                counter = self._windows.get(key)
                if counter is not None and counter.index == window:
                    counter.used = max(0, counter.used + delta)

    def _current(self, key: str, check: Check, window: int) -> bool:
        """Whether a day or month counter still counts ``window`` (other kinds: always)."""
        if check.kind not in ("day", "month"):
            return True
        counter = self._windows.get(key)
        return counter is not None and counter.index == window

    async def release(self, plan: Plan, lease: str, lease_ttl_ms: int) -> bool:
        now = self._now()
        key = _lease_key(plan, lease)
        record = self._record(key, now)
        undone = False
        if record is not None and not record.released:
            for check, window in zip(plan.checks, record.windows, strict=True):
                self._undo(_key(plan, check), check, lease, window, record)
            undone = True
        self._records[key] = _LeaseRecord(now + lease_ttl_ms, released=True)
        return undone

    def _undo(self, key: str, check: Check, lease: str, window: int, record: _LeaseRecord) -> None:
        if check.kind == "concurrency":
            self._leases.get(key, {}).pop(lease, None)
        elif check.kind in ("rpm", "tpm"):
            buckets = self._buckets.get(key, {})
            left = buckets.pop(window, 0) - _amount(check.kind, record.estimate)
            if left > 0:
                buckets[window] = left
            self._hold(key, check.kind, window, record, -record.estimate)
        elif self._current(key, check, window):
            counter = self._windows[key]
            counter.used = max(0, counter.used - record.estimate)
            self._hold(key, check.kind, window, record, -record.estimate)

    def _record(self, key: str, now: int) -> _LeaseRecord | None:
        record = self._records.get(key)
        if record is not None and record.expires <= now:
            del self._records[key]
            return None
        return record

    def _sweep(self, now: int) -> None:
        """Drop expired lease records (Redis expires them by itself), at most once a second."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + BUCKET_MS
        for key in [k for k, r in self._records.items() if r.expires <= now]:
            del self._records[key]

    async def usage(self, plan: Plan) -> tuple[CheckState, ...]:
        now = self._now()
        return tuple(self._state(_key(plan, c), c, now) for c in plan.checks)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _state(self, key: str, check: Check, now: int) -> CheckState:
        kind, limit = check.kind, check.limit
        if kind in ("rpm", "tpm"):
            counted = self._counted_buckets(key, now)
            oldest = next((b for b, n in counted if n > 0), None)
            reset = (oldest + BUCKETS + 1) * BUCKET_MS - now if oldest is not None else 0
            return _state(sum(n for _, n in counted), limit, reset)
        if kind == "concurrency":
            leases = self._leases.setdefault(key, {})
            for lease in [lease for lease, expiry in leases.items() if expiry <= now]:
                del leases[lease]
            return _state(len(leases), limit, 0)
        index, end = _calendar(kind, now)
        counter = self._windows.get(key)
        return _state(counter.used if counter and counter.index == index else 0, limit, end - now)

    def _counted_buckets(self, key: str, now: int) -> list[tuple[int, int]]:
        buckets = self._buckets.setdefault(key, {})
        oldest = now // BUCKET_MS - BUCKETS
        for stale in [b for b in buckets if b < oldest]:
            del buckets[stale]
        return sorted(buckets.items())

    def _retry(self, key: str, check: Check, state: CheckState, need: int, now: int) -> int:
        if check.kind in ("rpm", "tpm"):
            left = state.used
            for bucket, tokens in self._counted_buckets(key, now):
                left -= tokens
                if left + need <= check.limit:
                    return (bucket + BUCKETS + 1) * BUCKET_MS - now
            return WINDOW_MS
        if check.kind == "concurrency":
            return UNKNOWN_RETRY_MS
        return state.reset_ms

    def _charge(self, key: str, check: Check, now: int, lease: str, estimate: int, ttl_ms: int) -> int:
        if check.kind in ("rpm", "tpm"):
            bucket = now // BUCKET_MS
            amount = _amount(check.kind, estimate)
            if amount:  # no bucket at 0
                buckets = self._buckets[key]
                buckets[bucket] = buckets.get(bucket, 0) + amount
            return bucket
        if check.kind == "concurrency":
            self._leases[key][lease] = now + ttl_ms
            return 0
        index, _ = _calendar(check.kind, now)
        counter = self._windows.get(key)
        if counter is None or counter.index != index:
            counter = self._windows[key] = _Window(index, 0)
            self._held.pop(key, None)  # the last window's estimates in flight go with its count
        counter.used += estimate
        return index


def _amount(kind: Kind, estimate: int) -> int:
    """What a reservation charges a check: one request, or its estimate in tokens."""
    return 1 if kind in ("rpm", "concurrency") else estimate


def _key(plan: Plan, check: Check) -> str:
    return f"{plan.shard}|{check.subject}|{check.kind}"


def _lease_key(plan: Plan, lease: str) -> str:
    return f"{plan.shard}|lease|{lease}"


def _state(used: int, limit: int, reset_ms: int) -> CheckState:
    return CheckState(used, max(0, limit - used), max(0, reset_ms))


def _calendar(kind: Kind, now: int) -> tuple[int, int]:
    if kind == "day":
        day = now // DAY_MS
        return day, (day + 1) * DAY_MS
    return month_window(now)


class MemoryDirectory:
    """Records in process memory: issued keys last until the process ends."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, dict[str, str]]] = {}
        self._audit: deque[dict[str, str]] = deque(maxlen=AUDIT_MAX)
        self._listeners: set[asyncio.Queue[str]] = set()

    async def put(self, kind: str, name: str, record: Record) -> None:
        self._records.setdefault(kind, {})[name] = dict(record)
        for queue in self._listeners:
            queue.put_nowait(f"{kind}:{name}")

    async def get(self, kind: str, name: str) -> dict[str, str] | None:
        record = self._records.get(kind, {}).get(name)
        return dict(record) if record is not None else None

    async def all(self, kind: str) -> list[dict[str, str]]:
        return [dict(r) for r in self._records.get(kind, {}).values()]

    async def append_audit(self, entry: Record) -> None:
        self._audit.append(dict(entry))

    async def audit(self, limit: int) -> list[dict[str, str]]:
        return list(reversed(self._audit))[:limit]

    async def changes(self) -> AsyncGenerator[str, None]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            yield ""
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)

    async def close(self) -> None:
        return None

