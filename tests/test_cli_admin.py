"""``llm-proxy keys …`` / ``teams usage``: directly against Redis, and against a running admin API (uvicorn)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette

from proxy.access.issued_keys import IssuedKeys
from proxy.access.quotas import QuotaService
from proxy.access.store_redis import RedisDirectory, RedisQuotaStore
from proxy.admin.api import AdminContext, admin_routes
from proxy.cli import main
from proxy.config.loader import ADMIN_KEY_ENV, parse_config
from proxy.config.types import QuotasConfig
from proxy.io.redis_client import connect
from tests.redis_fixtures import RedisServer, free_port, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ADMIN = "cli-admin-key"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


class Gateway:
    """Just the admin API, served by a real uvicorn on a free loopback port."""

    def __init__(self, redis_url: str) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        config = parse_config(f"""
admin_key: {ADMIN}
redis_url: {redis_url}
upstreams: [{{name: a, base_url: "http://a/v1", models: [m]}}]
teams: [{{name: t, limits: {{rpm: 9}}}}]
""", {})
        self.keys = IssuedKeys(RedisDirectory(connect(redis_url, 1.0), 1.0))
        quotas = QuotaService(RedisQuotaStore.from_url(redis_url, 1.0), QuotasConfig())
        app = Starlette(routes=admin_routes(AdminContext(lambda: config, quotas, self.keys)))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=asyncio.run, args=(self.server.serve(),), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def gateway(redis_server: RedisServer) -> Iterator[Gateway]:  # noqa: F811
    with Gateway(redis_server.url) as gw:
        yield gw


def test_keys_lifecycle_directly_against_redis(redis_server: RedisServer,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = ("--redis-url", redis_server.url)
    code, created, _ = run(capsys, "keys", "create", "--name", "batch", "--team", "t", "--model", "gpt-4o*",
                           "--rpm", "10", "--tokens-per-day", "5000", "--metadata", '{"ticket": "OPS-1"}',
                           *target)
    assert code == 0 and created["key"].startswith(f"sk-{created['id']}-")
    assert created["limits"]["rpm"] == 10 and created["models"] == ["gpt-4o*"]
    code, listed, _ = run(capsys, "keys", "list", "--team", "t", *target)
    assert [k["id"] for k in listed["data"]] == [created["id"]] and created["key"] not in json.dumps(listed)
    code, rotated, _ = run(capsys, "keys", "rotate", created["id"], "--overlap", "60", *target)
    assert code == 0 and rotated["key"] != created["key"] and rotated["previous_secret_valid_until"]
    code, revoked, _ = run(capsys, "keys", "revoke", created["id"], "--actor", "ops", *target)
    assert code == 0 and revoked["revoked"] is True
    code, _, err = run(capsys, "keys", "revoke", "key_missing", *target)
    assert code == 1 and "key_missing" in err


def test_team_usage_with_config_teams(redis_server: RedisServer, tmp_path: Path,  # noqa: F811
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(f"""
redis_url: {redis_server.url}
upstreams: [{{name: a, base_url: "http://a/v1", models: [m]}}]
teams: [{{name: t, limits: {{rpm: 9, tokens_per_month: 1000}}}}]
""")
    code, usage, _ = run(capsys, "teams", "usage", "t", "--config", str(config))
    assert code == 0 and [(u["limit"], u["used"]) for u in usage["usage"]] == [("rpm", 0), ("tokens_per_month", 0)]
    code, _, err = run(capsys, "teams", "usage", "nope", "--config", str(config))
    assert code == 1 and "nope" in err


def test_keys_against_a_running_gateway(gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN + "\n")
    target = ("--url", gateway.url, "--admin-key-file", str(key_file))
    code, created, _ = run(capsys, "keys", "create", "--name", "svc", "--team", "t", "--tpm", "100", *target)
    assert code == 0 and created["key"].startswith("sk-")
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN)  # the other way to give the admin key
    code, listed, _ = run(capsys, "keys", "list", "--url", gateway.url)
    assert [k["name"] for k in listed["data"]] == ["svc"] and listed["data"][0]["usage"][0]["limit"] == "tpm"
    code, usage, _ = run(capsys, "teams", "usage", "t", "--url", gateway.url)
    assert code == 0 and usage["usage"][0]["limit"] == "rpm"
    code, _, _ = run(capsys, "keys", "rotate", created["id"], "--url", gateway.url)
    assert code == 0
    code, revoked, _ = run(capsys, "keys", "revoke", created["id"], "--url", gateway.url, "--actor", "bob")
    assert code == 0 and revoked["revoked"]
    audit = asyncio.run(_audit(gateway))
    assert [(e["action"], e["actor"].split("@")[0]) for e in audit][:2] == [("key.revoke", "bob"),
                                                                          ("key.rotate", "cli")]


async def _audit(gateway: Gateway) -> list[dict[str, Any]]:
    keys = IssuedKeys(RedisDirectory(connect(gateway.redis_url, 1.0), 1.0))
    try:
        return await keys.audit(10)
    finally:
        await keys.close()


def test_wrong_admin_key_and_unreachable_gateway_fail_cleanly(gateway: Gateway, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ADMIN_KEY_ENV, "wrong")
    code, _, err = run(capsys, "keys", "list", "--url", gateway.url)
    assert code == 1 and "401" in err
    monkeypatch.delenv(ADMIN_KEY_ENV)
    code, _, err = run(capsys, "keys", "list", "--url", gateway.url)
    assert code == 1 and ADMIN_KEY_ENV in err
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN)
    code, _, err = run(capsys, "keys", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach" in err
