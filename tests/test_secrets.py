"""Secrets never leak (issue 8, item 3).

One gateway with Redis, an admin key on its own port, static and issued
keys, tracing to an OTLP receiver, an OpenAI and an Azure upstream (one of
them failing in every way), streams, and 401s with wrong keys that look like
real ones. Then everything it produced is searched for every secret: its log
(the application log at debug level and the access log), ``/metrics``, every
span, every answer (error bodies, admin listings, the audit log), every
header and body the upstreams received, and everything in Redis. Nothing may
appear, except the upstream's own key in the one header that carries it to
that upstream, and an issued secret exactly once, in the answer that created
or rotated it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis as redis_client
from starlette.requests import Request

from proxy.access import issued_keys as issued_module
from proxy.access import keys as keys_module
from proxy.access.issued_keys import IssuedKeys, KeySpec
from proxy.access.keys import StaticKeys, hash_key
from proxy.access.store import MemoryDirectory
from proxy.admin import api as admin_module
from proxy.config.loader import parse_config
from proxy.errors import AuthenticationError
from proxy.serving.auth_guard import AuthFailureGuard
from tests.gateway_process import GatewayProcess
from tests.otlp_receiver import OtlpReceiver
from tests.redis_fixtures import RedisServer
from tests.stub_upstream import Behaviour, StubUpstream, free_port

STATIC = "sk-static-" + secrets.token_hex(24)
ADMIN = "sk-admin-" + secrets.token_hex(24)
UP_OPENAI = "upk-openai-" + secrets.token_hex(24)
UP_AZURE = "upk-azure-" + secrets.token_hex(24)
COOKIE = "sess-" + secrets.token_hex(16)
PROXY_AUTH = "proxy-" + secrets.token_hex(16)
API_KEY_HEADER = "sk-apikeyheader-" + secrets.token_hex(16)
LEAKY_HEADERS = {"openai-organization": "org-" + secrets.token_hex(8),
                 "openai-project": "proj_" + secrets.token_hex(8),
                 "set-cookie": "__cf_bm=" + secrets.token_hex(16) + "; path=/; HttpOnly"}
# Headers a client may send that must never travel on: credentials and hop-by-hop ones.
CLIENT_EXTRA = {"api-key": API_KEY_HEADER, "Cookie": f"session={COOKIE}",
                "Proxy-Authorization": f"Basic {PROXY_AUTH}", "Proxy-Connection": "keep-alive",
                "Proxy-Foo": PROXY_AUTH, "Connection": "keep-alive", "Upgrade": "h2c",
                "Keep-Alive": "timeout=5", "TE": "trailers", "X-Client-Custom": "hello"}
# All an upstream may receive from the gateway (the names, lower case).
FORWARDED = {"host", "content-type", "content-length", "accept-encoding", "user-agent", "accept",
             "authorization", "api-key", "x-request-id", "traceparent", "tracestate"}
MESSAGES = [{"role": "user", "content": "keep my secrets"}]


@dataclass
class Run:
    """What one gateway run produced, for searching."""

    gw: GatewayProcess
    admin_url: str
    stubs: dict[str, StubUpstream]
    redis: RedisServer
    receiver: OtlpReceiver
    issued: list[str] = field(default_factory=list)  # secrets handed out by create/rotate
    wrong: list[str] = field(default_factory=list)  # keys that look real but are not
    answers: list[httpx.Response] = field(default_factory=list)
    spans: str = ""
    metrics: str = ""
    log: str = ""
    redis_dump: str = ""
    digests: list[str] = field(default_factory=list)

    def call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        resp = httpx.request(method, url, timeout=15, **kwargs)
        self.answers.append(resp)
        return resp

    def chat(self, key: str, model: str = "m", stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": MESSAGES, "stream": stream, **extra}
        return self.call("POST", self.gw.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}", **CLIENT_EXTRA})

    def admin(self, method: str, path: str, key: str = ADMIN, **kwargs: Any) -> httpx.Response:
        return self.call(method, self.admin_url + path, headers={"Authorization": f"Bearer {key}"}, **kwargs)


def _near_miss(key: str) -> str:
    last = "a" if key[-1] != "a" else "b"
    return key[:-1] + last


def _config(openai_url: str, azure_url: str, redis_url: str, admin_port: int) -> str:
    return f"""redis_url: {redis_url}
