"""Shared pytest setup: real stub upstreams and real gateway processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.gateway_process import GatewayProcess
from tests.stub_upstream import StubUpstream


@pytest.fixture
def stub() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def stub2() -> Iterator[StubUpstream]:
    server = StubUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def gateway() -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateway processes with a given config text; all stopped at the end."""
    started: list[GatewayProcess] = []

    def start(config_text: str, **kwargs: object) -> GatewayProcess:
        proc = GatewayProcess(config_text, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.close()
