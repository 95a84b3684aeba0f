"""Check JSON values against OpenAI's schemas (the copy in proxy/data).

    from tests.spec import assert_conforms
    assert_conforms(orjson.loads(body), "CreateChatCompletionResponse")

Any component name of the data file works (``CreateChatCompletionRequest``,
``CreateChatCompletionStreamResponse`` for one SSE ``data:`` object,
``ListModelsResponse``, ``Model``, ``ErrorResponse``, ``CompletionUsage``...).
The data file is plain JSON Schema 2020-12 (the extract script already turned
OpenAI's ``nullable`` into ``null`` types), so it is validated as such; ``$ref``
to ``#/components/schemas/...`` resolves through a ``referencing`` registry.

Relaxed, because OpenAI-compatible servers the gateway relays (vLLM, Ollama,
older Azure API versions) omit fields OpenAI itself always sends, and the
gateway passes upstream bodies through unchanged:

- ``CreateChatCompletionResponse.choices[].logprobs`` is not required
  (OpenAI always sends it, ``null`` when not asked for);
- ``ChatCompletionResponseMessage.refusal`` is not required (OpenAI always
  sends it, usually ``null``).

Nothing else is changed: types, enums and every other required field are as
OpenAI wrote them.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DATA_FILE = "openai-chat-schemas.json"
_BASE_URI = "urn:llm-proxy:openai-chat-schemas"
# (schema, path to a "required" list inside it, field no longer required)
RELAXED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("CreateChatCompletionResponse", ("properties", "choices", "items"), "logprobs"),
    ("ChatCompletionResponseMessage", (), "refusal"),
)


def assert_conforms(instance: Any, schema_name: str) -> None:
    """Raise AssertionError listing every way ``instance`` violates the schema."""
    errors = sorted(_validator(schema_name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise AssertionError(f"does not conform to {schema_name}:\n{lines}")


def schema_names() -> frozenset[str]:
    return frozenset(_document()["components"]["schemas"])


@functools.cache
def _document() -> dict[str, Any]:
    text = resources.files("proxy.apis").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@functools.cache
def _registry() -> Registry[Any]:
    document = copy.deepcopy(_document())
    schemas = document["components"]["schemas"]
    for name, path, field in RELAXED:
        node = functools.reduce(lambda n, key: n[key], path, schemas[name])
        node["required"] = [f for f in node["required"] if f != field]
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    return Registry().with_resource(_BASE_URI, resource)


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in schema_names():
        raise KeyError(f"no schema {schema_name!r} in {DATA_FILE}")
    schema = {"$ref": f"{_BASE_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=_registry())


def _describe(error: ValidationError) -> str:
    text = f"{error.json_path}: {error.message}"
    if error.context:
        # oneOf/anyOf: say why the closest alternative failed, not just "no match".
        closest = best_match(error.context)
        text += f" (closest: {closest.json_path}: {closest.message})"
    return text
