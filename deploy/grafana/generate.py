"""Writes the dashboards in this folder: ``python3 deploy/grafana/generate.py``.

The JSON files are what Grafana imports; this script is where they are
edited, so every panel shares one datasource variable, one set of filters and
unique ids. tests/test_dashboards.py fails when the two disagree. Only metrics
listed in docs/observability.md may appear in a query.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
F = 'team=~"$team",model=~"$model"'  # the dashboard filters, on series that carry both labels
RI = "$__rate_interval"

Panel = dict[str, Any]


class Layout:
    """Places panels left to right on a 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "id": len(self.panels) + 1, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def add(self, panel: Panel, w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
            "range": not instant, "instant": instant}


def panel(kind: str, title: str, targets: list[dict[str, Any]], unit: str = "short",
          description: str = "", **extra: Any) -> Panel:
    p: Panel = {"type": kind, "title": title, "description": description, "datasource": DS,
                "targets": targets,
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}}
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "showPoints": "never"}
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom",
                                   "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    p.update(extra)
    return p


def stacked(p: Panel) -> Panel:
    p["fieldConfig"]["defaults"]["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    return p


def stat(title: str, expr: str, unit: str = "short", description: str = "") -> Panel:
    return panel("stat", title, [target(expr, instant=True)], unit, description,
                 options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "none", "textMode": "value"})


def quantiles(metric: str, by: str, selector: str) -> list[dict[str, Any]]:
    return [target(f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RI}])))",
                   f"p{round(q * 100)} {{{{{by}}}}}", ref)
            for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))]


def variables(with_team: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{
        "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
    }]
    names = ["team", "model"] if with_team else ["model"]
    for name in names:
        selector = 'llm_proxy_requests_total{team=~"$team"}' if name == "model" and with_team \
            else "llm_proxy_requests_total"
        out.append({
            "name": name, "label": name.capitalize(), "type": "query", "datasource": DS,
            "query": {"query": f"label_values({selector}, {name})", "refId": "PrometheusVariableQueryEditor"},
            "definition": f"label_values({selector}, {name})",
            "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "refresh": 2, "sort": 1, "hide": 0, "regex": "", "options": [],
        })
    return out


def dashboard(uid: str, title: str, description: str, layout: Layout,
              with_team: bool = True) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["llm-proxy"],
        "timezone": "browser", "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "1m", "time": {"from": "now-24h", "to": "now"}, "fiscalYearStartMonth": 0,
        "liveNow": False, "weekStart": "",
        "annotations": {"list": []}, "links": [], "templating": {"list": variables(with_team)},
        "panels": layout.panels,
    }


