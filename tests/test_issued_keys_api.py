"""Issued keys through the admin API of real gateway processes sharing one Redis.

Two replicas (A and B) share a Redis: what is done on A must hold on B at
once (the change channel), and survive a restart (Redis holds the records).
The openai SDK is the client, as it is for a team using a key.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import RedisServer
from tests.stub_upstream import StubUpstream

pytestmark = pytest.mark.timeout(120)

ADMIN = "sk-admin-issued-keys-test"
MODEL, OTHER_MODEL = "m", "other"
MESSAGES = [{"role": "user", "content": "hello there"}]
PROPAGATION = 0.5  # seconds a change made on one replica may take to hold on another


def config(stub: StubUpstream, redis_url: str | None, admin: bool = True) -> str:
    redis_line = f"redis_url: {redis_url}\n" if redis_url else ""
    admin_line = f"admin_key: {ADMIN}\n" if admin else ""
    return f"""
{redis_line}{admin_line}upstreams: [{{name: stub, base_url: '{stub.url}', models: [{MODEL}, {OTHER_MODEL}]}}]
teams: [{{name: cfg-team, limits: {{rpm: 1000}}}}]
logging: {{level: debug}}   # the secret must stay out of even the most talkative log
"""


@dataclass
class Env:
    redis: RedisServer
    stub: StubUpstream
    a: GatewayProcess
    b: GatewayProcess
    http: httpx.Client

    def admin(self, method: str, path: str, gw: GatewayProcess | None = None, actor: str | None = None,
              **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        if actor:
            headers["x-llm-proxy-actor"] = actor
        return self.http.request(method, (gw or self.a).url + path, headers=headers, **kwargs)

    def create(self, gw: GatewayProcess | None = None, **spec: Any) -> dict[str, Any]:
        made = self.admin("POST", "/admin/keys", gw, json={"name": f"k-{time.monotonic_ns()}", **spec})
        assert made.status_code == 201, made.text
        return dict(made.json())

    def status(self, gw: GatewayProcess, secret: str, model: str = MODEL) -> int:
        """A chat completion's status with ``secret`` on ``gw``."""
        answer = self.http.post(gw.url + "/v1/chat/completions", headers=bearer(secret),
                                json={"model": model, "messages": MESSAGES, "max_tokens": 3})
        return answer.status_code

    def barrier(self) -> None:
        """Wait until B has applied every change made so far on A.

        Changes reach a replica in order on one channel, so once B knows a key
        created after them, it has applied them all.
        """
        marker = self.create(name="barrier")["key"]
        wait_until(lambda: self.status(self.b, marker) == 200, PROPAGATION)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def wait_until(check: Callable[[], bool], within: float, step: float = 0.01) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not true within {within}s")
        time.sleep(step)
    return time.monotonic() - started


def sdk(gw: GatewayProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=10)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def env_shared() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        server = RedisServer()
        stack.callback(server.close)
        server.start()
        stub = StubUpstream().start()
        stack.callback(stub.stop)
        gateways = []
        for _ in range(2):
            gw = GatewayProcess(config(stub, server.url))
            stack.callback(gw.close)
            gateways.append(gw.start())
        client = stack.enter_context(httpx.Client(timeout=10))
        yield Env(server, stub, gateways[0], gateways[1], client)


@pytest.fixture
def env(env_shared: Env) -> Env:
    env_shared.stub.reset()
    return env_shared


# --- issuing and using a key


def test_create_shows_a_secret_that_works_with_the_sdk_on_every_replica(env: Env) -> None:
    made = env.admin("POST", "/admin/keys", json={
        "name": "ci", "team": "team-x", "models": [MODEL], "limits": {"rpm": 100, "tpm": 100_000},
        "expires_at": "2099-01-01T00:00:00Z", "metadata": {"owner": "alice"}})
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    key = made.json()
    assert key["key"].startswith(f"sk-{key['id']}-") and len(key["key"]) > len(key["id"]) + 40
    assert key["object"] == "api_key" and key["name"] == "ci" and key["team"] == "team-x"
    assert key["models"] == [MODEL] and key["metadata"] == {"owner": "alice"}
    assert key["limits"] == {"rpm": 100, "tpm": 100_000, "concurrency": None, "tokens_per_day": None,
                             "tokens_per_month": None}
    assert key["expires_at"] == "2099-01-01T00:00:00Z" and key["revoked"] is False
    answer = sdk(env.a, key["key"]).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    wait_until(lambda: env.status(env.b, key["key"]) == 200, PROPAGATION)
    with pytest.raises(openai.PermissionDeniedError):  # outside the key's models
        sdk(env.b, key["key"]).chat.completions.create(model=OTHER_MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        sdk(env.a, key["key"] + "x").chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]


