"""Faults, on loopback with real processes (issue 8, item 1).

Each fault gives the client a clear OpenAI-format error or a correct answer,
never a hang past the deadline and never a 200 with a corrupt body; and the
usage ledger stays exact. The ledger is read from the admin API (the usage of
an issued key against each limit) and compared with what the stub upstreams
served, request by request (joined on ``x-request-id``, which the gateway
forwards): a settled request is charged the usage the upstream reported, or,
when a broken stream carried none, the gateway's documented fallback (its
prompt estimate plus one token per content event relayed); a request that
failed before its first byte is charged nothing. Across a Redis or gateway
outage the reservations that could not be settled are pinned down by their
concurrency leases (``reserved = settled + released``), and a reservation
whose answer was lost is released in the background (the gateway logs any
release it gives up).
"""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.apis.schema import parse_chat_request
from proxy.upstreams import mock
from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import LateReplies, RedisServer
from tests.spec import assert_conforms
from tests.stub_upstream import Seen, StubUpstream

ADMIN = "sk-admin-faults-0123456789"
MESSAGES = [{"role": "user", "content": "tell me about faults"}]
MAX_TOKENS = 50
DEADLINE = 4.0
TIMEOUTS = "{connect: 1, first_byte: 1, idle: 1, total: 1.5}"
LIMITS = {"rpm": 1_000_000, "tokens_per_day": 1_000_000_000, "concurrency": 10_000}


# --- helpers ------------------------------------------------------------------


@dataclass
class Answer:
    """One client request as the client saw it."""

    request_id: str
    model: str
    stream: bool
    status: int
    headers: httpx.Headers
    body: bytes
    seconds: float
    events: list[bytes] = field(default_factory=list)


def _config(a: StubUpstream, b: StubUpstream) -> str:
    return f"""admin_key: {ADMIN}
upstreams:
  - {{name: a, base_url: '{a.url}', models: [solo, dup], priority: 0, timeout: {TIMEOUTS}}}
  - {{name: b, base_url: '{b.url}', models: [dup], priority: 1, timeout: {TIMEOUTS}}}
routing: {{strategy: round_robin, max_attempts: 3, deadline: {DEADLINE}, retry_budget: 10,
          min_retries_per_second: 1000}}
health: {{failure_threshold: 1000000}}
quotas: {{default_max_tokens: 100}}
server: {{reload_interval: 0.2, shutdown_delay: 0}}
"""


def issue_key(gw: GatewayProcess, name: str, **limits: int) -> tuple[str, str]:
    """A new issued key with generous limits (unless given): (id, secret)."""
    resp = httpx.post(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"name": name, "limits": {**LIMITS, **limits}}, timeout=5)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], resp.json()["key"]


def usage(gw: GatewayProcess, key_id: str) -> dict[str, int]:
    """What the admin API says the key used, per limit."""
    resp = httpx.get(f"{gw.url}/admin/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    assert resp.status_code == 200, resp.text
    rows = resp.json()["usage"]
    assert rows is not None, "the quota store is not answering"
    return {row["limit"]: row["used"] for row in rows}


def send(url: str, key: str, model: str, stream: bool, timeout: float = 30) -> Answer:
    request_id = uuid.uuid4().hex
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": stream}
    started = time.monotonic()
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id})
    answer = Answer(request_id, model, stream, resp.status_code, resp.headers, resp.content,
                    time.monotonic() - started)
    if stream and resp.status_code == 200:
        answer.events = _events(resp.content)
    return answer


def _events(data: bytes) -> list[bytes]:
    """The complete SSE events of a body (what an SSE client dispatches)."""
    parts = re.split(rb"\r\n\r\n|\n\n|\r\r", data)
    return parts[:-1]  # the last part is what followed the final blank line: nothing, or a cut


def _data(event: bytes) -> bytes:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)


def assert_openai_error(status: int, body: bytes) -> dict[str, Any]:
    assert status >= 400, status
    payload = orjson.loads(body)
    assert_conforms(payload, "ErrorResponse")
    assert b"Traceback" not in body
    return dict(payload["error"])


