"""The gateway's OpenAPI 3.1 document (``/openapi.json``) and reference page (``/docs``).

The schemas are OpenAI's own (``data/openai-chat-schemas.json``, extracted by
``scripts/extract_openai_schemas.py``); this module adds the gateway's paths,
errors and headers around them. The document is built on its first request
and kept by the route object, so importing costs nothing and a gateway that
nobody asks for docs never reads the file.

``/docs`` is Swagger UI from the ``swagger_ui_bundle`` package, served from
local files only, so it works air-gapped; its CSP forbids any other origin.
That bundle is Swagger UI 4, which refuses to render ``openapi: 3.1.x``, so
the page loads ``/docs/openapi-3.0.json``: the same document rewritten in
OpenAPI 3.0 terms (``nullable`` instead of ``null`` types). ``/openapi.json``
stays the canonical 3.1 document for clients and code generators.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope
from swagger_ui_bundle import swagger_ui_path

from .. import __version__

DATA_FILE = "openai-chat-schemas.json"
SCHEMAS_REF = "#/components/schemas/"
# Only what the page loads; the bundle's demo index.html points at petstore.swagger.io.
DOCS_ASSETS = frozenset({"swagger-ui.css", "swagger-ui.css.map", "swagger-ui-bundle.js",
                         "swagger-ui-bundle.js.map", "favicon-16x16.png", "favicon-32x32.png"})
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'self'")
# (status, component name, when the gateway answers with it)
ERRORS: tuple[tuple[str, str, str], ...] = (
    ("400", "InvalidRequest", "The body is not valid JSON or breaks a rule of the API; "
                              "`param` names the field."),
    ("401", "Unauthorized", "Missing, unknown, revoked or expired API key."),
    ("403", "PermissionDenied", "The key or its team may not use this model."),
    ("404", "ModelNotFound", "No upstream serves this model."),
    ("408", "RequestTimeout", "The body did not arrive within the gateway's body timeout."),
    ("413", "RequestTooLarge", "The body is larger than the gateway accepts."),
    ("429", "RateLimited", "A quota of the key or its team is used up or held by requests in flight; "
                           "the request's token estimate alone exceeds a limit (`code: "
                           "estimate_exceeds_limit`, `x-should-retry: false`); every upstream of the "
                           "model is cooling down after its own 429 (`code: upstream_rate_limited`); or "
                           "this address failed authentication too often (`code: auth_failures`). "
                           "Retry after `Retry-After` seconds."),
    ("502", "BadGateway", "Every upstream tried failed, or a stream broke."),
    ("503", "ServiceUnavailable", "No upstream is available now (ejected, bad credentials or saturated; "
                                  "`Retry-After` until the first may be tried), or the quota store is "
                                  "down and the gateway fails closed."),
    ("504", "GatewayTimeout", "No upstream answered within the deadline."),
)
RATE_LIMIT_HEADERS = ("limit-requests", "remaining-requests", "reset-requests",
                      "limit-tokens", "remaining-tokens", "reset-tokens")


def openapi_routes(title: str = "llm-proxy") -> list[BaseRoute]:
    docs = ApiDocs(title)
    return [
        Route("/openapi.json", docs.openapi, methods=["GET"]),
        Route("/docs", docs.page, methods=["GET"]),
        Route("/docs/openapi-3.0.json", docs.openapi_30, methods=["GET"]),
        Mount("/docs/assets", app=DocsAssets(directory=swagger_ui_path)),
    ]


class ApiDocs:
    """The endpoints; documents are built on first use, per root path, and kept."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._bodies: dict[tuple[str, str], bytes] = {}

    async def openapi(self, request: Request) -> Response:
        return self._json(request, "3.1")

    async def openapi_30(self, request: Request) -> Response:
        return self._json(request, "3.0")

    async def page(self, request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(docs_page(self.title, root), headers={"Content-Security-Policy": DOCS_CSP})

    def _json(self, request: Request, version: str) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        body = self._bodies.get((root, version))
        if body is None:
            document = build_document(self.title, root or "/")
            if version == "3.0":
                document = as_openapi_30(document)
            # The stdlib encoder: the spec's seed bounds exceed orjson's 64-bit integers.
            body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
            self._bodies[(root, version)] = body
        return Response(body, media_type="application/json")


class DocsAssets(StaticFiles):
    """Swagger UI's files, limited to those the /docs page uses."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if path not in DOCS_ASSETS:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


def docs_page(title: str, root: str) -> str:
    assets = f"{root}/docs/assets"
    config = json.dumps({
        "url": f"{root}/docs/openapi-3.0.json",
        "dom_id": "#swagger-ui",
        "layout": "BaseLayout",
        "deepLinking": True,
        "validatorUrl": None,  # the default badge fetches from validator.swagger.io
        "defaultModelsExpandDepth": 0,
    }).replace("</", "<\\/")  # JSON inside <script>: no "</script>" can end it early
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} API reference</title>
<link rel="stylesheet" href="{html.escape(assets)}/swagger-ui.css">
<link rel="icon" type="image/png" href="{html.escape(assets)}/favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{html.escape(assets)}/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({config});</script>
</body>
</html>
"""


def load_schemas() -> dict[str, Any]:
    """The data file: ``components.schemas`` plus ``x-source`` and ``x-license``."""
    text = resources.files("proxy.apis").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def build_document(title: str, server_url: str = "/") -> dict[str, Any]:
    data = load_schemas()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": __version__,
            "summary": "An OpenAI-compatible LLM gateway.",
            "description": _INFO_DESCRIPTION.format(source=data["x-source"]),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": server_url}],
        "security": [{"bearerAuth": []}],
        "tags": [{"name": "Chat"}, {"name": "Models"}, {"name": "Probes"}],
        "paths": {
            "/v1/chat/completions": {"post": _chat_operation()},
            "/v1/models": {"get": _models_operation()},
            "/healthz": {"get": _liveness_operation()},
            "/readyz": {"get": _readiness_operation()},
        },
        "components": {
            "schemas": {**data["components"]["schemas"], **_gateway_schemas()},
            "responses": {name: _error_response(text) for _, name, text in ERRORS},
            "headers": _headers(),
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "A gateway key (`Authorization: Bearer sk-...`), not a provider key."}},
        },
    }


