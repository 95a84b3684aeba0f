"""The SSE relay: exact bytes, usage extraction, stripping what the gateway added."""

import orjson
import pytest

from proxy import mock
from proxy.streaming import SseRelay, error_event

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
