"""One timer per request for all its deadlines (bench/README.md, #4).

A request goes through phases that each have a deadline: reading its body,
each upstream attempt, each wait for the next chunk of a stream and for the
client to take each write of it. An
``asyncio.timeout`` per phase creates and cancels a timer handle each time (a
stream paid one per chunk). A ``Watchdog`` keeps one handle for the whole
request: a phase sets its deadline (a float) and clears it when done, and the
handle moves only when it fires before the current deadline (the deadline
moved later meanwhile: it is re-armed once) or when a deadline comes earlier
than the handle.

On expiry it cancels the task, as ``asyncio.timeout`` does, at the same
moment; the phase that catches the ``CancelledError`` asks ``expired()``
whether it was the watchdog's (the cancellation is then withdrawn and the
phase raises its own timeout error) or someone else's (re-raise it).
"""

from __future__ import annotations

import asyncio
import math


class Watchdog:
    __slots__ = ("_armed_at", "_cancelling", "_deadline", "_fired", "_handle", "_loop", "_task")

    def __init__(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "a Watchdog guards the task that creates it"
        self._loop = asyncio.get_running_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self._deadline = math.inf  # of the current phase; inf: none now
        self._armed_at = math.inf  # when the handle fires; inf: no handle
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    def time(self) -> float:
        """The loop's clock, which deadlines are in."""
        return self._loop.time()

    def expire_at(self, when: float) -> None:
        """The current phase must end by ``when`` (loop time)."""
        self._deadline = when
        if when < self._armed_at:
            self._arm(when)

    def expire_in(self, seconds: float) -> None:
        self.expire_at(self._loop.time() + seconds)

    def clear(self) -> None:
        """The phase ended: no deadline until the next one (the handle stays armed).

        Call it after ``expired()``. When the watchdog fired but the phase
        ended another way (its await had completed, or it raised something
        else), the cancellation is withdrawn, as ``asyncio.timeout`` does."""
        self._deadline = math.inf
        if self._fired:
            self._fired = False
            self._task.uncancel()

    def expired(self) -> bool:
        """On ``CancelledError``: True when this watchdog cancelled the task and
        nothing else did; the cancellation is then withdrawn."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        self._deadline = math.inf
        self._armed_at = math.inf
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._check)
        self._armed_at = when

    def _check(self) -> None:
        armed_for = self._armed_at
        self._handle = None
        self._armed_at = math.inf
        if self._deadline <= armed_for:
            # The deadline this handle was armed for (or an earlier one): as
            # asyncio.timeout, expire now, without asking the clock again.
            if not self._fired:
                self._fired = True
                self._task.cancel()
        elif self._deadline != math.inf:
            self._arm(self._deadline)
