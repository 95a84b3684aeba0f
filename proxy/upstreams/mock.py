"""Deterministic OpenAI-format completions: the ``mock`` provider.

The demo config runs on this with no provider keys, and the test stub
upstreams serve these same bytes over real HTTP. Text is a function of the
request, so two identical requests give identical bytes (ids included), which
lets tests compare what a client received through the gateway with what it
would have received directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

_WORDS = tuple(
    "the gateway answers every request with words drawn from a small fixed list so that tests "
    "and demos see stable text while tokens stream at a configurable pace through one endpoint "
    "one key and one bill whichever provider sits behind it".split(" "))
_CREATED_BASE = 1_700_000_000


@dataclass(frozen=True, slots=True)
class Completion:
    """What the mock decided to answer for one request."""

    id: str
    created: int
    model: str
    choices: tuple[tuple[str, ...], ...]  # per choice, its tokens
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.choices)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }


def count_prompt_tokens(messages: Any) -> int:
    """Words in the messages plus OpenAI's per-message framing (3 + 3)."""
    total = 3
    for message in messages if isinstance(messages, list) else ():
        total += 3
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            total += sum(len(str(p.get("text", "")).split()) for p in content if isinstance(p, dict))
    return total


def plan(body: dict[str, Any], default_tokens: int) -> Completion:
    seed = hashlib.sha256(orjson.dumps([body.get("model"), body.get("messages")],
                                       option=orjson.OPT_SORT_KEYS)).digest()
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    count = min(default_tokens, limit) if isinstance(limit, int) else default_tokens
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    choices = tuple(_tokens(seed, i, count) for i in range(max(1, n or 1)))
    return Completion(
        id="chatcmpl-mock" + seed[:12].hex(),
        created=_CREATED_BASE + int.from_bytes(seed[:3], "big"),
        model=str(body.get("model")),
        choices=choices,
        finish_reason="length" if isinstance(limit, int) and limit <= default_tokens else "stop",
        prompt_tokens=count_prompt_tokens(body.get("messages")),
    )


def _tokens(seed: bytes, choice: int, count: int) -> tuple[str, ...]:
    start = seed[choice % len(seed)]
    words = [_WORDS[(start + 7 * i + choice) % len(_WORDS)] for i in range(count)]
    return tuple(w if i == 0 else " " + w for i, w in enumerate(words))


def completion_body(c: Completion) -> bytes:
    return orjson.dumps({
        "id": c.id,
        "object": "chat.completion",
        "created": c.created,
        "model": c.model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(tokens),
                                     "refusal": None, "annotations": []},
             "logprobs": None, "finish_reason": c.finish_reason}
            for i, tokens in enumerate(c.choices)
        ],
        "usage": c.usage(),
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    })


def stream_events(c: Completion, include_usage: bool) -> Iterator[bytes]:
    """SSE events exactly as OpenAI frames them, one ``data:`` line each."""
    base: dict[str, Any] = {"id": c.id, "object": "chat.completion.chunk", "created": c.created,
                            "model": c.model, "service_tier": "default",
                            "system_fingerprint": "fp_mock"}
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice], **extra}) + b"\n\n"

    for i in range(len(c.choices)):
        yield chunk(i, {"role": "assistant", "content": "", "refusal": None}, None)
    for step in range(max(len(t) for t in c.choices)):
        for i, tokens in enumerate(c.choices):
            if step < len(tokens):
                yield chunk(i, {"content": tokens[step]}, None)
    for i in range(len(c.choices)):
        yield chunk(i, {}, c.finish_reason)
    if include_usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": c.usage()}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def models_body(models: list[str]) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": _CREATED_BASE, "owned_by": "llm-proxy"}
        for m in models]})
