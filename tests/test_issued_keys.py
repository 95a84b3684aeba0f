"""Issued keys: the cache and its rules without sockets, then two replicas sharing a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest

from proxy.access.issued_keys import (
    IssuedKey,
    IssuedKeys,
    KeySpec,
    apply_changes,
    parse_key_spec,
    parse_overlap,
    parse_team,
)
from proxy.access.keys import Authenticator, StaticKeys, hash_key
from proxy.access.store import Directory, MemoryDirectory
from proxy.access.store_redis import RedisDirectory
from proxy.config.loader import parse_config
from proxy.config.types import Limits, TeamConfig
from proxy.errors import AuthenticationError, InvalidRequestError, NotFoundError
from proxy.io.redis_client import connect
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)
CONFIG = parse_config("""
upstreams: [{name: a, base_url: "http://a/v1", models: [gpt-4o, gpt-4o-mini]}]
keys: [{name: ci, key: sk-static, team: team-a}]
teams: [{name: team-a, models: ["gpt-4o*"], limits: {rpm: 50}}]
""", {})


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def eventually(check: Callable[[], bool], within: float = 2.0) -> float:
    """Seconds until ``check()`` held; fails after ``within``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, "not within the time allowed"
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def bearer(secret: str) -> bytes:
    return f"Bearer {secret}".encode()


@pytest.fixture(params=["memory", "redis"])
async def directory(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Directory]]:
    """A factory of directory handles that all share one store (one per replica)."""
    shared = MemoryDirectory()
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    def make() -> Directory:
        return RedisDirectory(connect(url, 1.0), 1.0) if url else shared

    yield make


@pytest.fixture
async def replicas(directory: Callable[[], Directory]) -> AsyncIterator[Callable[..., IssuedKeys]]:
    started: list[IssuedKeys] = []

    async def start(clock: Clock | None = None, refresh_interval: float = 30.0) -> IssuedKeys:
        keys = IssuedKeys(directory(), refresh_interval=refresh_interval, clock=clock or Clock())
        await keys.start()
        started.append(keys)
        return keys

    yield start  # type: ignore[misc]
    for keys in started:
        await keys.close()


async def test_created_key_authenticates_with_only_its_hash_stored(
        replicas: Callable[..., IssuedKeys], directory: Callable[[], Directory]) -> None:
    keys = await replicas()  # type: ignore[misc]
    key, secret = await keys.create(KeySpec(name="svc", team="team-a", limits=Limits(rpm=5)), "tester")
    assert secret.startswith(f"sk-{key.id}-") and len(secret) > 50
    stored = await directory().get("key", key.id)
    assert stored is not None and secret not in str(stored) and stored["secret_sha256"] == hash_key(secret)
    auth = Authenticator(StaticKeys(CONFIG), keys)
    policy = await auth.authenticate(bearer(secret))
    assert (policy.id, policy.name, policy.limits.rpm) == (key.id, "svc", 5)
    assert policy.team_limits == Limits(rpm=50) and policy.team_models == ("gpt-4o*",)  # from the config
    assert (await auth.authenticate(b"Bearer sk-static")).name == "ci"


async def test_revocation_reaches_another_replica_at_once(replicas: Callable[..., IssuedKeys]) -> None:
    one, two = await replicas(), await replicas()  # type: ignore[misc]
    key, secret = await one.create(KeySpec(name="svc"), "tester")
    digest = hash_key(secret)
    await eventually(lambda: two.find(digest) is not None)
    await one.revoke(key.id, "tester")
    assert one.find(digest) is None  # the replica that revoked: at once
    assert await eventually(lambda: two.find(digest) is None) < 0.5
    with pytest.raises(AuthenticationError):
        await Authenticator(StaticKeys(CONFIG), two).authenticate(bearer(secret))


