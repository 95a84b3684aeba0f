"""Hostile HTTP at the gateway's protocol edges, over raw sockets against a real gateway process.

Chunked trailers that never end (from a client, and from an upstream), bodies of requests the
gateway refuses before reading them, malformed HTTP, and the router's slash redirect. Where an
attack used to cost memory, the gateway's resident memory is sampled from /proc while it runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway_process import GatewayProcess
from tests.stub_upstream import StubUpstream

GOOD = "sk-hostile-http-good-key-00000000"
ADMIN = "sk-hostile-http-admin-key-1111111"
MAX_BODY = 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024
MIB = 1024 * 1024
OFFERED_MIB = 48  # what each attacker offers to send: past every limit, and bounded
RSS_BOUND_MIB = 24  # growth allowed while an attack runs (each used to hold what it sent)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
CHAT_BODY = json.dumps(CHAT).encode()


@pytest.fixture(scope="module")
def stub() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(stub: StubUpstream) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(f"""
admin_key: {ADMIN}
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: good, key: {GOOD}}}]
health: {{failure_threshold: 1000000}}
server: {{max_body_bytes: {MAX_BODY}, max_header_bytes: {MAX_HEADER_BYTES}, body_timeout: 10,
          shutdown_delay: 0}}
""")
    try:
        yield proc.start()
    finally:
        proc.close()


@pytest.fixture(autouse=True)
def _plain_stub(stub: StubUpstream) -> None:
    stub.reset()


@pytest.mark.parametrize("path", ["/admin/keys/", "/v1/models/", "/v1/chat/completions/", "/docs/assets"])
def test_no_redirect_is_built_from_the_clients_host(gw: GatewayProcess, path: str) -> None:
    resp = httpx.get(gw.url + path, headers={"Host": "evil.example"})
    assert "location" not in resp.headers
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_url"
