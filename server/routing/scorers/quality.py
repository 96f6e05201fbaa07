"""Quality: 1 for the base, falling linearly to 0 at `scale` relative perplexity increase."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from server.routing.plugin import PluginConfig, clamp01
from server.routing.types import Candidate, RequestFeatures


class QualityScorer:
    name = "quality"

    class Config(PluginConfig):
        scale: float = Field(0.30, gt=0.0, le=100.0, description="ppl delta that scores 0")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def score(self, candidate: Candidate, features: RequestFeatures, candidates: Sequence[Candidate]) -> float:
        variant = candidate.variant
        if variant.is_base:
            return 1.0
        if variant.ppl_delta is None:
            return 0.0
        return clamp01(1.0 - max(variant.ppl_delta, 0.0) / self.config.scale)