async def test_rotation_keeps_the_old_secret_for_the_overlap(replicas: Callable[..., IssuedKeys]) -> None:
    clock = Clock()
    keys = await replicas(clock)  # type: ignore[misc]
    key, old = await keys.create(KeySpec(name="svc"), "tester")
    rotated, new = await keys.rotate(key.id, timedelta(hours=1), "tester")
    assert new != old and rotated.previous_until == clock.now + timedelta(hours=1)
    assert keys.find(hash_key(old)) is not None and keys.find(hash_key(new)) is not None
    clock.now += timedelta(minutes=59)
    assert keys.find(hash_key(old)) is not None
    clock.now += timedelta(minutes=1)
    assert keys.find(hash_key(old)) is None and keys.find(hash_key(new)) is not None
    _, newest = await keys.rotate(key.id, timedelta(0), "tester")
    assert keys.find(hash_key(new)) is None and keys.find(hash_key(newest)) is not None


async def test_expired_key_is_refused(replicas: Callable[..., IssuedKeys]) -> None:
    keys = await replicas()  # type: ignore[misc]
    _, secret = await keys.create(KeySpec(name="old", expires_at=datetime(2020, 1, 1, tzinfo=UTC)), "t")
    with pytest.raises(AuthenticationError) as err:
        await Authenticator(StaticKeys(CONFIG), keys).authenticate(bearer(secret))
    assert err.value.code == "expired_api_key"


async def test_update_and_team_override_reach_policies(replicas: Callable[..., IssuedKeys]) -> None:
    one, two = await replicas(), await replicas()  # type: ignore[misc]
    key, secret = await one.create(KeySpec(name="svc", team="team-a", limits=Limits(rpm=5, tpm=100)), "t")
    await one.update(key.id, {"limits": {"rpm": 7, "tpm": None}, "models": ["gpt-4o-mini"]}, "t")
    await one.put_team(TeamConfig("team-a", None, Limits(rpm=9)), "t")
    auth = Authenticator(StaticKeys(CONFIG), two)

    def current() -> bool:
        policy = two.find(hash_key(secret))
        team = two.team("team-a")
        return policy is not None and policy.limits.rpm == 7 and team is not None
    await eventually(current)
    policy = await auth.authenticate(bearer(secret))
    assert policy.limits == Limits(rpm=7) and policy.models == ("gpt-4o-mini",)
    assert policy.team_limits == Limits(rpm=9) and policy.team_models is None  # admin-set beats config
    static = await auth.authenticate(b"Bearer sk-static")
    assert static.team_limits == Limits(rpm=9)


async def test_a_new_replica_loads_everything(replicas: Callable[..., IssuedKeys]) -> None:
    one = await replicas()  # type: ignore[misc]
    secrets = [(await one.create(KeySpec(name=f"k{i}"), "t"))[1] for i in range(5)]
    late = await replicas()  # type: ignore[misc]
    assert all(late.find(hash_key(s)) is not None for s in secrets)
    assert sorted(k.name for k in await late.keys()) == [f"k{i}" for i in range(5)]


async def test_audit_records_who_did_what_without_secrets(replicas: Callable[..., IssuedKeys]) -> None:
    keys = await replicas()  # type: ignore[misc]
    key, secret = await keys.create(KeySpec(name="svc", team="t"), "alice@10.0.0.1")
    _, new = await keys.rotate(key.id, timedelta(hours=1), "bob")
    await keys.revoke(key.id, "carol")
    entries = await keys.audit(10)
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("key.revoke", "carol", key.id), ("key.rotate", "bob", key.id), ("key.create", "alice@10.0.0.1", key.id)]
    assert all(e["at"].endswith("Z") for e in entries)
    assert secret not in str(entries) and new not in str(entries)


async def test_unknown_key_is_not_found(replicas: Callable[..., IssuedKeys]) -> None:
    keys = await replicas()  # type: ignore[misc]
    with pytest.raises(NotFoundError):
        await keys.revoke("key_missing", "t")


