"""Deterministic OpenAI-format completions: the ``mock`` provider.

The demo config runs on this with no provider keys, and the test stub
upstreams serve these same bytes over real HTTP. The answer is a function of
the request: text; a call of one of the request's ``tools`` (``tool_choice``
``auto`` or ``required``, or the function it names; ``auto`` answers in text
once the last message is a tool's result), its arguments valid against the
function's parameter schema; or, for ``response_format`` ``json_schema`` (or
``json_object``), content valid against that schema. ``plan`` gives two
identical requests identical bytes, ids included, which lets tests compare what
a client received through the gateway with what it would have received
directly; the provider gives each answer a fresh id and the current time
(``fresh``), as OpenAI does.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .mock_json import example

_WORDS = tuple(
    "the gateway answers every request with words drawn from a small fixed list so that tests "
    "and demos see stable text while tokens stream at a configurable pace through one endpoint "
    "one key and one bill whichever provider sits behind it".split(" "))
_CREATED_BASE = 1_700_000_000
_ID_ALPHABET = string.ascii_letters + string.digits
_JSON_PIECE = 6  # characters of JSON per streamed token


@dataclass(frozen=True, slots=True)
class Completion:
    """What the mock decided to answer for one request."""

    id: str
    created: int
    model: str
    choices: tuple[tuple[str, ...], ...]  # per choice, its tokens: the content, or the call's arguments
    finish_reason: str
    prompt_tokens: int
    function: str | None = None  # every choice calls this function, its tokens being the arguments

    def call_id(self, choice: int) -> str:
        return "call_" + hashlib.sha256(f"{self.id}/{choice}".encode()).hexdigest()[:24]

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
    limit = limit if isinstance(limit, int) else None
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    function = _called_function(body)
    schema = _response_schema(body) if function is None else None
    if function is not None or schema is not None:
        choices = tuple(_json_tokens(_structured(function, schema, seed + bytes([i % 256])))
                        for i in range(max(1, n or 1)))
        cut = limit is not None and any(len(c) > limit for c in choices)
        choices = tuple(c[:limit] for c in choices) if cut else choices
        finish = "length" if cut else "tool_calls" if function is not None else "stop"
    else:
        count = min(default_tokens, limit) if limit is not None else default_tokens
        choices = tuple(_tokens(seed, i, count) for i in range(max(1, n or 1)))
        finish = "length" if limit is not None and limit <= default_tokens else "stop"
    return Completion(
        id="chatcmpl-mock" + seed[:12].hex(),
        created=_CREATED_BASE + int.from_bytes(seed[:3], "big"),
        model=str(body.get("model")),
        choices=choices,
        finish_reason=finish,
        prompt_tokens=count_prompt_tokens(body.get("messages")),
        function=None if function is None else str(function["name"]),
    )


def fresh(c: Completion) -> Completion:
    """The same answer under a new id, created now: what each real answer looks like."""
    return replace(c, id="chatcmpl-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(29)),
                   created=int(time.time()))


def _called_function(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function definition the answer calls, or None for an answer in content."""
    tools = body.get("tools")
    functions: list[dict[str, Any]] = [
        t["function"] for t in (tools if isinstance(tools, list) else ())
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)]
    choice = body.get("tool_choice")
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict):
        named = choice.get("function")
        wanted = named.get("name") if isinstance(named, dict) else None
        if wanted is not None:
            return next((f for f in functions if f["name"] == wanted), None)
    if choice != "required" and _last_role(body.get("messages")) == "tool":
        return None  # auto, with the tool's result in hand: the model answers
    return functions[0]


def _last_role(messages: Any) -> Any:
    last = messages[-1] if isinstance(messages, list) and messages else None
    return last.get("role") if isinstance(last, dict) else None


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema the content must follow (``{}``: any JSON object), or None for text."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


def _structured(function: dict[str, Any] | None, schema: dict[str, Any] | None, seed: bytes) -> bytes:
    if function is not None:
        value = example(function.get("parameters", {"type": "object"}), seed)
        return orjson.dumps(value if isinstance(value, dict) else {})
    return orjson.dumps(example(schema, seed))


def _json_tokens(text: bytes) -> tuple[str, ...]:
    decoded = text.decode()
    return tuple(decoded[i:i + _JSON_PIECE] for i in range(0, len(decoded), _JSON_PIECE)) or ("",)


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
            {"index": i, "message": _message(c, i, "".join(tokens)), "logprobs": None,
             "finish_reason": c.finish_reason}
            for i, tokens in enumerate(c.choices)
        ],
        "usage": c.usage(),
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    })


def _message(c: Completion, choice: int, text: str) -> dict[str, Any]:
    if c.function is None:
        return {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    call = {"id": c.call_id(choice), "type": "function", "function": {"name": c.function, "arguments": text}}
    return {"role": "assistant", "content": None, "refusal": None, "annotations": [], "tool_calls": [call]}


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
        yield chunk(i, _first_delta(c, i), None)
    for step in range(max(len(t) for t in c.choices)):
        for i, tokens in enumerate(c.choices):
            if step < len(tokens):
                yield chunk(i, _delta(c, tokens[step]), None)
    for i in range(len(c.choices)):
        yield chunk(i, {}, c.finish_reason)
    if include_usage:
        yield b"data: " + orjson.dumps({**base, "choices": [], "usage": c.usage()}) + b"\n\n"
    yield b"data: [DONE]\n\n"


def _first_delta(c: Completion, choice: int) -> dict[str, Any]:
    if c.function is None:
        return {"role": "assistant", "content": "", "refusal": None}
    call = {"index": 0, "id": c.call_id(choice), "type": "function",
            "function": {"name": c.function, "arguments": ""}}
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}


def _delta(c: Completion, token: str) -> dict[str, Any]:
    if c.function is None:
        return {"content": token}
    return {"tool_calls": [{"index": 0, "function": {"arguments": token}}]}


def models_body(models: list[str]) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": _CREATED_BASE, "owned_by": "llm-proxy"}
        for m in models]})
