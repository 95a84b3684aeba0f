"""The config contract: every shipped file loads; every problem is reported with its path."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.loader import load_config, parse_config
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "upstreams: [{name: a, base_url: 'http://a/v1', models: [m]}]\n"


def _problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, env or {})
    return list(err.value.problems)


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    env = {"OPENAI_API_KEY": "x", "AZURE_OPENAI_API_KEY": "x", "TEAM_A_CI_KEY": "k1", "TEAM_B_KEY": "k2",
           "REDIS_URL": "redis://127.0.0.1:6379/0", "LLM_PROXY_ADMIN_KEY": "admin"}
    assert load_config(path, env).upstreams


def test_defaults() -> None:
    c = parse_config(MINIMAL, {})
    u = c.upstreams[0]
    assert (u.provider, u.weight, u.priority, u.max_concurrency) == ("openai", 1.0, 0, None)
    assert (u.timeout.connect, u.timeout.first_byte, u.timeout.idle, u.timeout.total) == (5, 60, 60, 600)
    assert (c.routing.strategy, c.routing.max_attempts, c.routing.deadline) == ("least_requests", 3, 120)
    assert c.redis_url is None and c.admin_key is None and c.quotas.on_store_error == "fail_closed"


def test_server_header_limits() -> None:
    server = parse_config(MINIMAL, {}).server
    assert (server.header_timeout, server.max_header_bytes) == (10.0, 65536)
    server = parse_config(MINIMAL + "server: {header_timeout: 2.5, max_header_bytes: 32768}\n", {}).server
    assert (server.header_timeout, server.max_header_bytes) == (2.5, 32768)
    assert _problems(MINIMAL + "server: {header_timeout: 0, max_header_bytes: 512}\n") == [
        "server.header_timeout: must be > 0", "server.max_header_bytes: must be >= 1024"]
    assert _problems(MINIMAL + "server: {header_timeout: soon, max_header_bytes: 64k}\n") == [
        "server.header_timeout: must be a number", "server.max_header_bytes: must be an integer"]


def test_environment_substitution_with_defaults() -> None:
    text = """