def test_the_secret_is_shown_once_and_stored_only_as_its_sha256(env: Env) -> None:
    key = env.create(team="team-secret", limits={"rpm": 10})
    secret, key_id = key["key"], key["id"]
    rotated = env.admin("POST", f"/admin/keys/{key_id}/rotate", json={"overlap_seconds": 60}).json()
    new_secret = rotated["key"]
    for s in (secret, new_secret):
        assert env.status(env.a, s) == 200
    env.status(env.a, secret + "-wrong")  # a failed authentication must not log what was tried either
    wait_until(lambda: env.status(env.b, new_secret) == 200, PROPAGATION)
    seen = [env.admin("GET", f"/admin/keys/{key_id}").text, env.admin("GET", "/admin/keys").text,
            env.admin("GET", "/admin/keys", params={"team": "team-secret"}).text,
            env.admin("PATCH", f"/admin/keys/{key_id}", json={"metadata": {"x": 1}}).text,
            env.admin("GET", "/admin/audit", params={"limit": 1000}).text, env.a.log(), env.b.log()]
    assert key_id in seen[0] and key_id in seen[1] and key_id in seen[2] and key_id in seen[4]
    for text in seen:
        for s in (secret, new_secret):
            assert s not in text and random_part(s) not in text
            assert hashlib.sha256(s.encode()).hexdigest() not in text  # not even its digest
    stored = redis_dump(env.redis)
    for s in (secret, new_secret):
        assert random_part(s) not in stored
    assert hashlib.sha256(new_secret.encode()).hexdigest() in stored  # what Redis holds instead


def random_part(secret: str) -> str:
    """``sk-<id>-<random>``: the random part (it may itself hold '-')."""
    prefix, key_id, random = secret.split("-", 2)
    assert prefix == "sk" and key_id.startswith("key_") and len(random) >= 40
    return random


def redis_dump(server: RedisServer) -> str:
    """Every key and value in Redis, as text."""
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        parts: list[str] = []
        for name in client.scan_iter(count=1000):
            kind = client.type(name)
            value: Any = {"hash": client.hgetall, "set": client.smembers, "string": client.get,
                          "zset": lambda n: client.zrange(n, 0, -1, withscores=True),
                          "stream": lambda n: client.xrange(n)}.get(kind, lambda n: "")(name)
            parts.append(f"{name} {value}")
        return "\n".join(parts)
    finally:
        client.close()


def test_revoke_is_refused_at_once_on_another_replica(env: Env) -> None:
    key = env.create()
    wait_until(lambda: env.status(env.b, key["key"]) == 200, PROPAGATION)
    revoked = env.admin("DELETE", f"/admin/keys/{key['id']}")
    done = time.monotonic()
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True and revoked.json()["revoked_at"]
    took = wait_until(lambda: env.status(env.b, key["key"]) == 401, PROPAGATION, step=0.005)
    assert time.monotonic() - done < PROPAGATION and took < PROPAGATION
    assert env.status(env.a, key["key"]) == 401
    with pytest.raises(openai.AuthenticationError):
        sdk(env.b, key["key"]).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    again = env.admin("DELETE", f"/admin/keys/{key['id']}", env.b)
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert env.admin("POST", f"/admin/keys/{key['id']}/rotate").status_code == 400  # revoked stays revoked
    assert env.admin("GET", f"/admin/keys/{key['id']}", env.b).json()["revoked"] is True


