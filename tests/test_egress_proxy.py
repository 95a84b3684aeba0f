"""The gateway behind a real forward proxy (Debian's tinyproxy), as in a company network.

The proxy's own log proves where each request went: an http upstream's
request in absolute form, an https upstream's ``CONNECT`` (TLS to the
upstream inside it), nothing for an upstream that NO_PROXY or ``proxy:
null`` sends direct. Failover, timeouts and health checks behave as for
direct upstreams; a proxy that refuses is a connection failure named in the
log and in /admin/upstreams, without its password.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.egress_parts import Pki, Tinyproxy
from tests.gateway_process import GatewayProcess
from tests.otlp_receiver import OtlpReceiver
from tests.stub_upstream import StubUpstream, free_port

KEY = "sk-egress-proxy"
ADMIN = "sk-egress-proxy-admin"
PASSWORD = "s3cret-proxy-pw"
StartGateway = Callable[..., GatewayProcess]
NO_PROXY_ENV = {name: "" for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "NO_PROXY", "no_proxy")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_stub(pki: Pki) -> Iterator[StubUpstream]:
    server = StubUpstream(tls=pki.server_context()[0]).start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture
def proxies() -> Iterator[Callable[..., Tinyproxy]]:
    started: list[Tinyproxy] = []

    def start(auth: tuple[str, str] | None = None, connect_ports: tuple[int, ...] = ()) -> Tinyproxy:
        started.append(proxy := Tinyproxy(auth, connect_ports))
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def _config(*upstreams: str) -> str:
    return "upstreams:\n" + "\n".join(upstreams) + f"""
