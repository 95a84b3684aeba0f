"""The ``mock`` provider's answers: tool calls, structured output and ids, as the openai SDK
reads them (the demo config, served by a real gateway process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from proxy.upstreams import mock
from proxy.upstreams.mock_json import example
from tests.gateway_process import GatewayProcess

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
]


class Forecast(BaseModel):
    city: str
    kind: Literal["sunny", "rainy", "cloudy"]
    high: float = Field(ge=-50, le=60)
    days: list[int] = Field(min_length=1, max_length=3)
    note: str | None
    updated: str = Field(json_schema_extra={"format": "date-time"})


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    gw = GatewayProcess(DEMO.read_text()).start()
    try:
        yield openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-demo-key", max_retries=0, timeout=60)
    finally:
        gw.close()


def test_a_named_tool_choice_is_called_with_arguments_valid_against_its_schema(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="demo-model", messages=MESSAGES, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(orjson.loads(calls[0].function.arguments), WEATHER)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_a_streamed_tool_call_assembles_to_the_same_call(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": "demo-model", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert whole is not None and whole[0].function.name == "get_time"  # required: the first tool
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            name += delta.function.name or "" if delta.function else ""
            arguments += delta.function.arguments or "" if delta.function else ""
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
    assert (name, arguments, finish) == ("get_time", whole[0].function.arguments, "tool_calls")


def test_auto_answers_in_text_once_the_tool_result_is_in(client: openai.OpenAI) -> None:
    call = client.chat.completions.create(model="demo-model", messages=MESSAGES, tools=TOOLS)
    assert call.choices[0].message.tool_calls, "auto with tools and no result yet: a call"
    made = call.choices[0].message.tool_calls[0]
    follow_up: Any = [*MESSAGES, call.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": made.id, "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model="demo-model", messages=follow_up, tools=TOOLS)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    none = client.chat.completions.create(model="demo-model", messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.content and none.choices[0].finish_reason == "stop"


def test_parse_with_a_pydantic_model_gets_a_valid_instance(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(model="demo-model", messages=MESSAGES, response_format=Forecast)
    forecast = parsed.choices[0].message.parsed
    assert isinstance(forecast, Forecast) and 1 <= len(forecast.days) <= 3 and -50 <= forecast.high <= 60


def test_a_streamed_json_schema_answer_is_valid_json_of_that_schema(client: openai.OpenAI) -> None:
    schema = Forecast.model_json_schema()
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="demo-model", messages=MESSAGES, response_format=fmt, stream=True) if c.choices)
    jsonschema.validate(orjson.loads(text), schema)
    plain = client.chat.completions.create(model="demo-model", messages=MESSAGES,
                                           response_format={"type": "json_object"})
    assert isinstance(orjson.loads(plain.choices[0].message.content or ""), dict)


def test_each_answer_has_its_own_id_and_the_current_time(client: openai.OpenAI) -> None:
    before = int(time.time())
    first, second = (client.chat.completions.create(model="demo-model", messages=MESSAGES) for _ in range(2))
    after = int(time.time())
    assert first.id != second.id and first.id.startswith("chatcmpl-") and len(first.id) > 20
    assert before <= first.created <= second.created <= after
    assert first.choices[0].message.content == second.choices[0].message.content  # the text stays deterministic


SCHEMAS: list[Any] = [
    WEATHER,
    Forecast.model_json_schema(),
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                                "minItems": 2, "uniqueItems": True}},
     "required": ["tags"]},
    {"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                      "k": {"type": "integer", "multipleOf": 5, "minimum": 12, "maximum": 30},
                                      "c": {"const": "fixed"}, "b": {"type": "boolean"}, "z": {"type": "null"}}},
    {"$defs": {"Node": {"type": "object", "properties": {"name": {"type": "string"},
                                                        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"},
                                                                     "maxItems": 0}}}},
     "$ref": "#/$defs/Node"},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"properties": {"b": {"type": "integer", "minimum": 3}}, "required": ["b"]}]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                      "mail": {"type": "string", "format": "email"},
                                      "id": {"type": "string", "format": "uuid"},
                                      "pick": {"oneOf": [{"type": "null"}, {"type": "string", "minLength": 40}]}},
     "minProperties": 6},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_generated_values_are_valid_and_deterministic(schema: Any) -> None:
    value = example(schema, b"seed")
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    assert example(schema, b"seed") == value


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8) | st.sampled_from(["object", "array", "string", "integer", "number",
                                                             "#", "#/$defs/x", "$ref", "properties", "items"]),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["type", "properties", "items", "$ref", "$defs", "enum", "anyOf", "allOf",
                                         "minItems", "maxItems", "minimum", "maximum", "multipleOf", "minLength",
                                         "maxLength", "prefixItems", "additionalProperties", "minProperties",
                                         "x", "const", "format"]), inner, max_size=6),
                    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_client_supplied_schema_gives_an_answer_and_never_an_error(schema: Any) -> None:
    body = {"model": "m", "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    for tool_choice in ("none", "required"):
        completion = mock.plan({**body, "tool_choice": tool_choice}, 8)
        assert orjson.loads(mock.completion_body(completion))["choices"]
        assert b"".join(mock.stream_events(completion, True)).endswith(b"data: [DONE]\n\n")
