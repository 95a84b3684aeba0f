"""The admin API over HTTP (ASGI, in process) with two replicas sharing one real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import httpx
import pytest
from starlette.applications import Starlette

from proxy.access.issued_keys import IssuedKeys
from proxy.access.keys import Authenticator, StaticKeys
from proxy.access.quotas import QuotaService
from proxy.access.store_redis import RedisDirectory, RedisQuotaStore
from proxy.admin.api import AdminContext, admin_routes
from proxy.config.loader import parse_config
from proxy.config.types import Config, QuotasConfig
from proxy.errors import AuthenticationError
from proxy.io.redis_client import connect
from tests.redis_fixtures import RedisServer, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ADMIN = "admin-secret-123"
CONFIG = parse_config(f"""
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: "http://a/v1", models: [gpt-4o, gpt-4o-mini]}}]
teams: [{{name: team-a, limits: {{rpm: 50}}}}]
""", {})
AUTH = {"authorization": f"Bearer {ADMIN}"}


@dataclass
class Replica:
    http: httpx.AsyncClient
    keys: IssuedKeys
    quotas: QuotaService
    auth: Authenticator


async def start_replica(url: str, config: Config) -> Replica:
    keys = IssuedKeys(RedisDirectory(connect(url, 1.0), 1.0))
    await keys.start()
    quotas = QuotaService(RedisQuotaStore.from_url(url, 1.0), QuotasConfig())
    app = Starlette(routes=admin_routes(AdminContext(lambda: config, quotas, keys)))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
    return Replica(http, keys, quotas, Authenticator(StaticKeys(config), keys))


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[Replica, Replica]]:  # noqa: F811
    one, two = await start_replica(redis_server.url, CONFIG), await start_replica(redis_server.url, CONFIG)
    yield one, two
    for r in (one, two):
        await r.http.aclose()
        await r.keys.close()
        await r.quotas.close()


async def authenticates(replica: Replica, secret: str) -> bool:
    try:
        await replica.auth.authenticate(f"Bearer {secret}".encode())
        return True
    except AuthenticationError:
        return False


async def within(seconds: float, replica: Replica, secret: str, expected: bool) -> float:
    started = time.monotonic()
    while await authenticates(replica, secret) != expected:
        assert time.monotonic() - started < seconds
        await asyncio.sleep(0.002)
    return time.monotonic() - started


async def create(replica: Replica, **body: object) -> dict[str, object]:
    response = await replica.http.post("/admin/keys", json={"name": "svc", **body}, headers=AUTH)
    assert response.status_code == 201, response.text
    data: dict[str, object] = response.json()
    return data


async def test_admin_api_is_404_without_admin_key(redis_server: RedisServer) -> None:  # noqa: F811
    replica = await start_replica(redis_server.url, replace(CONFIG, admin_key=None))
    try:
        response = await replica.http.get("/admin/keys", headers=AUTH)
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    finally:
        await replica.http.aclose()
        await replica.keys.close()
        await replica.quotas.close()


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": ADMIN}])
async def test_admin_api_is_401_without_the_admin_key(pair: tuple[Replica, Replica],
                                                      headers: dict[str, str]) -> None:
    response = await pair[0].http.post("/admin/keys", json={"name": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert await pair[0].keys.keys() == []


async def test_a_flood_of_wrong_admin_keys_is_slowed_but_the_admin_key_still_works(
        pair: tuple[Replica, Replica]) -> None:
    statuses = [(await pair[0].http.get("/admin/keys", headers={"authorization": f"Bearer guess-{i}"}))
                for i in range(15)]
    assert [r.status_code for r in statuses] == [401] * 10 + [429] * 5
    refused = statuses[-1]
    assert refused.json()["error"]["code"] == "auth_failures" and int(refused.headers["retry-after"]) >= 1
    assert (await pair[0].http.get("/admin/keys", headers=AUTH)).status_code == 200


async def test_create_then_the_key_works_everywhere_and_its_secret_is_shown_once(
        pair: tuple[Replica, Replica]) -> None:
    one, two = pair
    created = await create(one, team="team-a", models=["gpt-4o-mini"], limits={"rpm": 5},
                           metadata={"owner": "data-team"})
    secret, key_id = str(created["key"]), str(created["id"])
    assert secret.startswith(f"sk-{key_id}-") and created["limits"] == {
        "rpm": 5, "tpm": None, "concurrency": None, "tokens_per_day": None, "tokens_per_month": None}
    await within(1.0, two, secret, True)
    policy = await two.auth.authenticate(f"Bearer {secret}".encode())
    assert policy.allows("gpt-4o-mini") and not policy.allows("gpt-4o")
    await (await two.quotas.reserve(policy, 10)).settle(10)
    shown = (await one.http.get(f"/admin/keys/{key_id}", headers=AUTH)).json()
    listed = (await two.http.get("/admin/keys?team=team-a", headers=AUTH)).json()["data"]
    assert [k["id"] for k in listed] == [key_id] and (await two.http.get(
        "/admin/keys?team=other", headers=AUTH)).json()["data"] == []
    for view in (shown, listed[0]):
        assert "key" not in view and secret not in str(view) and view["metadata"] == {"owner": "data-team"}
        assert view["usage"] == [{"scope": "key", "limit": "rpm", "value": 5, "used": 1, "remaining": 4,
                                  "reset_seconds": pytest.approx(60, abs=2)}]


async def test_revoke_is_401_at_once_on_another_replica(pair: tuple[Replica, Replica]) -> None:
    one, two = pair
    created = await create(one)
    secret = str(created["key"])
    await within(1.0, two, secret, True)
    response = await one.http.delete(f"/admin/keys/{created['id']}", headers=AUTH)
    assert response.status_code == 200 and response.json()["revoked"] is True
    assert not await authenticates(one, secret)
    assert await within(0.5, two, secret, False) < 0.5


async def test_rotate_keeps_the_old_secret_for_the_overlap(pair: tuple[Replica, Replica]) -> None:
    one, two = pair
    created = await create(one)
    old = str(created["key"])
    rotated = (await one.http.post(f"/admin/keys/{created['id']}/rotate", json={"overlap_seconds": 3600},
                                   headers=AUTH)).json()
    new = rotated["key"]
    assert new != old and rotated["previous_secret_valid_until"] is not None
    await within(1.0, two, new, True)
    assert await authenticates(two, old)
    again = (await one.http.post(f"/admin/keys/{created['id']}/rotate", json={"overlap_seconds": 0},
                                 headers=AUTH)).json()
    await within(1.0, two, again["key"], True)
    assert not await authenticates(two, new) and not await authenticates(two, old)


async def test_patch_changes_limits_models_and_expiry(pair: tuple[Replica, Replica]) -> None:
    one, two = pair
    created = await create(one, limits={"rpm": 5, "tpm": 100})
    response = await one.http.patch(f"/admin/keys/{created['id']}", headers=AUTH, json={
        "limits": {"tpm": None, "concurrency": 2}, "models": ["gpt-4o"], "expires_at": "2020-01-01T00:00:00Z"})
    body = response.json()
    assert response.status_code == 200
    assert body["limits"]["rpm"] == 5 and body["limits"]["tpm"] is None and body["limits"]["concurrency"] == 2
    assert body["models"] == ["gpt-4o"] and body["expires_at"] == "2020-01-01T00:00:00Z"
    await within(1.0, two, str(created["key"]), False)  # expired now


async def test_teams_put_get_usage(pair: tuple[Replica, Replica]) -> None:
    one, two = pair
    configured = (await one.http.get("/admin/teams/team-a", headers=AUTH)).json()
    assert configured["source"] == "config" and configured["limits"]["rpm"] == 50
    assert (await one.http.get("/admin/teams/nope", headers=AUTH)).status_code == 404
    put = await one.http.put("/admin/teams/team-b", headers=AUTH, json={"limits": {"rpm": 3}})
    assert put.status_code == 200 and put.json()["source"] == "admin"
    created = await create(one, team="team-b")
    await within(1.0, two, str(created["key"]), True)
    policy = await two.auth.authenticate(f"Bearer {created['key']}".encode())
    assert policy.team_limits is not None and policy.team_limits.rpm == 3
    for _ in range(2):
        await (await two.quotas.reserve(policy, 1)).settle(1)
    usage = (await one.http.get("/admin/teams/team-b/usage", headers=AUTH)).json()["usage"]
    assert [(u["limit"], u["used"], u["remaining"]) for u in usage] == [("rpm", 2, 1)]
    listed = (await one.http.get("/admin/teams", headers=AUTH)).json()["data"]
    assert [(t["name"], t["source"]) for t in listed] == [("team-a", "config"), ("team-b", "admin")]


async def test_audit_log_says_who_did_what(pair: tuple[Replica, Replica]) -> None:
    one, two = pair
    created = await one.http.post("/admin/keys", json={"name": "svc"},
                                  headers={**AUTH, "x-llm-proxy-actor": "alice"})
    key_id, secret = created.json()["id"], created.json()["key"]
    await two.http.delete(f"/admin/keys/{key_id}", headers=AUTH)
    entries = (await one.http.get("/admin/audit?limit=10", headers=AUTH)).json()["data"]
    assert [(e["action"], e["actor"].split("@")[0], e["target"]) for e in entries] == [
        ("key.revoke", "admin", key_id), ("key.create", "alice", key_id)]
    assert secret not in str(entries)
    assert (await one.http.get("/admin/audit?limit=0", headers=AUTH)).status_code == 400


@pytest.mark.parametrize(("body", "param"), [
    ({"name": "x", "limits": {"rpm": "many"}}, "limits.rpm"), ({"team": "t"}, "name"),
    ({"name": "x", "key": "sk-chosen"}, "key"),
])
async def test_invalid_bodies_are_400_naming_the_field(pair: tuple[Replica, Replica], body: dict[str, object],
                                                       param: str) -> None:
    response = await pair[0].http.post("/admin/keys", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_unknown_key_is_404_and_bad_json_is_400(pair: tuple[Replica, Replica]) -> None:
    one, _ = pair
    assert (await one.http.get("/admin/keys/key_nope", headers=AUTH)).status_code == 404
    assert (await one.http.delete("/admin/keys/key_nope", headers=AUTH)).status_code == 404
    response = await one.http.post("/admin/keys", content=b"{not json", headers=AUTH)
    assert response.status_code == 400


async def test_patch_changes_only_the_named_team_settings_where_put_replaces_the_team(
        pair: tuple[Replica, Replica]) -> None:
    one, _ = pair
    patched = await one.http.patch("/admin/teams/team-a", headers=AUTH, json={"limits": {"tokens_per_month": 5000}})
    assert patched.status_code == 200, patched.text
    limits = patched.json()["limits"]
    assert (limits["rpm"], limits["tokens_per_month"]) == (50, 5000)  # the configured rpm stays
    patched = await one.http.patch("/admin/teams/team-a", headers=AUTH,
                                   json={"models": ["gpt-4o-mini"], "limits": {"rpm": None}})
    assert patched.json()["models"] == ["gpt-4o-mini"]
    assert (patched.json()["limits"]["rpm"], patched.json()["limits"]["tokens_per_month"]) == (None, 5000)
    put = await one.http.put("/admin/teams/team-a", headers=AUTH, json={"limits": {"rpm": 7}})
    assert put.json()["models"] is None and put.json()["limits"]["tokens_per_month"] is None
    missing = await one.http.patch("/admin/teams/no-such-team", headers=AUTH, json={"limits": {"rpm": 1}})
    assert missing.status_code == 404
    bad = await one.http.patch("/admin/teams/team-a", headers=AUTH, json={"limits": {"rpm": -1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limits.rpm"
