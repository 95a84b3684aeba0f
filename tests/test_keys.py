"""Static keys: only hashes kept, Bearer parsing, model allow-lists, expiry."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from proxy.access.keys import Authenticator, StaticKeys, bearer_token, hash_key
from proxy.config.loader import parse_config
from proxy.errors import AuthenticationError, PermissionDeniedError

CONFIG = """
upstreams: [{name: a, base_url: "http://a/v1", models: [gpt-4o, gpt-4o-mini, llama-3-8b]}]
keys:
  - {name: ci, key: sk-ci-secret, team: team-a, models: [gpt-4o-mini, "llama-*"]}
  - {name: old, key: sk-old, expires_at: "2020-01-01T00:00:00Z"}
  - {name: hashed, key_sha256: "%s"}
teams:
  - {name: team-a, models: ["gpt-4o*", "llama-*"]}
""" % hash_key("sk-from-hash")


def _auth() -> Authenticator:
    return Authenticator(StaticKeys(parse_config(CONFIG, {})))


def _check(header: bytes | None):  # type: ignore[no-untyped-def]
    return asyncio.run(_auth().authenticate(header))


def test_plain_and_hashed_keys_authenticate() -> None:
    assert _check(b"Bearer sk-ci-secret").name == "ci"
    assert _check(b"bearer sk-from-hash").name == "hashed"


@pytest.mark.parametrize("header", [None, b"", b"Bearer", b"Basic abc", b"Bearer wrong",
                                    b"Bearer sk-ci-secreT"])
def test_missing_or_wrong_key_is_401(header: bytes | None) -> None:
    with pytest.raises(AuthenticationError) as err:
        _check(header)
    assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert b"sk-ci-secret" not in err.value.body()


def test_wrong_key_is_not_echoed() -> None:
    with pytest.raises(AuthenticationError) as err:
        _check(b"Bearer sk-some-guess")
    assert b"sk-some-guess" not in err.value.body()


def test_expired_key_is_401() -> None:
    with pytest.raises(AuthenticationError) as err:
        _check(b"Bearer sk-old")
    assert err.value.code == "expired_api_key"


def test_allow_list_is_key_and_team_globs() -> None:
    policy = _check(b"Bearer sk-ci-secret")
    assert policy.allows("gpt-4o-mini") and policy.allows("llama-3-8b")
    assert not policy.allows("gpt-4o")  # the team allows it, the key does not
    with pytest.raises(PermissionDeniedError) as err:
        policy.check_model("gpt-4o")
    assert err.value.status == 403 and err.value.param == "model"


def test_policy_expiry_uses_utc() -> None:
    policy = _check(b"Bearer sk-ci-secret")
    assert not policy.expired()
    soon = datetime.now(UTC) + timedelta(seconds=1)
    assert not policy.__class__(**{**policy.__dict__, "expires_at": soon}).expired()


def test_bearer_token_strips_whitespace() -> None:
    assert bearer_token(b"Bearer   sk-x  ") == "sk-x"
