"""The SSE relay: upstream bytes out as they arrive, usage counted on the way.

The gateway always asks a streaming upstream for ``include_usage``. When the
client did not ask for it, the relay removes exactly what that option added
(the final usage-only event, and the ``"usage":null`` member OpenAI then puts
in every other chunk), so the client receives the bytes the upstream would
have sent it without the option. Otherwise bytes pass through untouched.

Complete events are forwarded as soon as their blank line arrives; only an
unfinished event is held back. All complete events of a chunk are handled
together: with ``\\n\\n`` framing (what every OpenAI-style upstream sends)
the events before a stream's last few are changed in bulk (a few passes over
the bytes, not a few calls per event), the rest one at a time, and an event is
parsed only when it carries a usage object; ``\\r`` framings take the
general path. The bulk pass gives exactly what the one-event-at-a-time rule
gives (``tests/test_streaming.py`` holds it to that over any chunking).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LF_END = b"\n\n"
# The member include_usage adds to every chunk, in the order they are tried. None can
# occur inside a JSON string (a quote there is escaped), so each is the member itself.
_USAGE_NULL = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
_NULL_VALUE = b'"usage":null'  # _USAGE_NULL[0] without its comma
_NULL_LAST_MEMBER = b',"usage":null}'  # where OpenAI puts it: the last member of the event's object
_NULL_LAST = _NULL_LAST_MEMBER + b"\n\n"
_NULL_LAST_CUT = b"}\n\n"
_LF = ord("\n")
_COMMA = ord(",")
_USAGE = b'"usage"'
_CONTENT = b'"content":"'
_DONE = b"data: [DONE]"


class SseRelay:
    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.content_events = 0  # content deltas: one per choice per event
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the bytes to send the client now."""
        buffer = self._pending + data if self._pending else data
        if b"\r" in buffer:
            return self._feed_framed(buffer)
        end = buffer.rfind(_LF_END) + 2
        if end == 1:
            self._pending = buffer
            return b""
        if end > 2 and buffer[end - 3] == _LF:
            # A run of three or more line breaks: only split() says where its events end.
            events = buffer.split(_LF_END)
            self._pending = events.pop()
            complete = buffer[:len(buffer) - len(self._pending)]
            self.content_events += complete.count(_CONTENT)
            return self._each(events)
        complete, self._pending = (buffer[:end], buffer[end:]) if end < len(buffer) else (buffer, b"")
        self.content_events += complete.count(_CONTENT)
        if _USAGE not in complete and _DONE not in complete:
            return complete  # nothing to change or to parse: the events leave as they came
        return self._relay_lf(complete)

    def leftover(self) -> bytes:
        """What to send of an unterminated last event when the upstream ends: nothing.

        An SSE client never dispatches an event whose blank line did not come,
        and sent before the error event that follows a cut, the half event
        would merge with it into one event that is not JSON (the SDK then
        raises a decoding error instead of the API error). So it is dropped.
        """
        self._pending = b""
        return b""

    def _relay_lf(self, complete: bytes) -> bytes:
        """Complete ``\\n\\n``-framed events → the bytes to send.

        Every event but a stream's last few carries ``"usage":null`` as the last member of its
        object. The last events (``[DONE]``, the usage event) go one at a time; those before
        them in bulk when each ``"usage"`` among them is such a member: an event then names
        ``usage`` once at most (the member ends at its blank line), so cutting the member out of
        every ``,"usage":null}\\n\\n`` is exactly the one-event-at-a-time rule."""
        cut, last = len(complete), []
        while cut:
            at = complete.rfind(_LF_END, 0, cut - 2)
            if at > 0 and complete[at - 1] == _LF:
                return self._each(complete.split(_LF_END)[:-1])  # see feed
            start = at + 2 if at >= 0 else 0
            event = complete[start:cut - 2]
            if not _ends_stream(event):
                break
            last.append(event)
            cut = start
        head = complete[:cut] if last else complete
        bulk = head.replace(_NULL_LAST, _NULL_LAST_CUT)
        if _USAGE in bulk or _DONE in head:
            out = self._each(head.split(_LF_END)[:-1])
        else:
            out = bulk if self.strip_usage else head
        if last:
            last.reverse()
            out += self._each(last)
        return out

    def _each(self, events: list[bytes]) -> bytes:
        """Complete events (without their blank lines), one at a time. One ``find`` per event:
        when its first ``"usage"`` is the member include_usage adds, that is the first
        ``,"usage":null`` too, the one ``_usage_member`` would remove, so it is cut out
        without that search."""
        kept: list[bytes] = []
        keep = kept.append
        strip = self.strip_usage
        for event in events:
            if event.startswith(_DONE):
                self.done = True
                self.content_events -= event.count(_CONTENT)  # feed counted it; [DONE] carries none
                keep(event)
                continue
            at = event.find(_USAGE)
            if at < 0:
                keep(event)
            elif at and event[at - 1] == _COMMA and event.startswith(_NULL_VALUE, at):
                keep(event[:at - 1] + event[at + len(_NULL_VALUE):] if strip else event)
            elif (sent := self._usage_member(event)) is not None:
                keep(sent)
        if not kept:
            return b""
        keep(b"")
        return _LF_END.join(kept)

    def _feed_framed(self, buffer: bytes) -> bytes:
        """Any of the three SSE line endings, one event at a time."""
        out: list[bytes] = []
        start = 0
        while (match := _EVENT_END.search(buffer, start)) is not None:
            out.append(self._event(buffer[start:match.start()], match.group()))
            start = match.end()
        self._pending = buffer[start:]
        return b"".join(out)

    def _event(self, event: bytes, terminator: bytes) -> bytes:
        if event.startswith(_DONE):
            self.done = True
            return event + terminator
        self.content_events += event.count(_CONTENT)
        if _USAGE not in event:
            return event + terminator
        changed = self._usage_member(event)
        if changed is None:
            return b""
        return changed + terminator

    def _usage_member(self, event: bytes) -> bytes | None:
        """An event that names ``usage``: as it is to be sent, or None to drop it."""
        null = next((p for p in _USAGE_NULL if p in event), None)
        if null is not None:
            return event.replace(null, b"", 1) if self.strip_usage else event
        return self._usage_event(event)

    def _usage_event(self, event: bytes) -> bytes | None:
        payload = _data_of(event)
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            return event
        self.usage = payload["usage"]
        if not self.strip_usage:
            return event
        if not payload.get("choices"):
            return None
        # Rare: usage riding on a content chunk. The client never asked for it.
        del payload["usage"]
        return b"data: " + orjson.dumps(payload)


def _ends_stream(event: bytes) -> bool:
    """``[DONE]``, or an event that names ``usage`` other than as its object's last member."""
    return event.startswith(_DONE) or (_USAGE in event and not event.endswith(_NULL_LAST_MEMBER))


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
