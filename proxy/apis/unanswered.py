"""Requests not answered yet, so that a shutdown whose grace runs out can answer them.

Streams still open then are ended by ``OpenStreams`` (``stream_waits.py``). A
request with no answer begun, its body still arriving or its upstream's answer
awaited (a whole body, or a stream's first byte), would be cancelled by uvicorn
at the grace's end: a traceback in the log and a plain-text 500 to the client.
``Unanswered.end``, called when the streams are ended, cancels each such wait
instead, and every one that begins later fails at once: the wait raises
``ServerShuttingDownError``, which its request answers as any error (503 in
OpenAI's format, with ``Connection: close``) and settles as its charging policy
says. A wait for an upstream is cancelled as when its client leaves: the
upstream request is closed, and the upstream is not judged by it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from ..errors import ServerShuttingDownError


class Unanswered:
    """The waits of requests not answered yet."""

    __slots__ = ("_waits", "ending")

    def __init__(self) -> None:
        self._waits: set[AnswerWait] = set()
        self.ending = False

    def wait(self) -> AnswerWait:
        """``with unanswered.wait():`` around one wait of a request before its answer begins."""
        return AnswerWait(self)

    def end(self) -> int:
        """End every wait under way now, and every one that begins from now on; how many were
        under way."""
        self.ending = True
        waits = list(self._waits)
        for wait in waits:
            wait.end()
        return len(waits)


class AnswerWait:
    __slots__ = ("_baseline", "_ended", "_task", "_unanswered")

    def __init__(self, unanswered: Unanswered) -> None:
        self._unanswered = unanswered
        self._ended = False
        self._task: asyncio.Task[object] | None = None
        self._baseline = 0

    def __enter__(self) -> AnswerWait:
        if self._unanswered.ending:
            raise shutting_down()
        task = asyncio.current_task()
        assert task is not None
        self._task, self._baseline = task, task.cancelling()
        self._unanswered._waits.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._unanswered._waits.discard(self)
        if not self._ended:
            return
        assert self._task is not None
        # The cancellation this wait asked for is withdrawn; one that someone else asked for
        # as well (the client left at the same moment) goes on as theirs.
        if self._task.uncancel() <= self._baseline and exc_type is asyncio.CancelledError:
            raise shutting_down() from None

    def end(self) -> None:
        if not self._ended and self._task is not None:
            self._ended = True
            self._task.cancel()


def shutting_down() -> ServerShuttingDownError:
    return ServerShuttingDownError(
        "The gateway is shutting down and the request was not answered in time; retry it.",
        headers=[(b"connection", b"close")])
