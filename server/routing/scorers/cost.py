"""Cost: smaller variants are cheaper to serve. 1 for the smallest candidate, falling with size
relative to the largest (bits when sizes are not all known). Used by the `flex` tier."""

from __future__ import annotations

from collections.abc import Sequence

from server.routing.plugin import PluginConfig, clamp01
from server.routing.types import Candidate, RequestFeatures


class CostScorer:
    name = "cost"

    class Config(PluginConfig):
        pass

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def score(self, candidate: Candidate, features: RequestFeatures, candidates: Sequence[Candidate]) -> float:
        sized = all(c.variant.size_bytes for c in candidates)
        cost = {c.variant.id: float(c.variant.size_bytes if sized else c.variant.bits) for c in candidates}
        low, high = min(cost.values()), max(cost.values())
        if high == low:
            return 1.0
        return clamp01((high - cost[candidate.variant.id]) / (high - low))
