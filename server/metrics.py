"""Gateway metrics (Prometheus naming: quantgate_ prefix, base units), one registry per app."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.catalog import Catalog
from server.engines.base import EngineState, EngineStatus
from server.registry.store import Registry, VariantState
from server.telemetry.engine_load import EngineGauges

logger = logging.getLogger(__name__)
JOB_STATES = ("running", "succeeded", "failed", "interrupted")

# Latency buckets from 5 ms to 2 min: CPU engines are slow, GPU ones fast.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class _Children:
    """`labels()` that finds a child once per label set: prometheus_client checks the names, converts
    the values and takes a lock on every call, and the gateway makes about ten calls per proxied
    request (loadtests/results/2026-12-05/overhead-fake-cpu.md, the profile). Nothing here calls
    `remove()` or `clear()`, which would leave this cache pointing at dropped children."""

    _labelnames: tuple[str, ...]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._found: dict[tuple, Any] = {}

    def labels(self, *values: object, **by_name: object) -> Any:
        try:
            key = values or tuple(by_name[name] for name in self._labelnames)
            return self._found[key]
        except KeyError:  # a new label set (found and kept), or a name it lacks (prometheus_client raises)
            child = super().labels(*values, **by_name)  # type: ignore[misc]
        self._found[key] = child
        return child


class _Counter(_Children, Counter):
    pass


class _Gauge(_Children, Gauge):
    pass


class _Histogram(_Children, Histogram):
    pass


class _EngineCollector(Collector):
    """Engine up/restarts and scraped load, read at scrape time (no bookkeeping to drift)."""

    def __init__(self, statuses: Callable[[], Iterable[EngineStatus]],
                 load: Callable[[], dict[str, EngineGauges]] | None = None) -> None:
        self._statuses = statuses
        self._load = load

    def collect(self):
        up = GaugeMetricFamily("quantgate_engine_up", "1 when the variant's engine is serving",
                               labels=["variant", "kind"])
        state = GaugeMetricFamily("quantgate_engine_state", "1 for the engine's current state",
                                  labels=["variant", "state"])
        restarts = CounterMetricFamily("quantgate_engine_restarts", "engine restarts after a crash",
                                       labels=["variant"])
        for status in self._statuses():
            up.add_metric([status.variant_id, status.kind], 1.0 if status.serving else 0.0)
            for candidate in EngineState:
                state.add_metric([status.variant_id, candidate.value], float(candidate is status.state))
            restarts.add_metric([status.variant_id], float(status.restarts))
        yield from (up, state, restarts)
        if self._load is not None:
            yield from _load_families(self._load())


def _load_families(load: dict[str, EngineGauges]) -> list[GaugeMetricFamily]:
    running = GaugeMetricFamily("quantgate_engine_requests_running", "vllm:num_requests_running as last scraped",
                                labels=["variant"])
    waiting = GaugeMetricFamily("quantgate_engine_requests_waiting", "vllm:num_requests_waiting as last scraped",
                                labels=["variant"])
    kv = GaugeMetricFamily("quantgate_engine_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc as last scraped",
                           labels=["variant"])
    for variant_id, gauges in load.items():
        running.add_metric([variant_id], gauges.running)
        waiting.add_metric([variant_id], gauges.waiting)
        kv.add_metric([variant_id], gauges.kv_usage)
    return [running, waiting, kv]


class _CatalogCollector(Collector):
    """What each variant is (method, bits, size, quality) and what the registry is doing, read at
    scrape time from the catalog and the SQLite registry."""

    def __init__(self, catalog: Catalog, registry: Registry | None,
                 build_progress: Callable[[], dict[str, dict]] | None = None) -> None:
        self._catalog = catalog
        self._registry = registry
        self._build_progress = build_progress

    def collect(self):
        info = GaugeMetricFamily("quantgate_variant_info", "1 per variant, with what it is",
                                 labels=["model", "variant", "method", "bits", "state"])
        size = GaugeMetricFamily("quantgate_variant_size_bytes", "weights on disk", labels=["model", "variant"])
        ppl = GaugeMetricFamily("quantgate_variant_ppl_delta_ratio",
                                "measured perplexity relative to the base, minus 1 (0.015 = +1.5 %)",
                                labels=["model", "variant"])
        for model in self._catalog.models():
            for v in model.variants:
                info.add_metric([model.name, v.id, v.method, str(v.bits), v.state], 1.0)
                if v.size_bytes is not None:
                    size.add_metric([model.name, v.id], float(v.size_bytes))
                if v.ppl_delta is not None:
                    ppl.add_metric([model.name, v.id], v.ppl_delta)
        yield from (info, size, ppl)
        if self._registry is None:
            return
        variants, jobs = self._registry.counts()
        by_state = GaugeMetricFamily("quantgate_registry_variants",
                                     "registry variants by state (rejected: below the quality gate; "
                                     "unsupported: this host's engine lacks the kernel)",
                                     labels=["model", "state"])
        for model in sorted({m for m, _ in variants}):
            for state in VariantState:
                by_state.add_metric([model, state.value], float(variants.get((model, state.value), 0)))
        job_family = GaugeMetricFamily("quantgate_registry_jobs", "compression/evaluation jobs by state",
                                       labels=["state"])
        for state in JOB_STATES:
            job_family.add_metric([state], float(jobs.get(state, 0)))
        running = GaugeMetricFamily("quantgate_registry_job_running_seconds",
                                    "how long each running job has been at it, by its current stage",
                                    labels=["variant", "stage"])
        now = time.time()
        for job in self._registry.running_jobs():
            running.add_metric([job.variant_id, job.stage], now - job.started_at)
        yield from (by_state, job_family, running)
        if self._build_progress is not None:
            yield from _progress_families(self._build_progress())


def _progress_families(views: dict[str, dict]) -> list[GaugeMetricFamily]:
    """The build in progress (server/registry/progress.py): its phase, fraction done and ETA."""
    fraction = GaugeMetricFamily("quantgate_variant_build_progress_ratio",
                                 "fraction of the build's current phase done (calibrating reports one)",
                                 labels=["variant", "phase"])
    eta = GaugeMetricFamily("quantgate_variant_build_eta_seconds",
                            "time left in the build's current phase, at its measured rate",
                            labels=["variant", "phase"])
    for variant_id, view in views.items():
        if view["fraction"] is not None:
            fraction.add_metric([variant_id, view["phase"]], view["fraction"])
        if view["eta_s"] is not None:
            eta.add_metric([variant_id, view["phase"]], view["eta_s"])
    return [fraction, eta]


class _MemoryCollector(Collector):
    """Memory per variant (the engine's process tree RSS; GPU memory where NVML answers) and the host's."""

    def __init__(self, statuses: Callable[[], Iterable[EngineStatus]]) -> None:
        self._statuses = statuses
        self._nvml = _nvml()

    def collect(self):
        engine = GaugeMetricFamily("quantgate_engine_memory_bytes",
                                   "memory held by the variant's engine processes (rss: resident, gpu: device)",
                                   labels=["variant", "kind"])
        gpu_by_pid = self._gpu_by_pid()
        for status in self._statuses():
            if status.pid is None:
                continue
            pids = _process_tree(status.pid)
            if pids:
                engine.add_metric([status.variant_id, "rss"], float(sum(rss for _, rss in pids)))
            if gpu_by_pid:
                engine.add_metric([status.variant_id, "gpu"], float(sum(gpu_by_pid.get(p, 0) for p, _ in pids)))
        host = GaugeMetricFamily("quantgate_host_memory_bytes", "the host's memory", labels=["kind"])
        vm = psutil.virtual_memory()
        host.add_metric(["total"], float(vm.total))
        host.add_metric(["available"], float(vm.available))
        yield from (engine, host)

    def _gpu_by_pid(self) -> dict[int, int]:
        if self._nvml is None:
            return {}
        used: dict[int, int] = {}
        try:
            for index in range(self._nvml.nvmlDeviceGetCount()):
                handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used[proc.pid] = used.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        except Exception as exc:  # noqa: BLE001 - a metrics scrape must not fail on NVML
            logger.debug("NVML query failed: %s", exc)
        return used


def _nvml():
    """pynvml (nvidia-ml-py, which vllm depends on) when a GPU driver answers, else None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - no module, no driver, no GPU: all mean "no GPU numbers"
        return None


def _process_tree(pid: int) -> list[tuple[int, int]]:
    """(pid, rss) of a process and its descendants (vLLM runs the model in a child process)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for proc in procs:
        try:
            out.append((proc.pid, proc.memory_info().rss))
        except psutil.Error:
            continue
    return out


class GatewayMetrics:
    def __init__(self, engine_statuses: Callable[[], Iterable[EngineStatus]],
                 engine_load: Callable[[], dict[str, EngineGauges]] | None = None,
                 catalog: Catalog | None = None, registry: Registry | None = None,
                 build_progress: Callable[[], dict[str, dict]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = _Counter(
            "quantgate_requests", "requests answered, by outcome",
            ["model", "variant", "endpoint", "tier", "status"], registry=r,
        )  # fmt: skip
        self.e2e = _Histogram(
            "quantgate_request_duration_seconds", "end-to-end latency of successful requests",
            ["model", "variant", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = _Histogram(
            "quantgate_time_to_first_token_seconds", "time to the first streamed token",
            ["model", "variant"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = _Histogram(
            "quantgate_inter_token_seconds", "time between streamed chunks",
            ["model", "variant"], buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = _Histogram(
            "quantgate_gateway_overhead_seconds", "time spent in the gateway before the upstream call",
            ["endpoint"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1), registry=r,
        )  # fmt: skip
        self.in_flight = _Gauge(
            "quantgate_in_flight_requests", "requests being served, per variant", ["variant"], registry=r
        )
        self.tokens = _Counter(
            "quantgate_tokens", "tokens processed, from the engines' usage reports",
            ["model", "variant", "kind"], registry=r,
        )  # fmt: skip
        self.decisions = _Counter(
            "quantgate_routing_decisions", "routing decisions, by the reason the variant was chosen",
            ["model", "variant", "reason"], registry=r,
        )  # fmt: skip
        self.budget_outcomes = _Counter(
            "quantgate_budget_outcomes",
            "requests with a latency budget: met or missed as measured, or rejected up front",
            ["model", "variant", "decision", "outcome"], registry=r,
        )  # fmt: skip
        self.predictor_error = _Histogram(
            "quantgate_predictor_error_ratio", "observed / predicted latency of routed requests",
            ["variant", "kind"], buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4), registry=r,
        )  # fmt: skip
        self.rung_switches = _Counter(
            "quantgate_rung_switches", "a shared device's active rung changed (server/routing/concentrate.py)",
            ["model", "device", "to"], registry=r,
        )  # fmt: skip
        self.active_rung = _Gauge(
            "quantgate_active_rung", "1 for the active rung of a shared device, 0 for its other rungs",
            ["model", "device", "variant"], registry=r,
        )  # fmt: skip
        self.retries = _Counter(
            "quantgate_upstream_retries", "requests moved to another variant before any byte was sent",
            ["model", "variant"], registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(engine_statuses, engine_load))
        r.register(_MemoryCollector(engine_statuses))
        if catalog is not None:
            r.register(_CatalogCollector(catalog, registry, build_progress))
        ProcessCollector(namespace="quantgate", registry=r)  # the gateway's own CPU, RSS, open fds
