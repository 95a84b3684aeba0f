"""Hostile input against a real gateway process (issue 8, item 2).

Hypothesis builds request bodies as raw bytes (so they can hold what a JSON
library would never write: NaN and Infinity, duplicate keys, invalid UTF-8,
lone surrogates, numbers past 64 bits, nesting 100,000 deep, megabyte
strings) and whole requests for every operation of ``/openapi.json`` and the
admin API (any method, query, headers and body). Whatever comes in: never a
500, never a traceback, always an OpenAI-format error or a valid answer, and
the process stays up. schemathesis then generates requests from the
gateway's own ``/openapi.json`` (schema-valid and schema-breaking ones) and
checks every answer against that document: no server error, documented
status codes, content types, headers and response schemas. Then the limits:
header size (431), body size (413), slow clients (slowloris, slow headers,
slow bodies) and a flood of bad keys (per-address 429).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import ignored_auth, positive_data_acceptance

from tests.gateway_process import GatewayProcess
from tests.spec import assert_conforms
from tests.stub_upstream import StubUpstream

GOOD = "sk-hostile-good-key-000000000000"
ADMIN = "sk-hostile-admin-key-11111111111"
MAX_BODY = 1024 * 1024
BODY_TIMEOUT = 2.0
# LLM_PROXY_FUZZ_EXAMPLES=5000 for a longer, random hunt; CI runs a fixed 150.
EXAMPLES = int(os.environ.get("LLM_PROXY_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == 150, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def stub() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(stub: StubUpstream) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(f"""
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m, other]}}]
keys: [{{name: good, key: {GOOD}}}]
health: {{failure_threshold: 1000000}}
server: {{max_body_bytes: {MAX_BODY}, body_timeout: {BODY_TIMEOUT}, shutdown_delay: 0}}
""")
    try:
        yield proc.start()
    finally:
        proc.close()


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


def assert_sane(resp: httpx.Response, gw: GatewayProcess) -> None:
    """A valid answer or an OpenAI-format error; never a 500 or a traceback; the process alive."""
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
    body = resp.content
    assert resp.status_code != 500, body[:500]
    assert b"Traceback" not in body and b'File "/' not in body
    if resp.request.method == "HEAD" or resp.status_code in (204, 304):
        return
    if resp.status_code >= 400:
        assert resp.headers["content-type"] == "application/json", (resp.status_code, body[:300])
        assert_conforms(orjson.loads(body), "ErrorResponse")
        return
    content_type = resp.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        assert body.endswith(b"data: [DONE]\n\n") or b'data: {"error":' in body, body[-300:]
    elif content_type == "application/json":
        orjson.loads(body)


# --- building hostile JSON as bytes -------------------------------------------------

CHAT_FIELDS = ("model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop",
               "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty",
               "logit_bias", "tools", "tool_choice", "response_format", "user", "seed", "logprobs",
               "top_logprobs", "include_usage", "role", "content", "name", "tool_calls", "tool_call_id",
               "type", "text", "image_url", "detail", "function_call",
               # the admin API's fields
               "name", "team", "models", "limits", "rpm", "tpm", "concurrency", "tokens_per_day",
               "expires_at", "metadata", "overlap_seconds")


def _array(items: list[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


def _object(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


def _string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")


LEAVES: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from([b"null", b"true", b"false", b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0",
                     b"01", b"1.", b"+1", b"0x1F", b"", b"nul", b"\"m\"", b"\"user\"", b"\"assistant\"",
                     b"\"tool\"", b"\"text\"", b"\"auto\"", b"2.0", b"128", b"129", b"-1", b"0"]),
    st.integers(min_value=-(10**30), max_value=10**30).map(lambda i: str(i).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    st.text(max_size=30).map(_string),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map(lambda t: json.dumps(t).encode()),
    st.binary(max_size=12).map(lambda b: b'"' + b + b'"'),  # invalid UTF-8, stray quotes
    st.integers(0, 1_200_000).map(lambda n: b'"' + b"word " * (n // 5) + b'"'),  # huge strings
)
KEYS: st.SearchStrategy[bytes] = st.one_of(st.sampled_from(CHAT_FIELDS).map(_string),
                                           st.text(max_size=8).map(_string))
VALUES: st.SearchStrategy[bytes] = st.recursive(
    LEAVES,
    lambda kids: st.one_of(st.lists(kids, max_size=4).map(_array),
                           st.lists(st.tuples(KEYS, kids), max_size=4).map(_object)),
    max_leaves=12)
# Past orjson's serialising limit (255) and its parsing limit (1024); far deeper is its own test below.
DEEP: st.SearchStrategy[bytes] = st.tuples(st.integers(200, 5000), st.sampled_from([b"[]", b"{}"])).map(
    lambda d: (d[1][:1] if d[1] == b"[]" else b'{"a":') * d[0] + b"1" + d[1][1:] * d[0])
MESSAGE: st.SearchStrategy[bytes] = st.lists(st.tuples(KEYS, VALUES), max_size=4).map(
    lambda pairs: _object([(b'"role"', b'"user"'), (b'"content"', b'"hi"'), *pairs]))


@st.composite
def chat_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "deep", "raw", "cut"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=200), VALUES))
    pairs = draw(st.lists(st.tuples(KEYS, VALUES), max_size=8))
    if draw(st.booleans()):  # a valid core, so that validation goes deeper (duplicates may follow)
        messages = draw(st.lists(MESSAGE, min_size=1, max_size=3))
        pairs = [(b'"model"', b'"m"'), (b'"messages"', _array(messages)), *pairs]
    if kind == "deep":
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(KEYS), draw(DEEP)))
    body = _object(pairs)
    if kind == "cut":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    return body


DEEP_UNKNOWN = b'{"model":"m","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 300 + b"]" * 300 + b"}"
DEEP_TOOL_CALLS = (b'{"model":"m","messages":[{"role":"assistant","content":"x","tool_calls":'
                   + b"[" * 300 + b"]" * 300 + b"}]}")


@FUZZ
@given(body=chat_bodies(), content_type=st.sampled_from(
    ["application/json", "application/json", "application/json; charset=utf-8", "text/plain", ""]))
@example(body=DEEP_UNKNOWN, content_type="application/json")
@example(body=DEEP_TOOL_CALLS, content_type="application/json")
@example(body=b'{"model":"m","model":7,"messages":[{"role":"user","content":"x"}]}', content_type="application/json")
@example(body=b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}', content_type="application/json")
@example(body=b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":NaN}',
         content_type="application/json")
def test_fuzzed_chat_bodies_never_break_the_gateway(
        gw: GatewayProcess, client: httpx.Client, body: bytes, content_type: str) -> None:
    try:
        resp = client.post("/v1/chat/completions", content=body,
                           headers={"Authorization": f"Bearer {GOOD}", "Content-Type": content_type})
    except httpx.TransportError as exc:
        assert gw.proc is not None
        pytest.fail(f"{exc!r}; gateway exit status {gw.proc.poll()}; its log ends:\n{gw.log()[-3000:]}")
    assert_sane(resp, gw)
    if body in (DEEP_UNKNOWN, DEEP_TOOL_CALLS):
        assert resp.status_code == 400  # refused before it reaches an upstream


ORJSON = tuple(int(part) for part in orjson.__version__.split(".")[:3])


@pytest.mark.xfail(ORJSON < (3, 9, 15), strict=True, reason=(
    f"orjson {orjson.__version__} < 3.9.15 (CVE-2024-27454): loads() has no depth limit, so a body "
    "nested 200,000 deep (1 MB) kills the gateway with SIGSEGV; pyproject.toml must require orjson>=3.11.6"))
@pytest.mark.parametrize("opening", [b'{"a":', b"["])
def test_a_body_nested_200000_deep_is_refused_and_the_gateway_stays_up(
        gateway: Callable[..., GatewayProcess], stub: StubUpstream, opening: bytes) -> None:
    own = gateway(f"""
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: good, key: {GOOD}}}]
""")
    closing = b"}" if opening.startswith(b"{") else b"]"
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"x":' + opening * 200_000 + b"1" \
        + closing * 200_000 + b"}"
    try:
        resp = httpx.post(own.url + "/v1/chat/completions", content=body, timeout=10,
                          headers={"Authorization": f"Bearer {GOOD}", "Content-Type": "application/json"})
    except httpx.TransportError:
        assert own.proc is not None
        pytest.fail(f"the gateway died (exit status {own.proc.poll()})")
    assert resp.status_code == 400
    assert_sane(resp, own)


def test_duplicate_keys_reach_the_upstream_as_the_gateway_read_them(
        gw: GatewayProcess, client: httpx.Client, stub: StubUpstream) -> None:
    """No parser differential: the last duplicate wins, and only it is forwarded."""
    stub.reset()
    body = b'{"model":"other","model":"m","messages":[{"role":"user","content":"x"}],"n":3,"n":1}'
    resp = client.post("/v1/chat/completions", content=body,
                       headers={"Authorization": f"Bearer {GOOD}", "Content-Type": "application/json"})
    assert resp.status_code == 200
    assert len(orjson.loads(resp.content)["choices"]) == 1
    assert stub.chat_requests[-1].body["model"] == "m" and stub.chat_requests[-1].body["n"] == 1


# --- every other operation: from /openapi.json, plus the admin API ----------------

ADMIN_PATHS = ("/admin/keys", "/admin/keys/{x}", "/admin/keys/{x}/rotate", "/admin/teams", "/admin/teams/{x}",
               "/admin/teams/{x}/usage", "/admin/audit")
ODD_PATHS = ("/", "//v1/models", "/v1/../admin/keys", "/v1/models/", "/v1/chat/completions/x", "/%00",
             "/docs", "/docs/openapi-3.0.json", "/docs/assets/../../../etc/passwd", "/metrics", "/openapi.json",
             "/" + "a" * 8000)


@pytest.fixture(scope="module")
def paths(gw: GatewayProcess) -> list[str]:
    document = httpx.get(gw.url + "/openapi.json").json()
    return [*document["paths"], *ADMIN_PATHS, *ODD_PATHS]


@st.composite
def requests(draw: st.DrawFn, paths: list[str]) -> tuple[str, str, dict[str, bytes], bytes]:
    path = draw(st.sampled_from(paths)).replace(
        "{x}", draw(st.one_of(st.sampled_from(["key_0", "team-a", "..", "%2e%2e", "a" * 300]),
                              st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.%", min_size=1, max_size=20))))
    query = draw(st.lists(st.tuples(st.sampled_from(["limit", "team", "x", "limit[]", ""]),
                                    st.sampled_from(["1", "0", "1000", "1001", "-1", "abc", "%ff", "", "1e3"])),
                          max_size=3))
    if query:
        path += "?" + "&".join(f"{k}={v}" for k, v in query)
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]))
    auth = draw(st.sampled_from([None, f"Bearer {GOOD}", f"Bearer {ADMIN}", f"Bearer {ADMIN}",
                                 "Bearer sk-wrong", "Basic YTpi", "Bearer", "bearer  " + GOOD, "Bearer \xe9\xff"]))
    headers = {"Content-Type": draw(st.sampled_from([b"application/json", b"text/plain", b"multipart/form-data"]))}
    if auth is not None:
        headers["Authorization"] = auth.encode("latin-1")
    if draw(st.booleans()):
        headers[draw(st.sampled_from(["X-Request-Id", "x-llm-proxy-actor", "traceparent", "Accept", "Cookie"]))] = \
            draw(st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=200)).encode("latin-1")
    body = draw(st.one_of(st.just(b""), VALUES, chat_bodies()))
    return method, path, headers, body


def test_fuzzed_requests_to_every_operation_never_break_the_gateway(
        gw: GatewayProcess, client: httpx.Client, paths: list[str]) -> None:
    @FUZZ
    @given(request=requests(paths))
    def run(request: tuple[str, str, dict[str, bytes], bytes]) -> None:
        method, path, headers, body = request
        resp = client.request(method, path, headers=headers, content=body if method not in ("GET", "HEAD") else b"")
        assert_sane(resp, gw)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_conforms_to_the_gateways_openapi_document(gw: GatewayProcess, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(gw.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    if mode is GenerationMode.NEGATIVE:  # only the body can be broken: the other operations take no input
        operations = [op for op in operations if op.body]
    assert operations
    # Not checked: that any schema-valid body is accepted (the gateway is stricter than OpenAI's
    # document, e.g. an empty `model`), and the answer to a missing key, which turns from 401
    # into the per-address 429 after 20 tries (test_a_flood_of_bad_keys_... covers both).
    excluded = [positive_data_acceptance, ignored_auth]
    for operation in operations:
        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=gw.url, headers={"Authorization": f"Bearer {GOOD}"})
            case.validate_response(response, excluded_checks=excluded)

        run()


RAW_REQUESTS = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"G\x00T /healthz HTTP/1.1\r\n\r\n",
    b"GET http://evil.example/v1/models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS ClientHello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
)


@pytest.mark.parametrize("raw", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
def test_malformed_http_is_refused_and_the_gateway_stays_up(gw: GatewayProcess, raw: bytes) -> None:
    answer = _exchange(gw.port, raw)
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:300]
    assert b"Traceback" not in answer
    assert gw.proc is not None and gw.proc.poll() is None
    assert httpx.get(gw.url + "/healthz").status_code == 200


def _exchange(port: int, raw: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


# --- sizes ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(gw: GatewayProcess, client: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {GOOD}", "Content-Type": "application/json"}
    # Declared too large: refused at once, without waiting for a byte of it.
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GOOD}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(head)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < BODY_TIMEOUT
    # Chunked, so no length is declared: refused once the limit is crossed.
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    resp = client.post("/v1/chat/completions", content=chunks(), headers=auth)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
    # At the limit: answered.
    core = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    resp = client.post("/v1/chat/completions", content=core + b" " * (MAX_BODY - len(core)), headers=auth)
    assert resp.status_code == 200, resp.text


def test_many_large_headers_are_answered_without_a_crash(gw: GatewayProcess) -> None:
    headers = "".join(f"X-Filler-{i}: {'v' * 4000}\r\n" for i in range(200))  # 800 KB of headers
    answer = _exchange(gw.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 ") and not answer.startswith(b"HTTP/1.1 5")
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_admin_input_out_of_range_is_a_400(gateway: Callable[..., GatewayProcess], stub: StubUpstream) -> None:
    own = gateway(f"""
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
""")  # its own process: the module's gateway must log no traceback
    admin = {"Authorization": f"Bearer {ADMIN}"}
    key_id = httpx.post(own.url + "/admin/keys", json={"name": "overlap"}, headers=admin).json()["id"]
    statuses = [
        httpx.post(f"{own.url}/admin/keys/{key_id}/rotate", json={"overlap_seconds": 1e12}, headers=admin),
        httpx.post(own.url + "/admin/keys", headers=admin,
                   content=b'{"name":"deep","metadata":{"x":' + b"[" * 300 + b"]" * 300 + b"}}"),
    ]
    assert [r.status_code for r in statuses] == [400, 400], [r.text for r in statuses]


def test_a_header_block_over_64_kib_is_refused(gw: GatewayProcess) -> None:
    block = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(1024))  # 1 MiB
    answer = _exchange(gw.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{block}\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 431"), answer[:300]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert_conforms(error, "ErrorResponse")
    assert error["error"]["code"] == "request_header_fields_too_large"


def _rss_kib(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    with open(f"/proc/{gw.proc.pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_unfinished_header_blocks_are_not_held_in_memory(gw: GatewayProcess) -> None:
    """20 connections sending 5 MB of headers that never end held +113 MB of RSS before the limit."""
    before = _rss_kib(gw)
    line = b"X-Filler: " + b"v" * 1000 + b"\r\n"
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(20)]
    try:
        def flood(sock: socket.socket) -> None:
            with contextlib.suppress(OSError):  # refused at the limit: the rest may meet a closed socket
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + line * 5000)

        threads = [threading.Thread(target=flood, args=(sock,)) for sock in socks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        grown_mib = (_rss_kib(gw) - before) / 1024
        answers = [sock.recv(65536) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert grown_mib < 20, f"RSS grew by {grown_mib:.1f} MiB"
    assert all(answer.startswith(b"HTTP/1.1 431") for answer in answers), [a[:40] for a in answers]
    assert httpx.get(gw.url + "/healthz").status_code == 200


# --- slow clients -------------------------------------------------------------------------


def _open_fds(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


def _held_by_gateway(gw: GatewayProcess, clients: list[socket.socket]) -> int:
    """How many of these client connections the gateway process holds a socket for.

    Counted by inode, since the gateway's other descriptors (upstream keep-alive connections,
    earlier clients) come and go while a test runs."""
    assert gw.proc is not None
    ports = {sock.getsockname()[1] for sock in clients}
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
            if local == gw.port and remote in ports:
                inodes.add(f"socket:[{fields[9]}]")
    fd_dir = f"/proc/{gw.proc.pid}/fd"
    held = 0
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            held += os.readlink(f"{fd_dir}/{fd}") in inodes
    return held


def _good_requests(client: httpx.Client, count: int, pause: float) -> list[float]:
    """Latencies of good requests, each a 200."""
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {GOOD}"},
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        latencies.append(time.monotonic() - started)
        assert resp.status_code == 200, resp.text
        time.sleep(pause)
    return latencies


def test_slowloris_does_not_starve_good_clients(gw: GatewayProcess, client: httpx.Client) -> None:
    before = _open_fds(gw)
    slow: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        stop = threading.Event()

        def dribble() -> None:  # a header byte per connection every 100 ms
            while not stop.is_set():
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X")
                stop.wait(0.1)

        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()
        try:
            latencies = _good_requests(client, 20, 0.1)
        finally:
            stop.set()
            dribbler.join(5)
        assert max(latencies) < 1.0, latencies
        assert _held_by_gateway(gw, slow) == 200  # they are all held open meanwhile (see the next test)
    finally:
        for sock in slow:
            sock.close()
    deadline = time.monotonic() + 30
    while _open_fds(gw) > before + 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds(gw) <= before + 5  # and all given back when the clients leave


def test_a_connection_that_never_finishes_its_headers_is_closed(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=11) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            answer = sock.recv(65536)  # 408 within server.header_timeout (10 s), then the close
        except TimeoutError:
            pytest.fail("still open after 11 s")
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]


def test_slow_bodies_time_out_and_do_not_starve_good_clients(gw: GatewayProcess, client: httpx.Client) -> None:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GOOD}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()
    slow = [socket.create_connection(("127.0.0.1", gw.port), timeout=BODY_TIMEOUT + 3) for _ in range(50)]
    try:
        for sock in slow:
            sock.sendall(head)
        started = time.monotonic()
        latencies = _good_requests(client, 10, 0.05)
        assert max(latencies) < 1.0, latencies
        for sock in slow:  # each a byte now and then, never the whole body in time
            sock.sendall(b" ")
        for sock in slow:
            answer = sock.recv(65536)
            while b'"code"' not in answer and (more := sock.recv(65536)):
                answer += more
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"code":"request_timeout"' in answer
        assert time.monotonic() - started < BODY_TIMEOUT + 2
    finally:
        for sock in slow:
            sock.close()


# --- a flood of bad keys ------------------------------------------------------------------------


def _from(address: str, gw: GatewayProcess) -> httpx.Client:
    """A client whose connections come from another loopback address (each its own 'client IP')."""
    return httpx.Client(base_url=gw.url, timeout=10, transport=httpx.HTTPTransport(local_address=address))


def test_a_flood_of_bad_keys_is_slowed_per_address_without_slowing_good_keys(gw: GatewayProcess) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    flood_statuses: list[int] = []
    good: list[tuple[int, float]] = []
    stop = threading.Event()

    def flood() -> None:
        with _from("127.0.0.2", gw) as attacker:
            for i in range(300):
                if stop.is_set():
                    return
                wrong = f"sk-hostile-good-key-9{i:011d}"  # looks like a real one
                flood_statuses.append(attacker.post("/v1/chat/completions", json=body,
                                                    headers={"Authorization": f"Bearer {wrong}"}).status_code)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        with _from("127.0.0.2", gw) as same_address:  # a legitimate client behind the same address
            while thread.is_alive() and len(good) < 200:
                started = time.monotonic()
                resp = same_address.post("/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {GOOD}"})
                good.append((resp.status_code, time.monotonic() - started))
    finally:
        stop.set()
        thread.join(30)
    assert flood_statuses[:20] == [401] * 20
    assert set(flood_statuses[20:]) == {429}
    assert {status for status, _ in good} == {200}  # good keys never held back
    assert max(seconds for _, seconds in good) < 1.0
    with _from("127.0.0.3", gw) as elsewhere:  # another address is not affected by the first one's flood
        resp = elsewhere.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-typo"})
        assert resp.status_code == 401
        assert_conforms(resp.json(), "ErrorResponse")


def test_the_gateway_logged_no_traceback(gw: GatewayProcess) -> None:
    """Run last: everything above reached the gateway without an unhandled error."""
    assert gw.proc is not None and gw.proc.poll() is None
    log = gw.log()
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 1500):log.find("Traceback") + 3000]
