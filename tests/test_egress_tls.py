"""TLS between the gateway and an upstream: a throwaway CA, real TLS servers on loopback.

The upstream client (proxy/upstreams/transport.py) verifies with the upstream's
``tls.ca_file`` (or the system's CAs and ``SSL_CERT_FILE``), sends SNI,
checks the host name, and presents a client certificate where the server
requires one. A failure says what TLS said, and the gateway fails over.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from proxy.config.loader import parse_config
from proxy.errors import UpstreamConnectionError
from proxy.upstreams.transport import HttpTransport, UpstreamResponse
from tests.egress_parts import Pki, TlsFront
from tests.gateway_process import GatewayProcess
from tests.stub_upstream import StubUpstream

KEY = "sk-egress-tls"
ADMIN = "sk-egress-tls-admin"
StartGateway = Callable[..., GatewayProcess]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_stub(pki: Pki) -> Iterator[tuple[StubUpstream, list[str | None]]]:
    context, names = pki.server_context()
    server = StubUpstream(tls=context).start()
    yield server, names
    server.stop()


@pytest.fixture
def mtls_stub(pki: Pki, stub: StubUpstream) -> Iterator[TlsFront]:
    """The plain stub behind a front that requires a client certificate of the test CA."""
    context, _ = pki.server_context(client_ca=pki.ca)
    front = TlsFront(context, stub.port).start()
    yield front
    front.stop()


def _transport(base_url: str, tls: str = "") -> HttpTransport:
    settings = f", tls: {{{tls}}}" if tls else ""
    config = parse_config(f"upstreams: [{{name: a, base_url: '{base_url}', models: [m], "
                          f"timeout: {{connect: 10}}{settings}}}]", {})
    return HttpTransport(config.upstreams[0])


@pytest.fixture
async def transports() -> AsyncIterator[list[HttpTransport]]:
    made: list[HttpTransport] = []
    yield made
    for transport in made:
        await transport.close()


async def _models(transport: HttpTransport, base_url: str) -> UpstreamResponse:
    response = await transport.get(base_url + "/models", {})
    while await response.read_chunk():
        pass
    response.close()
    return response


async def test_a_tls_upstream_is_verified_with_its_ca_file_and_gets_sni(
        pki: Pki, tls_stub: tuple[StubUpstream, list[str | None]], transports: list[HttpTransport]) -> None:
    stub, names = tls_stub
    base = f"https://localhost:{stub.port}/v1"
    transports.append(transport := _transport(base, f"ca_file: '{pki.ca}'"))
    assert (await _models(transport, base)).status == 200
    assert names == ["localhost"]  # SNI: the upstream's host name
    assert stub.seen[-1].headers["Host"] == f"localhost:{stub.port}"


async def test_a_wrong_ca_or_a_wrong_name_is_refused_with_the_reason(
        pki: Pki, tls_stub: tuple[StubUpstream, list[str | None]], transports: list[HttpTransport]) -> None:
    stub, _ = tls_stub
    base = f"https://127.0.0.1:{stub.port}/v1"
    transports.append(transport := _transport(base, f"ca_file: '{pki.other_ca}'"))
    with pytest.raises(UpstreamConnectionError) as caught:
        await _models(transport, base)
    assert caught.value.message == "cannot reach upstream: TLS certificate verify failed"
    assert caught.value.detail.startswith("TLS certificate verify failed: unable to get local issuer certificate")
    assert caught.value.detail.endswith(f"(127.0.0.1:{stub.port})")
    transports.append(default := _transport(base))  # the system's CAs do not know the test CA either
    with pytest.raises(UpstreamConnectionError, match="TLS certificate verify failed"):
        await _models(default, base)
    assert not stub.seen


async def test_the_host_name_is_checked(pki: Pki, transports: list[HttpTransport]) -> None:
    context, _ = pki.server_context(misnamed=True)
    stub = StubUpstream(tls=context).start()
    try:
        base = f"https://localhost:{stub.port}/v1"  # a certificate of the right CA for another name
        transports.append(transport := _transport(base, f"ca_file: '{pki.ca}'"))
        with pytest.raises(UpstreamConnectionError) as caught:
            await _models(transport, base)
        assert "Hostname mismatch, certificate is not valid for 'localhost'" in caught.value.detail
        transports.append(unverified := _transport(base, "verify: false"))
        assert (await _models(unverified, base)).status == 200  # allowed, and warned about at start-up
    finally:
        stub.stop()


async def test_an_mtls_upstream_is_refused_without_the_client_certificate_and_served_with_it(
        pki: Pki, mtls_stub: TlsFront, stub: StubUpstream, transports: list[HttpTransport]) -> None:
    base = f"https://127.0.0.1:{mtls_stub.port}/v1"
    transports.append(without := _transport(base, f"ca_file: '{pki.ca}'"))
    with pytest.raises(UpstreamConnectionError) as caught:
        await _models(without, base)
    assert caught.value.message.startswith("cannot reach upstream: TLS failed")
    assert "certificate required" in caught.value.detail and "tls.cert_file" in caught.value.detail
    transports.append(with_cert := _transport(
        base, f"ca_file: '{pki.ca}', cert_file: '{pki.client_cert}', key_file: '{pki.client_key}'"))
    for _ in range(2):  # the second request reuses the verified connection
        assert (await _models(with_cert, base)).status == 200
    assert len(stub.seen) == 2
    assert mtls_stub.handshakes == ["PEER_DID_NOT_RETURN_A_CERTIFICATE", "ok"]


def _config(*upstreams: str, extra: str = "") -> str:
    return "upstreams:\n" + "\n".join(upstreams) + f"""
