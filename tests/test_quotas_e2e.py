"""Quotas end to end: real gateway processes, a real Redis, a real upstream, the openai SDK.

The same tests run against two gateway processes sharing one Redis ("redis")
and against one gateway with the in-process store ("memory"). Every test
issues its own key through the admin API, so the 60-second windows of one
test never touch another's. Outage tests have their own Redis, which they kill
and restart on the same port.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.apis.schema import parse_chat_request
from proxy.upstreams import mock
from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import RedisServer
from tests.stub_upstream import StubUpstream

pytestmark = pytest.mark.timeout(120)

ADMIN = "sk-admin-quotas-e2e"
STATIC = "sk-static-quotas-e2e"  # a config key for the outage tests: Redis restarts empty
MODEL = "m"
COMPLETION_TOKENS = 8  # what the stub answers when max_tokens allows it
MAX_OUTPUT_TOKENS = 100  # the model's maximum output: what the estimate holds at most per choice
RATE_HEADERS = tuple(f"x-ratelimit-{w}-{u}" for u in ("requests", "tokens") for w in ("limit", "remaining", "reset"))
REQUEST_TIMEOUT = 15.0  # no single request may take longer; a hang fails the test instead of stalling it


def config(stub: StubUpstream, redis_url: str | None = None, on_store_error: str = "fail_closed",
           static_limits: str = "{}") -> str:
    redis = f"redis_url: {redis_url}\n" if redis_url else ""
    return f"""
{redis}admin_key: {ADMIN}
upstreams:
  - name: stub
    base_url: '{stub.url}'
    models: [{MODEL}]
    timeout: {{connect: 2, first_byte: 10, idle: 10, total: 30}}
health: {{failure_threshold: 1000}}   # upstream failures here are on purpose; never eject the only one
routing: {{max_attempts: 1}}
models: {{{MODEL}: {{max_output_tokens: {MAX_OUTPUT_TOKENS}}}}}
keys: [{{name: static, key: {STATIC}, limits: {static_limits}}}]
quotas: {{on_store_error: {on_store_error}, store_timeout: 0.25}}
logging: {{access_log: false}}
"""


def body(content: str = "supercalifragilistic expialidocious", max_tokens: int = COMPLETION_TOKENS,
         **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            **extra}


def upstream_usage(request: dict[str, Any]) -> int:
    """The total_tokens the stub reports for a request (its answers are deterministic)."""
    return int(mock.plan(request, COMPLETION_TOKENS).usage()["total_tokens"])


def gateway_estimate(request: dict[str, Any]) -> int:
    """What the gateway reserves before forwarding: its prompt estimate + max_tokens × n, with
    max_tokens bounded by the model's maximum output."""
    parsed = parse_chat_request(orjson.dumps(request), "application/json")
    return parsed.prompt_tokens + min(parsed.max_tokens or 4096, MAX_OUTPUT_TOKENS) * parsed.n


def prompt_estimate(request: dict[str, Any]) -> int:
    return parse_chat_request(orjson.dumps(request), "application/json").prompt_tokens


