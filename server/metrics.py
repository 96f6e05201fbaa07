"""Gateway metrics (Prometheus naming: quantgate_ prefix, base units), one registry per app."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engines.base import EngineState, EngineStatus
from server.telemetry.engine_load import EngineGauges

# Latency buckets from 5 ms to 2 min: CPU engines are slow, GPU ones fast.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


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


class GatewayMetrics:
    def __init__(self, engine_statuses: Callable[[], Iterable[EngineStatus]],
                 engine_load: Callable[[], dict[str, EngineGauges]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "quantgate_requests", "requests answered, by outcome",
            ["model", "variant", "endpoint", "status"], registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "quantgate_request_duration_seconds", "end-to-end latency of successful requests",
            ["model", "variant", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "quantgate_time_to_first_token_seconds", "time to the first streamed token",
            ["model", "variant"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "quantgate_inter_token_seconds", "time between streamed chunks",
            ["model", "variant"], buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "quantgate_gateway_overhead_seconds", "time spent in the gateway before the upstream call",
            ["endpoint"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1), registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "quantgate_in_flight_requests", "requests being served, per variant", ["variant"], registry=r
        )
        self.tokens = Counter(
            "quantgate_tokens", "tokens processed, from the engines' usage reports",
            ["model", "variant", "kind"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "quantgate_routing_decisions", "routing decisions, by the reason the variant was chosen",
            ["model", "variant", "reason"], registry=r,
        )  # fmt: skip
        self.budget_outcomes = Counter(
            "quantgate_budget_outcomes",
            "requests with a latency budget: met or missed as measured, or rejected up front",
            ["model", "variant", "decision", "outcome"], registry=r,
        )  # fmt: skip
        self.predictor_error = Histogram(
            "quantgate_predictor_error_ratio", "observed / predicted latency of routed requests",
            ["variant", "kind"], buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4), registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "quantgate_upstream_retries", "requests moved to another variant before any byte was sent",
            ["model", "variant"], registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(engine_statuses, engine_load))