def prompt_estimate(model: str, stream: bool) -> int:
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": stream}
    return parse_chat_request(orjson.dumps(body), "application/json").prompt_tokens


def reservation_estimate() -> int:
    return prompt_estimate("m", False) + MAX_TOKENS


def served_usage(model: str) -> int:
    """What the stub's usage says one of our requests cost (prompt + completion)."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    return int(mock.plan(body, 8).usage()["total_tokens"])


def _seen(stub: StubUpstream, request_id: str) -> Seen:
    found = [s for s in stub.chat_requests if s.headers.get("x-request-id") == request_id]
    assert len(found) == 1, f"{len(found)} upstream requests with id {request_id}"
    return found[0]


def charged(answer: Answer, stubs: dict[str, StubUpstream]) -> int:
    """What the ledger must hold for one answered request, from what the upstream sent."""
    if answer.status >= 400:
        return 0  # no upstream bytes reached the client: the reservation is refunded
    seen = _seen(stubs[answer.headers["x-llm-proxy-upstream"]], answer.request_id)
    if not answer.stream:
        reported = orjson.loads(seen.sent)["usage"]
        return int(reported["prompt_tokens"]) + int(reported["completion_tokens"])
    sent = _events(seen.sent)
    for event in sent:
        payload = _data(event)
        if payload.startswith(b"{") and b'"usage":{' in payload:
            reported = orjson.loads(payload)["usage"]
            return int(reported["prompt_tokens"]) + int(reported["completion_tokens"])
    # No usage event: the documented fallback, the prompt estimate + one token per content event.
    return prompt_estimate(answer.model, True) + sum(b'"content":"' in e for e in sent)


def expected_stream(model: str) -> bytes:
    """The bytes a client that did not ask for usage gets from a healthy upstream."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    return b"".join(mock.stream_events(mock.plan(body, 8), include_usage=False))


def check_answer(answer: Answer, stubs: dict[str, StubUpstream]) -> str:
    """Assert the answer is a correct one or a clear error; say which: ok, error or cut."""
    assert answer.seconds < DEADLINE + 1.5, f"{answer.seconds:.2f}s: past the deadline"
    if answer.status != 200:
        error = assert_openai_error(answer.status, answer.body)
        assert answer.status in (502, 503, 504), (answer.status, error)
        return "error"
    upstream = answer.headers["x-llm-proxy-upstream"]
    if not answer.stream:
        assert answer.headers["content-type"] == "application/json"
        assert_conforms(orjson.loads(answer.body), "CreateChatCompletionResponse")
        assert answer.body == _seen(stubs[upstream], answer.request_id).sent  # relayed as sent
        return "ok"
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.body.endswith(b"\n\n"), "the stream ends in the middle of an event"
    datas = [_data(e) for e in answer.events]
    if datas[-1] == b"[DONE]":
        for payload in datas[:-1]:
            assert_conforms(orjson.loads(payload), "CreateChatCompletionStreamResponse")
        if _seen(stubs[upstream], answer.request_id).sent.endswith(b"data: [DONE]\n\n"):
            assert answer.body == expected_stream(answer.model)
        return "ok"
    # A broken stream: every event whole and valid, then one OpenAI error event, and no [DONE].
    assert b"[DONE]" not in datas
    for payload in datas[:-1]:
        assert_conforms(orjson.loads(payload), "CreateChatCompletionStreamResponse")
    assert_conforms(orjson.loads(datas[-1]), "ErrorResponse")
    return "cut"


# --- fixtures: one gateway with the in-process store for the upstream faults --


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubUpstream]]:
    servers = {"a": StubUpstream().start(), "b": StubUpstream().start()}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def local_gw(stubs: dict[str, StubUpstream]) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(_config(stubs["a"], stubs["b"]))
    try:
        yield gw.start()
    finally:
        gw.close()


@pytest.fixture(autouse=True)
def _fresh_stubs(stubs: dict[str, StubUpstream]) -> None:
    for server in stubs.values():
        server.reset()


# --- upstream faults ------------------------------------------------------------

