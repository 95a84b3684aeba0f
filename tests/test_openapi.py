"""/openapi.json and /docs: a valid document, and a reference page that needs no network."""

from __future__ import annotations

import json
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from starlette.applications import Starlette
from starlette.testclient import TestClient

import proxy.apis.openapi
from proxy.apis.openapi import openapi_routes
from proxy.apis.schema import parse_chat_request

ERROR_STATUSES = {"400", "401", "403", "404", "408", "413", "429", "502", "503", "504"}
OPENAI_SCHEMAS = {"CreateChatCompletionRequest", "CreateChatCompletionResponse",
                  "CreateChatCompletionStreamResponse", "ListModelsResponse", "Model", "ErrorResponse"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(Starlette(routes=openapi_routes())) as c:
        yield c


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc: dict[str, Any] = response.json()
    return doc


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def test_document_describes_the_gateway(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "llm-proxy" and document["info"]["version"]
    methods = {path: set(ops) for path, ops in document["paths"].items()}
    assert methods == {"/v1/chat/completions": {"post"}, "/v1/models": {"get"},
                       "/healthz": {"get"}, "/readyz": {"get"}}
    assert set(document["components"]["schemas"]) >= OPENAI_SCHEMAS


def test_chat_completions_operation(document: dict[str, Any]) -> None:
    op = document["paths"]["/v1/chat/completions"]["post"]
    request = op["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/CreateChatCompletionRequest"}
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/CreateChatCompletionResponse")
    assert ok["text/event-stream"]["schema"]["$ref"].endswith("/CreateChatCompletionStreamResponse")
    assert set(op["responses"]) == {"200"} | ERROR_STATUSES
    for status in ERROR_STATUSES:
        error = _resolve(document, op["responses"][status]["$ref"])
        assert error["description"]
        assert error["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_models_and_probes(document: dict[str, Any]) -> None:
    models = document["paths"]["/v1/models"]["get"]["responses"]["200"]
    assert models["content"]["application/json"]["schema"]["$ref"].endswith("/ListModelsResponse")
    for probe in ("/healthz", "/readyz"):
        op = document["paths"][probe]["get"]
        assert op["security"] == [], "probes must not ask Kubernetes for a key"
        assert "200" in op["responses"]
    assert "503" in document["paths"]["/readyz"]["get"]["responses"]


def test_bearer_security(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert document["security"] == [{"bearerAuth": []}]
    assert "security" not in document["paths"]["/v1/chat/completions"]["post"]


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    refs = set(_refs(document))
    assert len(refs) > 50
    for ref in refs:
        _resolve(document, ref)


def test_every_component_schema_is_a_valid_json_schema(document: dict[str, Any]) -> None:
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_document_is_valid_openapi_31(document: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document, cls=validator.OpenAPIV31SpecValidator)


def test_docs_view_is_valid_openapi_30_with_the_same_content(client: TestClient,
                                                             document: dict[str, Any]) -> None:
    view = client.get("/docs/openapi-3.0.json").json()
    assert view["openapi"] == "3.0.3"
    assert view["paths"] == document["paths"]
    assert set(view["components"]["schemas"]) == set(document["components"]["schemas"])
    assert "null" not in str(list(_types(view["components"]["schemas"]))), "3.0 has no null type"
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(view, cls=validator.OpenAPIV30SpecValidator)


def _types(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "type":
                yield value
            yield from _types(value)
    elif isinstance(node, list):
        for item in node:
            yield from _types(item)


def test_built_once_on_first_request(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = proxy.apis.openapi.load_schemas

    def counting() -> dict[str, Any]:
        calls.append(1)
        return real()

    monkeypatch.setattr(proxy.apis.openapi, "load_schemas", counting)
    app = Starlette(routes=openapi_routes("team gateway"))
    assert calls == [], "nothing is read before someone asks"
    with TestClient(app) as c:
        first = c.get("/openapi.json").content
        assert c.get("/openapi.json").content == first
    assert calls == [1]
    assert b'"title":"team gateway"' in first


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def _page_urls(html: str) -> list[str]:
    links = _Links()
    links.feed(html)
    return links.urls


def test_docs_page_uses_only_local_assets_and_they_are_served(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    urls = _page_urls(page.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls)
    assert any(u.endswith("swagger-ui.css") for u in urls)
    for url in urls:
        assert url.startswith("/docs/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    assert '"url": "/docs/openapi-3.0.json"' in page.text
    assert '"validatorUrl": null' in page.text, "the validator badge would call validator.swagger.io"


def test_docs_page_forbids_other_origins(client: TestClient) -> None:
    csp = client.get("/docs").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "img-src", "connect-src", "font-src"):
        sources = directives[name].split()
        assert all(s in ("'self'", "'unsafe-inline'", "data:") for s in sources), (name, sources)


def test_asset_types(client: TestClient) -> None:
    assert "javascript" in client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"]
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/docs/assets/index.html", "/docs/assets/swagger-initializer.js",
                                  "/docs/assets/swagger-ui-es-bundle.js", "/docs/assets/nothing.js"])
def test_only_the_pages_assets_are_exposed(client: TestClient, path: str) -> None:
    # The bundle's demo page and initializer point at petstore.swagger.io.
    assert client.get(path).status_code == 404


def test_behind_a_path_prefix_every_url_keeps_the_prefix() -> None:
    with TestClient(Starlette(routes=openapi_routes()), root_path="/llm") as c:
        page = c.get("/docs").text
        assert all(u.startswith("/llm/docs/assets/") for u in _page_urls(page))
        assert '"url": "/llm/docs/openapi-3.0.json"' in page
        assert c.get("/openapi.json").json()["servers"] == [{"url": "/llm"}]
    with TestClient(Starlette(routes=openapi_routes())) as c:
        assert c.get("/openapi.json").json()["servers"] == [{"url": "/"}]


def test_the_try_it_out_body_is_one_the_gateway_accepts(document: dict[str, Any]) -> None:
    # Swagger UI sends the media type's example as it is; without one it makes a body of zeros
    # ("max_completion_tokens": 0), which the gateway refuses with a 400.
    media = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    example = media["example"]
    request = parse_chat_request(json.dumps(example).encode(), "application/json")
    assert request.model and request.max_tokens is None