routing: {{max_attempts: 6, deadline: 30}}
keys: [{{name: t, key: {KEY}}}]
admin_key: {ADMIN}
"""


def _up(name: str, url: str, model: str, extra: str = "", priority: int = 0, total: float = 30,
        connect: float = 5) -> str:
    return (f"  - {{name: {name}, base_url: '{url}', models: [{model}], priority: {priority}, "
            f"timeout: {{connect: {connect}, first_byte: {min(total, 10)}, total: {total}}}{extra}}}")


def _post(gw: GatewayProcess, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {KEY}"},
                      json=body)


def _recent_errors(gw: GatewayProcess) -> dict[str, list[dict[str, str]]]:
    views = httpx.get(gw.url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    return {u["name"]: u["recent_errors"] for u in views}


def _wait_for(predicate: Callable[[], bool], what: Callable[[], str], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"not in time; {what()}"
        time.sleep(0.05)


def test_http_proxy_in_the_environment_is_not_gone_around(
        gateway: StartGateway, proxies: Callable[..., Tinyproxy], stub: StubUpstream) -> None:
    proxy = proxies()
    gw = gateway(_config(_up("plain", stub.url, "plain")), env={**NO_PROXY_ENV, "HTTP_PROXY": proxy.url})
    assert _post(gw, "plain").status_code == 200
    assert proxy.requests() == [f"POST http://127.0.0.1:{stub.port}/v1/chat/completions"]


def test_the_environment_s_proxy_carries_http_and_https_upstreams_and_no_proxy_goes_direct(
        gateway: StartGateway, proxies: Callable[..., Tinyproxy], pki: Pki, stub: StubUpstream,
        stub2: StubUpstream, tls_stub: StubUpstream) -> None:
    proxy = proxies()
    gw = gateway(_config(
        _up("plain", stub.url, "plain", ", health_check: {interval: 0.2}"),
        _up("secure", f"https://localhost:{tls_stub.port}/v1", "secure",
            f", tls: {{ca_file: '{pki.ca}'}}, health_check: {{interval: 0.2}}"),
        _up("bypass", f"http://localhost:{stub2.port}/v1", "bypass")),
        env={**NO_PROXY_ENV, "HTTP_PROXY": proxy.url, "https_proxy": proxy.url, "NO_PROXY": "localhost:"
             f"{stub2.port}"})
    assert f"upstream secure: connections go through proxy {proxy.url} (from https_proxy)" in gw.log()
    for model in ("plain", "secure", "bypass"):
        for stream in (False, True):
            resp = _post(gw, model, stream)
            assert resp.status_code == 200 and resp.headers["x-llm-proxy-upstream"] == model, resp.text
            upstream = {"plain": stub, "secure": tls_stub, "bypass": stub2}[model]
            if stream:  # relayed byte for byte through the proxy and TLS, as directly
                assert resp.content == upstream.chat_requests[-1].sent
    asked = proxy.requests()
    assert asked.count(f"POST http://127.0.0.1:{stub.port}/v1/chat/completions") == 2  # absolute form
    assert f"CONNECT localhost:{tls_stub.port}" in asked  # a tunnel; TLS to the upstream inside it
    assert not any(f":{tls_stub.port}/" in a for a in asked)  # the proxy never sees an https request
    assert not any(str(stub2.port) in a for a in asked)  # NO_PROXY: direct
    # the active checks go the same way, and ask for no encoding the gateway cannot decode
    _wait_for(lambda: f"GET http://127.0.0.1:{stub.port}/v1/models" in proxy.requests(), proxy.log)
    _wait_for(lambda: any(s.path == "/v1/models" for s in tls_stub.seen), lambda: str(tls_stub.seen))
    checks = [s for s in [*stub.seen, *tls_stub.seen] if s.path == "/v1/models"]
    assert checks and all(s.headers["Accept-Encoding"] == "identity" for s in checks)
    assert all(s.headers["Accept-Encoding"] == "identity" for s in stub.chat_requests)


def test_proxy_credentials_an_upstream_s_own_proxy_and_proxy_null(
        gateway: StartGateway, proxies: Callable[..., Tinyproxy], pki: Pki, stub: StubUpstream,
        stub2: StubUpstream, tls_stub: StubUpstream, receiver: OtlpReceiver) -> None:
    corp, team = proxies(), proxies(auth=("svc", PASSWORD))
    secure = f"https://127.0.0.1:{tls_stub.port}/v1"
    tls = f", tls: {{ca_file: '{pki.ca}'}}"
    gw = gateway(_config(
        _up("no-credentials", secure, "m", f", proxy: '{team.url}'{tls}"),
        _up("wrong-password", secure, "m", f", proxy: 'http://svc:wrong-pw@127.0.0.1:{team.port}'{tls}",
            priority=1),
        _up("right-password", secure, "m", f", proxy: 'http://svc:{PASSWORD}@127.0.0.1:{team.port}'{tls}",
            priority=2),
        _up("plain-with-auth", stub.url, "plain", f", proxy: 'http://svc:{PASSWORD}@127.0.0.1:{team.port}'"),
        _up("direct", stub2.url, "direct", ", proxy: null")),
        env={**NO_PROXY_ENV, "HTTPS_PROXY": corp.url, "HTTP_PROXY": corp.url,
             "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    for model, upstream in (("m", "right-password"), ("plain", "plain-with-auth"), ("direct", "direct")):
        resp = _post(gw, model)
        assert resp.status_code == 200 and resp.headers["x-llm-proxy-upstream"] == upstream, resp.text
    spans = receiver.wait_for(lambda spans: len(spans) >= 8)  # 3 requests, 5 attempts
    failed = sorted(span.status.message for span in spans if span.status.message)
    assert failed[0].startswith(f"proxy {team.url} answered 401 Unauthorized to CONNECT")
    assert failed[1].startswith(f"proxy {team.url} answered 407 Proxy Authentication Required")
    assert corp.requests() == []  # every upstream's own proxy (or none) beat the environment's
    assert team.requests() == [f"CONNECT 127.0.0.1:{tls_stub.port}"] * 3 + [
        f"POST http://127.0.0.1:{stub.port}/v1/chat/completions"]
    assert len(stub2.chat_requests) == 1 and len(tls_stub.chat_requests) == 1
    errors = _recent_errors(gw)
    assert errors["no-credentials"][-1]["error"] == (
        f"proxy {team.url} answered 407 Proxy Authentication Required to CONNECT 127.0.0.1:{tls_stub.port} "
        "(proxy credentials missing or refused)")
    assert errors["wrong-password"][-1]["error"].startswith(f"proxy {team.url} answered 401")
    log = gw.log()
    assert f"upstream no-credentials: proxy {team.url} answered 407" in log
    for secret in (PASSWORD, "wrong-pw"):
        assert secret not in log and secret not in str(errors) and secret not in str(spans)


def test_failover_and_timeouts_through_a_proxy_are_as_direct(
        gateway: StartGateway, proxies: Callable[..., Tinyproxy], pki: Pki, stub: StubUpstream,
        stub2: StubUpstream, tls_stub: StubUpstream) -> None:
    proxy, strict = proxies(), proxies(connect_ports=(443,))
    down = f"http://127.0.0.1:{free_port()}"
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the backlog) and never answers
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    tls = f", tls: {{ca_file: '{pki.ca}'}}"
    gw = gateway(_config(
        _up("proxy-silent", f"https://127.0.0.1:{tls_stub.port}/v1", "m", f", proxy: '{silent_url}'{tls}",
            connect=1),
        _up("proxy-down", f"https://127.0.0.1:{tls_stub.port}/v1", "m", f", proxy: '{down}'{tls}"),
        _up("proxy-forbids", f"https://127.0.0.1:{tls_stub.port}/v1", "m", f", proxy: '{strict.url}'{tls}"),
        _up("unreachable", f"https://127.0.0.1:{free_port()}/v1", "m", tls, priority=1),
        _up("hanging", f"https://127.0.0.1:{tls_stub.port}/v1", "m", tls, priority=2, total=0.5),
        _up("last", stub2.url, "m", priority=3)),
        env={**NO_PROXY_ENV, "HTTPS_PROXY": proxy.url, "HTTP_PROXY": proxy.url, "NO_PROXY": "localhost"})
    tls_stub.behave("hang")
    for stream in (False, True):
        resp = _post(gw, "m", stream)
        assert resp.status_code == 200 and resp.headers["x-llm-proxy-upstream"] == "last", resp.text
    silent.close()
    errors = _recent_errors(gw)
    assert errors["proxy-silent"][-1]["error"] == (
        f"no connection within 1s, the connect timeout (127.0.0.1:{tls_stub.port} through proxy {silent_url})")
    assert errors["proxy-down"][-1]["error"] == f"connection refused (proxy {down})"
    assert errors["proxy-forbids"][-1]["error"].startswith(f"proxy {strict.url} answered 403 ")
    assert errors["proxy-forbids"][-1]["error"].endswith("(the proxy does not allow this destination)")
    assert errors["unreachable"][-1]["error"].startswith(f"proxy {proxy.url} answered 500 Unable to connect")
    assert errors["hanging"][-1] == {**errors["hanging"][-1], "outcome": "timeout",
                                     "error": "The upstream did not answer within 0.5s."}
    assert sum(r.startswith("CONNECT") for r in proxy.requests()) >= 4  # unreachable and hanging, twice each
    assert len(stub2.chat_requests) == 2
