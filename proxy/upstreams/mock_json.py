"""JSON values that a JSON Schema accepts, for the ``mock`` provider's tool calls and
structured output.

Deterministic: the same schema and seed give the same value. Covers what function
parameters and ``response_format: json_schema`` use in practice (objects, arrays,
strings with their common formats and lengths, numbers with bounds and ``multipleOf``,
booleans, null, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf``, ``$ref`` into
``$defs``/``definitions``), which includes every schema the openai SDK derives from a
pydantic model. ``pattern`` is not honoured. The schema comes from a client, so nothing
here trusts its shape: depth, sizes and ``$ref`` chains are bounded, and whatever is not
a schema is treated as "anything".
"""

from __future__ import annotations

import hashlib
from typing import Any

MAX_DEPTH = 16  # nesting (and $ref hops) followed before answering null
MAX_ITEMS = 16  # array items, whatever minItems asks
MAX_STRING = 512  # characters, whatever minLength asks
MAX_VALUES = 2000  # values in all: past this, null (a schema can ask for far more)
MAX_NUMBER = 1e15  # bounds beyond this are brought within it
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
_FORMATS = {
    "date-time": "2025-01-01T12:00:00Z",
    "date": "2025-01-01",
    "time": "12:00:00",
    "duration": "P1D",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def example(schema: Any, seed: bytes) -> Any:
    """A value that ``schema`` accepts (null where it cannot find one within the bounds)."""
    return _Builder(schema, seed).value(schema, 0)


class _Builder:
    def __init__(self, root: Any, seed: bytes) -> None:
        self.root = root
        self.seed = seed
        self.drawn = 0
        self.left = MAX_VALUES

    def draw(self, bound: int) -> int:
        """A deterministic number in [0, bound): each draw differs from the last."""
        self.drawn += 1
        digest = hashlib.sha256(self.seed + self.drawn.to_bytes(4, "big")).digest()
        return int.from_bytes(digest[:8], "big") % max(1, bound)

    def value(self, schema: Any, depth: int) -> Any:
        self.left -= 1
        if depth > MAX_DEPTH or self.left < 0:
            return None
        if not isinstance(schema, dict):
            return self.word() if schema is not False else None
        if isinstance(schema.get("$ref"), str):
            return self.value(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[self.draw(len(enum))]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self.value(_first_not_null(branches), depth + 1)
        if isinstance(schema.get("allOf"), list):
            return self.value(_merged(schema), depth + 1)
        kind = _kind(schema)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind in ("integer", "number"):
            return self.number(schema, kind == "integer")
        if kind == "boolean":
            return self.draw(2) == 1
        if kind == "null":
            return None
        return self.string(schema)

    def resolve(self, ref: str) -> Any:
        """A local reference (``#/$defs/Name``); anything else is "anything"."""
        if not ref.startswith("#"):
            return {}
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        out: dict[str, Any] = {}
        if isinstance(properties, dict):
            for name, sub in properties.items():
                out[str(name)] = self.value(sub, depth + 1)
        wanted = schema.get("minProperties")
        if isinstance(wanted, int) and schema.get("additionalProperties") is not False:
            extra = schema.get("additionalProperties")
            while len(out) < min(wanted, MAX_ITEMS):
                out[f"{self.word()}_{len(out)}"] = self.value(extra if isinstance(extra, dict) else {}, depth + 1)
        return out

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        firsts = [self.value(s, depth + 1) for s in prefix[:MAX_ITEMS]] if isinstance(prefix, list) else []
        low = _int(schema.get("minItems"), 1)
        high = _int(schema.get("maxItems"), max(low, len(firsts), 1))
        count = max(len(firsts), min(max(low, 1), high, MAX_ITEMS))
        items = schema.get("items")
        return firsts + [self.value(items if isinstance(items, dict) else {}, depth + 1)
                         for _ in range(count - len(firsts))]

    def number(self, schema: dict[str, Any], integer: bool) -> int | float:
        low, high = _bounds(schema, integer)
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0:
            first = -(-low // step) * step
            steps = (high - first) // step
            value = first + step * self.draw(int(steps) + 1 if 0 <= steps < MAX_NUMBER else 1)
            return int(value) if integer else float(value)
        if integer:
            return int(low) + self.draw(int(high) - int(low) + 1)
        return low + (high - low) * self.draw(1000) / 1000

    def string(self, schema: dict[str, Any]) -> str:
        text = _FORMATS.get(str(schema.get("format")))
        if text is None:
            text = " ".join(self.word() for _ in range(1 + self.draw(3)))
        low = min(_int(schema.get("minLength"), 0), MAX_STRING)
        high = _int(schema.get("maxLength"), max(low, len(text)))
        return (text + "x" * max(0, low - len(text)))[:max(low, high)]

    def word(self) -> str:
        return WORDS[self.draw(len(WORDS))]


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [k for k in kind if k in _TYPES]
        kind = next((k for k in named if k != "null"), named[0] if named else None)
    if kind in _TYPES:
        return str(kind)
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _first_not_null(branches: list[Any]) -> Any:
    return next((b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")), branches[0])


def _merged(schema: dict[str, Any]) -> dict[str, Any]:
    """allOf's parts as one schema: the parts' keys, with their properties and required lists joined."""
    out = {k: v for k, v in schema.items() if k != "allOf"}
    properties: dict[str, Any] = dict(out.get("properties") or {}) if isinstance(out.get("properties"), dict) else {}
    for part in schema["allOf"]:
        if isinstance(part, dict):
            if isinstance(part.get("properties"), dict):
                properties.update(part["properties"])
            out.update({k: v for k, v in part.items() if k not in ("properties", "required")})
    if properties:
        out["properties"] = properties
    return out


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _bounds(schema: dict[str, Any], integer: bool) -> tuple[float, float]:
    def bound(name: str) -> float | None:
        value = schema.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        return float(min(max(value, -MAX_NUMBER), MAX_NUMBER))

    gap = 1 if integer else 1e-6
    low = bound("minimum")
    if low is None and (low := bound("exclusiveMinimum")) is not None:
        low += gap
    high = bound("maximum")
    if high is None and (high := bound("exclusiveMaximum")) is not None:
        high -= gap
    if low is None:
        low = min(0, high - 100) if high is not None else 0
    if high is None or high < low:
        high = low + 100
    if integer:
        low, high = float(-(-low // 1)), float(high // 1)
    return low, max(low, high)