admin_key: ${{TEST_ADMIN_KEY}}
upstreams:
  - {{name: oai, base_url: '{openai_url}', api_key: '${{UP_OPENAI}}', models: [m, both], priority: 1,
     timeout: {{connect: 1, first_byte: 1, idle: 1, total: 3}}}}
  - {{name: az, provider: azure, base_url: '{azure_url}', api_version: '2024-10-21', api_key: '${{UP_AZURE}}',
     models: {{both: dep-both, azonly: dep-az}}, priority: 0,
     timeout: {{connect: 1, first_byte: 1, idle: 1, total: 3}}}}
routing: {{max_attempts: 3, deadline: 5, retry_budget: 10, min_retries_per_second: 100}}
health: {{failure_threshold: 1000}}
keys:
  - {{name: static-app, key: '${{TEST_STATIC_KEY}}', team: team-s}}
  - {{name: hashed-app, key_sha256: '{hash_key("sk-hashed-" + "0" * 40)}'}}
teams: [{{name: team-s, limits: {{rpm: 100000}}}}]
server: {{admin_port: {admin_port}, shutdown_delay: 0}}
logging: {{level: debug}}
"""


@pytest.fixture(scope="module")
def live() -> Iterator[Run]:
    """The gateway, after every path has been used; still running."""
    with contextlib.ExitStack() as stack:
        redis = RedisServer().start()
        stack.callback(redis.close)
        stubs = {"oai": StubUpstream().start(), "az": StubUpstream().start()}
        for stub in stubs.values():
            stub.response_headers = dict(LEAKY_HEADERS)
            stack.callback(stub.stop)
        receiver = stack.enter_context(OtlpReceiver())
        admin_port = free_port()
        gw = GatewayProcess(
            _config(stubs["oai"].url, f"http://127.0.0.1:{stubs['az'].port}", redis.url, admin_port),
            env={"TEST_ADMIN_KEY": ADMIN, "UP_OPENAI": UP_OPENAI, "UP_AZURE": UP_AZURE,
                 "TEST_STATIC_KEY": STATIC, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                 "OTEL_BSP_SCHEDULE_DELAY": "100"})
        stack.callback(gw.close)
        result = Run(gw.start(), f"http://127.0.0.1:{admin_port}", stubs, redis, receiver)
        _exercise(result)
        yield result


@pytest.fixture(scope="module")
def run(live: Run) -> Run:
    """Everything the run produced, collected once the gateway stopped (which flushes the spans)."""
    live.metrics = httpx.get(live.gw.url + "/metrics").text
    live.redis_dump = _dump(live.redis)
    live.gw.signal(signal.SIGTERM)
    live.gw.wait(20)
    spans = live.receiver.wait_for(lambda s: len(s) >= 20)
    live.spans = "\n".join([str(s) for s in spans] + [str(r) for r in live.receiver.resources])
    live.log = live.gw.log()
    return live


def _exercise(r: Run) -> None:
    """Every path: answers, streams, failovers, upstream failures, 401s, the admin API."""
    oai, az = r.stubs["oai"], r.stubs["az"]
    assert r.chat(STATIC).status_code == 200
    assert r.chat(STATIC, stream=True).status_code == 200
    assert r.chat(STATIC, stream=True, stream_options={"include_usage": True}).status_code == 200
    az.behave("status", status=500)
    assert r.chat(STATIC, model="both").status_code == 200  # azure fails, openai answers
    assert r.chat(STATIC, model="azonly").status_code == 502
    az.behave("status", status=401)  # the gateway's credentials rejected: logged as an error
    assert r.chat(STATIC, model="azonly").status_code == 502
    az.behave("ok")
    oai.queue(Behaviour("429", {"retry_after": 0}), Behaviour("status", {"status": 400}),
              Behaviour("cut"), Behaviour("garbage"))
    for stream in (False, False, True, False):
        r.chat(STATIC, stream=stream)
    # Wrong keys that look like real ones, on every surface that takes a key.
    r.wrong += [_near_miss(STATIC), "sk-static-" + secrets.token_hex(24), _near_miss(ADMIN)]
    for wrong in [*r.wrong, ADMIN, UP_OPENAI, UP_AZURE]:
        assert r.chat(wrong).status_code == 401
        assert r.call("GET", r.gw.url + "/v1/models", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    for wrong in [*r.wrong[:2], STATIC, UP_OPENAI]:
        assert r.admin("GET", "/admin/keys", key=wrong).status_code == 401
    # Issued keys: create, use, rotate (the old secret keeps working for the overlap), revoke.
    created = r.admin("POST", "/admin/keys", json={"name": "issued-app", "team": "team-s",
                                                   "limits": {"rpm": 1000, "tokens_per_day": 10**7}})
    assert created.status_code == 201
    key_id, first = created.json()["id"], created.json()["key"]
    r.issued.append(first)
    other = r.admin("POST", "/admin/keys", json={"name": "to-revoke"})
    r.issued.append(other.json()["key"])
    deadline = time.monotonic() + 30
    while r.chat(first).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.chat(first, stream=True).status_code == 200
    rotated = r.admin("POST", f"/admin/keys/{key_id}/rotate", json={"overlap_seconds": 60})
    second = rotated.json()["key"]
    r.issued.append(second)
    assert r.chat(first).status_code == 200 and r.chat(second).status_code == 200
    r.wrong += [_near_miss(first), _near_miss(second)]
    assert r.chat(_near_miss(second)).status_code == 401
    assert r.admin("DELETE", f"/admin/keys/{other.json()['id']}").status_code == 200
    assert r.chat(r.issued[1]).status_code == 401
    assert r.admin("PATCH", f"/admin/keys/{key_id}", json={"metadata": {"owner": "team-s"}}).status_code == 200
    assert r.admin("PUT", "/admin/teams/team-s", json={"limits": {"rpm": 5000}}).status_code == 200
    for path in ("/admin/keys", f"/admin/keys/{key_id}", "/admin/teams", "/admin/teams/team-s",
                 "/admin/teams/team-s/usage", "/admin/audit?limit=1000"):
        assert r.admin("GET", path).status_code == 200
    assert r.call("GET", r.gw.url + "/readyz").status_code == 200
    r.digests = [hash_key(s) for s in (STATIC, ADMIN, *r.issued)]


def _dump(server: RedisServer) -> str:
    client = redis_client.Redis(port=server.port, decode_responses=True)
    out: list[str] = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        value: Any = {"hash": client.hgetall, "zset": lambda n: client.zrange(n, 0, -1, withscores=True),
                      "set": client.smembers, "string": client.get,
                      "stream": lambda n: client.xrange(n), "list": lambda n: client.lrange(n, 0, -1)}[kind](name)
        out.append(f"{name} {value}")
    client.close()
    return "\n".join(out)


def _fragments(secret: str) -> list[str]:
    """The secret, and every 16-character piece of its random part (a truncated copy is a leak too)."""
    random_part = secret.split("-", 2)[-1]  # after "sk-<kind or key id>-"; it may hold "-" itself
    assert len(random_part) >= 16, secret
    return [secret, *{random_part[i:i + 16] for i in range(0, len(random_part) - 15, 4)}]


def _leaks(text: str, secret: str) -> list[str]:
    return [f for f in _fragments(secret) if f in text]


def _every_secret(r: Run) -> list[str]:
    return [STATIC, ADMIN, UP_OPENAI, UP_AZURE, COOKIE, PROXY_AUTH, API_KEY_HEADER, *r.issued, *r.wrong]


# --- the admin API: unreachable without its key, and only on its own port ---------------

ADMIN_ROUTES = [("POST", "/admin/keys"), ("GET", "/admin/keys"), ("GET", "/admin/keys/k"), ("PATCH", "/admin/keys/k"),
                ("DELETE", "/admin/keys/k"), ("POST", "/admin/keys/k/rotate"), ("GET", "/admin/teams"),
                ("GET", "/admin/teams/t"), ("PUT", "/admin/teams/t"), ("GET", "/admin/teams/t/usage"),
                ("GET", "/admin/audit")]


def test_the_admin_api_is_unreachable_without_the_admin_key(live: Run) -> None:
    for method, path in ADMIN_ROUTES:
        for headers in ({}, {"Authorization": f"Bearer {_near_miss(ADMIN)}"}, {"Authorization": f"Bearer {STATIC}"},
                        {"Authorization": f"Basic {ADMIN}"}, {"Authorization": ADMIN}, {"X-Api-Key": ADMIN},
                        {"Authorization": f"Bearer {ADMIN} x"}, {"Authorization": f"Bearer {ADMIN[:-8]}"}):
            resp = httpx.request(method, live.admin_url + path, headers=headers, json={"name": "x"}, timeout=5)
            # 401, or 429 once this address has failed too often (the admin key itself still works)
            assert resp.status_code in (401, 429), (method, path, headers, resp.text)
            assert resp.json()["error"]["code"] in ("invalid_api_key", "auth_failures")
        # With the key, but on the port clients use: it does not exist there.
        resp = httpx.request(method, live.gw.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
        assert resp.status_code == 404


def test_the_admin_port_serves_nothing_but_the_admin_api(live: Run) -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/readyz")]:
        resp = httpx.request(method, live.admin_url + path, headers={"Authorization": f"Bearer {STATIC}"},
                             json={"model": "m", "messages": MESSAGES}, timeout=5)
        assert resp.status_code == 404, (path, resp.status_code)


@pytest.mark.parametrize("where", ["log", "metrics", "spans"])
def test_no_secret_in_logs_metrics_or_traces(run: Run, where: str) -> None:
    text = getattr(run, where)
    assert text, f"nothing was collected from {where}"
    for secret in _every_secret(run):
        assert not _leaks(text, secret), f"{where} holds (part of) a secret"
    for digest in run.digests:  # not even their digests
        assert digest not in text
    for value in LEAKY_HEADERS.values():
        assert value.split(";")[0] not in text


def test_the_log_saw_every_path(run: Run) -> None:
    """The search above means something only if the log covers the error paths."""
    assert "rejected the gateway's credentials" in run.log  # upstream 401
    for status in (200, 401, 502):
        assert f'"status":{status}' in run.log
    assert run.log.count('"msg":"access"') >= 20
    assert " DEBUG " in run.log


def test_no_secret_in_any_answer_and_issued_secrets_appear_once(run: Run) -> None:
    every = "\n".join(f"{a.status_code} {dict(a.headers)} {a.text}" for a in run.answers)
    for secret in run.issued:
        assert every.count(secret) == 1  # only the create or rotate answer that handed it out
        every = every.replace(secret, "<handed out once>")
    for secret in [STATIC, ADMIN, UP_OPENAI, UP_AZURE, COOKIE, PROXY_AUTH, API_KEY_HEADER, *run.issued, *run.wrong]:
        assert not _leaks(every, secret)
    for digest in run.digests:
        assert digest not in every
    errors = [a for a in run.answers if a.status_code >= 400]
    assert len(errors) >= 15 and all("Traceback" not in a.text for a in errors)


def test_upstream_account_headers_never_reach_the_client(run: Run) -> None:
    for answer in run.answers:
        assert not {k.lower() for k in answer.headers} & set(LEAKY_HEADERS)


def test_upstreams_get_only_their_own_key_and_no_client_credentials(run: Run) -> None:
    seen = {name: stub.chat_requests for name, stub in run.stubs.items()}
    assert len(seen["oai"]) >= 10 and len(seen["az"]) >= 3
    for name, requests in seen.items():
        own, others = (UP_OPENAI, UP_AZURE) if name == "oai" else (UP_AZURE, UP_OPENAI)
        for request in requests:
            names = {k.lower() for k in request.headers}
            assert names <= FORWARDED, names - FORWARDED  # no Cookie, Proxy-*, Connection, Upgrade, api-key...
            if name == "oai":
                assert request.headers["authorization"] == f"Bearer {own}" and "api-key" not in names
            else:
                assert request.headers["api-key"] == own and "authorization" not in names
            text = f"{dict(request.headers)} {request.body} {request.query}"
            for secret in [others, STATIC, ADMIN, COOKIE, PROXY_AUTH, API_KEY_HEADER, *run.issued, *run.wrong]:
                assert not _leaks(text, secret)
            assert own not in str(request.body)


def test_redis_holds_digests_never_secrets(run: Run) -> None:
    assert run.redis_dump
    for secret in _every_secret(run):
        assert not _leaks(run.redis_dump, secret)
    for secret in run.issued[1:]:  # the live ones are there, as SHA-256
        assert hash_key(secret) in run.redis_dump


def test_without_an_admin_key_the_admin_api_does_not_exist(stub: StubUpstream) -> None:
    from starlette.testclient import TestClient

    from proxy.app import create_app

    config = parse_config(f"upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]\n"
                          f"keys: [{{name: s, key: {STATIC}}}]\n", {})
    with TestClient(create_app(config)) as client:
        for method, path in ADMIN_ROUTES:
            for key in (ADMIN, STATIC, ""):
                resp = client.request(method, path, headers={"Authorization": f"Bearer {key}"})
                assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"


# --- keys are compared in constant time: hmac.compare_digest decides ---------------------


class _Spy:
    """Stands in for hmac.compare_digest: records the call and answers as told."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, Any]] = []

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return self.answer


