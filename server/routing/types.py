"""The frozen data that crosses between the gateway (mechanism) and the router (policy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.catalog import Variant

Tier = Literal["auto", "default", "flex", "priority"]
BudgetStatus = Literal["met-predicted", "degraded", "none"]


@dataclass(frozen=True)
class Budget:
    """What the request may take, in milliseconds; None where it set no bound."""

    e2e_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    source: str = "none"  # "request", "tier", or "none"

    @property
    def any(self) -> bool:
        return self.e2e_ms is not None or self.ttft_ms is not None or self.tpot_ms is not None

    def met_by(self, ttft_ms: float | None, tpot_ms: float | None, e2e_ms: float | None) -> bool:
        """Whether latencies meet every bound set; a bound whose latency is unknown counts as met."""
        checks = ((self.e2e_ms, e2e_ms), (self.ttft_ms, ttft_ms), (self.tpot_ms, tpot_ms))
        return all(bound is None or value is None or value <= bound for bound, value in checks)


@dataclass(frozen=True)
class RequestFeatures:
    prompt_tokens: int  # estimated; the gateway does not tokenize on the request path
    output_tokens: int  # max_tokens when given, else the model's observed completion-length quantile
    budget: Budget
    tier: Tier = "default"


@dataclass(frozen=True)
class EngineLoad:
    """Live load of one engine: the gateway's own count plus the engine's scraped gauges."""

    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    # Other engines on the same device (local engines share this host's CPU cores or GPU; remote
    # ones the device their spec names) that are busy now: they take their share of the compute
    # this engine was profiled with alone.
    device_peers_busy: int = 0
    device: str = ""  # the device group (EngineStatus.device); "" when unknown
    # Of `in_flight`, the streamed requests that have had no first token yet, and their prompt tokens (the
    # gateway sees each stream's first chunk, so this is never a scrape old): prefills this one waits behind.
    prefilling: int = 0
    prefill_tokens: int = 0

    @property
    def queue(self) -> int:
        """Requests ahead of a new one: the engine's view, or the gateway's when that is fresher."""
        return max(self.in_flight, self.running + self.waiting)

    @property
    def idle(self) -> bool:
        """Nothing on this engine and no busy engine beside it on its device."""
        return self.queue == 0 and self.device_peers_busy == 0


@dataclass(frozen=True)
class Prediction:
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    idle_e2e_ms: float  # the same request on an idle engine: the gap is the predicted queueing

    def fits(self, budget: Budget) -> bool:
        return budget.met_by(self.ttft_ms, self.tpot_ms, self.e2e_ms)


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    serving: bool
    load: EngineLoad = field(default_factory=EngineLoad)
    prediction: Prediction | None = None  # None until the variant has latency priors
    # Another rung of this candidate's device is the active one (server/routing/concentrate.py);
    # with the device's recent arrival rate, for the cost of taking a request anyway.
    standby: bool = False
    device_rate_rps: float = 0.0


@dataclass(frozen=True)
class Decision:
    variant: Variant | None
    prediction: Prediction | None
    reason: str  # most-accurate, within-budget, degraded, rejected, no-variant, pinned
    budget_status: BudgetStatus
    fallbacks: tuple[Candidate, ...] = ()  # retried in this order if the chosen engine fails first
    retry_after_s: int | None = None  # set when rejected
    scores: tuple[tuple[str, float], ...] = ()  # variant id -> total score, for the admin view
