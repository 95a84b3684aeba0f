"""How a connection to an upstream is opened, and what a failure says.

One ``Dialer`` per upstream address, chosen once from the upstream's config:

- ``Direct``: TCP to the upstream, TLS for https (the event loop's own
  ``create_connection``, as before proxies existed);
- ``Tunnel``: an https upstream through an HTTP proxy: TCP to the proxy,
  ``CONNECT host:port``, then TLS to the upstream inside the tunnel
  (``loop.start_tls``), so the proxy sees the host name and nothing else;
- ``ProxyHop``: an http upstream through an HTTP proxy: TCP to the proxy,
  which gets each request in absolute form (the transport writes it so).

Every failure becomes an ``UpstreamConnectionError`` whose message says what
happened (refused, DNS, TLS and why, the proxy's answer, reset) and whose
detail adds where. A proxy is named by its URL without credentials.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

from ..config.types import ForwardProxy
from ..errors import UpstreamConnectionError

P = TypeVar("P", bound=asyncio.Protocol)
# Bytes the proxy's answer to CONNECT may take (status line and headers).
MAX_CONNECT_ANSWER = 64 * 1024
_TLS_HINTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server wants a client certificate: tls.cert_file",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the client certificate's CA",
    "WRONG_VERSION_NUMBER": "is it an http:// server?",
}
_PROXY_HINTS = {
    401: "proxy credentials refused",
    407: "proxy credentials missing or refused",
    403: "the proxy does not allow this destination",
    502: "the proxy could not reach the upstream",
    503: "the proxy could not reach the upstream",
    504: "the proxy timed out reaching the upstream",
}


class Dialer(Protocol):
    where: str  # the address, and the proxy when there is one (for error details)

    async def open(self, factory: Callable[[], P]) -> P:
        """A connected protocol from ``factory``; raises ``UpstreamConnectionError``."""
        ...


def dialer(host: str, port: int, tls: ssl.SSLContext | None, proxy: ForwardProxy | None) -> Dialer:
    if proxy is None:
        return Direct(host, port, tls)
    return Tunnel(host, port, tls, proxy) if tls is not None else ProxyHop(host, port, proxy)


class Direct:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        self._host, self._port, self._tls = host, port, tls
        self.where = host_port(host, port)

    async def open(self, factory: Callable[[], P]) -> P:
        try:
            _, protocol = await asyncio.get_running_loop().create_connection(
                factory, self._host, self._port, ssl=self._tls,
                server_hostname=self._host if self._tls is not None else None)
        except OSError as exc:  # ssl.SSLError is one
            raise failure(exc, self.where) from None
        return protocol


class ProxyHop:
    def __init__(self, host: str, port: int, proxy: ForwardProxy) -> None:
        self._proxy = proxy
        self.where = f"{host_port(host, port)} through proxy {proxy.url}"

    async def open(self, factory: Callable[[], P]) -> P:
        try:
            _, protocol = await asyncio.get_running_loop().create_connection(
                factory, self._proxy.host, self._proxy.port)
        except OSError as exc:
            raise failure(exc, f"proxy {self._proxy.url}") from None
        return protocol


class Tunnel:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext, proxy: ForwardProxy) -> None:
        self._host, self._tls, self._proxy = host, tls, proxy
        self._authority = host_port(host, port)
        self.where = f"{self._authority} through proxy {proxy.url}"
        lines = [f"CONNECT {self._authority} HTTP/1.1\r\nHost: {self._authority}\r\nUser-Agent: llm-proxy\r\n"]
        if proxy.authorization is not None:
            lines.append(f"Proxy-Authorization: {proxy.authorization}\r\n")
        self._request = ("".join(lines) + "\r\n").encode("latin-1")

    async def open(self, factory: Callable[[], P]) -> P:
        loop = asyncio.get_running_loop()
        try:
            raw, answer = await loop.create_connection(_ConnectAnswer, self._proxy.host, self._proxy.port)
        except OSError as exc:
            raise failure(exc, f"proxy {self._proxy.url}") from None
        try:
            raw.write(self._request)
            status, reason = await answer.status()
            if not 200 <= status < 300:
                raise self._refused(status, reason)
            protocol = factory()
            transport = await loop.start_tls(raw, protocol, self._tls, server_hostname=self._host)
        except OSError as exc:
            raw.abort()
            raise failure(exc, self.where) from None
        except BaseException:
            raw.abort()
            raise
        if transport is None:  # the tunnel closed during the handshake
            raise UpstreamConnectionError("cannot reach upstream: connection closed during the TLS handshake",
                                          detail=f"connection closed during the TLS handshake ({self.where})")
        protocol.connection_made(transport)
        return protocol

    def _refused(self, status: int, reason: str) -> UpstreamConnectionError:
        hint = _PROXY_HINTS.get(status)
        return UpstreamConnectionError(
            f"cannot reach upstream: the proxy refused the tunnel ({status})",
            detail=f"proxy {self._proxy.url} answered {status} {reason} to CONNECT {self._authority}"
                   + (f" ({hint})" if hint else ""))


class _ConnectAnswer(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT, up to the end of its head; then TLS takes the connection."""

    def __init__(self) -> None:
        self._head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    async def status(self) -> tuple[int, str]:
        head = await self._head
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ConnectionError("the proxy's answer to CONNECT is not HTTP")
        return int(code), "".join(c for c in reason[:80] if c.isprintable())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head.done():
            return  # a refusal's body: the connection is closed unread
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            if self._transport is not None:
                self._transport.pause_reading()  # the rest is TLS, read by start_tls's protocol
            self._head.set_result(bytes(self._buffer[:end]))
        elif len(self._buffer) > MAX_CONNECT_ANSWER:
            self._head.set_exception(ConnectionError("the proxy's answer to CONNECT is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._head.done():
            self._head.set_exception(ConnectionError("the proxy closed the connection without answering CONNECT"))


def failure(exc: OSError, where: str) -> UpstreamConnectionError:
    """``cannot reach upstream: <what happened>``; the detail adds the reason and where."""
    kind, detail = describe(exc)
    return UpstreamConnectionError(f"cannot reach upstream: {kind}", detail=f"{detail} ({where})")


def describe(exc: BaseException) -> tuple[str, str]:
    """What a connection error means: a short kind, and the kind with its reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate verify failed", f"TLS certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        code = exc.reason or type(exc).__name__
        hint = _TLS_HINTS.get(code)
        return "TLS failed", f"TLS failed: {code.lower().replace('_', ' ')}" + (f" ({hint})" if hint else "")
    if isinstance(exc, socket.gaierror):
        return "DNS lookup failed", f"DNS lookup failed: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused", "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset", "connection reset by peer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror, exc.strerror
    text = str(exc) or type(exc).__name__
    return text, text


def lost(exc: BaseException | None) -> str:
    """Why an open connection ended before its answer did."""
    return "the upstream closed the connection" if exc is None else describe(exc)[1]


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
