"""The SSE relay: upstream bytes out as they arrive, usage counted on the way.

The gateway always asks a streaming upstream for ``include_usage``. When the
client did not ask for it, the relay removes exactly what that option added
(the final usage-only event, and the ``"usage":null`` member OpenAI then puts
in every other chunk), so the client receives the bytes the upstream would
have sent it without the option. Otherwise bytes pass through untouched.

Complete events are forwarded as soon as their blank line arrives; only an
unfinished event is held back.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_USAGE_NULL = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
_DONE = b"data: [DONE]"


class SseRelay:
    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.content_events = 0
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the bytes to send the client now."""
        buffer = self._pending + data if self._pending else data
        out: list[bytes] = []
        start = 0
        while True:
            end = _find_end(buffer, start)
            if end is None:
                break
            stop, after = end
            out.append(self._event(buffer[start:stop], buffer[stop:after]))
            start = after
        self._pending = buffer[start:]
        return b"".join(out)

    def leftover(self) -> bytes:
        """What to send of an unterminated last event when the upstream ends: nothing.

        An SSE client never dispatches an event whose blank line did not come,
        and sent before the error event that follows a cut, the half event
        would merge with it into one event that is not JSON (the SDK then
        raises a decoding error instead of the API error). So it is dropped.
        """
        self._pending = b""
        return b""

    def _event(self, event: bytes, terminator: bytes) -> bytes:
        if event.startswith(_DONE):
            self.done = True
            return event + terminator
        if b'"content":"' in event:
            self.content_events += 1
        if b'"usage"' not in event:
            return event + terminator
        null = next((p for p in _USAGE_NULL if p in event), None)
        if null is not None:
            return (event.replace(null, b"", 1) if self.strip_usage else event) + terminator
        return self._usage_event(event, terminator)

    def _usage_event(self, event: bytes, terminator: bytes) -> bytes:
        payload = _data_of(event)
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return event + terminator
        self.usage = payload["usage"]
        if not self.strip_usage:
            return event + terminator
        if not payload.get("choices"):
            return b""
        # Rare: usage riding on a content chunk. The client never asked for it.
        del payload["usage"]
        return b"data: " + orjson.dumps(payload) + terminator


def _find_end(buffer: bytes, start: int) -> tuple[int, int] | None:
    if b"\r" not in buffer:
        i = buffer.find(b"\n\n", start)
        return None if i < 0 else (i, i + 2)
    match = _EVENT_END.search(buffer, start)
    return None if match is None else (match.start(), match.end())


def _data_of(event: bytes) -> Any:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


def error_event(message: str, code: str) -> bytes:
    """What a client gets when the stream breaks after its first byte: an
    error, and no ``[DONE]``, so no client takes a cut stream for a whole one."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error",
                                               "param": None, "code": code}}) + b"\n\n"
