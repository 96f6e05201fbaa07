"""Load: prefers engines with short queues and free KV cache (llm-d's queue and KV-utilisation
scorers, folded into one). A queue of `scale` requests halves the queue part."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from server.routing.plugin import PluginConfig, clamp01
from server.routing.types import Candidate, RequestFeatures


class LoadScorer:
    name = "load"

    class Config(PluginConfig):
        scale: float = Field(8.0, gt=0.0, description="queue length that halves the queue score")
        kv_weight: float = Field(0.5, ge=0.0, le=1.0, description="share of the score from free KV cache")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def score(self, candidate: Candidate, features: RequestFeatures, candidates: Sequence[Candidate]) -> float:
        load, c = candidate.load, self.config
        queue_part = 1.0 / (1.0 + load.queue / c.scale)
        return clamp01((1.0 - c.kv_weight) * queue_part + c.kv_weight * (1.0 - load.kv_usage))