redis_url: ${REDIS_URL:-redis://localhost:6379/0}
upstreams:
  - name: a
    base_url: ${BASE:-http://a/v1}
    api_key: ${KEY}
    weight: ${W:-2.5}
    models: [m]
"""
    c = parse_config(text, {"KEY": "secret-1"})
    assert c.redis_url == "redis://localhost:6379/0"
    assert c.upstreams[0].api_key == "secret-1" and c.upstreams[0].weight == 2.5


def test_unset_variable_without_default_is_named() -> None:
    assert _problems(MINIMAL.replace("'http://a/v1'", "'${UPSTREAM_URL}'")) == [
        "upstreams[0].base_url: environment variable UPSTREAM_URL is not set"]


def test_every_problem_is_reported_with_its_path() -> None:
    text = """
upstreams:
  - {name: a, base_url: "http://a/v1", models: [m], timeout: {first_byte: 0}}
  - {name: a, base_url: "ftp://b", models: [], weight: -1}
  - {name: z, provider: azure, base_url: "https://z", models: {m: dep}}
routing: {strategy: fastest, max_attempts: 0}
keys:
  - {name: k, key: a, key_sha256: b}
  - {name: j, key_sha256: nothex, limits: {rpm: many, typo: 1}}
quotas: {on_store_error: maybe}
"""
    problems = _problems(text)
    for expected in [
        "upstreams[0].timeout.first_byte: must be > 0",
        "upstreams[1].base_url: must be an http:// or https:// URL",
        "upstreams[1].models: must name at least one model",
        "upstreams[2].api_version: is required for provider azure",
        "routing.strategy: must be one of round_robin, weighted, least_requests, latency (got 'fastest')",
        "routing.max_attempts: must be >= 1",
        "keys[0]: needs exactly one of key or key_sha256",
        "keys[1].key_sha256: must be 64 hexadecimal digits",
        "keys[1].limits.rpm: must be an integer",
        "quotas.on_store_error: must be one of fail_closed, fail_open (got 'maybe')",
    ]:
        assert expected in problems, problems
    assert any(p.startswith("keys[1].limits.typo: unknown key") for p in problems)


def test_key_directory_max_age_is_a_positive_finite_number_of_seconds() -> None:
    assert parse_config(MINIMAL, {}).quotas.key_directory_max_age == 30
    assert parse_config(MINIMAL + "quotas: {key_directory_max_age: 2.5}\n", {}).quotas.key_directory_max_age == 2.5
    for bad, problem in (("0", "must be > 0"), ("-1", "must be > 0"), ("soon", "must be a number"),
                         (".inf", "must be a finite number"), (".nan", "must be a finite number")):
        assert _problems(MINIMAL + f"quotas: {{key_directory_max_age: {bad}}}\n") == [
            f"quotas.key_directory_max_age: {problem}"]


def test_duplicate_names_are_rejected() -> None:
    text = """
upstreams:
  - {name: a, base_url: "http://a/v1", models: [m]}
  - {name: a, base_url: "http://b/v1", models: [m]}
"""
    assert "upstreams: duplicate name 'a'" in _problems(text)


def test_static_keys_are_kept_only_as_hashes() -> None:
    c = parse_config(MINIMAL + "keys: [{name: k, key: sk-plain-secret}]\n", {})
    assert c.keys[0].key_sha256 == hashlib.sha256(b"sk-plain-secret").hexdigest()
    assert "sk-plain-secret" not in repr(c)


def test_secrets_do_not_appear_in_repr() -> None:
    text = MINIMAL.replace("models: [m]", "models: [m], api_key: upstream-secret") + \
        "admin_key: admin-secret\nredis_url: redis://:pw-secret@h:6379\n"
    shown = repr(parse_config(text, {}))
    assert "upstream-secret" not in shown and "admin-secret" not in shown and "pw-secret" not in shown


def test_a_secret_from_a_file_loses_its_newline_and_one_that_would_split_a_header_is_refused() -> None:
    text = MINIMAL.replace("models: [m]", "models: [m], api_key: '${KEY}'") + "admin_key: '${ADMIN}'\n"
    c = parse_config(text, {"KEY": "sk-upstream\n", "ADMIN": " admin-secret\r\n"})
    assert c.upstreams[0].api_key == "sk-upstream" and c.admin_key == "admin-secret"
    problems = _problems(text, {"KEY": "sk-up\r\nX-Injected: 1", "ADMIN": "two words"})
    assert any(p.startswith("upstreams[0].api_key") for p in problems), problems
    assert any(p.startswith("admin_key") for p in problems), problems
    assert not any("sk-up" in p or "two words" in p for p in problems)  # the secret is not echoed


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("models: [m]", "models: [m], timeout: {first_byte: -1}"))
    run = [sys.executable, "-m", "proxy", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    fail = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1
    assert "upstreams[0].timeout.first_byte: must be > 0" in fail.stderr


def test_a_models_maximum_output_bounds_its_quota_estimate() -> None:
    assert parse_config(MINIMAL + "models: {m: {max_output_tokens: 8192}}\n", {}).models["m"].max_output_tokens == 8192
    assert parse_config(MINIMAL + "models: {m: {fallbacks: []}}\n", {}).models["m"].max_output_tokens == 16384
    assert _problems(MINIMAL + "models: {m: {max_output_tokens: 0}}\n") == [
        "models.m.max_output_tokens: must be >= 1"]
    assert _problems(MINIMAL + "models: {m: {max_output_tokens: lots}}\n") == [
        "models.m.max_output_tokens: must be an integer"]
    assert _problems(MINIMAL + "models: {other: {max_output_tokens: 10}}\n")  # not a configured model


def test_an_invalid_provider_does_not_hide_the_same_upstreams_other_problems() -> None:
    problems = _problems("upstreams: [{name: a, provider: openia, base_url: 'http://a/v1', models: [m], "
                         "weight: 0, timeout: {first_byte: 0}, mock: {latency: -1}}]\n")
    assert problems[0].startswith("upstreams[0].provider: ")
    assert {"upstreams[0].weight: must be > 0", "upstreams[0].timeout.first_byte: must be > 0",
            "upstreams[0].mock.latency: must be >= 0"} <= set(problems), problems
