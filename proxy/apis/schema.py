"""Validation of ``POST /v1/chat/completions`` bodies.

Runs on every request, so it is plain Python over the dict orjson parsed: one
lookup per known field and one pass over the messages (which also estimates
the prompt's tokens). Ranges follow OpenAI's spec
(``CreateChatCompletionRequest``); messages copy OpenAI's wording. Where the
gateway cannot know better than the upstream it is lenient: unknown fields,
unknown content-part types and unknown ``tool_choice``/``response_format``
objects pass through untouched, and ``null`` for an optional field means
absent. The upstream still validates whatever reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TOOL_CHOICES = ("none", "auto", "required")
MAX_STOP = 4
# Far above any model's output limit, but ``prompt + max_tokens * n`` stays a
# small integer for the quota store; OpenAI rejects such values anyway.
MAX_TOKENS_LIMIT = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)

# Token estimate (see ``ChatRequest.prompt_tokens``).
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3  # OpenAI's framing per message (role and separators)
TOKENS_REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
TOKENS_PER_MEDIA_PART = 765  # a 1024x1024 high-detail image; also used for audio and files
TOKENS_PER_LOW_DETAIL_IMAGE = 85

_NUMBER_RANGES: tuple[tuple[str, float, float], ...] = (
    ("temperature", 0, 2),
    ("top_p", 0, 1),
    ("presence_penalty", -2, 2),
    ("frequency_penalty", -2, 2),
)
_INTEGER_RANGES: tuple[tuple[str, int, int], ...] = (
    ("n", 1, 128),
    ("max_tokens", 1, MAX_TOKENS_LIMIT),
    ("max_completion_tokens", 1, MAX_TOKENS_LIMIT),
    ("top_logprobs", 0, 20),
    ("seed", *INT64),
)
_BOOLEANS = ("stream", "logprobs")
# orjson parses any depth but serialises at most 255 levels of arrays and
# objects, and the body is serialised again for the upstream: deeper bodies
# are refused here (400) instead of failing there.
_MAX_SERIALISABLE_DEPTH = 255


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]  # the parsed JSON body; unknown fields kept untouched
    model: str
    stream: bool
    include_usage: bool  # the client itself asked for stream_options.include_usage
    max_tokens: int | None  # max_completion_tokens if given, else max_tokens, else None
    n: int
    # Estimated prompt tokens, to reserve quota before the upstream reports the
    # real count: UTF-8 bytes of the text (message contents, names, tool calls,
    # tool definitions) / 4, plus OpenAI's framing of 3 tokens per message and
    # 3 for the reply; an image, audio or file part is a flat 765 (85 for a
    # low-detail image). OpenAI's tokenizers (o200k, cl100k) average about 4
    # bytes a token on English prose and code, so that is typically within
    # +-25%; CJK text (3 bytes a character, 0.7-1.5 tokens each) may come out
    # at half the real count, and an image's real cost is 85 to ~1,500 tokens.
    # Settling replaces the estimate with the usage the upstream reports.
    prompt_tokens: int


def parse_chat_request(raw: bytes, content_type: str | None) -> ChatRequest:
    """Parse and check a chat completion body; raise InvalidRequestError naming the field."""
    _check_content_type(content_type)
    body = _load(raw)
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("You must provide a model parameter.", param="model",
                                  code="missing_required_parameter")
    if type(model) is not str:
        raise _type_error("model", "a string", model)
    if not model:
        raise InvalidRequestError("Invalid 'model': empty string. Expected a non-empty string.",
                                  param="model", code="empty_string")
    stream = body.get("stream") is True
    try:
        message_tokens = _messages(body.get("messages"))
        include_usage = _check_fields(body, stream)
    except InvalidRequestError as exc:
        exc.model = model
        raise
    tools = body.get("tools")
    tool_tokens = len(orjson.dumps(tools)) // BYTES_PER_TOKEN if tools else 0
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    n = body.get("n")
    return ChatRequest(
        body=body,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=None if limit is None else int(limit),
        n=1 if n is None else int(n),
        prompt_tokens=message_tokens + tool_tokens,
    )


def _check_fields(body: dict[str, Any], stream: bool) -> bool:
    """Check every field but the model and the messages; return whether the client asked for usage."""
    for name, low, high in _NUMBER_RANGES:
        _number(body.get(name), name, low, high)
    for name, low_int, high_int in _INTEGER_RANGES:
        _integer(body.get(name), name, low_int, high_int)
    for name in _BOOLEANS:
        _boolean(body.get(name), name)
    _string(body.get("user"), "user")
    _stop(body.get("stop"))
    _logit_bias(body.get("logit_bias"))
    _tool_choice(body.get("tool_choice"))
    _response_format(body.get("response_format"))
    _tools(body.get("tools"))
    return _stream_options(body.get("stream_options"), stream)


def _check_content_type(content_type: str | None) -> None:
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        got = f"'{content_type}'" if content_type else "none"
        raise InvalidRequestError(
            f"Invalid Content-Type header: expected 'application/json', but got {got} instead.")


def _load(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson rejects invalid UTF-8, NaN/Infinity and lone surrogates too.
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}. The API expects a JSON payload."
        ) from None
    if type(body) is not dict:
        raise InvalidRequestError(
            f"Invalid type for the request body: expected a JSON object, but got {_kind(body)} instead.")
    _check_depth(raw, body)
    return body


def _check_depth(raw: bytes, body: dict[str, Any]) -> None:
    # A body with fewer brackets than that cannot nest so deep: no cost for the usual ones.
    if raw.count(b"[") + raw.count(b"{") <= _MAX_SERIALISABLE_DEPTH:
        return
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:  # from a parsed body, only the depth limit can fail
        raise InvalidRequestError(
            f"Invalid body: the JSON is nested too deeply (at most {_MAX_SERIALISABLE_DEPTH} levels).") from None


def _messages(messages: Any) -> int:
    """Check the messages; return their estimated tokens."""
    if messages is None:
        raise _missing("messages")
    if type(messages) is not list:
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise InvalidRequestError("'messages' must contain at least one message.", param="messages",
                                  code="empty_array")
    size = 0
    tokens = TOKENS_REPLY_PRIMING + TOKENS_PER_MESSAGE * len(messages)
    for i, message in enumerate(messages):
        text_bytes, media_tokens = _message(message, f"messages[{i}]")
        size += text_bytes
        tokens += media_tokens
    return tokens + -(-size // BYTES_PER_TOKEN)


def _message(message: Any, where: str) -> tuple[int, int]:
    """Check one message; return (bytes of text, tokens of media parts)."""
    if type(message) is not dict:
        raise _type_error(where, "an object", message)
    role = message.get("role")
    if role is None:
        raise _missing(f"{where}.role")
    if type(role) is not str or role not in ROLES:
        raise _invalid_value(f"{where}.role", role, ROLES)
    content = message.get("content")
    size, media = 0, 0
    if content is None:
        # Assistant turns that only call tools carry no content; function results may be null.
        if "content" not in message and role != "assistant":
            raise _missing(f"{where}.content")
        if role not in ("assistant", "function"):
            raise _type_error(f"{where}.content", "one of a string or array of objects", content)
    elif type(content) is str:
        size = _utf8_len(content)
    elif type(content) is list and role != "function":
        size, media = _content_parts(content, f"{where}.content")
    else:
        expected = "a string" if role == "function" else "one of a string or array of objects"
        raise _type_error(f"{where}.content", expected, content)
    size += _string(message.get("name"), f"{where}.name", required=role == "function")
    if role == "tool":
        _string(message.get("tool_call_id"), f"{where}.tool_call_id", required=True)
    calls = message.get("tool_calls") or message.get("function_call")
    if calls is not None:
        size += len(orjson.dumps(calls))
    return size, media


def _content_parts(parts: list[Any], where: str) -> tuple[int, int]:
    if not parts:
        raise InvalidRequestError(
            f"Invalid '{where}': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.", param=where, code="empty_array")
    size, media = 0, 0
    for i, part in enumerate(parts):
        here = f"{where}[{i}]"
        if type(part) is not dict:
            raise _type_error(here, "an object", part)
        kind = part.get("type")
        if kind is None:
            raise _missing(f"{here}.type")
        if type(kind) is not str:
            raise _type_error(f"{here}.type", "a string", kind)
        text = part.get(kind) if kind in ("text", "refusal") else None
        if type(text) is str:
            size += _utf8_len(text)
        elif kind not in ("text", "refusal"):
            media += _media_tokens(part)
    return size, media


def _media_tokens(part: dict[str, Any]) -> int:
    image = part.get("image_url")
    if type(image) is dict and image.get("detail") == "low":
        return TOKENS_PER_LOW_DETAIL_IMAGE
    return TOKENS_PER_MEDIA_PART


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython; encoding is only needed for non-ASCII text.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _number(value: Any, name: str, low: float, high: float) -> None:
    if value is None:
        return
    if type(value) is not float and type(value) is not int:
        raise _type_error(name, "a decimal", value)
    _range(value, name, "decimal", low, high)


def _integer(value: Any, name: str, low: int, high: int) -> None:
    if value is None:
        return
    # 2.0 is an integer in JSON Schema (and to the upstream's parser); True is not.
    if not (type(value) is int or (type(value) is float and value.is_integer())):
        raise _type_error(name, "an integer", value)
    _range(value, name, "integer", low, high)


def _range(value: float, name: str, kind: str, low: float, high: float) -> None:
    if value < low:
        raise InvalidRequestError(
            f"Invalid '{name}': {kind} below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.", param=name, code=f"{kind}_below_min_value")
    if value > high:
        raise InvalidRequestError(
            f"Invalid '{name}': {kind} above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.", param=name, code=f"{kind}_above_max_value")


def _boolean(value: Any, name: str) -> None:
    if value is not None and type(value) is not bool:
        raise _type_error(name, "a boolean", value)


def _string(value: Any, name: str, required: bool = False) -> int:
    """Check an optional (or required) string; return its UTF-8 length."""
    if value is None:
        if required:
            raise _missing(name)
        return 0
    if type(value) is not str:
        raise _type_error(name, "a string", value)
    return _utf8_len(value)


def _stop(stop: Any) -> None:
    if stop is None or type(stop) is str:
        return
    if type(stop) is not list:
        raise _type_error("stop", "one of a string or array of strings", stop)
    if len(stop) > MAX_STOP:
        raise InvalidRequestError(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, "
            f"but got an array with length {len(stop)} instead.", param="stop", code="array_above_max_length")
    for i, item in enumerate(stop):
        if type(item) is not str:
            raise _type_error(f"stop[{i}]", "a string", item)


def _logit_bias(bias: Any) -> None:
    if bias is None:
        return
    if type(bias) is not dict:
        raise _type_error("logit_bias", "an object", bias)
    for token, value in bias.items():
        if not (token.isdecimal() and token.isascii()):
            raise InvalidRequestError(
                f"Invalid key in 'logit_bias': {token!r}. Keys must be token ids (strings of digits).",
                param="logit_bias")
        if value is None:
            raise _type_error(f"logit_bias.{token}", "a decimal", value)
        _number(value, f"logit_bias.{token}", -100, 100)


def _stream_options(options: Any, stream: bool) -> bool:
    """Check stream_options; return whether the client asked for the usage chunk."""
    if options is None:
        return False
    if not stream:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options")
    if type(options) is not dict:
        raise _type_error("stream_options", "an object", options)
    include_usage = options.get("include_usage")
    _boolean(include_usage, "stream_options.include_usage")
    return include_usage is True


def _tools(tools: Any) -> None:
    if tools is None:
        return
    if type(tools) is not list:
        raise _type_error("tools", "an array", tools)
    for i, tool in enumerate(tools):
        if type(tool) is not dict:
            raise _type_error(f"tools[{i}]", "an object", tool)


def _tool_choice(choice: Any) -> None:
    if choice is None or type(choice) is dict:
        return
    if type(choice) is not str:
        raise _type_error("tool_choice", "one of a string or object", choice)
    if choice not in TOOL_CHOICES:
        raise _invalid_value("tool_choice", choice, TOOL_CHOICES)


def _response_format(fmt: Any) -> None:
    if fmt is None:
        return
    if type(fmt) is not dict:
        raise _type_error("response_format", "an object", fmt)
    kind = fmt.get("type")
    if kind is None:
        raise _missing("response_format.type")
    if type(kind) is not str:
        raise _type_error("response_format.type", "a string", kind)


def _missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                               code="missing_required_parameter")


def _type_error(param: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.", param=param,
        code="invalid_type")


def _invalid_value(param: str, value: Any, supported: tuple[str, ...]) -> InvalidRequestError:
    options = ", ".join(f"'{s}'" for s in supported[:-1]) + f", and '{supported[-1]}'"
    shown = f"'{value}'" if type(value) is str else _kind(value)
    return InvalidRequestError(
        f"Invalid value for '{param}': {shown}. Supported values are: {options}.", param=param,
        code="invalid_value")


def _kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a decimal", str: "a string",
             list: "an array", dict: "an object"}
    return kinds.get(type(value), "null")