def test_an_older_snapshot_never_overwrites_a_newer_change() -> None:
    keys = IssuedKeys(MemoryDirectory())
    base = IssuedKey(id="key_1", name="n", team=None, models=None, limits=Limits(), expires_at=None,
                     metadata={}, secret_sha256="a" * 64, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    revoked = IssuedKey(**{**base.__dict__, "revoked_at": base.created_at, "rev": 2})
    keys._apply(revoked)
    keys._apply(base)  # a stale echo
    assert keys.find("a" * 64) is None


def test_records_round_trip() -> None:
    key = IssuedKey(id="key_1", name="n", team="t", models=("a*",), limits=Limits(rpm=1, tokens_per_month=9),
                    expires_at=datetime(2027, 1, 1, tzinfo=UTC), metadata={"owner": "x"},
                    secret_sha256="b" * 64, created_at=datetime(2026, 1, 1, tzinfo=UTC),
                    previous_sha256="c" * 64, previous_until=datetime(2026, 1, 2, tzinfo=UTC), rev=3)
    assert IssuedKey.from_record(key.record()) == key
    assert "b" * 64 not in str(key.public()) and "secret" not in str(key.public()).replace("previous_secret", "")


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("body", "param"), [
    ({}, "name"), ({"name": ""}, "name"), ({"name": "x", "limits": {"rpm": -1}}, "limits.rpm"),
    ({"name": "x", "limits": {"rps": 1}}, "rps"), ({"name": "x", "models": "gpt-4o"}, "models"),
    ({"name": "x", "expires_at": "tomorrow"}, "expires_at"), ({"name": "x", "metadata": [1]}, "metadata"),
    ({"name": "x", "secret": "mine"}, "secret"), ({"name": "x", "limits": {"tpm": True}}, "limits.tpm"),
    ({"name": "x", "metadata": {"a": "b" * 5000}}, "metadata"),
    ({"name": "x", "metadata": {"deep": _nested(300)}}, "metadata"),
])
def test_invalid_specs_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_key_spec(body)
    assert err.value.param == param and err.value.status == 400


@pytest.mark.parametrize("value", [-1, 1e12, float("nan"), True, "60"])
def test_an_overlap_out_of_range_is_a_400(value: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_overlap(value)
    assert err.value.param == "overlap_seconds" and err.value.status == 400


def test_an_overlap_within_a_year_is_taken() -> None:
    assert parse_overlap(None) == timedelta(hours=24)
    assert parse_overlap(0) == timedelta(0)
    assert parse_overlap(365 * 86400) == timedelta(days=365)


def test_patch_merges_limits_and_team_body_is_checked() -> None:
    key = IssuedKey(id="key_1", name="n", team=None, models=None, limits=Limits(rpm=1, tpm=2), expires_at=None,
                    metadata={}, secret_sha256="a" * 64, created_at=datetime(2026, 1, 1, tzinfo=UTC))
    changed = apply_changes(key, {"limits": {"tpm": None, "concurrency": 3}, "expires_at": "2027-01-01T00:00:00Z"})
    assert changed.limits == Limits(rpm=1, concurrency=3)
    assert changed.expires_at == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequestError):
        apply_changes(key, {"team": "other"})
    assert parse_team("t", {"limits": {"rpm": 3}}) == TeamConfig("t", None, Limits(rpm=3))
    with pytest.raises(InvalidRequestError):
        parse_team("t", {"name": "u"})


async def test_redis_restart_is_survived_by_the_follower(redis_server: RedisServer) -> None:  # noqa: F811
    one = IssuedKeys(RedisDirectory(connect(redis_server.url, 1.0), 1.0))
    two = IssuedKeys(RedisDirectory(connect(redis_server.url, 1.0), 1.0))
    await one.start()
    await two.start()
    try:
        redis_server.restart()  # empty: nothing was persisted
        key, secret = None, ""
        deadline = time.monotonic() + 5
        while key is None:
            try:
                key, secret = await one.create(KeySpec(name="after"), "t")
            except Exception:  # noqa: BLE001 - any failure while Redis comes back; retried within a bound
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        await eventually(lambda: two.find(hash_key(secret)) is not None, within=8)
        await one.revoke(key.id, "t")
        await eventually(lambda: two.find(hash_key(secret)) is None, within=2)
    finally:
        await one.close()
        await two.close()
