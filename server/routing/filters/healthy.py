"""Keep variants that may take traffic (registry state) and whose engine is serving now."""

from __future__ import annotations

from server.routing.plugin import PluginConfig
from server.routing.types import Candidate, RequestFeatures


class HealthyFilter:
    name = "healthy"

    class Config(PluginConfig):
        pass

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def keep(self, candidate: Candidate, features: RequestFeatures) -> bool:
        return candidate.serving and candidate.variant.servable
