"""Limits that protect the gateway from slow or oversized clients."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from tests.gateway_process import GatewayProcess
from tests.stub_upstream import StubUpstream

KEY = "sk-limits-test"


def test_slow_body_gets_408_in_time(gateway: Callable[..., GatewayProcess], stub: StubUpstream) -> None:
    gw = gateway(f"""
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: t, key: {KEY}}}]
server: {{body_timeout: 0.5}}
""")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\":")
        started = time.monotonic()
        answer = sock.recv(65536)
        while b'"code"' not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in answer
    assert time.monotonic() - started < 2
    assert stub.chat_requests == []


def test_a_flood_of_bad_keys_is_slowed_but_good_keys_are_not(
        gateway: Callable[..., GatewayProcess], stub: StubUpstream) -> None:
    import httpx

    gw = gateway(f"""
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: t, key: {KEY}}}]
""")
    url = gw.url + "/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=5) as client:
        statuses = [client.post(url, json=body, headers={"Authorization": f"Bearer sk-guess-{i}"}).status_code
                    for i in range(40)]
        assert statuses[:20] == [401] * 20
        assert set(statuses[20:]) == {429}
        held = client.post(url, json=body, headers={"Authorization": "Bearer sk-guess-x"})
        assert int(held.headers["retry-after"]) >= 1
        good = client.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200


def test_admin_api_can_live_on_its_own_port(gateway: Callable[..., GatewayProcess], stub: StubUpstream) -> None:
    import httpx

    from tests.stub_upstream import free_port

    admin_port = free_port()
    gw = gateway(f"""
admin_key: sk-admin-test
upstreams: [{{name: a, base_url: '{stub.url}', models: [m]}}]
keys: [{{name: t, key: {KEY}}}]
server: {{admin_port: {admin_port}}}
""")
    admin = {"Authorization": "Bearer sk-admin-test"}
    assert httpx.get(gw.url + "/admin/keys", headers=admin).status_code == 404
    on_admin = httpx.get(f"http://127.0.0.1:{admin_port}/admin/keys", headers=admin)
    assert on_admin.status_code == 200 and on_admin.json()["object"] == "list"
    assert httpx.get(f"http://127.0.0.1:{admin_port}/admin/keys").status_code == 401
    assert httpx.get(f"http://127.0.0.1:{admin_port}/v1/models",
                     headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
