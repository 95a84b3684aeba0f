"""The Redis client of the quota store, the key directory and health sharing.

redis-py's client for any supported URL (the quota scripts of a plain URL go
down the store's own pipe, ``access/redis_pipe.py``). ``bounded`` runs one call
within a timeout, and every Redis failure becomes a ``ServiceUnavailableError``
(code ``quota_store_unavailable``) here, at the edge.

URL forms (see docs/quotas.md):
  redis://[:password@]host:port/db, rediss://..., unix:///path/redis.sock?db=0
  redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]
  redis+cluster://[:password@]host:port[,host:port...]   (rediss+ for TLS)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedSSLConnection
from redis.backoff import NoBackoff

from ..errors import ServiceUnavailableError

Client = Redis | RedisCluster
T = TypeVar("T")
# What a failing Redis raises. RuntimeError too: redis-py passes on uvloop's for a write to a
# transport the peer has just closed (a Redis being killed), which became a 500 before.
_REDIS_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError, TimeoutError,
                 RuntimeError)


@dataclass(frozen=True)
class RedisTarget:
    scheme: str  # "redis" | "sentinel" | "cluster"
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    password: str | None
    username: str | None
    service: str | None = None
    db: int = 0


def parse_redis_url(url: str) -> RedisTarget | None:
    """The parts of a ``redis+sentinel://`` or ``redis+cluster://`` URL; None for plain URLs."""
    scheme, sep, rest = url.partition("://")
    base, plus, kind = scheme.partition("+")
    if not sep or not plus or base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        return None
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    user, _, password = userinfo.partition(":") if at else ("", "", "")
    hosts = tuple(_host_port(h, 26379 if kind == "sentinel" else 6379) for h in hostlist.split(",") if h)
    parts = [p for p in path.split("/") if p]
    if not hosts or (kind == "sentinel" and not parts):
        need = "host:port and a service name" if kind == "sentinel" else "host:port"
        raise ValueError(f"a {scheme}:// URL needs {need}")
    return RedisTarget(kind, base == "rediss", hosts, unquote(password) or None, unquote(user) or None,
                       parts[0] if kind == "sentinel" else None,
                       int(parts[1]) if kind == "sentinel" and len(parts) > 1 else 0)


def _host_port(text: str, default: int) -> tuple[str, int]:
    if text.startswith("["):  # [ipv6]:port
        host, _, port = text[1:].partition("]")
        return host, int(port[1:]) if port.startswith(":") else default
    host, colon, port = text.rpartition(":")
    return (host, int(port)) if colon else (text, default)


MAX_CONNECTIONS = 256


def connect(url: str, timeout: float) -> Client:
    """A client for any supported URL; connects lazily (no I/O here)."""
    # One immediate retry covers a pooled connection that died with a restarted Redis;
    # more would not fit in the timeout.
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "retry": Retry(NoBackoff(), 1)}
    target = parse_redis_url(url)
    if target is None:
        # A blocking pool waits (within the timeout) for a free connection under a burst,
        # where the default pool fails at its cap and would turn load into 503s.
        pool = BlockingConnectionPool.from_url(url, max_connections=MAX_CONNECTIONS, timeout=timeout, **common)
        return Redis(connection_pool=pool)
    auth: dict[str, Any] = {"password": target.password, "username": target.username}
    if target.scheme == "cluster":
        nodes = [ClusterNode(h, p) for h, p in target.hosts]
        return RedisCluster(startup_nodes=nodes, ssl=target.tls, **auth, **common)
    # The URL's password is the master's; sentinels are commonly run without one.
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=dict(common),  # type: ignore[no-untyped-call, unused-ignore]
                        **auth, **common)
    assert target.service is not None
    tls: dict[str, Any] = {"connection_class": SentinelManagedSSLConnection} if target.tls else {}
    client: Redis = sentinel.master_for(target.service, db=target.db, **tls)
    return client


async def bounded(call: Awaitable[T], limit: float, operation: str) -> T:
    """Run one store call within ``limit`` seconds; any Redis failure becomes a 503."""
    async def timed() -> T:
        async with asyncio.timeout(limit):
            return await call
    return await translated(timed(), operation)


async def translated(call: Awaitable[T], operation: str) -> T:
    """One store call that bounds itself; any Redis failure becomes a 503."""
    try:
        return await call
    except _REDIS_ERRORS as exc:
        raise unavailable(operation, type(exc).__name__) from exc


def unavailable(operation: str, why: str) -> ServiceUnavailableError:
    return ServiceUnavailableError(f"The quota store is unavailable ({operation}: {why}).",
                                   code="quota_store_unavailable")
