"""What the gateway learns from each answered request: metrics, the budget outcome measured
against the real latency, the latency predictor's online correction, completion lengths."""

from __future__ import annotations

from dataclasses import dataclass

from server.catalog import Variant
from server.metrics import GatewayMetrics
from server.routing.predictor import LatencyBook, RawPrediction
from server.routing.types import Budget, Decision, Prediction


@dataclass(frozen=True)
class Call:
    """One attempt of one request on one variant, with what was predicted for it."""

    model: str
    endpoint: str
    variant: Variant
    decision: Decision
    budget: Budget
    prediction: Prediction | None
    raw: RawPrediction | None  # uncorrected (TTFT, TPOT) ms the prediction came from, and on what load
    started: float  # time.perf_counter() when the request arrived
    tier: str = "default"

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.model, "variant": self.variant.id, "endpoint": self.endpoint}

    @property
    def request_labels(self) -> dict[str, str]:
        """quantgate_requests_total's labels, less the status."""
        return {**self.labels, "tier": self.tier}


@dataclass(frozen=True)
class Observed:
    e2e_s: float
    ttft_s: float | None  # streamed requests only
    tpot_s: float | None  # mean gap between streamed chunks
    completion_tokens: int | None
    # Whether no other request reached the device before this one's first token / its end; a request
    # routed to an idle device that was then joined is not an idle observation (routing/predictor.py).
    alone_to_first_token: bool = True
    alone_to_end: bool = True


class Observations:
    def __init__(self, metrics: GatewayMetrics, book: LatencyBook) -> None:
        self.metrics = metrics
        self.book = book

    def record(self, call: Call, seen: Observed) -> None:
        m = self.metrics
        m.e2e.labels(**call.labels).observe(seen.e2e_s)
        if seen.ttft_s is not None:
            m.ttft.labels(call.model, call.variant.id).observe(seen.ttft_s)
        if seen.completion_tokens:
            self.book.completion_lengths(call.model).add(seen.completion_tokens)
        self._budget_outcome(call, seen)
        self._learn(call, seen)

    def rejected(self, model: str) -> None:
        self.metrics.budget_outcomes.labels(model, "", "rejected", "rejected").inc()

    def _budget_outcome(self, call: Call, seen: Observed) -> None:
        if not call.budget.any:
            return
        # Unstreamed, the client's first token arrives with the whole answer.
        ttft = seen.ttft_s if seen.ttft_s is not None else seen.e2e_s
        met = call.budget.met_by(ttft * 1000, None if seen.tpot_s is None else seen.tpot_s * 1000, seen.e2e_s * 1000)
        self.metrics.budget_outcomes.labels(call.model, call.variant.id, call.decision.budget_status,
                                            "met" if met else "missed").inc()  # fmt: skip

    def _learn(self, call: Call, seen: Observed) -> None:
        latency, prediction = self.book.get(call.variant.id), call.prediction
        if latency is None or prediction is None or call.raw is None:
            return
        raw_ttft, raw_tpot, idle = call.raw.ttft_ms, call.raw.tpot_ms, call.raw.idle
        ttft_ms = None if seen.ttft_s is None else seen.ttft_s * 1000
        tpot_ms = None if seen.tpot_s is None else seen.tpot_s * 1000
        if tpot_ms is None and seen.completion_tokens and seen.completion_tokens > 1:
            # Unstreamed: what is left after the predicted TTFT, per generated token.
            tpot_ms = max(seen.e2e_s * 1000 - prediction.ttft_ms, 0.0) / (seen.completion_tokens - 1)
        # Routed idle, then joined: neither an idle observation nor one of the load it was routed on.
        learn_ttft = ttft_ms if not idle or seen.alone_to_first_token else None
        learn_tpot = tpot_ms if not idle or seen.alone_to_end else None
        latency.observe(raw_ttft, learn_ttft, raw_tpot, learn_tpot, idle=idle)
        error = self.metrics.predictor_error
        if ttft_ms is not None and prediction.ttft_ms > 0:
            error.labels(call.variant.id, "ttft").observe(ttft_ms / prediction.ttft_ms)
        if tpot_ms is not None and prediction.tpot_ms > 0:
            error.labels(call.variant.id, "tpot").observe(tpot_ms / prediction.tpot_ms)
        if seen.completion_tokens:
            # Against the prediction for the length actually generated (max_tokens is an upper bound).
            predicted = prediction.ttft_ms + (seen.completion_tokens - 1) * prediction.tpot_ms
            error.labels(call.variant.id, "e2e").observe(seen.e2e_s * 1000 / predicted)
