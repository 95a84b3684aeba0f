"""The README's demo section, every block as written, against the demo config served by a real
gateway, in the README's order (as a newcomer would run them).

The one change made to a block: the address ``127.0.0.1:8080`` becomes this gateway's, on a
free port, so the test neither needs port 8080 nor disturbs whatever has it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEMO = ROOT / "config" / "demo.yaml"
ADDRESS = "127.0.0.1:8080"


def demo_section() -> str:
    text = README.read_text()
    return text.split("\n## The demo\n", 1)[1].split("\n## ", 1)[0]


def blocks(section: str) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in re.findall(r"```(\w+)\n(.*?)```", section, re.S)]


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    gw = GatewayProcess(DEMO.read_text()).start()
    try:
        yield gw
    finally:
        gw.close()


def run(lang: str, code: str, address: str) -> str:
    code = code.replace(ADDRESS, address)
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    # The README's python blocks run with the virtual environment's python, and so do these.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, f"{lang} block failed ({done.returncode}):\n{code}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_set_up_section_has_the_two_commands() -> None:
    text = README.read_text()
    setup = text.split("\n## Set-up: two commands\n", 1)[1].split("\n## ", 1)[0]
    commands = [code.strip() for lang, code in blocks(setup)]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install . openai"
        " && .venv/bin/llm-proxy serve --config config/demo.yaml",
        "./scripts/test"]
    assert "./scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_every_demo_block_runs_as_written(gateway: GatewayProcess) -> None:
    found = blocks(demo_section())
    assert [lang for lang, _ in found] == ["sh", "sh", "sh", "python", "python"]
    outputs = [run(lang, code, f"127.0.0.1:{gateway.port}") for lang, code in found]
    completion, quotas, admin, sdk, structured = outputs
    assert '"object":"chat.completion"' in completion and "data: [DONE]" in completion
    statuses = re.findall(r"^HTTP/1.1 (\d+)", quotas, re.M)
    assert statuses == ["200", "200", "200", "429"], quotas
    assert re.findall(r"^x-ratelimit-remaining-requests: (\d+)", quotas, re.M | re.I) == ["2", "1", "0", "0"]
    assert re.search(r"^retry-after: \d+", quotas, re.M | re.I), quotas
    assert '"object":"chat.completion"' in admin and '"name":"trial"' in admin
    assert '"tokens_per_month":5000000' in admin and '"object":"team.usage"' in admin
    assert '"key":' not in admin.split('"object":"chat.completion"', 1)[1], "a listing showed a secret"
    assert sdk.strip()
    name, arguments = structured.splitlines()[0].split(" ", 1)
    assert name == "get_weather" and '"city":' in arguments
    assert re.match(r"name='.+' population=-?\d+", structured.splitlines()[1]), structured