_INFO_DESCRIPTION = """\
One OpenAI-compatible endpoint in front of a pool of upstreams (OpenAI, Azure OpenAI, \
any OpenAI-compatible server), with keys per team, quotas and failover.

Request and response bodies are OpenAI's: the schemas here are copied from OpenAI's \
OpenAPI spec ({source}, MIT licence). The gateway checks the fields and ranges it \
knows, passes unknown fields through untouched, and relays upstream answers as received.
"""


CHAT_EXAMPLE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


def _chat_operation() -> dict[str, Any]:
    return {
        "operationId": "createChatCompletion",
        "tags": ["Chat"],
        "summary": "Create a chat completion",
        "description": (
            "Routes the request to an upstream that serves `model`, failing over to the next on "
            "errors before the first byte. With `stream: true` the answer is server-sent events, each "
            "`data:` line one chunk object, ending with `data: [DONE]`; a stream that breaks after it "
            "began ends with an error event and without `[DONE]`."),
        # Without an example, "Try it out" fills every field with its type's zero, which the gateway refuses.
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("CreateChatCompletionRequest"), "example": CHAT_EXAMPLE}}},
        "responses": {
            "200": {
                "description": "The completion, or with `stream: true` its chunks as server-sent events.",
                "headers": {**_rate_limit_header_refs(),
                            "x-llm-proxy-upstream": {"$ref": "#/components/headers/Upstream"}},
                "content": {
                    "application/json": {"schema": _ref("CreateChatCompletionResponse")},
                    "text/event-stream": {"schema": _ref("CreateChatCompletionStreamResponse")},
                },
            },
            **_error_refs(),
        },
    }


