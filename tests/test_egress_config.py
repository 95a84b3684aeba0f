"""An upstream's proxy and TLS settings, as the config layer builds them.

The environment's proxy variables are read once here, as curl, requests and
httpx read them; what comes out is each upstream's effective proxy. Secrets
(a proxy's password) never show in a problem or in the config's repr.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from proxy.config.egress import bypasses
from proxy.config.loader import parse_config
from proxy.config.types import ForwardProxy
from proxy.errors import ConfigError
from tests.egress_parts import Pki

UPSTREAMS = """
upstreams:
  - {name: openai, base_url: 'https://api.openai.com/v1', models: [a]}
  - {name: vllm, base_url: 'http://vllm.llm.svc:8000/v1', models: [b]}
  - {name: demo, provider: mock, models: [c]}
"""


def _proxies(environ: dict[str, str], text: str = UPSTREAMS) -> dict[str, ForwardProxy | None]:
    return {u.name: u.proxy for u in parse_config(text, environ).upstreams}


def _problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ or {})
    return list(caught.value.problems)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_the_environment_proxy_is_each_upstream_s_by_its_scheme_lower_case_first() -> None:
    found = _proxies({"HTTPS_PROXY": "http://secure.corp:3128", "https_proxy": "http://lower.corp:8080",
                      "HTTP_PROXY": "plain.corp:3129"})
    assert found["openai"] == ForwardProxy("lower.corp", 8080, source="https_proxy")
    assert found["vllm"] == ForwardProxy("plain.corp", 3129, source="HTTP_PROXY")  # no scheme: http
    assert found["demo"] is None  # the mock makes no connection
    assert _proxies({"https_proxy": "", "HTTPS_PROXY": "http://p.corp"})["openai"] == ForwardProxy(
        "p.corp", 80, source="HTTPS_PROXY")  # an empty variable counts as unset; the port defaults to 80
    assert _proxies({}) == {"openai": None, "vllm": None, "demo": None}


def test_no_proxy_sends_the_upstreams_it_names_direct() -> None:
    environ = {"HTTPS_PROXY": "http://p.corp:3128", "HTTP_PROXY": "http://p.corp:3128",
               "NO_PROXY": "localhost, .svc,10.0.0.0/8"}
    assert _proxies(environ) == {"openai": ForwardProxy("p.corp", 3128, source="HTTPS_PROXY"),
                                 "vllm": None, "demo": None}
    assert _proxies({**environ, "no_proxy": "*"})["openai"] is None  # lower case first here too


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypassed"), [
    ("openai.com", "api.openai.com", 443, True),
    (".openai.com", "api.openai.com", 443, True),
    ("*.openai.com", "api.openai.com", 443, True),
    ("openai.com", "openai.com", 443, True),
    ("openai.com", "notopenai.com", 443, False),
    ("API.OpenAI.com.", "api.openai.com", 443, True),
    ("10.0.0.0/8", "10.1.2.3", 443, True),
    ("10.0.0.0/8", "11.1.2.3", 443, False),
    ("10.1.2.3", "10.1.2.3", 80, True),
    ("::1", "::1", 443, True),
    ("[fd00::]/8", "fd00::5", 443, False),  # brackets take an address, not a range
    ("fd00::/8", "fd00::5", 443, True),
    ("[::1]:8443", "::1", 8443, True),
    ("vllm.svc:8000", "vllm.svc", 8000, True),
    ("vllm.svc:8000", "vllm.svc", 9000, False),
    ("*", "anything", 1, True),
    ("", "anything", 1, False),
    ("10.0.0.0/8", "ten.example", 443, False),
])
def test_no_proxy_entries_as_curl_and_requests_read_them(no_proxy: str, host: str, port: int,
                                                         bypassed: bool) -> None:
    assert bypasses(no_proxy, host, port) is bypassed


def test_an_upstream_s_own_proxy_beats_the_environment_and_null_means_direct() -> None:
    text = """
upstreams:
  - {name: own, base_url: 'https://api.openai.com/v1', models: [a], proxy: 'http://team.corp:3128'}
  - {name: none, base_url: 'https://api.openai.com/v1', models: [b], proxy: null}
  - {name: empty, base_url: 'https://api.openai.com/v1', models: [c], proxy: ''}
  - {name: unset, base_url: 'https://api.openai.com/v1', models: [d], proxy: '${TEAM_PROXY:-}'}
  - {name: no-proxy-ignored, base_url: 'https://api.openai.com/v1', models: [e], proxy: 'http://x.corp:1'}
