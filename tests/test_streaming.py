"""The SSE relay: exact bytes, usage extraction, stripping what the gateway added."""

import re

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.apis.streaming import SseRelay, error_event
from proxy.upstreams import mock

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "n": 2}


def _events(include_usage: bool) -> bytes:
    return b"".join(mock.stream_events(mock.plan(BODY, 5), include_usage))


def _relay(data: bytes, strip: bool, step: int | None = None) -> tuple[bytes, SseRelay]:
    relay = SseRelay(strip_usage=strip)
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    out = b"".join(relay.feed(c) for c in chunks) + relay.leftover()
    return out, relay


@pytest.mark.parametrize("step", [None, 1, 7, 64])
def test_client_that_asked_for_usage_gets_upstream_bytes_unchanged(step: int | None) -> None:
    upstream = _events(include_usage=True)
    out, relay = _relay(upstream, strip=False, step=step)
    assert out == upstream
    assert relay.done
    assert relay.usage is not None and relay.usage["completion_tokens"] == 10


@pytest.mark.parametrize("step", [None, 1, 13])
def test_stripping_gives_exactly_what_the_upstream_sends_without_the_option(step: int | None) -> None:
    out, relay = _relay(_events(include_usage=True), strip=True, step=step)
    assert out == _events(include_usage=False)
    assert relay.usage == mock.plan(BODY, 5).usage()


def test_events_are_released_as_soon_as_complete() -> None:
    relay = SseRelay(strip_usage=True)
    first, second = list(mock.stream_events(mock.plan(BODY, 2), False))[:2]
    assert relay.feed(first + second[:10]) == first
    assert relay.feed(second[10:]) == second


def test_crlf_framing_is_kept() -> None:
    data = b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    out, relay = _relay(data, strip=True, step=3)
    assert out == data and relay.done and relay.content_events == 1


def test_usage_on_a_content_chunk_is_removed_only_when_stripping() -> None:
    event = (b'data: {"choices":[{"delta":{"content":"x"}}],'
             b'"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n')
    out, relay = _relay(event, strip=True)
    assert orjson.loads(out[6:]) == {"choices": [{"delta": {"content": "x"}}]}
    assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 2}
    out, _ = _relay(event, strip=False)
    assert out == event


def test_stream_without_done_is_not_done() -> None:
    data = _events(include_usage=False).replace(b"data: [DONE]\n\n", b"")
    _, relay = _relay(data, strip=True)
    assert not relay.done


def test_error_event_is_an_openai_error_object() -> None:
    event = error_event("cut", "upstream_stream_error")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:])["error"] == {"message": "cut", "type": "server_error", "param": None,
                                                "code": "upstream_stream_error"}


# --- the relay against the event-at-a-time definition, over odd inputs and any chunking ---------

_NULLS = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')


def _reference(data: bytes, strip: bool) -> tuple[bytes, dict[str, object] | None, bool, int]:
    """One event at a time, as the relay is specified: what leaves, usage, done, content events."""
    out, usage, done, content = b"", None, False, 0
    for event, terminator in _split(data):
        if event.startswith(b"data: [DONE]"):
            done = True
            out += event + terminator
            continue
        content += event.count(b'"content":"')  # content deltas: one per choice
        null = next((p for p in _NULLS if p in event), None) if b'"usage"' in event else None
        if null is not None:
            out += (event.replace(null, b"", 1) if strip else event) + terminator
            continue
        payload = None
        if b'"usage"' in event:
            lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
            try:
                payload = orjson.loads(b"\n".join(lines)) if lines else None
            except orjson.JSONDecodeError:
                payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
            out += event + terminator
            continue
        usage = payload["usage"]
        if not strip:
            out += event + terminator
        elif payload.get("choices"):
            del payload["usage"]
            out += b"data: " + orjson.dumps(payload) + terminator
    return out, usage, done, content


def _split(data: bytes) -> list[tuple[bytes, bytes]]:
    """Complete events and their blank lines (a buffer with a ``\\r`` anywhere allows all three)."""
    pattern = re.compile(rb"\r\n\r\n|\n\n|\r\r") if b"\r" in data else re.compile(rb"\n\n")
    events, start = [], 0
    for match in pattern.finditer(data):
        events.append((data[start:match.start()], match.group()))
        start = match.end()
    return events


ODD_EVENTS = [
    b'data: {"usage":null,"x":{"usage":null},"usage":null}\n\n',  # not the first member: the general search
    b'data: {"a":1,"usage":null,"b":{"c":2,"usage":null}}\n\n',  # twice: only the first goes
    b'data: {"a":1, "usage": null}\n\n', b'data: {"usage": null, "a":1}\n\n', b'data: {"usage":null}\n\n',
    b'data: [DONE] "usage":null,\n\n', b": comment\n\n", b"\n\n\n", b'data: {"content":"a","content":"b"}\n\n',
    b'event: x\ndata: {"choices":[],\ndata: "usage":{"prompt_tokens":3}}\n\n',
    b'data: {"usage":{"prompt_tokens":1},"choices":[{"delta":{"content":"q"}}]}\n\n', b'data: {bad "usage":{\n\n',
    b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\r\n\r\n',
    # for the bulk pass: runs of line breaks, [DONE] where it is not an event's start, a nested member
    b"\n\n\n", b'\ndata: [DONE]\n\n', b'data: [DONE],"usage":null}\n\n', b'data: {"x":{"usage":null}}\n\n',
    b'data: {"content":"usage","usage":null}\n\n\n', b'data: {"a":"usage","usage":null}\n\n',
    b'data: [DONE] {"content":"x"}\n\n',
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from([*ODD_EVENTS, _events(True), _events(False)]), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6), strip=st.booleans(),
       keep=st.integers(min_value=0, max_value=4000))
def test_any_chunking_of_any_events_gives_the_event_at_a_time_result(
        parts: list[bytes], cuts: list[int], strip: bool, keep: int) -> None:
    data = b"".join(parts)
    data = data[:keep] if keep < len(data) else data  # a cut stream too
    points = sorted({c for c in cuts if c <= len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    relay = SseRelay(strip_usage=strip)
    out = b"".join(relay.feed(c) for c in chunks) + relay.leftover()
    assert (out, relay.usage, relay.done, relay.content_events) == _reference(data, strip)
