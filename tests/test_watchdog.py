"""The request's one timer (proxy/io/watchdog.py): phases, moves, and whose cancellation it was."""

from __future__ import annotations

import asyncio

import pytest

from proxy.io.watchdog import Watchdog


async def _phase(watchdog: Watchdog, seconds: float, work: float, at: float | None = None) -> str:
    """One phase as the request path writes it: 'timeout' when the watchdog ended it.
    It ends ``seconds`` from now, or at the loop time ``at``."""
    if at is None:
        watchdog.expire_in(seconds)
    else:
        watchdog.expire_at(at)
    try:
        await asyncio.sleep(work)
    except asyncio.CancelledError:
        if watchdog.expired():
            return "timeout"
        raise
    finally:
        watchdog.clear()
    return "done"


async def test_a_phase_past_its_deadline_is_ended_and_the_task_is_not_left_cancelled() -> None:
    watchdog = Watchdog()
    assert await _phase(watchdog, 0.02, 5) == "timeout"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no stray cancellation arrives later
    watchdog.close()


class _Counting(Watchdog):
    """Counts the timer handles armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed: list[float] = []

    def _arm(self, when: float) -> None:
        self.armed.append(when)
        super()._arm(when)


async def test_later_phases_reuse_one_timer_and_each_gets_its_own_deadline() -> None:
    watchdog = _Counting()
    assert await _phase(watchdog, 0.1, 0) == "done"
    assert await _phase(watchdog, 2, 0) == "done"  # later than the handle: not re-armed
    assert len(watchdog.armed) == 1
    assert await _phase(watchdog, 2, 0.3) == "done"  # the handle fires before it: moved once, no expiry
    assert len(watchdog.armed) == 2
    assert await _phase(watchdog, 0.03, 1) == "timeout"  # earlier than the handle: re-armed
    assert len(watchdog.armed) == 3
    watchdog.close()


async def test_no_deadline_between_phases() -> None:
    watchdog = Watchdog()
    assert await _phase(watchdog, 0.01, 0) == "done"
    await asyncio.sleep(0.05)  # the handle fires with no phase running: nothing happens
    assert await _phase(watchdog, 1, 0) == "done"
    watchdog.close()


async def test_someone_elses_cancellation_is_not_taken_for_a_timeout() -> None:
    async def request() -> str:
        return await _phase(Watchdog(), 5, 5)

    task = asyncio.get_running_loop().create_task(request())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_both_at_once_the_outer_cancellation_wins() -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.05

    async def request() -> str:
        return await _phase(Watchdog(), 0, 5, at=deadline)  # the watchdog of the request's own task

    task = loop.create_task(request())
    await asyncio.sleep(0)
    loop.call_at(deadline, task.cancel)  # in the same loop iteration as the watchdog, after it
    with pytest.raises(asyncio.CancelledError):
        await task
