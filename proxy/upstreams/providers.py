"""How each provider wants a chat completion addressed and authenticated.

Upstream credentials come only from config; nothing from the client's request
decides where the gateway connects or which key it sends.
"""

from __future__ import annotations

from urllib.parse import quote

from ..config.types import UpstreamConfig


def chat_url(upstream: UpstreamConfig, model: str) -> str:
    if upstream.provider == "azure":
        return (f"{upstream.base_url}/openai/deployments/{quote(model, safe='')}"
                f"/chat/completions?api-version={quote(upstream.api_version or '', safe='')}")
    return f"{upstream.base_url}/chat/completions"


def models_url(upstream: UpstreamConfig) -> str:
    if upstream.provider == "azure":
        return f"{upstream.base_url}/openai/models?api-version={quote(upstream.api_version or '', safe='')}"
    return f"{upstream.base_url}/models"


def auth_headers(upstream: UpstreamConfig) -> dict[str, str]:
    if not upstream.api_key:
        return {}
    if upstream.provider == "azure":
        return {"api-key": upstream.api_key}
    return {"Authorization": f"Bearer {upstream.api_key}"}
