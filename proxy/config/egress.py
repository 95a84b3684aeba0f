"""An upstream's way out of the network: its forward proxy and its TLS settings.

The proxy environment variables are read here, once, when the config is
built (like ``${VAR}`` substitution), the way curl, requests and httpx read
them: ``https_proxy`` / ``HTTPS_PROXY`` for an https upstream,
``http_proxy`` / ``HTTP_PROXY`` for an http one (the lower-case name wins),
unless ``no_proxy`` / ``NO_PROXY`` names its host. An upstream's own
``proxy:`` wins over all of them; ``proxy: null`` or ``""`` means direct.
What comes out is the effective proxy of each upstream, in its frozen
config: nothing reads the environment at request time.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from yarl import URL

from .reader import Reader
from .tls import TlsFileError, client_context
from .types import ForwardProxy, TlsSettings

PROXY_VARIABLES = {"https": ("https_proxy", "HTTPS_PROXY"), "http": ("http_proxy", "HTTP_PROXY")}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
_SEPARATORS = re.compile(r"[,\s]+")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def upstream_proxy(r: Reader, d: Mapping[str, Any], path: str, base_url: str | None) -> ForwardProxy | None:
    """The proxy an upstream's connections go through, or None for direct ones."""
    target = _target(base_url)
    if target is None:
        return None  # the mock provider, or a base_url already reported
    if "proxy" in d:
        text = r.string(d["proxy"], f"{path}.proxy", empty_is_none=True)
        return None if text is None else parse_proxy(r, text, f"{path}.proxy", "proxy")
    scheme, host, port = target
    name, value = _first_set(r.environ, PROXY_VARIABLES[scheme])
    if value is None or bypasses(_first_set(r.environ, NO_PROXY_VARIABLES)[1] or "", host, port):
        return None
    return parse_proxy(r, value, f"{path} (its proxy from {name})", name)


def parse_proxy(r: Reader, text: str, path: str, source: str) -> ForwardProxy | None:
    """``http://[user:password@]host[:port]``; no scheme means http, no port 80.
    A problem never repeats the URL: it may hold a password."""
    malformed = "must be an http:// proxy URL with a host, and a port from 1 to 65535 if any"
    try:
        url = URL(text.strip() if "://" in text else "http://" + text.strip())
        host, port = url.raw_host, url.port
    except ValueError:
        r.problem(path, malformed)
        return None
    if url.scheme != "http":
        r.problem(path, f"must be an http:// proxy URL ({url.scheme}:// proxies are not supported)")
        return None
    if not host or port is None:
        r.problem(path, malformed)
        return None
    authorization = None
    if url.user is not None:
        pair = f"{url.user}:{url.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return ForwardProxy(host=host, port=port, authorization=authorization, source=source)


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """Whether NO_PROXY names this host: ``*``; a domain, which covers its
    subdomains (a leading ``.`` or ``*.`` changes nothing); an IP address or a
    CIDR range; any of these with ``:port`` for that port only."""
    host = host.lower().strip("[]").rstrip(".")
    address = _ip(host)
    for entry in _SEPARATORS.split(no_proxy.strip().lower()):
        if entry == "*":
            return True
        name, entry_port = _split_port(entry)
        if not name or (entry_port is not None and entry_port != port):
            continue
        if address is not None:
            network = _network(name)
            if network is not None and address in network:
                return True
            continue
        domain = name.removeprefix("*").removeprefix(".").rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def upstream_tls(r: Reader, raw: Any, path: str, base_url: str | None) -> TlsSettings:
    d = r.mapping(raw, path, {"ca_file", "cert_file", "key_file", "verify"}, optional=True)
    if d is None:
        return TlsSettings()
    settings = TlsSettings(
        ca_file=r.string(d.get("ca_file"), f"{path}.ca_file", empty_is_none=True),
        cert_file=r.string(d.get("cert_file"), f"{path}.cert_file", empty_is_none=True),
        key_file=r.string(d.get("key_file"), f"{path}.key_file", empty_is_none=True),
        verify=r.boolean(d.get("verify", True), f"{path}.verify"),
    )
    target = _target(base_url)
    if target is not None and target[0] != "https":
        r.problem(path, "applies to an https:// base_url only")
    elif settings.key_file is not None and settings.cert_file is None:
        r.problem(f"{path}.key_file", "needs cert_file (the client certificate)")
    elif settings.ca_file is not None and not settings.verify:
        r.problem(f"{path}.ca_file", "has no use with verify: false")
    else:
        try:
            client_context(settings)
        except TlsFileError as exc:
            r.problem(f"{path}.{exc.setting}", exc.message)
    return settings


def _target(base_url: str | None) -> tuple[str, str, int] | None:
    if not base_url or not base_url.startswith(("http://", "https://")):
        return None
    try:
        url = URL(base_url)
        port = url.port
    except ValueError:
        return None
    if not url.raw_host or port is None:
        return None
    return url.scheme, url.raw_host, port


def _first_set(environ: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str | None]:
    """The first of the names set to something (an empty value counts as unset, as in curl)."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return names[-1], None


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port or [v6]
        name, _, rest = entry[1:].partition("]")
        return name, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    name, colon, port = entry.rpartition(":")
    if colon and name.count(":") == 0 and port.isdigit():
        return name, int(port)
    return entry, None


def _ip(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
