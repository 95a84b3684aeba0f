"""Request validation: what a client sending a chat completion body gets back."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.apis.schema import ChatRequest, parse_chat_request
from proxy.errors import InvalidRequestError
from tests.spec import assert_conforms

JSON = "application/json"
USER = {"role": "user", "content": "Hello"}


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [USER]}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not _ABSENT}


_ABSENT: Any = object()


def parse(value: dict[str, Any] | bytes, content_type: str | None = JSON) -> ChatRequest:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return parse_chat_request(raw, content_type)


def rejected(value: dict[str, Any] | bytes, content_type: str | None = JSON) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        parse(value, content_type)
    exc = err.value
    assert (exc.status, exc.type) == (400, "invalid_request_error")
    assert orjson.loads(exc.body())["error"]["param"] == exc.param
    return exc


def assert_rejects(value: dict[str, Any] | bytes, param: str | None, *words: str) -> InvalidRequestError:
    exc = rejected(value)
    assert exc.param == param, exc.message
    for word in words:
        assert word in exc.message, exc.message
    return exc


# --- valid bodies -------------------------------------------------------------

def test_minimal_body_defaults() -> None:
    req = parse(body())
    assert (req.model, req.stream, req.include_usage, req.max_tokens, req.n) == (
        "gpt-4o-mini", False, False, None, 1)
    assert req.body == body()
    assert req.prompt_tokens > 0


FULL = body(
    messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "function", "name": "look", "content": None},
        {"role": "user", "content": ""},
    ],
    temperature=0.7, top_p=1, n=2, stop=["\n", "END"], max_tokens=50, max_completion_tokens=100,
    presence_penalty=-2, frequency_penalty=2, logit_bias={"50256": -100, "1234": 100},
    stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=20, seed=42,
    user="user-1", tools=[{"type": "function", "function": {"name": "look", "parameters": {}}}],
    tool_choice="auto", response_format={"type": "json_object"},
)


def test_full_body_parses() -> None:
    req = parse(FULL)
    assert (req.stream, req.include_usage, req.max_tokens, req.n) == (True, True, 100, 2)
    assert req.body == FULL


def test_unknown_fields_are_kept_exactly() -> None:
    unknown = {"vendor_extension": {"nested": [1, 2.5, None, True, "é\u2028😀"], "big": 2**63 - 1},
               "reasoning_effort": "high", "metadata": {"k": "v"}}
    raw = orjson.dumps({**body(), **unknown})
    req = parse_chat_request(raw, JSON)
    for name, value in unknown.items():
        assert orjson.dumps(req.body[name]) == orjson.dumps(value)
    assert orjson.dumps(req.body) == raw


def test_null_means_absent_for_every_optional_field() -> None:
    optional = ("temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens",
                "presence_penalty", "frequency_penalty", "logit_bias", "stream", "stream_options",
                "logprobs", "top_logprobs", "seed", "user", "tools", "tool_choice", "response_format")
    req = parse(body(**dict.fromkeys(optional)))
    assert (req.stream, req.include_usage, req.max_tokens, req.n) == (False, False, None, 1)


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, None),
    ({"max_tokens": 7}, 7),
    ({"max_completion_tokens": 9}, 9),
    ({"max_tokens": 7, "max_completion_tokens": 9}, 9),
    ({"max_tokens": 7, "max_completion_tokens": None}, 7),
    ({"max_tokens": 7.0}, 7),
])
def test_max_tokens_prefers_max_completion_tokens(fields: dict[str, Any], expected: int | None) -> None:
    req = parse(body(**fields))
    assert req.max_tokens == expected
    assert expected is None or type(req.max_tokens) is int


def test_n_is_an_int_even_when_sent_as_2_0() -> None:
    req = parse(body(n=2.0))
    assert req.n == 2 and type(req.n) is int


# --- content type and JSON ----------------------------------------------------

@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8",
    " application/json "])
def test_json_content_types_accepted(content_type: str) -> None:
    assert parse(body(), content_type).model == "gpt-4o-mini"


@pytest.mark.parametrize("content_type", [
    None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/jsonl", "application/vnd.api+json"])
def test_other_content_types_rejected(content_type: str | None) -> None:
    exc = rejected(body(), content_type)
    assert exc.param is None and "Content-Type" in exc.message and "application/json" in exc.message


@pytest.mark.parametrize("raw", [
    b"", b"{", b'{"model": "m",}', b"{'model': 'm'}", b'{"model": "\xff\xfe"}',
    b'{"model": "m", "temperature": NaN}', b'{"model": "m", "temperature": Infinity}',
    b'{"model": "m", "temperature": -Infinity}', b'{"model": "m", "temperature": 1e400}',
    b'{"model": "\\ud800"}', b"\xef\xbb\xbf{}",
])
def test_malformed_json_rejected(raw: bytes) -> None:
    exc = rejected(raw)
    assert exc.param is None and "could not parse the JSON body" in exc.message


@pytest.mark.parametrize(("raw", "kind"), [
    (b"[]", "an array"), (b'"hi"', "a string"), (b"null", "null"), (b"3", "an integer")])
def test_top_level_must_be_an_object(raw: bytes, kind: str) -> None:
    exc = rejected(raw)
    assert exc.param is None and "expected a JSON object" in exc.message and kind in exc.message


# --- model and messages -------------------------------------------------------

@pytest.mark.parametrize("model", [_ABSENT, None, "", 1, True, ["gpt-4o"], {"id": "gpt-4o"}])
def test_model_must_be_a_non_empty_string(model: Any) -> None:
    assert_rejects(body(model=model), "model", "model")


@pytest.mark.parametrize(("messages", "param", "words"), [
    (_ABSENT, "messages", ("Missing required parameter",)),
    (None, "messages", ("Missing required parameter",)),
    ("hello", "messages", ("expected an array", "got a string")),
    ({"role": "user"}, "messages", ("expected an array", "got an object")),
    ([], "messages", ("'messages' must contain at least one message.",)),
    (["hello"], "messages[0]", ("expected an object",)),
    ([USER, None], "messages[1]", ("expected an object", "got null")),
    ([{"content": "hi"}], "messages[0].role", ("Missing required parameter: 'messages[0].role'",)),
    ([{"role": "bot", "content": "hi"}], "messages[0].role", ("'bot'", "'developer'", "'function'")),
    ([{"role": "User", "content": "hi"}], "messages[0].role", ("Supported values",)),
    ([{"role": 1, "content": "hi"}], "messages[0].role", ("Supported values",)),
    ([{"role": ["user"], "content": "hi"}], "messages[0].role", ("Supported values",)),
    ([USER, {"role": "user"}], "messages[1].content", ("Missing required parameter",)),
    ([{"role": "system", "content": None}], "messages[0].content", ("got null",)),
    ([{"role": "developer"}], "messages[0].content", ("Missing",)),
    ([{"role": "user", "content": 5}], "messages[0].content",
     ("expected one of a string or array of objects", "got an integer")),
    ([{"role": "user", "content": {"type": "text"}}], "messages[0].content", ("got an object",)),
    ([{"role": "user", "content": []}], "messages[0].content", ("empty array",)),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", ("expected an object",)),
    ([{"role": "user", "content": [{"text": "hi"}]}], "messages[0].content[0].type", ("Missing",)),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": 3}]}],
     "messages[0].content[1].type", ("expected a string",)),
    ([{"role": "assistant", "content": 1}], "messages[0].content", ("expected one of",)),
    ([{"role": "assistant", "content": []}], "messages[0].content", ("empty array",)),
    ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", ("Missing",)),
    ([{"role": "tool", "content": "42", "tool_call_id": 7}], "messages[0].tool_call_id", ("a string",)),
    ([{"role": "tool", "tool_call_id": "c"}], "messages[0].content", ("Missing",)),
    ([{"role": "tool", "tool_call_id": "c", "content": None}], "messages[0].content", ("got null",)),
    ([{"role": "function", "content": "42"}], "messages[0].name", ("Missing",)),
    ([{"role": "function", "name": "f"}], "messages[0].content", ("Missing",)),
    ([{"role": "function", "name": "f", "content": [{"type": "text", "text": "x"}]}],
     "messages[0].content", ("expected a string",)),
    ([{"role": "user", "content": "hi", "name": 5}], "messages[0].name", ("expected a string",)),
])
def test_invalid_messages(messages: Any, param: str, words: tuple[str, ...]) -> None:
    assert_rejects(body(messages=messages), param, *words)


@pytest.mark.parametrize("message", [
    {"role": "assistant"},
    {"role": "assistant", "content": None},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    {"role": "function", "name": "f", "content": None},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]},
    {"role": "user", "content": [{"type": "some_future_part", "payload": 1}]},
    {"role": "user", "content": "hi", "unknown_message_field": [1]},
])
def test_lenient_message_shapes_accepted(message: dict[str, Any]) -> None:
    assert parse(body(messages=[USER, message])).body["messages"][1] == message


# --- numeric ranges -----------------------------------------------------------

NUMBER_FIELDS = [  # (field, accepted, out of range)
    ("temperature", [0, 0.0, 1, 0.7, 2, 2.0], [-0.01, 2.0001, 3, -1]),
    ("top_p", [0, 0.5, 1], [-0.1, 1.01, 2]),
    ("presence_penalty", [-2, -1.5, 0, 2], [-2.01, 2.5, 100]),
    ("frequency_penalty", [-2, 0.3, 2], [-3, 2.01]),
]


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, ok, _ in NUMBER_FIELDS for v in ok])
def test_numbers_in_range_accepted(field: str, value: float) -> None:
    assert parse(body(**{field: value})).body[field] == value


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, _, bad in NUMBER_FIELDS for v in bad])
def test_numbers_out_of_range_rejected(field: str, value: float) -> None:
    exc = assert_rejects(body(**{field: value}), field, f"Invalid '{field}'", f"got {value} instead")
    assert ("above maximum" in exc.message) != ("below minimum" in exc.message)
    assert exc.code == ("decimal_above_max_value" if "above" in exc.message else "decimal_below_min_value")


@pytest.mark.parametrize("field", [f for f, _, _ in NUMBER_FIELDS])
@pytest.mark.parametrize(("value", "kind"), [
    ("1", "a string"), (True, "a boolean"), (False, "a boolean"), ([1], "an array"), ({}, "an object")])
def test_numbers_of_wrong_type_rejected(field: str, value: Any, kind: str) -> None:
    assert_rejects(body(**{field: value}), field, f"Invalid type for '{field}': expected a decimal", kind)


def test_temperature_messages_match_openai() -> None:
    assert rejected(body(temperature="hot")).message == (
        "Invalid type for 'temperature': expected a decimal, but got a string instead.")
    assert rejected(body(temperature=3)).message == (
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.")


INTEGER_FIELDS = [  # (field, accepted, out of range)
    ("n", [1, 2, 128, 3.0], [0, -1, 129, 1000]),
    ("max_tokens", [1, 4096, 2**31 - 1], [0, -5, 2**31]),
    ("max_completion_tokens", [1, 16384], [0, -1, 2**40]),
    ("top_logprobs", [0, 5, 20], [-1, 21]),
    ("seed", [0, -1, 2**63 - 1, -(2**63)], [2**63, 2**64 - 1]),
]


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, ok, _ in INTEGER_FIELDS for v in ok])
def test_integers_in_range_accepted(field: str, value: int) -> None:
    assert parse(body(**{field: value})).body[field] == value


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, _, bad in INTEGER_FIELDS for v in bad])
def test_integers_out_of_range_rejected(field: str, value: int) -> None:
    exc = assert_rejects(body(**{field: value}), field, f"Invalid '{field}': integer")
    assert "Expected a value" in exc.message
    assert exc.code == ("integer_above_max_value" if "above" in exc.message else "integer_below_min_value")


@pytest.mark.parametrize("field", [f for f, _, _ in INTEGER_FIELDS])
@pytest.mark.parametrize(("value", "kind"), [
    (1.5, "a decimal"), ("2", "a string"), (True, "a boolean"), (False, "a boolean"), ([2], "an array")])
def test_integers_of_wrong_type_rejected(field: str, value: Any, kind: str) -> None:
    assert_rejects(body(**{field: value}), field, f"Invalid type for '{field}': expected an integer", kind)


def test_n_bounds_are_named() -> None:
    assert rejected(body(n=129)).message == (
        "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead.")
    assert "Expected a value >= 1" in rejected(body(max_tokens=0)).message


# --- booleans, strings, stop, logit_bias ---------------------------------------

@pytest.mark.parametrize("field", ["stream", "logprobs"])
@pytest.mark.parametrize("value", [1, 0, "true", [], {}])
def test_booleans_must_be_booleans(field: str, value: Any) -> None:
    assert_rejects(body(**{field: value}), field, "expected a boolean")


@pytest.mark.parametrize("value", [True, False])
def test_stream_flag(value: bool) -> None:
    assert parse(body(stream=value)).stream is value


@pytest.mark.parametrize("value", [5, ["u"], {"id": "u"}, True])
def test_user_must_be_a_string(value: Any) -> None:
    assert_rejects(body(user=value), "user", "expected a string")


@pytest.mark.parametrize("stop", ["\n", "", [], ["a"], ["a", "b", "c", "d"]])
def test_stop_accepted(stop: Any) -> None:
    assert parse(body(stop=stop)).body["stop"] == stop


@pytest.mark.parametrize(("stop", "param", "word"), [
    (5, "stop", "one of a string or array of strings"),
    ({"a": 1}, "stop", "one of a string or array of strings"),
    (True, "stop", "got a boolean"),
    (["a", "b", "c", "d", "e"], "stop", "maximum length 4"),
    (["a", 1], "stop[1]", "expected a string"),
    ([None], "stop[0]", "got null"),
])
def test_stop_rejected(stop: Any, param: str, word: str) -> None:
    assert_rejects(body(stop=stop), param, word)


@pytest.mark.parametrize("bias", [{}, {"50256": -100}, {"0": 100, "1": 0.5, "2": -3}])
def test_logit_bias_accepted(bias: dict[str, Any]) -> None:
    assert parse(body(logit_bias=bias)).body["logit_bias"] == bias


@pytest.mark.parametrize(("bias", "param", "word"), [
    ([1], "logit_bias", "expected an object"),
    ("50256:-100", "logit_bias", "expected an object"),
    ({"hello": 1}, "logit_bias", "'hello'"),
    ({"-1": 1}, "logit_bias", "token ids"),
    ({"1.5": 1}, "logit_bias", "token ids"),
    ({"": 1}, "logit_bias", "token ids"),
    ({"١٢": 1}, "logit_bias", "token ids"),  # Arabic-Indic digits are not token ids
    ({"1": 101}, "logit_bias.1", "Expected a value <= 100"),
    ({"1": -100.5}, "logit_bias.1", "Expected a value >= -100"),
    ({"1": "5"}, "logit_bias.1", "expected a decimal"),
    ({"1": True}, "logit_bias.1", "got a boolean"),
    ({"1": None}, "logit_bias.1", "got null"),
])
def test_logit_bias_rejected(bias: Any, param: str, word: str) -> None:
    assert_rejects(body(logit_bias=bias), param, word)


# --- stream_options -----------------------------------------------------------

@pytest.mark.parametrize(("fields", "include_usage"), [
    ({"stream": True}, False),
    ({"stream": True, "stream_options": {}}, False),
    ({"stream": True, "stream_options": None}, False),
    ({"stream": True, "stream_options": {"include_usage": True}}, True),
    ({"stream": True, "stream_options": {"include_usage": False}}, False),
    ({"stream": True, "stream_options": {"include_usage": None, "include_obfuscation": False}}, False),
    ({"stream": False, "stream_options": None}, False),
])
def test_include_usage(fields: dict[str, Any], include_usage: bool) -> None:
    assert parse(body(**fields)).include_usage is include_usage


@pytest.mark.parametrize("fields", [
    {"stream_options": {"include_usage": True}},
    {"stream": False, "stream_options": {"include_usage": True}},
    {"stream": None, "stream_options": {}},
])
def test_stream_options_need_stream(fields: dict[str, Any]) -> None:
    exc = assert_rejects(body(**fields), "stream_options")
    assert exc.message == "The 'stream_options' parameter is only allowed when 'stream' is enabled."


@pytest.mark.parametrize(("options", "param"), [
    ("usage", "stream_options"), ([True], "stream_options"),
    ({"include_usage": "yes"}, "stream_options.include_usage"),
    ({"include_usage": 1}, "stream_options.include_usage")])
def test_stream_options_rejected(options: Any, param: str) -> None:
    assert_rejects(body(stream=True, stream_options=options), param, "Invalid type")


# --- tools, tool_choice, response_format ---------------------------------------

@pytest.mark.parametrize(("fields", "param", "word"), [
    ({"tools": {"type": "function"}}, "tools", "expected an array"),
    ({"tools": "f"}, "tools", "expected an array"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, "f"]}, "tools[1]", "expected an object"),
    ({"tool_choice": "maybe"}, "tool_choice", "'none', 'auto', and 'required'"),
    ({"tool_choice": "Auto"}, "tool_choice", "Supported values"),
    ({"tool_choice": 1}, "tool_choice", "one of a string or object"),
    ({"tool_choice": ["auto"]}, "tool_choice", "got an array"),
    ({"response_format": "json"}, "response_format", "expected an object"),
    ({"response_format": {}}, "response_format.type", "Missing required parameter"),
    ({"response_format": {"type": 1}}, "response_format.type", "expected a string"),
])
def test_tool_and_format_fields_rejected(fields: dict[str, Any], param: str, word: str) -> None:
    assert_rejects(body(**fields), param, word)


@pytest.mark.parametrize("fields", [
    {"tools": []},
    {"tool_choice": "none"}, {"tool_choice": "auto"}, {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "f"}}},
    {"response_format": {"type": "text"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
])
def test_tool_and_format_fields_accepted(fields: dict[str, Any]) -> None:
    assert parse(body(**fields)).body == body(**fields)


# --- the prompt token estimate --------------------------------------------------

def _tokens(*messages: dict[str, Any], **fields: Any) -> int:
    return parse(body(messages=list(messages), **fields)).prompt_tokens


def test_estimate_is_about_four_bytes_per_token_plus_framing() -> None:
    assert _tokens({"role": "user", "content": "a" * 4000}) == 1000 + 3 + 3
    assert _tokens({"role": "user", "content": "x"}) == 1 + 3 + 3
    two = _tokens({"role": "system", "content": "a" * 400}, {"role": "user", "content": "b" * 400})
    assert two == 200 + 2 * 3 + 3


def test_estimate_counts_utf8_bytes_not_characters() -> None:
    assert _tokens({"role": "user", "content": "猫" * 1000}) == 750 + 6


def test_estimate_counts_images_as_a_fixed_cost_not_their_base64_size() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_000_000}}
    low = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}
    assert _tokens({"role": "user", "content": [image]}) == 765 + 6
    assert _tokens({"role": "user", "content": [low]}) == 85 + 6


def test_estimate_includes_tools_names_and_tool_calls() -> None:
    base = _tokens(USER)
    tools = [{"type": "function", "function": {"name": "f" * 400, "parameters": {}}}]
    assert _tokens(USER, tools=tools) >= base + 100
    assert _tokens({"role": "user", "content": "Hello", "name": "n" * 400}) >= base + 100
    call = {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "a" * 400}}]}
    assert _tokens(USER, call) >= base + 100 + 3


# --- properties -----------------------------------------------------------------

KNOWN_FIELDS = ("model", "messages", "temperature", "top_p", "n", "stop", "max_tokens",
                "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias",
                "stream", "stream_options", "logprobs", "top_logprobs", "seed", "user", "tools",
                "tool_choice", "response_format")
MESSAGE_FIELDS = ("role", "content", "name", "tool_call_id", "tool_calls", "function_call")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def _only_invalid_request_errors(value: dict[str, Any]) -> None:
    # The stdlib encoder, so integers beyond 64 bits reach the parser too.
    raw = json.dumps(value).encode()
    try:
        req = parse_chat_request(raw, JSON)
    except InvalidRequestError as exc:
        assert exc.status == 400 and exc.message
        return
    assert req.prompt_tokens > 0 and req.n >= 1


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(KNOWN_FIELDS), value=json_values, stream=st.sampled_from([True, None]))
def test_any_json_value_for_a_known_field_gives_a_400_or_parses(field: str, value: Any,
                                                                stream: bool | None) -> None:
    _only_invalid_request_errors({**body(stream=stream), field: value})


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(MESSAGE_FIELDS), value=json_values,
       role=st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]))
def test_any_json_value_inside_a_message_gives_a_400_or_parses(field: str, value: Any, role: str) -> None:
    message = {"role": role, "content": "hi", "name": "n", "tool_call_id": "c", field: value}
    _only_invalid_request_errors(body(messages=[USER, message]))


@given(value=json_values)
def test_any_json_document_gives_a_400_or_parses(value: Any) -> None:
    with contextlib.suppress(InvalidRequestError):
        parse_chat_request(json.dumps(value).encode(), JSON)


# --- accepted bodies conform to OpenAI's schema ---------------------------------

ACCEPTED_SAMPLES = [
    body(),
    FULL,
    body(stop="\n", n=None, temperature=None, top_p=None, seed=None, logit_bias=None, stream=None),
    body(stream=True, stream_options=None, max_tokens=None, max_completion_tokens=None, logprobs=None),
    body(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant"}, {"role": "user", "content": "again"}]),
    body(tool_choice={"type": "function", "function": {"name": "f"}},
         tools=[{"type": "function", "function": {"name": "f"}}]),
    body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    body(temperature=0, top_p=0, presence_penalty=-2, frequency_penalty=-2, n=128, top_logprobs=0),
    body(seed=-(2**63), max_tokens=1, logit_bias={"0": -100}),
    body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]),
    body(reasoning_effort="low", metadata={"team": "a"}, store=False, parallel_tool_calls=True),
]


@pytest.mark.parametrize("sample", ACCEPTED_SAMPLES)
def test_accepted_samples_conform_to_openai_request_schema(sample: dict[str, Any]) -> None:
    req = parse(sample)
    assert_conforms(req.body, "CreateChatCompletionRequest")


def test_conformance_helper_catches_what_the_gateway_would_reject() -> None:
    with pytest.raises(AssertionError, match="temperature"):
        assert_conforms(body(temperature=3), "CreateChatCompletionRequest")


@pytest.mark.parametrize(("value", "code"), [
    ({"model": "m"}, "missing_required_parameter"),
    (body(temperature="hot"), "invalid_type"),
    (body(messages=[{"role": "robot", "content": "x"}]), "invalid_value"),
    (body(stop=["a", "b", "c", "d", "e"]), "array_above_max_length"),
    (body(messages=[]), "empty_array"),
    (body(max_tokens=0), "integer_below_min_value"),
])
def test_errors_carry_openais_code(value: dict[str, Any], code: str) -> None:
    exc = rejected(value)
    assert exc.code == code and orjson.loads(exc.body())["error"]["code"] == code
