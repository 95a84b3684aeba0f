"""``Unanswered``: what a wait raises when the shutdown ends it, alone or with another cancellation."""

from __future__ import annotations

import asyncio

import pytest

from proxy.apis.unanswered import Unanswered
from proxy.errors import ServerShuttingDownError


async def _held(unanswered: Unanswered, started: asyncio.Event) -> None:
    with unanswered.wait():
        started.set()
        await asyncio.sleep(3600)


async def _started(unanswered: Unanswered) -> asyncio.Task[None]:
    started = asyncio.Event()
    task = asyncio.get_running_loop().create_task(_held(unanswered, started))
    await started.wait()
    return task


async def test_an_ended_wait_raises_server_shutting_down_and_leaves_no_cancellation() -> None:
    unanswered = Unanswered()
    task = await _started(unanswered)
    assert unanswered.end() == 1
    with pytest.raises(ServerShuttingDownError) as raised:
        await task
    assert raised.value.status == 503 and (b"connection", b"close") in raised.value.headers
    assert task.cancelling() == 0


async def test_a_wait_that_begins_after_the_end_fails_at_once() -> None:
    unanswered = Unanswered()
    assert unanswered.end() == 0
    with pytest.raises(ServerShuttingDownError), unanswered.wait():
        pass


async def test_a_cancellation_of_someone_elses_at_the_same_moment_stays_theirs() -> None:
    unanswered = Unanswered()
    task = await _started(unanswered)
    task.cancel()  # the client left, say
    unanswered.end()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() == 1  # theirs, still to be withdrawn by whoever asked for it