def test_rotate_keeps_the_old_secret_for_the_overlap_only(env: Env) -> None:
    key = env.create()
    old = key["key"]
    asked = datetime.now(UTC)
    rotated = env.admin("POST", f"/admin/keys/{key['id']}/rotate", json={"overlap_seconds": 1.5})
    assert rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
    new = rotated.json()["key"]
    assert new != old and new.startswith(f"sk-{key['id']}-") and rotated.json()["id"] == key["id"]
    until = datetime.fromisoformat(rotated.json()["previous_secret_valid_until"].replace("Z", "+00:00"))
    assert abs((until - asked).total_seconds() - 1.5) < 0.5
    env.barrier()
    for gw in (env.a, env.b):
        assert env.status(gw, old) == 200 and env.status(gw, new) == 200
    wait_until(lambda: datetime.now(UTC) > until + timedelta(seconds=0.05), 3.0)
    for gw in (env.a, env.b):
        assert env.status(gw, old) == 401 and env.status(gw, new) == 200

    # Without an overlap the old secret stops at once, everywhere.
    now = env.admin("POST", f"/admin/keys/{key['id']}/rotate", env.b, json={"overlap_seconds": 0}).json()
    assert now["previous_secret_valid_until"] is None
    wait_until(lambda: env.status(env.a, new) == 401, PROPAGATION)
    assert env.status(env.b, new) == 401 and env.status(env.a, now["key"]) == 200


def test_patch_takes_effect_on_both_replicas(env: Env) -> None:
    key = env.create(limits={"tpm": 10**6})
    secret = key["key"]
    wait_until(lambda: env.status(env.b, secret) == 200, PROPAGATION)
    patched = env.admin("PATCH", f"/admin/keys/{key['id']}", json={"limits": {"rpm": 3}})
    assert patched.status_code == 200
    assert patched.json()["limits"]["rpm"] == 3 and patched.json()["limits"]["tpm"] == 10**6  # merged
    env.barrier()
    on_b = env.http.post(env.b.url + "/v1/chat/completions", headers=bearer(secret),
                         json={"model": MODEL, "messages": MESSAGES})
    assert on_b.headers["x-ratelimit-limit-requests"] == "3"
    # Requests count against a limit from when it exists: the one before the PATCH does not.
    assert on_b.headers["x-ratelimit-remaining-requests"] == "2"
    assert env.status(env.a, secret) == 200 and env.status(env.b, secret) == 200
    assert env.status(env.b, secret) == 429 and env.status(env.a, secret) == 429
    usage = {u["limit"]: u["used"] for u in env.admin("GET", f"/admin/keys/{key['id']}").json()["usage"]}
    assert usage["rpm"] == 3

    env.admin("PATCH", f"/admin/keys/{key['id']}", json={"limits": {"rpm": None}, "models": [OTHER_MODEL]})
    env.barrier()
    for gw in (env.a, env.b):
        assert env.status(gw, secret) == 403 and env.status(gw, secret, OTHER_MODEL) == 200


def test_issued_keys_survive_a_gateway_restart(env: Env) -> None:
    kept, revoked = env.create(), env.create()
    env.admin("DELETE", f"/admin/keys/{revoked['id']}")
    env.b.stop()
    env.b.start()
    assert env.status(env.b, kept["key"]) == 200
    assert env.status(env.b, revoked["key"]) == 401
    listed = {k["id"] for k in env.admin("GET", "/admin/keys", env.b).json()["data"]}
    assert {kept["id"], revoked["id"]} <= listed


def test_expired_keys_are_refused(env: Env) -> None:
    past = env.create(expires_at=iso(datetime.now(UTC) - timedelta(minutes=1)))
    answer = env.http.post(env.a.url + "/v1/chat/completions", headers=bearer(past["key"]),
                           json={"model": MODEL, "messages": MESSAGES})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "expired_api_key"
    soon = env.create(expires_at=iso(datetime.now(UTC) + timedelta(seconds=1.5)))
    env.barrier()
    assert env.status(env.a, soon["key"]) == 200 and env.status(env.b, soon["key"]) == 200
    wait_until(lambda: env.status(env.b, soon["key"]) == 401, 3.0, step=0.1)
    assert env.status(env.a, soon["key"]) == 401
    # And a PATCH can expire a key (or bring it back) everywhere.
    env.admin("PATCH", f"/admin/keys/{soon['id']}", json={"expires_at": None})
    env.barrier()
    assert env.status(env.b, soon["key"]) == 200
    env.admin("PATCH", f"/admin/keys/{soon['id']}", json={"expires_at": iso(datetime.now(UTC))})
    env.barrier()
    assert env.status(env.b, soon["key"]) == 401


