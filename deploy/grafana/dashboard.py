"""Generates deploy/grafana/dashboards/quantgate.json (dashboards as code; a test keeps the two in step).

    python deploy/grafana/dashboard.py

tests/integration/test_prometheus_live.py evaluates every panel's query against a real Prometheus
scraping a real gateway and engine, and fails on any that returns no data.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "quantgate.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
V = 'variant=~"$variant"'


def q(expr: str, legend: str, ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(title: str, description: str, targets: list[dict], unit: str, x: int, y: int, w: int = 8, h: int = 8,
          kind: str = "timeseries", **field: object) -> dict:
    return {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, **field}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}}
        if kind == "timeseries" else {},
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
    }  # fmt: skip


def quantiles(metric: str, labels: str, by: str = "variant") -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{labels}}}[$__rate_interval])))",
              f"{{{{{by}}}}} p{int(p * 100)}") for p in (0.5, 0.95)]  # fmt: skip


def row(title: str, y: int) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}  # fmt: skip


def panels() -> list[dict]:
    out = [row("Latency budgets and routing", 0)]
    out += [
        panel("Budget attainment", "Share of budgeted requests whose measured latency met the budget "
              "(rejected ones count as missed), 5 m window. SLO: 95 %.",
              [q(f"quantgate:budget_attainment:ratio_rate5m{{{M}}}", "{{model}}")], "percentunit", 0, 1,
              min=0, max=1),
        panel("Budget outcomes", "Budgeted requests by routing decision (met-predicted / degraded / rejected) "
              "and measured outcome (met / missed / rejected).",
              [q(f"sum by (decision, outcome) (rate(quantgate_budget_outcomes_total{{{M}}}[$__rate_interval]))",
                 "{{decision}} / {{outcome}}")], "reqps", 8, 1),
        panel("Routing mix", "Requests routed to each variant (the precision ladder in use).",
              [q(f"sum by (variant) (rate(quantgate_routing_decisions_total{{{M}}}[$__rate_interval]))",
                 "{{variant}}")], "reqps", 16, 1, custom={"stacking": {"mode": "percent"}, "fillOpacity": 60}),
    ]
    out.append(row("Latency per variant", 9))
    out += [
        panel("Time to first token", "Streamed requests, p50 and p95 per variant, as the client sees them.",
              quantiles("quantgate_time_to_first_token_seconds", f"{M},{V}"), "s", 0, 10),
        panel("Inter-token latency", "Gap between streamed chunks, p50 and p95 per variant.",
              quantiles("quantgate_inter_token_seconds", f"{M},{V}"), "s", 8, 10),
        panel("End-to-end latency", "Whole request, p50 and p95 per variant.",
              quantiles("quantgate_request_duration_seconds", f"{M},{V}"), "s", 16, 10),
        panel("Gateway overhead", "Time inside the gateway from the request to the upstream call "
              "(target: p50 <= 1 ms, p99 <= 5 ms).",
              [q("histogram_quantile(0.5, sum by (le) (rate(quantgate_gateway_overhead_seconds_bucket[$__rate_interval])))",
                 "p50"),
               q("histogram_quantile(0.99, sum by (le) (rate(quantgate_gateway_overhead_seconds_bucket[$__rate_interval])))",
                 "p99")], "s", 0, 18),
        panel("Predictor error", "Observed / predicted latency of routed requests, median per variant "
              "and kind (1 = perfect).",
              [q(f"histogram_quantile(0.5, sum by (le, variant, kind) (rate(quantgate_predictor_error_ratio_bucket{{{V}}}[$__rate_interval])))",
                 "{{variant}} {{kind}}")], "none", 8, 18),
        panel("Requests and errors", "Answered requests by status (4xx: the client's, 5xx: ours or the "
              "engines', 499: client went away).",
              [q(f"sum by (status) (rate(quantgate_requests_total{{{M}}}[$__rate_interval]))", "{{status}}")],
              "reqps", 16, 18),
    ]
    out.append(row("Engines", 26))
    out += [
        panel("Memory per variant", "Resident memory of each engine's process tree (rss) and GPU memory "
              "where there is one (gpu); the host's available memory.",
              [q(f"quantgate_engine_memory_bytes{{{V}}}", "{{variant}} {{kind}}"),
               q('quantgate_host_memory_bytes{kind="available"}', "host available")], "bytes", 0, 27),
        panel("Queue", "Requests running and waiting inside each engine (vLLM's scheduler), and in flight "
              "through the gateway.",
              [q(f"quantgate_engine_requests_running{{{V}}}", "{{variant}} running"),
               q(f"quantgate_engine_requests_waiting{{{V}}}", "{{variant}} waiting"),
               q(f"quantgate_in_flight_requests{{{V}}}", "{{variant}} in flight")], "short", 8, 27),
        panel("KV cache usage", "vllm:kv_cache_usage_perc per engine (alert at 90 % for 10 m).",
              [q(f"quantgate_engine_kv_cache_usage_ratio{{{V}}}", "{{variant}}")], "percentunit", 16, 27,
              min=0, max=1),
        panel("Generated tokens", "Tokens per second generated by each engine (vllm:generation_tokens_total, "
              "re-exported by every gateway replica, hence max).",
              [q(f"max by (variant) (rate(vllm:generation_tokens_total{{{V}}}[$__rate_interval]))", "{{variant}}")],
              "short", 0, 35),
        panel("Engine up", "1 while the variant's engine serves; restarts in the window.",
              [q(f"quantgate_engine_up{{{V}}}", "{{variant}} up"),
               q(f"increase(quantgate_engine_restarts_total{{{V}}}[$__rate_interval])", "{{variant}} restarts")],
              "short", 8, 35),
        panel("Variants", "What each variant is: size on disk and measured perplexity delta vs the base.",
              [q(f"quantgate_variant_size_bytes{{{M}}}", "{{variant}} size"),
               q(f"quantgate_variant_ppl_delta_ratio{{{M}}}", "{{variant}} ppl delta")], "short", 16, 35,
              kind="table"),
    ]
    out.append(row("Registry", 43))
    out += [
        panel("Variants by state", "The registry's variants per state (rejected: below the quality floor).",
              [q(f"quantgate_registry_variants{{{M}}}", "{{model}} {{state}}")], "short", 0, 44),
        panel("Compression jobs", "Compression and evaluation jobs by state (running, succeeded, failed, "
              "interrupted by a restart).", [q("quantgate_registry_jobs", "{{state}}")], "short", 8, 44),
        panel("Build progress", "Fraction done of each build's current phase (calibrating: decoder layers; "
              "server/registry/progress.py). Present only while something builds.",
              [q(f"quantgate_variant_build_progress_ratio{{{V}}}", "{{variant}} {{phase}}")], "percentunit", 16, 44,
              min=0, max=1),
        panel("Build ETA", "Time left in each build's current phase at the rate measured in it (given once 5 % "
              "is done). Present only while something builds.",
              [q(f"quantgate_variant_build_eta_seconds{{{V}}}", "{{variant}} {{phase}}")], "s", 0, 52),
    ]
    return out


def variable(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "query": {"query": query,
            "refId": name}, "definition": query, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1}  # fmt: skip


def dashboard() -> dict:
    return {
        "uid": "quantgate", "title": "quantgate", "tags": ["quantgate", "llm", "vllm"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            variable("model", "label_values(quantgate_variant_info, model)", "Model"),
            variable("variant", 'label_values(quantgate_variant_info{model=~"$model"}, variant)', "Variant"),
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }  # fmt: skip


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")


if __name__ == "__main__":
    main()
