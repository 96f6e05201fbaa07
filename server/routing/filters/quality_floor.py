"""Keep variants within the model's routing quality floor (relative perplexity increase).

The registry already refuses to serve variants past the model's `max_ppl_delta`; this floor is
the routing policy's own, possibly stricter, bound. The base variant is the reference and always
passes; a variant with no measured delta never does."""

from __future__ import annotations

from pydantic import Field

from server.routing.plugin import PluginConfig
from server.routing.types import Candidate, RequestFeatures


class QualityFloorFilter:
    name = "quality-floor"

    class Config(PluginConfig):
        max_ppl_delta: float | None = Field(None, ge=0.0, le=100.0)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def keep(self, candidate: Candidate, features: RequestFeatures) -> bool:
        variant = candidate.variant
        if variant.is_base:
            return True
        if self.config.max_ppl_delta is None:
            return True
        return variant.ppl_delta is not None and variant.ppl_delta <= self.config.max_ppl_delta