def usage() -> dict[str, Any]:
    t = Layout()
    t.row("At a glance (selected time range)")
    t.add(stat("Requests", f"sum(increase(llm_proxy_requests_total{{{F}}}[$__range])) or vector(0)"), 4, 4)
    t.add(stat("Tokens", f"sum(increase(llm_proxy_tokens_total{{{F}}}[$__range])) or vector(0)"), 4, 4)
    t.add(stat("Estimated cost", f"sum(increase(llm_proxy_cost_usd_total{{{F}}}[$__range])) or vector(0)",
               "currencyUSD", "From the per-model prices in the gateway config; models without a price "
               "are not counted."), 4, 4)
    t.add(stat("Server errors (5xx)",
               f'(sum(increase(llm_proxy_requests_total{{{F},status_class="5xx"}}[$__range])) or vector(0)) '
               f"/ sum(increase(llm_proxy_requests_total{{{F}}}[$__range]))", "percentunit"), 4, 4)
    t.add(stat("Quota rejections (429)",
               'sum(increase(llm_proxy_quota_rejections_total{team=~"$team"}[$__range])) or vector(0)'),
          4, 4)
    t.add(stat("Keys in use",
               f"count(count by (team, key_name) (increase(llm_proxy_requests_total{{{F}}}[$__range]) > 0)) "
               "or vector(0)"), 4, 4)
    t.row("Usage over time")
    t.add(stacked(panel("timeseries", "Tokens per second by team", [target(
        f"sum by (team) (rate(llm_proxy_tokens_total{{{F}}}[{RI}]))", "{{team}}")], "short")), 12)
    t.add(stacked(panel("timeseries", "Tokens per second by model and kind", [target(
        f"sum by (model, kind) (rate(llm_proxy_tokens_total{{{F}}}[{RI}]))", "{{model}} {{kind}}")])), 12)
    t.add(stacked(panel("timeseries", "Estimated cost per hour by team", [target(
        f"sum by (team) (rate(llm_proxy_cost_usd_total{{{F}}}[{RI}])) * 3600", "{{team}}")],
        "currencyUSD")), 12)
    t.add(stacked(panel("timeseries", "Estimated cost per hour by model", [target(
        f"sum by (model) (rate(llm_proxy_cost_usd_total{{{F}}}[{RI}])) * 3600", "{{model}}")],
        "currencyUSD")), 12)
    t.add(stacked(panel("timeseries", "Requests per second by team", [target(
        f"sum by (team) (rate(llm_proxy_requests_total{{{F}}}[{RI}]))", "{{team}}")], "reqps")), 12)
    t.add(stacked(panel("timeseries", "Requests per second by key", [target(
        f"sum by (team, key_name) (rate(llm_proxy_requests_total{{{F}}}[{RI}]))", "{{team}} / {{key_name}}")],
        "reqps")), 12)
    t.row("Top keys (selected time range)")
    t.add(panel("bargauge", "Top 10 keys by tokens", [target(
        f"topk(10, sum by (team, key_name) (increase(llm_proxy_tokens_total{{{F}}}[$__range])))",
        "{{team}} / {{key_name}}", instant=True)], "short",
        options={"orientation": "horizontal", "displayMode": "gradient",
                 "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}), 12, 10)
    t.add(panel("table", "Top 10 keys by estimated cost", [target(
        f"topk(10, sum by (team, key_name) (increase(llm_proxy_cost_usd_total{{{F}}}[$__range])))",
        instant=True)], "currencyUSD",
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}]), 12, 10)
    t.row("Errors, limits and budgets")
    t.add(panel("timeseries", "Responses per second by status", [target(
        f"sum by (status) (rate(llm_proxy_requests_total{{{F}}}[{RI}]))", "{{status}}")], "reqps"), 12)
    t.add(panel("timeseries", "429 responses per second by team", [target(
        f'sum by (team) (rate(llm_proxy_requests_total{{{F},status="429"}}[{RI}])) or '
        f'sum by (team) (rate(llm_proxy_requests_total{{{F}}}[{RI}])) * 0', "{{team}}")], "reqps",
        "Quota rejections and upstreams that all answered 429."), 12)
    t.add(panel("timeseries", "Quota rejections per second by limit", [target(
        f'sum by (team, limit) (rate(llm_proxy_quota_rejections_total{{team=~"$team"}}[{RI}]))',
        "{{team}} {{limit}}")], "reqps"), 12)
    t.add(panel("bargauge", "Team budgets left", [target(
        '100 * min by (name, limit) (llm_proxy_budget_remaining_tokens{scope="team",name=~"$team"}) '
        '/ max by (name, limit) (llm_proxy_budget_limit_tokens{scope="team",name=~"$team"})',
        "{{name}} {{limit}}", instant=True)], "percent",
        "Share of each team's daily or monthly token budget still unused.",
        options={"orientation": "horizontal", "displayMode": "lcd",
                 "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        fieldConfig={"defaults": {"unit": "percent", "min": 0, "max": 100, "thresholds": {
            "mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 10},
                                          {"color": "green", "value": 25}]}}, "overrides": []}), 12)
    t.add(panel("table", "Key budgets left (tokens)", [target(
        'min by (name, limit) (llm_proxy_budget_remaining_tokens{scope="key"})', instant=True)],
        "short", transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}]), 24)
    return dashboard("llm-proxy-usage", "LLM usage and cost",
                     "Who uses which model, how much it costs, and how close each team is to its limits.", t)


