"""``llm-proxy`` itself: --version, the help of serve, and the logs of a gateway with an admin port."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

import proxy
from tests.gateway_process import GatewayProcess
from tests.stub_upstream import free_port

CLI = [sys.executable, "-m", "proxy"]


def test_version_is_printed() -> None:
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"llm-proxy {proxy.__version__}"


def test_serve_help_shows_what_host_and_port_are_and_their_defaults() -> None:
    done = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(done.stdout.split())
    assert "address to listen on" in text and "(default: 127.0.0.1)" in text
    assert "port of the API" in text and "(default: 8080)" in text


def test_an_admin_port_leaves_the_access_log_in_json_alone() -> None:
    admin_port = free_port()
    gw = GatewayProcess(f"""
admin_key: sk-admin-for-the-cli-test
upstreams: [{{name: m, provider: mock, models: [m], mock: {{latency: 0}}}}]
keys: [{{name: k, key: sk-cli-test}}]
server: {{admin_port: {admin_port}, shutdown_delay: 0}}
""").start()
    try:
        answer = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-cli-test"},
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert answer.status_code == 200
        admin = httpx.get(f"http://127.0.0.1:{admin_port}/admin/keys", timeout=30,
                          headers={"Authorization": "Bearer sk-admin-for-the-cli-test"})
        assert admin.status_code == 200
        deadline = time.monotonic() + 30
        while '"path":"/v1/chat/completions"' not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.05)
        assert ' HTTP/1.1" ' not in gw.log(), gw.log()  # no uvicorn text access line beside the JSON one
    finally:
        gw.close()
