"""What tests ask of a running gateway process: a state waited for, its access log, keys issued
and their usage read through its admin API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from tests.gateway_process import GatewayProcess


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    """Polls ``condition`` until it holds; fails once ``seconds`` have passed without it."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [orjson.loads(line[line.index("{"):]) for line in gw.log().splitlines()
            if '"msg":"access"' in line]


def issue_key(gw: GatewayProcess, admin_key: str, name: str) -> tuple[str, str]:
    """A key issued through the admin API, with room for many requests: its id and its secret."""
    resp = httpx.post(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10,
                      json={"name": name, "limits": {"concurrency": 10, "tokens_per_day": 10**9}})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], resp.json()["key"]


def key_usage(gw: GatewayProcess, admin_key: str, key_id: str) -> dict[str, int]:
    """What the admin API says a key has used, by limit."""
    resp = httpx.get(f"{gw.url}/admin/keys/{key_id}", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return {row["limit"]: row["used"] for row in resp.json()["usage"]}
