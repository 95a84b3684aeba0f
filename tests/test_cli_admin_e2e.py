"""``llm-proxy keys|teams`` as a platform engineer runs them: real processes, a real gateway, a real Redis.

Each command runs as ``python -m proxy ...`` against a running gateway
(``--url``) or straight against its Redis (``--redis-url``, ``--config``).
What is relied on: exit status 0/1/2, JSON on stdout (a secret only from
create and rotate), one ``error: ...`` line on stderr and nothing on stdout
when a command fails, and changes made in Redis reaching the running gateway
at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess
from tests.redis_fixtures import RedisServer, free_port
from tests.stub_upstream import StubUpstream

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sk-admin-cli-test"
MODEL = "m"
MESSAGES = [{"role": "user", "content": "hello"}]
PROPAGATION = 0.5


def config(stub: StubUpstream, redis_url: str) -> str:
    return f"""
redis_url: {redis_url}
admin_key: {ADMIN}
upstreams: [{{name: stub, base_url: '{stub.url}', models: [{MODEL}]}}]
teams: [{{name: cfg-team, limits: {{rpm: 1000, tokens_per_day: 100000}}}}]
"""


@dataclass
class Env:
    redis: RedisServer
    gw: GatewayProcess
    http: httpx.Client
    config_path: Path  # the gateway's config file: --config reads its redis_url and teams

    def status(self, secret: str) -> int:
        answer = self.http.post(self.gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3})
        return answer.status_code


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


def cli(*args: str, admin_key: str | None = ADMIN, env: dict[str, str] | None = None) -> Run:
    """``python -m proxy ARGS``; the admin key comes from $LLM_PROXY_ADMIN_KEY unless None."""
    environ = {k: v for k, v in os.environ.items() if k != "LLM_PROXY_ADMIN_KEY"}
    if admin_key is not None:
        environ["LLM_PROXY_ADMIN_KEY"] = admin_key
    done = subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=30)
    return Run(done.returncode, done.stdout, done.stderr)


def wait_until(check: Callable[[], bool], within: float, step: float = 0.01) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not true within {within}s")
        time.sleep(step)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with contextlib.ExitStack() as stack:
        server = RedisServer()
        stack.callback(server.close)
        server.start()
        stub = StubUpstream().start()
        stack.callback(stub.stop)
        gw = GatewayProcess(config(stub, server.url))
        stack.callback(gw.close)
        gw.start()
        client = stack.enter_context(httpx.Client(timeout=10))
        yield Env(server, gw, client, gw.config_path)


def test_create_through_the_gateway_prints_the_secret_once(env: Env) -> None:
    made = cli("keys", "create", "--url", env.gw.url, "--name", "ci", "--team", "cfg-team", "--model", MODEL,
               "--model", "gpt-*", "--rpm", "50", "--tokens-per-day", "10000", "--expires-at",
               "2099-01-01T00:00:00Z", "--metadata", '{"owner": "alice"}')
    key = made.json()
    assert made.err == ""
    assert key["key"].startswith(f"sk-{key['id']}-") and key["name"] == "ci" and key["team"] == "cfg-team"
    assert key["models"] == [MODEL, "gpt-*"] and key["metadata"] == {"owner": "alice"}
    assert key["limits"]["rpm"] == 50 and key["limits"]["tokens_per_day"] == 10000
    assert key["expires_at"] == "2099-01-01T00:00:00Z"
    client = openai.OpenAI(base_url=env.gw.url + "/v1", api_key=key["key"], max_retries=0, timeout=10)
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.usage is not None

    # list, through the gateway and straight from Redis: the same keys and usage, never the secret
    by_url = cli("keys", "list", "--url", env.gw.url, "--team", "cfg-team")
    by_redis = cli("keys", "list", "--redis-url", env.redis.url, "--team", "cfg-team")
    for listed in (by_url, by_redis):
        assert key["key"] not in listed.out and key["key"].split("-", 2)[2] not in listed.out
        row = next(k for k in listed.json()["data"] if k["id"] == key["id"])
        assert {u["limit"]: u["used"] for u in row["usage"]} == \
            {"rpm": 1, "tokens_per_day": answer.usage.total_tokens}
        assert all(k["team"] == "cfg-team" for k in listed.json()["data"])


def test_the_admin_key_can_come_from_a_file(env: Env, tmp_path: Path) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text(ADMIN + "\n")
    made = cli("keys", "create", "--url", env.gw.url, "--admin-key-file", str(key_file), "--name", "from-file",
               admin_key=None)
    assert env.status(made.json()["key"]) == 200


def test_changes_made_in_redis_reach_the_running_gateway_at_once(env: Env) -> None:
    key = cli("keys", "create", "--redis-url", env.redis.url, "--name", "direct", "--rpm", "100").json()
    wait_until(lambda: env.status(key["key"]) == 200, PROPAGATION)
    revoked = cli("keys", "revoke", "--redis-url", env.redis.url, key["id"])
    assert revoked.json()["revoked"] is True and key["key"] not in revoked.out
    wait_until(lambda: env.status(key["key"]) == 401, PROPAGATION)
    # --config: the redis_url of a gateway config file
    other = cli("keys", "create", "--config", str(env.config_path), "--name", "via-config").json()
    wait_until(lambda: env.status(other["key"]) == 200, PROPAGATION)


def test_rotate_keeps_the_old_secret_for_the_overlap(env: Env) -> None:
    key = cli("keys", "create", "--url", env.gw.url, "--name", "rotating").json()
    rotated = cli("keys", "rotate", "--url", env.gw.url, key["id"], "--overlap", "1").json()
    assert rotated["id"] == key["id"] and rotated["key"] != key["key"]
    assert rotated["previous_secret_valid_until"] is not None
    assert env.status(key["key"]) == 200 and env.status(rotated["key"]) == 200
    wait_until(lambda: env.status(key["key"]) == 401, 3.0, step=0.1)
    assert env.status(rotated["key"]) == 200
    again = cli("keys", "rotate", "--redis-url", env.redis.url, key["id"], "--overlap", "0").json()
    assert again["previous_secret_valid_until"] is None
    wait_until(lambda: env.status(rotated["key"]) == 401, PROPAGATION)
    assert env.status(again["key"]) == 200


def test_team_usage(env: Env) -> None:
    key = cli("keys", "create", "--url", env.gw.url, "--name", "team-user", "--team", "cfg-team").json()
    assert env.status(key["key"]) == 200
    by_url = cli("teams", "usage", "--url", env.gw.url, "cfg-team").json()
    by_config = cli("teams", "usage", "--config", str(env.config_path), "cfg-team").json()
    assert by_url["object"] == "team.usage" and by_url["team"] == "cfg-team"
    assert [(u["limit"], u["value"]) for u in by_url["usage"]] == [("rpm", 1000), ("tokens_per_day", 100000)]
    assert [u["used"] for u in by_url["usage"]] == [u["used"] for u in by_config["usage"]]
    assert by_url["usage"][0]["used"] >= 1
    # Straight from Redis the CLI knows only teams set through the API, and says how to find the others.
    unknown = cli("teams", "usage", "--redis-url", env.redis.url, "cfg-team")
    assert unknown.code == 1 and "--config" in unknown.err and unknown.out == ""
    put = env.http.put(env.gw.url + "/admin/teams/api-team", headers={"Authorization": f"Bearer {ADMIN}"},
                       json={"limits": {"rpm": 7}})
    assert put.status_code == 200
    by_redis = cli("teams", "usage", "--redis-url", env.redis.url, "api-team").json()
    assert [(u["limit"], u["value"], u["used"]) for u in by_redis["usage"]] == [("rpm", 7, 0)]


def test_the_audit_log_names_the_cli_actor(env: Env) -> None:
    by_url = cli("keys", "create", "--url", env.gw.url, "--name", "a1", "--actor", "alice").json()
    by_redis = cli("keys", "create", "--redis-url", env.redis.url, "--name", "a2", "--actor", "bob").json()
    audit = env.http.get(env.gw.url + "/admin/audit", headers={"Authorization": f"Bearer {ADMIN}"},
                         params={"limit": 50}).json()["data"]
    actors = {e["target"]: e["actor"] for e in audit if e["action"] == "key.create"}
    assert actors[by_url["id"]] == "alice@127.0.0.1" and actors[by_redis["id"]] == "bob"


def test_failures_exit_non_zero_with_one_line_on_stderr(env: Env, tmp_path: Path) -> None:
    url, redis_url = env.gw.url, env.redis.url
    closed = f"http://127.0.0.1:{free_port()}"
    dead_redis = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    wrong_key = tmp_path / "wrong"
    wrong_key.write_text("sk-not-the-admin-key")
    no_redis = tmp_path / "no-redis.yaml"
    no_redis.write_text(f"upstreams: [{{name: s, base_url: '{url}/v1', models: [m]}}]\n")
    cases: list[tuple[tuple[str, ...], dict[str, Any], int, str]] = [
        (("keys", "list", "--url", url), {"admin_key": None}, 1, "no admin key"),
        (("keys", "list", "--url", url, "--admin-key-file", str(wrong_key)), {}, 1, "401"),
        (("keys", "list", "--url", url, "--admin-key-file", str(tmp_path / "missing")), {}, 1, "cannot read"),
        (("keys", "list", "--url", closed), {}, 1, "cannot reach"),
        (("keys", "revoke", "--url", url, "key_missing"), {}, 1, "404"),
        (("keys", "revoke", "--redis-url", redis_url, "key_missing"), {}, 1, "No key with id 'key_missing'"),
        (("keys", "rotate", "--url", url, "key_missing"), {}, 1, "404"),
        (("keys", "list", "--redis-url", dead_redis), {}, 1, "cannot reach Redis"),
        (("keys", "list", "--config", str(no_redis)), {}, 1, "has no redis_url"),
        (("keys", "list", "--config", str(tmp_path / "nope.yaml")), {}, 1, ""),
        (("keys", "create", "--url", url, "--name", "x", "--metadata", "{oops"), {}, 1, "--metadata"),
        (("keys", "create", "--url", url, "--name", "x", "--expires-at", "soon"), {}, 1, "expires_at"),
        (("keys", "create", "--url", url, "--name", "x", "--rpm", "-1"), {}, 1, "limits.rpm"),
        (("teams", "usage", "--url", url, "no-such-team"), {}, 1, "No team named 'no-such-team'"),
        (("keys", "create", "--name", "x"), {}, 2, "one of the arguments"),
        (("keys", "create", "--url", url, "--name", "x", "--rpm", "many"), {}, 2, "invalid int"),
        (("keys", "create", "--url", url, "--redis-url", redis_url, "--name", "x"), {}, 2, "not allowed"),
        (("keys", "revoke", "--url", url), {}, 2, "ID"),
    ]
    with ThreadPoolExecutor(max_workers=6) as pool:
        runs = list(pool.map(lambda case: cli(*case[0], **case[1]), cases))
    for (args, _, code, message), run in zip(cases, runs, strict=True):
        assert run.code == code, (args, run)
        assert run.out == "", (args, run)  # scripts parsing stdout never see half an answer
        assert message in run.err, (args, run.err)
        if code == 1:
            assert run.err.startswith("error: ") and run.err.count("\n") == 1, (args, run.err)
    assert "hunter2" not in runs[7].err  # a Redis password never reaches a terminal or a CI log
    listed = cli("keys", "list", "--url", url).json()
    assert not any(k["name"] == "x" for k in listed["data"])  # no failed create left a key behind


def test_a_gateway_without_admin_api_is_named(env: Env) -> None:
    stub = StubUpstream().start()
    gw = GatewayProcess(f"upstreams: [{{name: s, base_url: '{stub.url}', models: [m]}}]\n")
    try:
        gw.start()
        run = cli("keys", "list", "--url", gw.url)
        assert run.code == 1 and "no admin API" in run.err and "admin_key" in run.err
    finally:
        gw.close()
        stub.stop()
