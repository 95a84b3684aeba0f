"""Real parts for the egress tests: a throwaway PKI, a TLS front and a forward proxy.

``Pki`` writes a CA, a second unrelated CA, server certificates (one for
``127.0.0.1``/``localhost``, one for another name) and a client certificate,
all PEM, made with the ``cryptography`` package. ``Tinyproxy`` runs Debian's
tinyproxy on a free loopback port, optionally with Basic auth; its log lists
every request and CONNECT it received, which is how a test proves that a
request went through it, or not.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import select
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.stub_upstream import free_port

_PEM = serialization.Encoding.PEM


class _Issuer:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.name = subject
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))

    def issue(self, common_name: str, names: list[x509.GeneralName],
              usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        """A leaf certificate and its unencrypted key, PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return cert.public_bytes(_PEM), key_pem


class Pki:
    """Files under ``dir``: ca.pem, other-ca.pem, server.pem/.key (127.0.0.1 and localhost),
    misnamed.pem/.key (elsewhere.example only), client.pem/.key, client-encrypted.key."""

    def __init__(self, directory: Path, ca_name: str = "llm-proxy test CA") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        ca, other = _Issuer(ca_name), _Issuer(f"an unrelated CA, not {ca_name}")
        self.ca = self._write("ca.pem", ca.cert.public_bytes(_PEM))
        self.other_ca = self._write("other-ca.pem", other.cert.public_bytes(_PEM))
        local = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        self.server_cert, self.server_key = self._pair("server", ca.issue("localhost", local,
                                                                           ExtendedKeyUsageOID.SERVER_AUTH))
        self.misnamed_cert, self.misnamed_key = self._pair("misnamed", ca.issue(
            "elsewhere.example", [x509.DNSName("elsewhere.example")], ExtendedKeyUsageOID.SERVER_AUTH))
        self.client_cert, self.client_key = self._pair("client", ca.issue(
            "llm-proxy gateway", [], ExtendedKeyUsageOID.CLIENT_AUTH))
        key = serialization.load_pem_private_key(self.client_key.read_bytes(), None)
        self.client_key_encrypted = self._write("client-encrypted.key", key.private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")))

    def server_context(self, misnamed: bool = False,
                       client_ca: Path | None = None) -> tuple[ssl.SSLContext, list[str | None]]:
        """A server's context, and the list where it collects the SNI of each handshake
        (None: none sent). With ``client_ca`` it requires a client certificate from that CA (mTLS)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if misnamed:
            context.load_cert_chain(self.misnamed_cert, self.misnamed_key)
        else:
            context.load_cert_chain(self.server_cert, self.server_key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        names: list[str | None] = []
        context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc]
        return context, names

    def _pair(self, stem: str, pems: tuple[bytes, bytes]) -> tuple[Path, Path]:
        return self._write(f"{stem}.pem", pems[0]), self._write(f"{stem}.key", pems[1])

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


class TlsFront:
    """A TLS-terminating front on loopback (an ingress), relaying to a plain backend port.

    Blocking ``ssl`` sockets, a thread per connection: unlike asyncio's TLS, which
    closes at once, OpenSSL here sends the server's alert (``certificate
    required``) before closing, as an ingress does."""

    def __init__(self, context: ssl.SSLContext, backend_port: int) -> None:
        self._context = context
        self._backend = backend_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.handshakes: list[str] = []  # "ok" or the server's reason for refusing
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> TlsFront:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(10)
        self._listener.close()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)  # to see the stop: closing a socket does not end an accept()
        while not self._stopped.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        tls = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        with tls:
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.handshakes.append(getattr(exc, "reason", None) or type(exc).__name__)
                _linger(tls)
                return
            self.handshakes.append("ok")
            with socket.create_connection(("127.0.0.1", self._backend), timeout=30) as backend, \
                    contextlib.suppress(OSError):
                _relay(tls, backend)


def _linger(tls: ssl.SSLSocket) -> None:
    """Close as nginx does (lingering close): FIN after the alert, then read what the client
    had already sent, so the close is no reset that could overtake the alert."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(tls, socket.SHUT_WR)
        tls.settimeout(5)
        while socket.socket.recv(tls, 65536):
            pass


def _relay(tls: ssl.SSLSocket, backend: socket.socket) -> None:
    """Both ways in one thread (an SSL object is not for two threads at once) until either
    side closes or both stay silent for 30 s."""
    while True:
        readable = [tls] if tls.pending() else select.select([tls, backend], [], [], 30)[0]
        if not readable:
            return
        for source in readable:
            data = source.recv(65536)
            if not data:
                return
            (backend if source is tls else tls).sendall(data)


class Tinyproxy:
    """tinyproxy on a free loopback port; ``auth`` = (user, password) turns Basic auth on;
    ``connect_ports`` limits CONNECT to those ports (others get 403)."""

    def __init__(self, auth: tuple[str, str] | None = None, connect_ports: tuple[int, ...] = ()) -> None:
        binary = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").exists() else None)
        if binary is None:
            pytest.skip("tinyproxy is not installed (scripts/test installs it)")
        self._binary = binary
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="llm-proxy-tinyproxy-")
        self.log_path = Path(self._dir.name) / "tinyproxy.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{self.log_path}"',
                 "LogLevel Info", f'PidFile "{self._dir.name}/tinyproxy.pid"', "MaxClients 50",
                 "DisableViaHeader Yes"]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        lines += [f"ConnectPort {port}" for port in connect_ports]
        self._conf = Path(self._dir.name) / "tinyproxy.conf"
        self._conf.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 20.0) -> Tinyproxy:
        self._proc = subprocess.Popen([self._binary, "-d", "-c", str(self._conf)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tinyproxy did not listen within {wait}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[str]:
        """What it was asked, in order: ``CONNECT host:port`` or ``POST http://...``."""
        marker = "]: Request (file descriptor "
        out = []
        for line in self.log().splitlines():
            if marker in line:
                out.append(line.split("): ", 1)[1].removesuffix(" HTTP/1.1"))
        return out

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._dir.cleanup()