@dataclass
class Env:
    backend: str
    stub: StubUpstream
    gateways: list[GatewayProcess]
    http: httpx.Client

    def admin(self, method: str, path: str, gateway: int = 0, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, self.gateways[gateway].url + path,
                                 headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)

    def new_key(self, team: str | None = None, **limits: int) -> tuple[str, str]:
        """A fresh issued key (id, secret), known to every gateway before it returns."""
        made = self.admin("POST", "/admin/keys", json={"name": f"k-{time.monotonic_ns()}", "team": team,
                                                       "limits": limits})
        assert made.status_code == 201, made.text
        secret = made.json()["key"]
        for gw in self.gateways:
            wait_until(lambda gw=gw: self.http.get(gw.url + "/v1/models", headers=bearer(secret))
                       .status_code == 200, within=2.0)
        return made.json()["id"], secret

    def usage(self, key_id: str) -> dict[str, int]:
        answer = self.admin("GET", f"/admin/keys/{key_id}")
        assert answer.status_code == 200, answer.text
        return {row["limit"]: row["used"] for row in answer.json()["usage"]}

    def chat(self, secret: str, request: dict[str, Any], gateway: int = 0) -> httpx.Response:
        gw = self.gateways[gateway % len(self.gateways)]
        return self.http.post(gw.url + "/v1/chat/completions", json=request, headers=bearer(secret))

    def burst(self, secret: str, request: dict[str, Any], count: int, workers: int = 16) -> list[httpx.Response]:
        """``count`` requests at once, spread over the gateways; each read to its end."""
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda i: self.chat(secret, request, i), range(count)))

    def sdk(self, secret: str, gateway: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateways[gateway % len(self.gateways)].url + "/v1", api_key=secret,
                             max_retries=0, timeout=REQUEST_TIMEOUT)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def wait_until(check: Callable[[], bool], within: float, step: float = 0.02) -> float:
    """Seconds until ``check()`` held; fails the test if it did not within ``within``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not true within {within}s")
        time.sleep(step)
    return time.monotonic() - started


@contextlib.contextmanager
def http_client() -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(timeout=REQUEST_TIMEOUT, limits=limits) as client:
        yield client


@pytest.fixture(scope="module")
def upstream() -> Iterator[StubUpstream]:
    stub = StubUpstream(completion_tokens=COMPLETION_TOKENS).start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture(scope="module", params=["redis", "memory"])
def env_shared(request: pytest.FixtureRequest, upstream: StubUpstream) -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        redis_url = None
        if request.param == "redis":
            redis = RedisServer()
            stack.callback(redis.close)
            redis_url = redis.start().url
        text = config(upstream, redis_url)
        gateways = []
        for _ in range(2 if redis_url else 1):  # the in-process store is valid for ONE replica only
            gw = GatewayProcess(text)
            stack.callback(gw.close)
            gateways.append(gw.start())
        client = stack.enter_context(http_client())
        yield Env(request.param, upstream, gateways, client)


@pytest.fixture
def env(env_shared: Env) -> Env:
    env_shared.stub.reset()
    return env_shared


def assert_rate_headers(response: httpx.Response) -> None:
    missing = [h for h in RATE_HEADERS if h not in response.headers]
    assert not missing, f"{response.status_code} lacks {missing}"


# --- every limit, across replicas


def test_exactly_rpm_requests_succeed(env: Env) -> None:
    key_id, secret = env.new_key(rpm=10, tpm=10**7)
    answers = env.burst(secret, body(), 40)
    ok = [a for a in answers if a.status_code == 200]
    denied = [a for a in answers if a.status_code == 429]
    assert len(ok) == 10 and len(denied) == 30, sorted(a.status_code for a in answers)
    assert len(env.stub.chat_requests) == 10  # a denied request never reaches the upstream
    for answer in ok + denied:
        assert_rate_headers(answer)
        assert answer.headers["x-ratelimit-limit-requests"] == "10"
    for answer in denied:
        assert 1 <= int(answer.headers["retry-after"]) <= 61  # a request counts for 60 to 61 s
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
        error = answer.json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert "requests per min (RPM)" in error["message"] and "Limit 10" in error["message"]
    with pytest.raises(openai.RateLimitError) as raised:
        env.sdk(secret).chat.completions.create(**body())
    assert raised.value.status_code == 429 and raised.value.code == "rate_limit_exceeded"
    assert int(raised.value.response.headers["retry-after"]) >= 1
    assert env.usage(key_id)["rpm"] == 10
    assert len(env.stub.chat_requests) == 10


def test_a_token_budget_admits_what_fits_and_is_never_overshot_by_estimates(env: Env) -> None:
    request = body()
    estimate, actual = gateway_estimate(request), upstream_usage(request)
    assert actual <= estimate  # so settling only ever lowers a counter, and the bounds below are exact
    limit = 10 * estimate + estimate // 2
    key_id, secret = env.new_key(tokens_per_day=limit)
    answers = env.burst(secret, request, 40)
    for denied in (a for a in answers if a.status_code == 429):
        error = denied.json()["error"]
        # Denied in the burst: held by requests in flight (they settle lower: retry at once), or spent.
        assert (error["code"], denied.headers.get("x-should-retry")) in (
            ("rate_limit_exceeded", "true"), ("insufficient_quota", "false")), denied.text
        if error["code"] == "rate_limit_exceeded":
            assert denied.headers["retry-after"] == "1" and "in flight" in error["message"]
    # Settles that came in below the estimate left room: spend it, one at a time, until settled usage
    # alone leaves too little (a request whose settle is still under way holds its estimate meanwhile).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        last = env.chat(secret, request)
        if last.status_code == 429 and last.json()["error"]["code"] == "insufficient_quota":
            break
        if last.status_code == 429:
            time.sleep(0.02)
    assert last.status_code == 429
    used = env.usage(key_id)["tokens_per_day"]
    admitted = sum(a.status_code == 200 for a in answers)
    assert limit - estimate < used <= limit, (used, limit, estimate)
    assert admitted >= 10  # ten estimates fit in the budget at once
    error = last.json()["error"]
    assert error["code"] == "insufficient_quota" and "tokens per day" in error["message"]
    assert last.headers["x-should-retry"] == "false"
    now = datetime.now(UTC).timestamp()
    assert abs(int(last.headers["retry-after"]) - ((now // 86400 + 1) * 86400 - now)) <= 5
    assert set(a.status_code for a in answers) <= {200, 429}
    # The budget gauges are refreshed from the store every 10 s: tests/test_e2e_telemetry.py.


def test_a_huge_max_tokens_holds_at_most_the_models_output_and_locks_no_one_out(env: Env) -> None:
    team = f"fair-{env.backend}"
    greedy_request = body(max_tokens=2**31 - 1, n=128, stream=True)
    budget = gateway_estimate(greedy_request) + 10 * gateway_estimate(body())  # room for both, bounded
    assert env.admin("PUT", f"/admin/teams/{team}", json={"limits": {"tokens_per_day": budget}}).status_code == 200
    _, greedy = env.new_key(team=team)
    _, other = env.new_key(team=team)
    env.stub.behave("slow", delay=0.5)  # the greedy stream stays in flight, its estimate held
    url = env.gateways[0].url + "/v1/chat/completions"
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client, \
            client.stream("POST", url, json=greedy_request, headers=bearer(greedy)) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_raw()  # kept: a dropped iterator closes the connection at once
        next(chunks)
        env.stub.behave("ok")
        for i in range(2):  # every other key of the team still gets through
            polite = env.chat(other, body(), gateway=i)
            assert polite.status_code == 200, polite.text


def test_a_request_that_can_never_fit_is_refused_at_once_and_the_sdk_does_not_retry_it(env: Env) -> None:
    team = f"small-{env.backend}"
    assert env.admin("PUT", f"/admin/teams/{team}", json={"limits": {"tokens_per_day": 5000}}).status_code == 200
    _, secret = env.new_key(team=team)
    request = body(max_tokens=64, n=128)  # up to 8,192 tokens and more: never within 5,000
    statuses: list[int] = []
    with openai.DefaultHttpxClient(event_hooks={"response": [lambda r: statuses.append(r.status_code)]}) as http:
        sdk = openai.OpenAI(base_url=env.gateways[0].url + "/v1", api_key=secret, max_retries=2,
                            timeout=REQUEST_TIMEOUT, http_client=http)
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.chat.completions.create(**request)
    assert raised.value.code == "estimate_exceeds_limit" and statuses == [429]
    message = raised.value.message
    assert "Request too large for team" in message and "Limit 5000" in message and "max_tokens" in message
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert not env.stub.chat_requests  # nothing reached the upstream
    assert env.chat(secret, body()).status_code == 200  # the budget is untouched


def send_and_leave(gateway: GatewayProcess, secret: str, request: dict[str, Any]) -> socket.socket:
    """Send a whole request on a raw connection and read nothing; closing the socket leaves."""
    data = orjson.dumps(request)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=REQUEST_TIMEOUT)
    sock.sendall(head + data)
    return sock


def test_abandoned_plain_requests_are_charged_their_prompts(env: Env) -> None:
    key_id, secret = env.new_key(tpm=10**8, tokens_per_day=10**8)
    env.stub.behave("ok", delay_headers=60)  # the answers take long: the clients leave first
    requests = [body(content=f"{i} " + "x" * 1_000_000) for i in range(3)]
    sockets = [send_and_leave(env.gateways[i % len(env.gateways)], secret, r) for i, r in enumerate(requests)]
    try:
        wait_until(lambda: len(env.stub.chat_requests) == 3, within=30.0)  # each reached the upstream
    finally:
        for sock in sockets:
            sock.close()
    wait_until(lambda: env.stub.in_flight == 0, within=15.0)  # the upstream requests were cancelled
    # The provider bills a prompt it was sent: at least the prompt estimate is charged, never 0.
    prompts = sum(prompt_estimate(r) for r in requests)
    wait_until(lambda: env.usage(key_id) == {"tpm": prompts, "tokens_per_day": prompts}, within=15.0)


def test_a_concurrency_limit_of_n_never_sees_n_plus_one(env: Env) -> None:
    key_id, secret = env.new_key(concurrency=3)
    env.stub.behave("slow", delay=0.03)  # a stream of ~12 events: ~0.35 s in flight

    def stream(i: int) -> int:
        gw = env.gateways[i % len(env.gateways)]
        with env.http.stream("POST", gw.url + "/v1/chat/completions", json=body(stream=True),
                             headers=bearer(secret)) as answer:
            answer.read()
            if answer.status_code == 429:
                assert "concurrent requests" in answer.json()["error"]["message"]
            return answer.status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(stream, range(48)))
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 3
    assert env.stub.max_in_flight == 3
    assert env.usage(key_id)["concurrency"] == 0  # every lease came back


def test_usage_is_charged_exactly_as_the_upstream_reported(env: Env) -> None:
    team = f"acct-{env.backend}"
    assert env.admin("PUT", f"/admin/teams/{team}", json={"limits": {"tokens_per_day": 10**7}}).status_code == 200
    key_id, secret = env.new_key(team=team, tpm=10**6, tokens_per_day=10**7, tokens_per_month=10**8)
    expected = 0
    plain = body(content="count me exactly")
    answer = env.sdk(secret, 0).chat.completions.create(**plain)
    assert answer.usage is not None and answer.usage.total_tokens == upstream_usage(plain)
    expected += answer.usage.total_tokens

    # A stream whose client did not ask for usage: the client sees none, the gateway counts it.
    quiet = body(content="stream me quietly", stream=True)
    chunks = list(env.sdk(secret, 1).chat.completions.create(**quiet))
    assert chunks and all(c.usage is None for c in chunks)
    upstream_body = env.stub.chat_requests[-1].body
    assert upstream_body["stream_options"] == {"include_usage": True}
    expected += upstream_usage(quiet)

    told = body(content="stream me with usage", stream=True, stream_options={"include_usage": True}, n=2)
    reported = [c.usage for c in env.sdk(secret, 0).chat.completions.create(**told) if c.usage is not None]
    assert len(reported) == 1 and reported[0].total_tokens == upstream_usage(told)
    expected += reported[0].total_tokens

    several = body(content="two choices", n=2, max_tokens=3)
    answer = env.sdk(secret, 1).chat.completions.create(**several)
    assert answer.usage is not None and answer.usage.total_tokens == upstream_usage(several)
    expected += answer.usage.total_tokens

    assert env.usage(key_id) == {"tpm": expected, "tokens_per_day": expected, "tokens_per_month": expected}
    team_usage = env.admin("GET", f"/admin/teams/{team}/usage").json()["usage"]
    assert [(u["scope"], u["limit"], u["used"]) for u in team_usage] == [("team", "tokens_per_day", expected)]


def test_an_answer_without_usage_is_charged_an_estimate_of_its_length(env: Env) -> None:
    key_id, secret = env.new_key(tpm=10**6, tokens_per_day=10**7)
    completion = {"id": "chatcmpl-quiet", "object": "chat.completion", "created": 1, "model": MODEL,
                  "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                               "message": {"role": "assistant", "content": "word " * 200}}]}
    env.stub.behave("status", status=200, body=completion)  # an upstream that reports no usage
    request = body(content="what does this cost")
    answer = env.chat(secret, request)
    assert answer.status_code == 200 and "usage" not in answer.json()
    prompt = parse_chat_request(orjson.dumps(request), "application/json").prompt_tokens
    # One token per 16 bytes of the answer (docs/quotas.md), never the reservation's max_tokens.
    assert env.usage(key_id)["tokens_per_day"] == prompt + len(answer.content) // 16


def test_an_abandoned_stream_releases_its_lease_at_once(env: Env) -> None:
    key_id, secret = env.new_key(concurrency=1)
    env.stub.behave("slow", delay=0.5)  # ~5 s if it ran to its end
    url = env.gateways[0].url + "/v1/chat/completions"
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client, \
            client.stream("POST", url, json=body(stream=True), headers=bearer(secret)) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_raw()  # kept: a dropped iterator closes the connection at once
        next(chunks)  # the first event: the stream is under way
        held = env.chat(secret, body(), gateway=-1)
        assert held.status_code == 429 and "concurrent" in held.json()["error"]["message"]
        env.stub.behave("ok")
    # The client went away (connection closed) without reading the rest.
    started = time.monotonic()
    answers = []
    while time.monotonic() - started < 3:
        answers.append(env.chat(secret, body(), gateway=-1))
        if answers[-1].status_code == 200:
            break
        time.sleep(0.02)
    assert answers[-1].status_code == 200
    assert time.monotonic() - started < 1.0, [a.status_code for a in answers]
    wait_until(lambda: env.stub.in_flight == 0, within=2.0)  # the upstream request was cancelled too
    assert env.usage(key_id)["concurrency"] == 0


def test_an_upstream_failure_releases_and_charges_nothing(env: Env) -> None:
    key_id, secret = env.new_key(concurrency=1, tpm=10**6, tokens_per_day=10**6)
    env.stub.behave("status", status=500)
    for i in range(3):
        failed = env.chat(secret, body(), gateway=i)
        assert failed.status_code >= 500 and failed.json()["error"]
    env.stub.behave("cut", after=0)  # a stream that breaks before its first byte
    failed = env.chat(secret, body(stream=True))
    assert failed.status_code >= 500
    assert env.usage(key_id) == {"tpm": 0, "concurrency": 0, "tokens_per_day": 0}
    env.stub.behave("ok")
    assert env.chat(secret, body(), gateway=1).status_code == 200  # the lease was released


def test_keys_and_teams_limits_apply_together(env: Env) -> None:
    team = f"pair-{env.backend}"
    assert env.admin("PUT", f"/admin/teams/{team}", json={"limits": {"rpm": 4}}).status_code == 200
    _, first = env.new_key(team=team, rpm=100)
    _, second = env.new_key(team=team, rpm=100)
    statuses = [env.chat(secret, body(), gateway=i).status_code
                for i, secret in enumerate([first, second] * 3)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    denied = env.chat(first, body())
    assert f"team '{team}'" in denied.json()["error"]["message"]


# --- Redis failures: a Redis of their own, killed and restarted on the same port


@dataclass
class Outage:
    redis: RedisServer
    closed: GatewayProcess  # quotas.on_store_error: fail_closed
    open: GatewayProcess  # fail_open
    http: httpx.Client


@pytest.fixture(scope="module")
def outage_shared(upstream: StubUpstream) -> Iterator[Outage]:
    with contextlib.ExitStack() as stack:
        redis = RedisServer()
        stack.callback(redis.close)
        redis.start()
        gateways = {}
        for mode in ("fail_closed", "fail_open"):
            gw = GatewayProcess(config(upstream, redis.url, mode, static_limits="{rpm: 100000, tpm: 100000000}"))
            stack.callback(gw.close)
            gateways[mode] = gw.start()
        yield Outage(redis, gateways["fail_closed"], gateways["fail_open"], stack.enter_context(http_client()))


@pytest.fixture
def outage(outage_shared: Outage, upstream: StubUpstream) -> Outage:
    upstream.reset()
    return outage_shared


@dataclass
class Sample:
    status: int
    seconds: float
    code: str | None
    rate_headers: bool


class Traffic:
    """A few threads sending requests to one gateway until stopped: at most ``limit`` requests, ``within`` s."""

    def __init__(self, http: httpx.Client, gw: GatewayProcess, threads: int = 4, limit: int = 2000,
                 within: float = 30.0) -> None:
        self._http, self._gw, self._limit, self._within = http, gw, limit, within
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 5)

    def _run(self) -> None:
        deadline = time.monotonic() + self._within
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.samples) < self._limit:
            started = time.monotonic()
            try:
                answer = self._http.post(self._gw.url + "/v1/chat/completions", json=body(max_tokens=2),
                                         headers=bearer(STATIC))
                status, code = answer.status_code, answer.json().get("error", {}).get("code")
                rates = "x-ratelimit-limit-requests" in answer.headers
            except httpx.HTTPError:
                status, code, rates = 0, None, False  # a timeout: a hang
            with self._lock:
                self.samples.append(Sample(status, time.monotonic() - started, code, rates))
            time.sleep(0.005)

    def count(self, status: int) -> int:
        with self._lock:
            return sum(s.status == status for s in self.samples)

    def wait_for(self, status: int, more: int, within: float) -> None:
        target = self.count(status) + more
        wait_until(lambda: self.count(status) >= target, within)


def readyz(http: httpx.Client, gw: GatewayProcess) -> httpx.Response:
    return http.get(gw.url + "/readyz")


def kill_redis(redis: RedisServer) -> None:
    assert redis.proc is not None
    redis.proc.kill()  # SIGKILL: no goodbye to the clients
    redis.proc.wait(5)


def test_redis_killed_fail_closed_gives_fast_503s_then_recovers(outage: Outage) -> None:
    gw, http = outage.closed, outage.http
    with Traffic(http, gw) as traffic:
        traffic.wait_for(200, 10, within=10)
        kill_redis(outage.redis)
        traffic.wait_for(503, 20, within=10)
        answer = readyz(http, gw)
        assert answer.status_code == 503 and answer.json()["checks"]["quota_store"] is False
        metrics = http.get(gw.url + "/metrics").text
        assert 'llm_proxy_store_errors_total{operation="reserve"}' in metrics
        outage.redis.restart()  # same port, empty
        traffic.wait_for(200, 10, within=5)
    samples = traffic.samples
    assert {s.status for s in samples} == {200, 503}, {s.status for s in samples}
    assert max(s.seconds for s in samples) < 1.5  # never a hang
    assert {s.code for s in samples if s.status == 503} == {"quota_store_unavailable"}
    assert all(s.rate_headers for s in samples if s.status == 200)
    assert all(s.status == 200 for s in samples[-8:])  # Redis back: no 503 again
    assert readyz(http, gw).status_code == 200


def test_readiness_recovers_when_redis_returns_without_traffic(outage: Outage) -> None:
    # Kubernetes sends no traffic to an unready pod, so /readyz must find Redis again by itself.
    gw, http = outage.closed, outage.http
    kill_redis(outage.redis)
    assert http.post(gw.url + "/v1/chat/completions", json=body(), headers=bearer(STATIC)).status_code == 503
    assert readyz(http, gw).status_code == 503
    outage.redis.restart()
    wait_until(lambda: readyz(http, gw).status_code == 200, within=3.0, step=0.1)


def test_a_hung_redis_never_hangs_a_request(outage: Outage) -> None:
    gw, http = outage.closed, outage.http
    assert outage.redis.proc is not None
    outage.redis.proc.send_signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            timed = list(pool.map(lambda _: _timed_post(http, gw), range(16)))
    finally:
        outage.redis.proc.send_signal(signal.SIGCONT)
    assert {status for status, _ in timed} == {503}
    assert max(seconds for _, seconds in timed) < 1.5
    wait_until(lambda: _timed_post(http, gw)[0] == 200, within=5.0, step=0.1)


def _timed_post(http: httpx.Client, gw: GatewayProcess) -> tuple[int, float]:
    started = time.monotonic()
    answer = http.post(gw.url + "/v1/chat/completions", json=body(max_tokens=2), headers=bearer(STATIC))
    return answer.status_code, time.monotonic() - started


def test_redis_killed_fail_open_keeps_serving(outage: Outage) -> None:
    gw, http = outage.open, outage.http
    with Traffic(http, gw) as traffic:
        traffic.wait_for(200, 10, within=10)
        kill_redis(outage.redis)
        time.sleep(0.5)
        during = len(traffic.samples)
        traffic.wait_for(200, 20, within=10)
        answer = readyz(http, gw)
        assert answer.status_code == 200 and answer.json()["checks"]["quota_store"] is True
        outage.redis.restart()
        wait_until(lambda: traffic.samples[-1].rate_headers, within=3.0)  # counted again
        traffic.wait_for(200, 5, within=5)
    samples = traffic.samples
    assert {s.status for s in samples} == {200}, gw.log()[-6000:]
    assert max(s.seconds for s in samples) < 1.5
    assert not all(s.rate_headers for s in samples[during:])  # admitted uncounted while Redis was away
    assert samples[-1].rate_headers  # and counted again once it was back