"""
    found = _proxies({"HTTPS_PROXY": "http://env.corp:3128", "NO_PROXY": "openai.com"}, text)
    assert found == {"own": ForwardProxy("team.corp", 3128), "none": None, "empty": None, "unset": None,
                     "no-proxy-ignored": ForwardProxy("x.corp", 1)}


def test_proxy_credentials_become_basic_auth_and_never_show() -> None:
    text = """
upstreams:
  - {name: a, base_url: 'https://api.openai.com/v1', models: [a], proxy: 'http://svc%40corp:p%3Ass@p.corp:3128'}
"""
    config = parse_config(text, {})
    proxy = config.upstreams[0].proxy
    assert proxy is not None and proxy.url == "http://p.corp:3128"
    assert proxy.authorization == "Basic " + base64.b64encode(b"svc@corp:p:ss").decode()
    assert "p:ss" not in repr(config) and "p%3Ass" not in repr(config)
    assert proxy.authorization not in repr(config)


@pytest.mark.parametrize(("value", "message"), [
    ("socks5://u:hunter2@p.corp:1080", "socks5:// proxies are not supported"),
    ("https://u:hunter2@p.corp:3128", "https:// proxies are not supported"),
    ("http://u:hunter2@:3128", "must be an http:// proxy URL with a host"),
    ("http://u:hunter2@p.corp:99999", "a port from 1 to 65535"),
])
def test_a_bad_proxy_url_is_a_problem_that_does_not_repeat_it(value: str, message: str) -> None:
    problems = _problems(UPSTREAMS, {"HTTPS_PROXY": value})
    assert len(problems) == 1 and message in problems[0] and "hunter2" not in problems[0]
    assert problems[0].startswith("upstreams[0] (its proxy from HTTPS_PROXY):")
    own = f"upstreams: [{{name: a, base_url: 'https://x.example/v1', models: [a], proxy: '{value}'}}]"
    problems = _problems(own)
    assert problems[0].startswith("upstreams[0].proxy:") and "hunter2" not in problems[0]


def test_tls_settings_are_checked_with_the_config(pki: Pki, tmp_path: Path) -> None:
    def tls(settings: str, base_url: str = "https://vllm.example/v1") -> str:
        return f"upstreams: [{{name: a, base_url: '{base_url}', models: [a], tls: {{{settings}}}}}]"

    config = parse_config(tls(f"ca_file: '{pki.ca}', cert_file: '{pki.client_cert}', "
                              f"key_file: '{pki.client_key}'"), {})
    assert config.upstreams[0].tls.ca_file == str(pki.ca) and config.upstreams[0].tls.verify
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    cases = {
        f"ca_file: '{tmp_path}/missing.pem'": "upstreams[0].tls.ca_file: cannot use",
        f"ca_file: '{tmp_path}/empty.pem'": "upstreams[0].tls.ca_file: cannot use",
        f"cert_file: '{pki.client_cert}', key_file: '{tmp_path}/missing.key'": "upstreams[0].tls.key_file: cannot read",
        f"cert_file: '{pki.client_cert}', key_file: '{pki.server_key}'": "upstreams[0].tls.cert_file:",
        f"cert_file: '{pki.client_cert}', key_file: '{pki.client_key_encrypted}'": "encrypted private key",
        f"key_file: '{pki.client_key}'": "upstreams[0].tls.key_file: needs cert_file",
        f"ca_file: '{pki.ca}', verify: false": "upstreams[0].tls.ca_file: has no use with verify: false",
        "verify: maybe": "upstreams[0].tls.verify: must be true or false",
        "ca_path: /etc/ssl": "upstreams[0].tls.ca_path: unknown key",
    }
    for settings, message in cases.items():
        problems = _problems(tls(settings))
        assert any(message in p for p in problems), (settings, problems)
    problems = _problems(tls(f"ca_file: '{pki.ca}'", base_url="http://vllm.example/v1"))
    assert problems == ["upstreams[0].tls: applies to an https:// base_url only"]
    assert not parse_config(tls("verify: false"), {}).upstreams[0].tls.verify