# mode → what a stream to the faulty upstream alone gets: "error" (failed before
# its first byte: another upstream may answer) or "cut" (failed after it: an error event).
UPSTREAM_FAULTS: dict[str, str] = {
    "reset": "error", "garbage": "error", "truncated": "error", "wrong_type": "error",
    "html_error": "error", "error_200": "error", "status": "error", "hang": "error",
    "hang_body": "error", "cut": "cut", "cut_body": "cut", "stall": "cut", "no_done": "cut",
    "garbage_sse": "cut", "no_usage": "ok",
}
# Plain (non-streamed) requests never commit before the whole body is in hand.
PLAIN = {"cut": "ok", "stall": "ok", "no_done": "ok", "no_usage": "ok", "garbage_sse": "error"}


def test_upstream_faults_give_a_clear_error_or_a_correct_answer_and_an_exact_ledger(
        local_gw: GatewayProcess, stubs: dict[str, StubUpstream]) -> None:
    key_id, key = issue_key(local_gw, "upstream-faults")
    answers: list[Answer] = []
    with ThreadPoolExecutor(4) as pool:
        for mode, stream_outcome in UPSTREAM_FAULTS.items():
            stubs["a"].behave(mode)
            cases = [(model, stream) for model in ("solo", "dup") for stream in (False, True)]
            batch = list(pool.map(lambda c: send(local_gw.url, key, *c), cases))
            for answer in batch:
                outcome = check_answer(answer, stubs)
                if answer.model == "dup" and not (answer.stream and stream_outcome == "cut"):
                    expected = "ok"  # the healthy upstream answers instead
                elif answer.stream:
                    expected = stream_outcome
                else:
                    expected = PLAIN.get(mode, "error")
                assert outcome == expected, (mode, answer.model, answer.stream, answer.body[-300:])
            answers += batch
    assert local_gw.proc is not None and local_gw.proc.poll() is None
    used = usage(local_gw, key_id)
    assert used["rpm"] == len(answers)  # every request was admitted once...
    assert used["concurrency"] == 0  # ...and every lease came back
    assert used["tokens_per_day"] == sum(charged(a, stubs) for a in answers)  # exact, not approximate


@pytest.mark.parametrize("mode", ["cut_body", "cut", "stall", "no_done", "garbage_sse"])
def test_the_sdk_raises_an_api_error_for_a_broken_stream(
        local_gw: GatewayProcess, stubs: dict[str, StubUpstream], mode: str) -> None:
    """Not a JSON decoding error: a half event must never be glued to the error event."""
    _, key = issue_key(local_gw, f"sdk-{mode}")
    stubs["a"].behave(mode)
    client = openai.OpenAI(base_url=local_gw.url + "/v1", api_key=key, max_retries=0, timeout=10)
    with pytest.raises(openai.APIError) as raised:
        for _ in client.chat.completions.create(model="solo", messages=MESSAGES,  # type: ignore[arg-type]
                                                stream=True):
            pass
    assert raised.value.code in ("upstream_stream_error", "upstream_stream_cut", "upstream_idle_timeout")


def test_upstream_account_headers_never_reach_the_client(
        local_gw: GatewayProcess, stubs: dict[str, StubUpstream]) -> None:
    _, key = issue_key(local_gw, "headers")
    for server in stubs.values():
        server.response_headers = {"openai-organization": "org-secret-acme", "openai-project": "proj_secret",
                                   "set-cookie": "__cf_bm=secret; path=/", "x-stub-leak": "1"}
    stubs["a"].behave("status", status=400)  # a relayed client error carries no upstream headers either
    for model in ("solo", "dup"):
        for stream in (False, True):
            answer = send(local_gw.url, key, model, stream)
            lowered = {k.lower() for k in answer.headers}
            assert not lowered & {"openai-organization", "openai-project", "set-cookie", "x-stub-leak"}
            assert b"secret" not in answer.body


# --- the config file replaced by a broken one ------------------------------------