def _models_operation() -> dict[str, Any]:
    return {
        "operationId": "listModels",
        "tags": ["Models"],
        "summary": "List the models this key may use",
        "responses": {
            "200": {"description": "The public model names.",
                    "content": {"application/json": {"schema": _ref("ListModelsResponse")}}},
            **_error_refs(("401", "429")),
        },
    }


def _liveness_operation() -> dict[str, Any]:
    return {
        "operationId": "liveness",
        "tags": ["Probes"],
        "summary": "Liveness: the process answers",
        "security": [],
        "responses": {"200": {"description": "Alive.", "content": {
            "application/json": {"schema": _ref("Liveness")}}}},
    }


def _readiness_operation() -> dict[str, Any]:
    content = {"application/json": {"schema": _ref("Readiness")}}
    return {
        "operationId": "readiness",
        "tags": ["Probes"],
        "summary": "Readiness: the gateway should get traffic",
        "description": "Config loaded, quota store reachable (or failing open), at least one "
                       "upstream available, and not shutting down.",
        "security": [],
        "responses": {"200": {"description": "Ready.", "content": content},
                      "503": {"description": "Not ready; `checks` says why.", "content": content}},
    }


def _gateway_schemas() -> dict[str, Any]:
    return {
        "Liveness": {"type": "object", "required": ["status"],
                     "properties": {"status": {"type": "string", "enum": ["ok"]}}},
        "Readiness": {"type": "object", "required": ["status", "checks"], "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"},
                       "description": "Each readiness condition and whether it holds."}}},
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS_REF + name}


def _error_refs(statuses: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/{name}"}
            for status, name, _ in ERRORS if statuses is None or status in statuses}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ref("ErrorResponse")}}}


def _headers() -> dict[str, Any]:
    out: dict[str, Any] = {
        f"RateLimit{''.join(p.title() for p in name.split('-'))}": {
            "description": f"OpenAI-style `x-ratelimit-{name}` rate-limit header.",
            "schema": {"type": "string"}}
        for name in RATE_LIMIT_HEADERS
    }
    out["Upstream"] = {"description": "The name of the upstream that answered.", "schema": {"type": "string"}}
    return out


def _rate_limit_header_refs() -> dict[str, Any]:
    return {f"x-ratelimit-{name}": {
        "$ref": f"#/components/headers/RateLimit{''.join(p.title() for p in name.split('-'))}"}
        for name in RATE_LIMIT_HEADERS}


# --- the OpenAPI 3.0 view for Swagger UI 4 -----------------------------------

_SCHEMA_KEYS = ("items", "additionalProperties", "not")
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf")


def as_openapi_30(document: dict[str, Any]) -> dict[str, Any]:
    """The document in OpenAPI 3.0.3 terms; only what this document uses is translated."""
    info = {k: v for k, v in document["info"].items() if k != "summary"}
    info["license"] = {"name": info["license"]["name"],
                       "url": "https://www.apache.org/licenses/LICENSE-2.0"}
    components = dict(document["components"])
    components["schemas"] = {name: schema_30(s) for name, s in components["schemas"].items()}
    return {**document, "openapi": "3.0.3", "info": info, "components": components}


def schema_30(schema: Any) -> Any:
    """One JSON Schema 2020-12 schema as an OpenAPI 3.0 Schema Object."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_KEYS:
            out[key] = schema_30(value)
        elif key in _SCHEMA_LIST_KEYS:
            branches = [schema_30(v) for v in value if v != {"type": "null"}]
            if len(branches) < len(value):
                out["nullable"] = True
            out[key] = branches
        elif key == "properties":
            out[key] = {name: schema_30(v) for name, v in value.items()}
        elif key == "type" and isinstance(value, list):
            kinds = [k for k in value if k != "null"]
            if len(kinds) < len(value):
                out["nullable"] = True
            if len(kinds) == 1:
                out["type"] = kinds[0]
            else:
                out["anyOf"] = [{"type": k} for k in kinds]
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    return out