def operations() -> dict[str, Any]:
    t = Layout()
    m = 'model=~"$model"'
    t.row("Traffic and latency")
    t.add(panel("timeseries", "Requests per second by status class", [target(
        f"sum by (status_class) (rate(llm_proxy_requests_total{{{m}}}[{RI}]))", "{{status_class}}")],
        "reqps"), 8)
    t.add(panel("timeseries", "Requests in flight", [target(
        "sum(llm_proxy_requests_in_flight)", "in flight")]), 8)
    t.add(panel("timeseries", "Server error ratio by model", [target(
        f'(sum by (model) (rate(llm_proxy_requests_total{{{m},status_class="5xx"}}[{RI}])) '
        f"or sum by (model) (rate(llm_proxy_requests_total{{{m}}}[{RI}])) * 0) "
        f"/ sum by (model) (rate(llm_proxy_requests_total{{{m}}}[{RI}]))", "{{model}}")], "percentunit"), 8)
    t.add(panel("timeseries", "Request duration by model", quantiles(
        "llm_proxy_request_duration_seconds", "model", m), "s"), 12)
    t.add(panel("timeseries", "Time to first token by model", quantiles(
        "llm_proxy_time_to_first_token_seconds", "model", m), "s"), 12)
    t.add(panel("timeseries", "Time to first token p95 by upstream", [target(
        f"histogram_quantile(0.95, sum by (le, upstream) "
        f"(rate(llm_proxy_time_to_first_token_seconds_bucket{{{m}}}[{RI}])))", "{{upstream}}")], "s"), 12)
    t.add(panel("timeseries", "Gateway overhead (outside upstream calls)", [
        target(f"histogram_quantile({q}, sum by (le) "
               f"(rate(llm_proxy_gateway_overhead_seconds_bucket[{RI}])))", f"p{round(q * 100)}", ref)
        for q, ref in ((0.5, "A"), (0.99, "B"))], "s"), 12)
    t.row("Upstreams")
    t.add(panel("table", "Upstream state now", [target(
        "max by (upstream, state) (llm_proxy_upstream_state) == 1", instant=True)], "short",
        "Across replicas and workers: a state shows when any of them sees the upstream in it.",
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]), 8)
    t.add(stacked(panel("timeseries", "Upstreams by state", [target(
        "sum by (state) (max by (upstream, state) (llm_proxy_upstream_state))", "{{state}}")])), 16)
    t.add(stacked(panel("timeseries", "Upstream attempts per second by outcome", [target(
        "sum by (upstream, outcome) (rate(llm_proxy_upstream_attempts_total[" + RI + "]))",
        "{{upstream}} {{outcome}}")], "reqps")), 12)
    t.add(panel("timeseries", "Upstream failure ratio", [target(
        f'1 - (sum by (upstream) (rate(llm_proxy_upstream_attempts_total{{outcome="ok"}}[{RI}])) '
        f"/ sum by (upstream) (rate(llm_proxy_upstream_attempts_total[{RI}])))", "{{upstream}}")],
        "percentunit"), 12)
    t.add(panel("timeseries", "Failovers per second by model", [target(
        f"sum by (model) (rate(llm_proxy_failovers_total{{{m}}}[{RI}]))", "{{model}}")], "reqps"), 8)
    t.add(panel("timeseries", "Cool-downs requested (429 Retry-After)", [target(
        f"sum by (upstream) (increase(llm_proxy_upstream_cooldowns_total[{RI}]))", "{{upstream}}")]), 8)
    t.add(panel("timeseries", "Upstream attempt duration p95", [target(
        f"histogram_quantile(0.95, sum by (le, upstream, outcome) "
        f"(rate(llm_proxy_upstream_attempt_duration_seconds_bucket[{RI}])))", "{{upstream}} {{outcome}}")],
        "s"), 8)
    t.row("Quota store, config and authentication")
    t.add(panel("timeseries", "Quota store latency p99 by operation", [target(
        f"histogram_quantile(0.99, sum by (le, operation) "
        f"(rate(llm_proxy_store_latency_seconds_bucket[{RI}])))",
        "{{operation}}")], "s"), 8)
    t.add(panel("timeseries", "Quota store errors per second", [target(
        f"sum by (operation) (rate(llm_proxy_store_errors_total[{RI}]))", "{{operation}}")], "reqps",
        "Redis unreachable or slow; quotas.on_store_error decides whether requests pass."), 8)
    t.add(panel("timeseries", "Quota rejections per second by limit", [target(
        f"sum by (limit) (rate(llm_proxy_quota_rejections_total[{RI}]))", "{{limit}}")], "reqps"), 8)
    t.add(stat("Last config reload", "min(llm_proxy_config_last_reload_successful)", "bool_yes_no",
               "No while the file on disk is rejected; the gateway keeps the config it had."), 4, 8)
    t.add(panel("timeseries", "Config reloads", [target(
        f"sum by (outcome) (increase(llm_proxy_config_reloads_total[{RI}]))", "{{outcome}}")]), 10)
    t.add(panel("timeseries", "Authentication failures per second", [target(
        f"sum by (reason) (rate(llm_proxy_auth_failures_total[{RI}]))", "{{reason}}")], "reqps"), 10)
    return dashboard("llm-proxy-operations", "LLM gateway operations",
                     "Latency, upstream health, failovers and the gateway's dependencies.", t,
                     with_team=False)


def main() -> None:
    for name, board in (("llm-proxy-usage.json", usage()), ("llm-proxy-operations.json", operations())):
        (HERE / name).write_text(json.dumps(board, indent=2) + "\n")


if __name__ == "__main__":
    main()
