"""The README's first command: the demo config serves the openai SDK with no
provider keys and no Redis."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.gateway_process import GatewayProcess

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def test_demo_config_answers_the_sdk() -> None:
    gw = GatewayProcess(DEMO.read_text()).start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-demo-key", max_retries=0)
        assert {m.id for m in client.models.list()} == {"demo-model", "gpt-4o-mini"}
        messages = [{"role": "user", "content": "Hello"}]
        completion = client.chat.completions.create(model="demo-model", messages=messages)  # type: ignore[arg-type]
        assert completion.choices[0].message.content and completion.usage is not None
        assert completion.usage.completion_tokens == 24
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="demo-model", messages=messages, stream=True) if c.choices)  # type: ignore[arg-type]
        assert streamed == completion.choices[0].message.content
    finally:
        gw.close()