@pytest.mark.parametrize("answer", [True, False])
def test_static_key_lookup_is_decided_by_compare_digest(monkeypatch: pytest.MonkeyPatch, answer: bool) -> None:
    config = parse_config(f"upstreams: [{{name: a, base_url: 'http://127.0.0.1:9/v1', models: [m]}}]\n"
                          f"keys: [{{name: s, key: {STATIC}}}]\n", {})
    spy = _Spy(answer)
    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    found = StaticKeys(config).find(hash_key(STATIC))
    assert spy.calls == [(hash_key(STATIC), hash_key(STATIC))]
    assert (found is not None) is answer  # the digest matched in the table, yet compare_digest has the last word


@pytest.mark.parametrize("answer", [True, False])
async def test_issued_key_lookup_is_decided_by_compare_digest(monkeypatch: pytest.MonkeyPatch, answer: bool) -> None:
    issued = IssuedKeys(MemoryDirectory())
    _, secret = await issued.create(KeySpec(name="k"), "test")
    spy = _Spy(answer)
    monkeypatch.setattr(issued_module.hmac, "compare_digest", spy)
    found = issued.find(hash_key(secret))
    assert spy.calls == [(hash_key(secret), hash_key(secret))]
    assert (found is not None) is answer


@pytest.mark.parametrize("answer", [True, False])
def test_the_admin_key_check_is_decided_by_compare_digest(monkeypatch: pytest.MonkeyPatch, answer: bool) -> None:
    config = parse_config(f"admin_key: {ADMIN}\nupstreams: [{{name: a, base_url: 'http://127.0.0.1:9/v1', "
                          "models: [m]}]\n", {})
    spy = _Spy(answer)
    monkeypatch.setattr(admin_module.hmac, "compare_digest", spy)
    request = Request({"type": "http", "method": "GET", "path": "/admin/keys", "client": ("127.0.0.1", 1),
                       "headers": [(b"authorization", f"Bearer {ADMIN}".encode())]})
    if answer:
        assert admin_module._authorize(config, request, AuthFailureGuard()).startswith("admin@")
    else:
        with pytest.raises(AuthenticationError):
            admin_module._authorize(config, request, AuthFailureGuard())
    assert spy.calls == [(ADMIN.encode(), ADMIN.encode())]


def test_only_digests_are_kept_for_static_keys() -> None:
    config = parse_config(f"upstreams: [{{name: a, base_url: 'http://127.0.0.1:9/v1', models: [m]}}]\n"
                          f"keys: [{{name: s, key: {STATIC}}}]\n", {})
    assert STATIC not in repr(config.keys) and STATIC not in repr(StaticKeys(config).__dict__)
    assert hashlib.sha256(STATIC.encode()).hexdigest() in repr(StaticKeys(config).__dict__)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    yield server
    server.stop()


def test_no_sk_looking_string_in_the_log(run: Run) -> None:
    """Belt and braces: no ``sk-`` token with a long random tail in the log."""
    assert re.search(r"sk-[A-Za-z0-9_-]{20,}", run.log) is None