# --- the admin API's own access


ROUTES = [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/keys/key_x"),
          ("PATCH", "/admin/keys/key_x"), ("DELETE", "/admin/keys/key_x"), ("POST", "/admin/keys/key_x/rotate"),
          ("GET", "/admin/teams"), ("GET", "/admin/teams/cfg-team"), ("PUT", "/admin/teams/cfg-team"),
          ("GET", "/admin/teams/cfg-team/usage"), ("GET", "/admin/audit")]


def test_admin_endpoints_need_the_admin_key(env: Env) -> None:
    client_key = env.create()["key"]
    before = len(env.admin("GET", "/admin/keys").json()["data"])
    for method, path in ROUTES:
        for headers in ({}, bearer("sk-wrong-admin-key"), bearer(client_key), bearer(ADMIN + "x"),
                        {"Authorization": f"Basic {ADMIN}"}, bearer(ADMIN[:-1])):
            answer = env.http.request(method, env.a.url + path, headers=headers,
                                      json={"name": "intruder", "limits": {"rpm": 1}})
            # 401, or 429 once this address has failed too often (the admin key still works)
            assert answer.status_code in (401, 429), (method, path, headers, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "auth_failures" if answer.status_code == 429 else \
                error["type"] == "invalid_request_error" and error["message"]
    assert len(env.admin("GET", "/admin/keys").json()["data"]) == before  # nothing was created
    audit = env.admin("GET", "/admin/audit", params={"limit": 1000}).json()["data"]
    assert not any(e["detail"].get("name") == "intruder" for e in audit)


def test_the_admin_api_is_absent_without_an_admin_key(env: Env) -> None:
    gw = GatewayProcess(config(env.stub, None, admin=False))
    try:
        gw.start()
        for method, path in ROUTES:
            for headers in ({}, bearer(ADMIN)):
                answer = env.http.request(method, gw.url + path, headers=headers, json={"name": "x"})
                assert answer.status_code == 404, (method, path, answer.text)
                assert answer.json()["error"]["code"] == "unknown_url"
    finally:
        gw.close()


def test_bad_admin_input_is_refused_by_name(env: Env) -> None:
    cases = [
        ("POST", "/admin/keys", {"team": "t"}, 400, "name"),
        ("POST", "/admin/keys", {"name": "x", "colour": "red"}, 400, "colour"),
        ("POST", "/admin/keys", {"name": "x", "limits": {"rpm": -1}}, 400, "limits.rpm"),
        ("POST", "/admin/keys", {"name": "x", "limits": {"rpx": 1}}, 400, "rpx"),
        ("POST", "/admin/keys", {"name": "x", "expires_at": "tomorrow"}, 400, "expires_at"),
        ("POST", "/admin/keys", {"name": "x", "models": "m"}, 400, "models"),
        ("GET", "/admin/keys/key_missing", None, 404, "id"),
        ("PATCH", "/admin/keys/key_missing", {"limits": {}}, 404, "id"),
        ("DELETE", "/admin/keys/key_missing", None, 404, "id"),
        ("POST", "/admin/keys/key_missing/rotate", {}, 404, "id"),
        ("GET", "/admin/teams/no-such-team", None, 404, "name"),
        ("PUT", "/admin/teams/t1", {"name": "t2"}, 400, "name"),
        ("GET", "/admin/audit?limit=0", None, 400, "limit"),
    ]
    for method, path, payload, status, param in cases:
        answer = env.admin(method, path, json=payload)
        assert answer.status_code == status, (method, path, answer.text)
        assert answer.json()["error"]["param"] == param, (method, path, answer.text)
    key = env.create()
    assert env.admin("PATCH", f"/admin/keys/{key['id']}", json={"team": "other"}).status_code == 400
    rotate = env.admin("POST", f"/admin/keys/{key['id']}/rotate", json={"overlap_seconds": -1})
    assert rotate.status_code == 400 and env.status(env.a, key["key"]) == 200  # not rotated
    broken = env.http.post(env.a.url + "/admin/keys", content=b"{not json",
                           headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    assert broken.status_code == 400


# --- teams and the audit log


def test_teams_can_be_set_read_and_charged(env: Env) -> None:
    put = env.admin("PUT", "/admin/teams/eng", json={"models": [MODEL], "limits": {"rpm": 3, "tokens_per_day": 10**6}})
    assert put.status_code == 200
    assert put.json() == {"object": "team", "name": "eng", "source": "admin", "models": [MODEL],
                          "limits": {"rpm": 3, "tpm": None, "concurrency": None, "tokens_per_day": 10**6,
                                     "tokens_per_month": None}}
    first, second = env.create(team="eng")["key"], env.create(team="eng")["key"]
    env.barrier()
    used = 0
    for gw, secret in ((env.a, first), (env.b, second)):
        answer = sdk(gw, secret).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        assert answer.usage is not None
        used += answer.usage.total_tokens
    assert env.status(env.b, first, OTHER_MODEL) == 403  # the team's models bind its keys
    usage = env.admin("GET", "/admin/teams/eng/usage", env.b).json()
    assert usage["object"] == "team.usage" and usage["team"] == "eng"
    assert [(u["scope"], u["limit"], u["value"], u["used"]) for u in usage["usage"]] == \
        [("team", "rpm", 3, 2), ("team", "tokens_per_day", 10**6, used)]
    got = env.admin("GET", "/admin/teams/eng").json()
    assert got["source"] == "admin"
    assert [(u["limit"], u["used"]) for u in got["usage"]] == [("rpm", 2), ("tokens_per_day", used)]
    assert env.status(env.a, second) == 200  # the third of three
    with pytest.raises(openai.RateLimitError) as denied:
        sdk(env.b, first).chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert "team 'eng'" in denied.value.message

    listed = {t["name"]: t["source"] for t in env.admin("GET", "/admin/teams").json()["data"]}
    assert listed["eng"] == "admin" and listed["cfg-team"] == "config"
    assert env.admin("GET", "/admin/teams/cfg-team").json()["limits"]["rpm"] == 1000
    # A team set through the API overrides the config's team of that name.
    env.admin("PUT", "/admin/teams/cfg-team", json={"limits": {"rpm": 5}})
    assert env.admin("GET", "/admin/teams/cfg-team", env.b).json()["source"] == "admin"


def test_every_admin_action_is_audited_with_who_what_when(env: Env) -> None:
    started = datetime.now(UTC) - timedelta(seconds=1)
    made = env.admin("POST", "/admin/keys", actor="alice", json={"name": "audited", "team": "aud"}).json()
    env.admin("PATCH", f"/admin/keys/{made['id']}", env.b, actor="bob", json={"limits": {"rpm": 9}})
    env.admin("POST", f"/admin/keys/{made['id']}/rotate", actor="alice", json={"overlap_seconds": 5})
    env.admin("DELETE", f"/admin/keys/{made['id']}", env.b, actor="carol")
    env.admin("PUT", "/admin/teams/aud", actor="dave", json={"limits": {"rpm": 7}})
    env.admin("GET", f"/admin/keys/{made['id']}", actor="eve")  # reading is not an action
    entries = env.admin("GET", "/admin/audit", params={"limit": 5}).json()["data"]
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("team.put", "dave@127.0.0.1", "aud"),
        ("key.revoke", "carol@127.0.0.1", made["id"]),
        ("key.rotate", "alice@127.0.0.1", made["id"]),
        ("key.update", "bob@127.0.0.1", made["id"]),
        ("key.create", "alice@127.0.0.1", made["id"]),
    ]
    for entry in entries:
        at = datetime.fromisoformat(entry["at"].replace("Z", "+00:00"))
        assert started <= at <= datetime.now(UTC)
    assert entries[4]["detail"] == {"name": "audited", "team": "aud"}
    assert entries[3]["detail"] == {"fields": ["limits"]}
    assert entries[0]["detail"]["limits"]["rpm"] == 7
    assert made["key"] not in str(entries)
    assert len(env.admin("GET", "/admin/audit", env.b, params={"limit": 2}).json()["data"]) == 2
