"""Headroom: the fraction of the budget left over by the prediction (the tightest bound counts).
Without a budget every candidate scores 1; without a prediction 0."""

from __future__ import annotations

from collections.abc import Sequence

from server.routing.plugin import PluginConfig, clamp01
from server.routing.types import Candidate, RequestFeatures


class HeadroomScorer:
    name = "headroom"

    class Config(PluginConfig):
        pass

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def score(self, candidate: Candidate, features: RequestFeatures, candidates: Sequence[Candidate]) -> float:
        budget, prediction = features.budget, candidate.prediction
        if not budget.any:
            return 1.0
        if prediction is None:
            return 0.0
        pairs = ((budget.e2e_ms, prediction.e2e_ms), (budget.ttft_ms, prediction.ttft_ms),
                 (budget.tpot_ms, prediction.tpot_ms))  # fmt: skip
        return min(clamp01((bound - value) / bound) for bound, value in pairs if bound is not None)
