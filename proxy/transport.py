"""The edge to upstreams: one pooled HTTP client per upstream, and the mock.

Everything above this module sees only ``Transport`` and ``UpstreamResponse``;
aiohttp's exceptions are translated here into ``UpstreamConnectionError``.
aiohttp was chosen over httpx by measurement (bench/README.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Protocol

import aiohttp
import orjson

from . import mock
from .config import UpstreamConfig
from .errors import UpstreamConnectionError


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read_chunk(self) -> bytes:
        """The next bytes as they arrive; ``b""`` at the end of the body."""
        ...

    def close(self) -> None:
        """Drop the response; an unfinished body closes the connection."""
        ...


class Transport(Protocol):
    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse: ...

    async def get(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class _HttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectionError(f"upstream connection broke: {type(exc).__name__}") from None

    def close(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class HttpTransport:
    """A keep-alive connection pool to one upstream, created inside the event loop."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._config.max_concurrency or 0,
                                             ttl_dns_cache=60, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._config.timeout.connect,
                                              connect=self._config.timeout.connect),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Content-Type"),
            )
        return self._session

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        return await self._request("POST", url, headers, body)

    async def get(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        return await self._request("GET", url, headers, None)

    async def _request(self, method: str, url: str, headers: Mapping[str, str],
                       body: bytes | None) -> UpstreamResponse:
        try:
            resp = await self._client().request(method, url, headers=headers, data=body,
                                                allow_redirects=False)
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectionError(f"cannot reach upstream: {type(exc).__name__}") from None
        return _HttpResponse(resp)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _MockResponse:
    def __init__(self, events: Iterator[bytes], delay: float, content_type: str) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {"content-type": content_type}
        self._events = events
        self._delay = delay
        self._first = True

    async def read_chunk(self) -> bytes:
        if self._delay and not self._first:
            await asyncio.sleep(self._delay)
        self._first = False
        return next(self._events, b"")

    def close(self) -> None:
        self._events = iter(())


class MockTransport:
    """The ``mock`` provider: OpenAI-format answers generated in-process."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._settings = config.mock
        self._models = list(config.models.values())

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> UpstreamResponse:
        request = orjson.loads(body)
        if self._settings.latency:
            await asyncio.sleep(self._settings.latency)
        plan = mock.plan(request, self._settings.completion_tokens)
        tps = self._settings.tokens_per_second
        if request.get("stream"):
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return _MockResponse(mock.stream_events(plan, usage), 1 / tps if tps else 0.0,
                                 "text/event-stream; charset=utf-8")
        if tps:
            await asyncio.sleep(plan.completion_tokens / tps)
        return _MockResponse(iter((mock.completion_body(plan),)), 0.0, "application/json")

    async def get(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        return _MockResponse(iter((mock.models_body(self._models),)), 0.0, "application/json")

    async def close(self) -> None:
        return None


def make_transport(config: UpstreamConfig) -> Transport:
    return MockTransport(config) if config.provider == "mock" else HttpTransport(config)
