#!/usr/bin/env python3
"""Copy the chat-completion schemas out of OpenAI's OpenAPI spec into proxy/apis/data.

    scripts/extract_openai_schemas.py [SPEC_DIR]

SPEC_DIR holds ``openapi.yaml``, ``LICENSE`` and ``SOURCE`` (default:
``../shared/openai-spec`` next to the repository). Writes
``proxy/apis/data/openai-chat-schemas.json`` (compact, keys sorted) and
``proxy/apis/data/OPENAI-SPEC-LICENSE``. Run it again when the spec is updated.

Only the named roots and what they reference are kept. The result is plain
OpenAPI 3.1 / JSON Schema 2020-12: OpenAI's spec says 3.1.0 but still writes
the 3.0 keyword ``nullable`` in places, which a 2020-12 validator ignores (it
would reject the ``null`` the spec means to allow), so it is rewritten here as
``type: [X, "null"]`` or ``anyOf: [..., {type: null}]``. Vendor extensions
(``x-*``), empty ``required`` lists and ``default: null`` on schemas that do
not admit null are dropped (validators of the spec reject those; they carry no
meaning), and site-relative links in
descriptions point at platform.openai.com so they work from the gateway's
/docs page.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "CreateChatCompletionRequest",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
)
REF_PREFIX = "#/components/schemas/"
OPENAI_SITE = "https://platform.openai.com"
# Keywords whose value is one schema / a list of schemas / a map of schemas.
SCHEMA_KEYS = ("items", "additionalProperties", "not", "contains", "propertyNames",
               "if", "then", "else", "unevaluatedProperties", "unevaluatedItems")
SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")
SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "dependentSchemas")
# Annotations stay on the outside when a nullable schema is wrapped in anyOf.
ANNOTATION_KEYS = ("title", "description", "default", "deprecated", "example", "examples",
                   "readOnly", "writeOnly")
# With any of these, ``type: [X, "null"]`` would not admit null: wrap instead.
CONSTRAINING_KEYS = ("$ref", "allOf", "anyOf", "oneOf", "not", "enum", "const")
_SITE_LINK = re.compile(r"\]\((/[^)\s]*)\)")


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("spec_dir", nargs="?", type=Path, default=repo.parent / "shared" / "openai-spec")
    parser.add_argument("--out", type=Path, default=repo / "proxy" / "apis" / "data")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec_dir / "openapi.yaml")
    source = (args.spec_dir / "SOURCE").read_text(encoding="utf-8").strip()
    document = extract(spec, source)
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "openai-chat-schemas.json"
    # The stdlib encoder: orjson refuses the spec's seed bounds (beyond 64 bits).
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    target.write_text(text + "\n", encoding="utf-8")
    shutil.copyfile(args.spec_dir / "LICENSE", args.out / "OPENAI-SPEC-LICENSE")
    count = len(document["components"]["schemas"])
    print(f"{target}: {count} schemas, {target.stat().st_size} bytes", file=sys.stderr)
    return 0


def load_spec(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the spec is ~3 MB: the C loader is 10x faster
    with path.open(encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.load(f, Loader=loader)
    return spec


def extract(spec: dict[str, Any], source: str) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    names = closure(schemas, ROOTS)
    return {
        "x-source": source,
        "x-license": "MIT, Copyright (c) OpenAI; see OPENAI-SPEC-LICENSE",
        "x-openapi": spec["openapi"],
        "x-spec-version": spec["info"]["version"],
        "components": {"schemas": {name: clean(schemas[name]) for name in sorted(names)}},
    }


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise SystemExit(f"schema {name!r} is referenced but not defined in the spec")
        seen.add(name)
        todo.extend(refs(schemas[name]))
    return seen


def refs(node: Any) -> list[str]:
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    if not isinstance(node, dict):
        return []
    found = [r for value in node.values() for r in refs(value)]
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith(REF_PREFIX):
            raise SystemExit(f"unsupported $ref {ref!r}")
        found.append(ref[len(REF_PREFIX):])
    return found


def clean(schema: Any) -> Any:
    """One schema, with its sub-schemas, in 3.1 form and without vendor extensions."""
    if not isinstance(schema, dict):
        return schema  # ``additionalProperties: true`` and the like
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-") or key == "nullable" or _pointless(schema, key, value):
            continue
        if key in SCHEMA_KEYS:
            out[key] = clean(value)
        elif key in SCHEMA_LIST_KEYS:
            out[key] = [clean(item) for item in value]
        elif key in SCHEMA_MAP_KEYS:
            out[key] = {name: clean(item) for name, item in value.items()}
        elif key == "description" and isinstance(value, str):
            out[key] = _SITE_LINK.sub(lambda m: f"]({OPENAI_SITE}{m.group(1)})", value)
        else:
            out[key] = value
    return with_null(out) if schema.get("nullable") is True else out


def _pointless(schema: dict[str, Any], key: str, value: Any) -> bool:
    """Keywords the spec writes that say nothing, and that validators reject."""
    if key == "required":
        return isinstance(value, list) and not value  # OpenAPI 3.0 requires at least one entry
    if key == "default" and value is None:
        # e.g. ChatCompletionStreamOptions' object branch: null is not an object.
        kind = schema.get("type")
        return isinstance(kind, str) and kind != "null" and schema.get("nullable") is not True
    return False


def with_null(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str) and not any(k in schema for k in CONSTRAINING_KEYS):
        return {**schema, "type": [kind, "null"]}
    outer = {k: v for k, v in schema.items() if k in ANNOTATION_KEYS}
    inner = {k: v for k, v in schema.items() if k not in ANNOTATION_KEYS}
    return {**outer, "anyOf": [inner, {"type": "null"}]}


if __name__ == "__main__":
    sys.exit(main())
