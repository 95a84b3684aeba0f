"""The Grafana dashboards and Prometheus rules, checked offline.

Against a live Prometheus and gateway: scripts/check-observability.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
METRIC = re.compile(r"\bllm_proxy_[A-Za-z0-9_]+")  # recording rules are llm_proxy:...: not matched
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h",
                     "$team": ".*", "$model": ".*"}


def exported_names() -> set[str]:
    """Every sample name /metrics can carry, from the Metrics class's own registry."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


def load(path: Path) -> dict[str, Any]:
    board = json.loads(path.read_text())
    assert isinstance(board, dict)
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels", ())  # a collapsed row keeps its panels inside


def queries(board: dict[str, Any]) -> Iterator[str]:
    for p in panels(board):
        for t in p.get("targets", ()):
            yield t["expr"]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            yield v["definition"]


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def test_there_are_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} >= {"llm-proxy-usage.json", "llm-proxy-operations.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    board = load(path)
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "model" in variables
    for name in ("team", "model"):
        if name in variables:
            assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    cells: set[tuple[int, int]] = set()
    for p in panels(board):
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        covered = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                   for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered
        if p["type"] == "row":
            continue
        assert p["title"] and p["targets"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            for name in re.findall(r"\$(\w+)", t["expr"]):
                assert name.startswith("__") or name in variables, f"unknown variable ${name}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_use_only_exported_metrics(path: Path) -> None:
    exported = exported_names()
    used = {name for expr in queries(load(path)) for name in METRIC.findall(expr)}
    assert used, "no llm_proxy_ metric in any query"
    assert used <= exported, f"not exported by Metrics: {sorted(used - exported)}"


def test_rules_use_only_exported_metrics() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = [r["expr"] for g in groups for r in g["rules"]]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    used = {name for e in exprs for name in METRIC.findall(e)}
    assert used <= exported_names(), sorted(used - exported_names())
    for e in exprs:
        assert set(re.findall(r"\bllm_proxy:[\w:]+", e)) <= recorded


def test_every_exported_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    families = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()}
    assert {n for n in families if f"`{n}`" not in doc} == set()


def test_dashboards_are_what_the_generator_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.HERE = tmp_path  # type: ignore[attr-defined]
    generate.main()
    for path in DASHBOARDS:
        assert (tmp_path / path.name).read_text() == path.read_text(), \
            f"{path.name} differs from deploy/grafana/generate.py's output: run it"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboards_parse_as_grafana_models(path: Path) -> None:
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import dashboard, prometheus

    register_default_plugins()
    board = dashboard.Dashboard.from_json(load(path))
    assert board.uid == load(path)["uid"]
    typed = [p for p in board.panels or [] if isinstance(p, dashboard.Panel)]
    assert typed
    for p in typed:
        assert p.targets and all(isinstance(t, prometheus.Dataquery) for t in p.targets), p.title


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_are_valid_promql(path: Path) -> None:
    promql = pytest.importorskip("promql_parser")
    for expr in queries(load(path)):
        if expr.startswith("label_values("):
            selector = expr[len("label_values("):].rsplit(",", 1)[0]
            expr = selector
        assert selectors(promql, promql.parse(substitute(expr))), expr


def selectors(promql: Any, tree: Any) -> list[str]:
    names: list[str] = []
    promql.walk(tree, lambda node: names.append(node.name) if isinstance(node, promql.VectorSelector)
                else None)
    return names
