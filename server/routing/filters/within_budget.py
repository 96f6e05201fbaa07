"""Keep variants predicted to meet every bound of the request's budget. A variant with no latency
priors yet cannot be predicted to meet anything, so it is dropped when there is a budget."""

from __future__ import annotations

from server.routing.plugin import PluginConfig
from server.routing.types import Candidate, RequestFeatures


class WithinBudgetFilter:
    name = "within-budget"

    class Config(PluginConfig):
        pass

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def keep(self, candidate: Candidate, features: RequestFeatures) -> bool:
        if not features.budget.any:
            return True
        return candidate.prediction is not None and candidate.prediction.fits(features.budget)
