"""Config files an operator gets wrong by accident: numbers that are not finite,
bytes that are not UTF-8, a key read from a secret file with its newline."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

from tests.gateway_process import GatewayProcess
from tests.running_gateway import wait_for

StartGateway = Callable[..., GatewayProcess]
CHECK_CONFIG = [sys.executable, "-m", "proxy", "check-config"]


def _mock_config(models: str = "[m]", extra: str = "") -> str:
    return (f"upstreams: [{{name: a, provider: mock, models: {models}}}]\n"
            f"keys: [{{name: app, key: sk-edge-key}}]\n{extra}")


def _check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHECK_CONFIG, str(path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_check_config_refuses_nan_and_infinity_in_every_number(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("""
upstreams:
  - name: a
    base_url: http://a/v1
    models: [m]
    weight: .inf
    timeout: {connect: .nan, first_byte: .inf, idle: .NaN, total: -.inf}
    health_check: {interval: .inf, timeout: .nan}
routing: {deadline: .nan, retry_budget: .inf, min_retries_per_second: "${RETRIES}"}
server: {header_timeout: .nan, body_timeout: .inf, shutdown_grace: "${GRACE}", reload_interval: .inf}
quotas: {store_timeout: .nan, lease_ttl: .inf}
health: {base_ejection: .nan, max_ejection: .inf}
pricing: {m: {input: .nan, output: .inf}}
keys: [{name: k, key: sk-1, limits: {rpm: .inf, tpm: .nan}}]
""")
    result = _check_config(config, {"RETRIES": "nan", "GRACE": "inf"})
    assert result.returncode == 1, result.stdout
    for path in ("upstreams[0].weight", "upstreams[0].timeout.connect", "upstreams[0].timeout.first_byte",
                 "upstreams[0].timeout.idle", "upstreams[0].timeout.total",
                 "upstreams[0].health_check.interval", "upstreams[0].health_check.timeout",
                 "routing.deadline", "routing.retry_budget", "routing.min_retries_per_second",
                 "server.header_timeout", "server.body_timeout", "server.shutdown_grace",
                 "server.reload_interval", "quotas.store_timeout", "quotas.lease_ttl",
                 "health.base_ejection", "health.max_ejection", "pricing.m.input", "pricing.m.output"):
        assert f"{path}: must be a finite number" in result.stderr, (path, result.stderr)
    for path in ("keys[0].limits.rpm", "keys[0].limits.tpm"):  # limits are counts: integers only
        assert f"{path}: must be an integer" in result.stderr, (path, result.stderr)


def test_check_config_names_a_file_that_is_not_utf8_or_holds_an_impossible_date(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(_mock_config().encode() + b"# r\xe9sum\xe9\n")
    result = _check_config(latin1)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{latin1}: not UTF-8 text" in result.stderr
    date = tmp_path / "date.yaml"
    date.write_text(_mock_config().replace("key: sk-edge-key", "key: sk-edge-key, expires_at: 2027-02-30"))
    result = _check_config(date)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "day is out of range for month" in result.stderr


def _models(gw: GatewayProcess) -> set[str]:
    resp = httpx.get(gw.url + "/v1/models", headers={"Authorization": "Bearer sk-edge-key"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return {m["id"] for m in resp.json()["data"]}


def test_a_file_replaced_by_non_utf8_bytes_is_logged_the_old_config_serves_and_watching_goes_on(
        gateway: StartGateway) -> None:
    watched = "server: {reload_interval: 0.1}\n"
    gw = gateway(_mock_config("[m1]", watched))
    assert _models(gw) == {"m1"}
    gw.config_path.write_bytes(_mock_config("[m1, m2]", watched).encode("utf-16"))
    wait_for(lambda: "not UTF-8 text" in gw.log() and "config reload rejected" in gw.log(), 30)
    assert _models(gw) == {"m1"}  # the old config still serves
    gw.config_path.write_text(_mock_config("[m1, m3]", watched))
    wait_for(lambda: _models(gw) == {"m1", "m3"}, 30)


def test_a_static_key_from_a_secret_file_authenticates_despite_its_trailing_newline(
        gateway: StartGateway) -> None:
    config = ("upstreams: [{name: a, provider: mock, models: [m]}]\n"
              "keys:\n  - {name: plain, key: '${APP_KEY}'}\n  - {name: hashed, key_sha256: '${APP_KEY_SHA256}'}\n")
    hashed_key = "sk-edge-hashed"
    gw = gateway(config, env={"APP_KEY": "sk-edge-plain\n",
                              "APP_KEY_SHA256": hashlib.sha256(hashed_key.encode()).hexdigest() + "\n"})
    for key in ("sk-edge-plain", hashed_key):
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