def test_a_broken_config_file_is_rejected_and_the_old_one_keeps_serving(
        local_gw: GatewayProcess, stubs: dict[str, StubUpstream]) -> None:
    _, key = issue_key(local_gw, "reload")
    good = local_gw.config_path.read_text()
    broken = [
        good[: len(good) // 2],  # a half-written file
        "upstreams: [\n  {name: a, base_url: ",  # not YAML
        good.replace("priority: 1", "priority: -7"),  # valid YAML, invalid config
        good.replace("routing:", "routng:"),  # an unknown key
        "",  # emptied
    ]
    try:
        for number, text in enumerate(broken, 1):
            local_gw.config_path.write_text(text)
            _wait_for(_rejections(local_gw, number), what=f"rejection #{number}")
            for model in ("solo", "dup"):
                answer = send(local_gw.url, key, model, stream=number % 2 == 0)
                assert check_answer(answer, stubs) == "ok"
            assert httpx.get(local_gw.url + "/readyz").status_code == 200
        # A good file is taken again: the new model appears.
        local_gw.config_path.write_text(good.replace("models: [dup]", "models: [dup, added]"))
        _wait_for(lambda: "added" in httpx.get(local_gw.url + "/v1/models",
                                               headers={"Authorization": f"Bearer {key}"}).text,
                  what="the good config")
    finally:
        local_gw.config_path.write_text(good)
        _wait_for(lambda: "added" not in httpx.get(local_gw.url + "/v1/models",
                                                   headers={"Authorization": f"Bearer {key}"}).text,
                  what="the original config")


def _rejections(gw: GatewayProcess, count: int) -> Callable[[], bool]:
    return lambda: gw.log().count("config reload rejected") >= count


def _wait_for(done: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout}s for {what}")


# --- Redis killed and restarted mid-traffic; a gateway killed mid-traffic --------


@dataclass
class Traffic:
    """Identical requests from a few threads until stopped; every answer kept."""

    targets: list[tuple[str, str]]  # (gateway url, key): requests go to the first; the next on a dead one
    workers: int = 4
    stream_every: int = 2
    answers: list[tuple[float, Answer]] = field(default_factory=list)
    failovers: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Traffic:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[tuple[float, Answer]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "a client is still waiting: something hangs"
        return self.answers

    def _run(self, worker: int) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            stream = count % self.stream_every == 0
            for number, (url, key) in enumerate(self.targets):
                started = time.monotonic()
                try:
                    answer = send(url, key, "m", stream, timeout=10)
                except httpx.TransportError:
                    assert number + 1 < len(self.targets), "the last gateway failed too"
                    with self._lock:
                        self.failovers += 1
                    continue  # the client's own retry, on the next gateway
                with self._lock:
                    self.answers.append((started, answer))
                break


def _redis_config(stub: StubUpstream, redis_url: str, mode: str, lease_ttl: float = 900,
                  store_timeout: float = 1.0) -> str:
    return f"""redis_url: {redis_url}
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m], timeout: {TIMEOUTS}}}]
routing: {{deadline: {DEADLINE}}}
quotas: {{on_store_error: {mode}, store_timeout: {store_timeout}, lease_ttl: {lease_ttl}}}
server: {{shutdown_delay: 0}}
"""


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    # Persisted like a production Redis: a restart keeps the issued keys and the counters.
    server = RedisServer(None, "--appendonly", "yes", "--appendfsync", "always")
    try:
        yield server.start()
    finally:
        server.close()


def _start_again(redis: RedisServer) -> None:
    redis.proc = None
    for _ in range(50):  # the port can linger for a moment
        try:
            redis.start()
            return
        except RuntimeError:
            time.sleep(0.05)
    raise RuntimeError("redis did not start again")


def _answered(traffics: Iterable[Traffic], since: float, count: int = 5, within: float = 60) -> None:
    """Wait until every client got ``count`` answers to requests sent after ``since`` (not a fixed
    time: on a busy machine a second may hold no answer at all)."""
    deadline = time.monotonic() + within
    while any(sum(t > since for t, _ in traffic.answers) < count for traffic in traffics):
        assert time.monotonic() < deadline, "the clients got too few answers"
        time.sleep(0.05)


def _reserved(answer: Answer) -> bool:
    """The gateway reserved this request in the store (its rate headers say so)."""
    return "x-ratelimit-limit-requests" in answer.headers


def test_redis_killed_and_restarted_mid_traffic(stubs: dict[str, StubUpstream], redis: RedisServer) -> None:
    stub = stubs["a"]
    gws = {mode: GatewayProcess(_redis_config(stub, redis.url, mode)) for mode in ("fail_closed", "fail_open")}
    try:
        for gw in gws.values():
            gw.start()
        keys = {mode: issue_key(gw, mode) for mode, gw in gws.items()}
        traffic = {mode: Traffic([(gw.url, keys[mode][1])], workers=3).start() for mode, gw in gws.items()}
        _answered(traffic.values(), since=time.monotonic())
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGKILL)
        redis.proc.wait(5)
        killed = time.monotonic()
        _answered(traffic.values(), since=killed + 0.3)
        restarting = time.monotonic()
        _start_again(redis)
        restarted = time.monotonic()
        _answered(traffic.values(), since=restarted + 1.0)
        results = {mode: t.stop() for mode, t in traffic.items()}
        time.sleep(0.3)  # the last settles
        full = served_usage("m")
        for mode, gw in gws.items():
            answers = results[mode]
            during = [a for t, a in answers if t > killed + 0.3 and t + a.seconds < restarting]
            after = [a for t, a in answers if t > restarted + 1.0]
            assert during and after
            statuses = {a.status for _, a in answers}
            for _, answer in answers:
                outcome = check_answer(answer, {"a": stub})
                assert outcome in ("ok", "error")
                if outcome == "error":
                    error = assert_openai_error(answer.status, answer.body)
                    assert answer.status == 503 and error["code"] == "quota_store_unavailable"
            if mode == "fail_open":
                assert statuses == {200}  # the mode holds: nobody turned away
                assert not any(_reserved(a) for a in during)  # ...and nothing counted while blind
            else:
                assert {a.status for a in during} == {503}  # the mode holds: nobody admitted uncounted
            assert all(a.status == 200 and _reserved(a) for a in after)  # accounting resumed
            # The ledger: R reservations; F of them could not be settled (Redis died between
            # reserve and settle); those keep their estimate and their lease; all others are exact.
            # A settle that failed may still have been run (Redis ran it, then died before it
            # answered): F is at most the settles that failed. A reserve whose answer was lost
            # was released, or, if its release was given up (logged), it may be a ghost G,
            # charged like an unsettled reservation.
            reserved = sum(_reserved(a) for _, a in answers)
            failed_settles = gw.log().count("quota settle failed")
            abandoned = gw.log().count("quota release failed")
            used = usage(gw, keys[mode][0])
            ghosts = used["rpm"] - reserved
            assert 0 <= ghosts <= abandoned, ("a request was charged twice, or charged without a reservation",
                                              used, reserved, abandoned)
            unsettled = used["concurrency"] - ghosts  # every lease still held: one per unsettled reservation
            assert 0 <= unsettled <= failed_settles, (used, reserved, failed_settles, ghosts)
            estimate = reservation_estimate()
            assert used["tokens_per_day"] == (reserved - unsettled) * full + (unsettled + ghosts) * estimate, (
                used, reserved, unsettled, ghosts)
    finally:
        for gw in gws.values():
            gw.close()
        if redis.proc is None or redis.proc.poll() is not None:
            _start_again(redis)


def test_a_gateway_killed_mid_traffic_while_another_keeps_serving(
        stubs: dict[str, StubUpstream], redis: RedisServer) -> None:
    stub = stubs["a"]
    lease_ttl = 5.0
    first, second = (GatewayProcess(_redis_config(stub, redis.url, "fail_closed", lease_ttl=lease_ttl))
                     for _ in range(2))
    try:
        first.start()
        second.start()
        key_id, key = issue_key(first, "two-replicas")
        _wait_for(lambda: send(second.url, key, "m", False).status == 200, what="the key on the second replica")
        stub.behave("ok", delay_headers=0.15)  # so requests are in flight when the process dies
        traffic = Traffic([(first.url, key), (second.url, key)], workers=6).start()
        time.sleep(1.0)
        first.signal(signal.SIGKILL)
        first.wait(5)
        killed = time.monotonic()
        time.sleep(1.0)
        answers = [a for _, a in traffic.stop()]
        time.sleep(0.3)
        used = usage(second, key_id)
        assert traffic.failovers >= 1
        for answer in answers:  # every client got its answer, from one replica or the other
            assert check_answer(answer, {"a": stub}) == "ok", (answer.status, answer.body[-300:])
        # A reservation is settled (charged what the stub reported), or it was made by the
        # dead process and never settled: it keeps its estimate and its concurrency lease
        # until the lease expires (lease_ttl), which releases it. Nothing else.
        full, estimate = served_usage("m"), reservation_estimate()
        orphans, rest = divmod(used["tokens_per_day"] - used["rpm"] * full, estimate - full)
        assert rest == 0 and 0 <= orphans <= traffic.workers, used
        assert used["concurrency"] == orphans, (used, orphans)
        settled = used["rpm"] - orphans
        served = len(stub.chat_requests)
        assert settled <= served <= settled + orphans  # an orphan may have reached the upstream
        assert len(answers) <= settled + orphans  # an answer may have left just before its settle
        time.sleep(max(0.0, killed + lease_ttl + 0.5 - time.monotonic()))
        assert usage(second, key_id)["concurrency"] == 0  # released by expiry
    finally:
        first.close()
        second.close()


# --- a slow Redis: replies that come late, or not at all ---------------------------


@pytest.fixture
def slow_redis(stubs: dict[str, StubUpstream], redis: RedisServer) -> Iterator[tuple[LateReplies, GatewayProcess]]:
    proxy = LateReplies(redis.port).start()
    gw = GatewayProcess(_redis_config(stubs["a"], proxy.url, "fail_closed", store_timeout=0.25))
    try:
        yield proxy, gw.start()
    finally:
        gw.close()
        proxy.stop()


def test_a_frozen_redis_never_holds_a_request_past_the_store_timeout(
        slow_redis: tuple[LateReplies, GatewayProcess], stubs: dict[str, StubUpstream]) -> None:
    proxy, gw = slow_redis
    _, key = issue_key(gw, "frozen")
    traffic = Traffic([(gw.url, key)], workers=3).start()
    time.sleep(0.5)
    proxy.delay = 3600  # Redis answers nothing: every call runs into quotas.store_timeout (0.25 s)
    time.sleep(1.5)
    proxy.delay = 0
    time.sleep(0.5)
    answers = [a for _, a in traffic.stop()]
    for answer in answers:
        assert check_answer(answer, stubs) in ("ok", "error")
        assert answer.seconds < 1.5, answer.seconds  # a reserve and a settle timeout, at most, plus the upstream
        if answer.status != 200:
            assert assert_openai_error(answer.status, answer.body)["code"] == "quota_store_unavailable"
    assert {a.status for a in answers} == {200, 503}


def test_a_late_redis_reply_leaves_no_ghost_reservation(slow_redis: tuple[LateReplies, GatewayProcess]) -> None:
    proxy, gw = slow_redis
    key_id, key = issue_key(gw, "late", concurrency=2)
    answers: list[Answer] = []

    def ask() -> int:
        answers.append(send(gw.url, key, "m", False))
        return answers[-1].status

    for _ in range(2):
        assert ask() == 200  # a warm connection, a healthy store
        time.sleep(0.2)
        proxy.delay = 0.6  # longer than store_timeout: the reply comes, but late
        assert ask() == 503  # refused...
        proxy.delay = 0
        time.sleep(0.8)
        _wait_for(lambda: ask() != 503, what="the store back in use")
    time.sleep(0.2)
    used = usage(gw, key_id)
    assert used["concurrency"] == 0  # ...so nothing may stay reserved: the late reservations were released
    admitted = [a for a in answers if a.status == 200]
    assert used["rpm"] == len(admitted) == sum(_reserved(a) for a in answers)
    assert used["tokens_per_day"] == len(admitted) * served_usage("m")
    assert ask() == 200  # and the key is not locked out
    assert "quota release failed" not in gw.log()