routing: {{max_attempts: 3, deadline: 20}}
keys: [{{name: t, key: {KEY}}}]
admin_key: {ADMIN}
{extra}"""


def _post(gw: GatewayProcess, model: str, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})


def _wait_for(predicate: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_tls_failure_fails_over_and_says_why_in_the_log_and_admin(
        gateway: StartGateway, pki: Pki, tls_stub: tuple[StubUpstream, list[str | None]],
        mtls_stub: TlsFront) -> None:
    stub, _ = tls_stub
    client = f"cert_file: '{pki.client_cert}', key_file: '{pki.client_key}'"
    gw = gateway(_config(
        f"  - {{name: wrong-ca, base_url: 'https://127.0.0.1:{stub.port}/v1', models: [m], "
        f"tls: {{ca_file: '{pki.other_ca}'}}}}",
        f"  - {{name: right-ca, base_url: 'https://localhost:{stub.port}/v1', models: [m], priority: 1, "
        f"tls: {{ca_file: '{pki.ca}'}}}}",
        f"  - {{name: no-cert, base_url: 'https://127.0.0.1:{mtls_stub.port}/v1', models: [mtls], "
        f"tls: {{ca_file: '{pki.ca}'}}}}",
        f"  - {{name: with-cert, base_url: 'https://127.0.0.1:{mtls_stub.port}/v1', models: [mtls], "
        f"priority: 1, tls: {{ca_file: '{pki.ca}', {client}}}}}",
        f"  - {{name: unverified, base_url: 'https://127.0.0.1:{stub.port}/v1', models: [u], "
        "tls: {verify: false}}"))
    assert "upstream unverified: tls.verify is false" in gw.log()  # a warning at start-up
    for model, upstream in (("m", "right-ca"), ("mtls", "with-cert"), ("u", "unverified")):
        for stream in (False, True):
            resp = _post(gw, model, stream)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-llm-proxy-upstream"] == upstream
    _wait_for(lambda: "upstream no-cert: TLS failed" in gw.log())
    log = gw.log()
    assert (f"upstream wrong-ca: TLS certificate verify failed: unable to get local issuer certificate "
            f"(127.0.0.1:{stub.port})") in log
    admin = httpx.get(gw.url + "/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    errors = {u["name"]: u["recent_errors"] for u in admin}
    assert errors["wrong-ca"][-1]["outcome"] == "connect_error"
    assert errors["wrong-ca"][-1]["error"].startswith("TLS certificate verify failed: unable to get local issuer")
    assert "certificate required" in errors["no-cert"][-1]["error"]
    assert errors["right-ca"] == [] and errors["with-cert"] == []


def test_ssl_cert_file_adds_a_ca_to_the_system_s_for_upstreams_without_ca_file(
        gateway: StartGateway, pki: Pki, tls_stub: tuple[StubUpstream, list[str | None]], tmp_path: Path) -> None:
    """SSL_CERT_FILE replaces OpenSSL's default CA file, not its hashed directory (Debian's
    /etc/ssl/certs): played here by SSL_CERT_DIR with a "public" CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    public = Pki(tmp_path / "public", ca_name="a public CA")
    subject_hash = subprocess.run([openssl, "x509", "-hash", "-noout", "-in", str(public.ca)], check=True,
                                  capture_output=True, text=True).stdout.strip()
    (tmp_path / "certs").mkdir()
    shutil.copy(public.ca, tmp_path / "certs" / f"{subject_hash}.0")
    public_stub = StubUpstream(tls=public.server_context()[0]).start()
    try:
        corp_stub, _ = tls_stub
        gw = gateway(_config(
            f"  - {{name: corp, base_url: 'https://127.0.0.1:{corp_stub.port}/v1', models: [corp]}}",
            f"  - {{name: public, base_url: 'https://127.0.0.1:{public_stub.port}/v1', models: [public]}}"),
            env={"SSL_CERT_FILE": str(pki.ca), "SSL_CERT_DIR": str(tmp_path / "certs")})
        for model in ("corp", "public"):
            resp = _post(gw, model)
            assert resp.status_code == 200 and resp.headers["x-llm-proxy-upstream"] == model, resp.text
    finally:
        public_stub.stop()


def test_a_tls_file_that_cannot_be_used_stops_the_start_with_its_setting(
        gateway: StartGateway, pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:
        gateway(_config(f"  - {{name: a, base_url: 'https://127.0.0.1:1/v1', models: [m], "
                        f"tls: {{ca_file: '{tmp_path}/corporate.pem'}}}}"))
    assert f"upstreams[0].tls.ca_file: cannot use {tmp_path}/corporate.pem: No such file or directory" \
        in str(caught.value)
