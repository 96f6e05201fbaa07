"""The pickers: order the scored candidates, best first (the first is picked, the rest are the
retry order). Chosen by `RoutingConfig.picker` from the registry in `plugins.py`."""

from __future__ import annotations

import random

from pydantic import Field

from server.catalog import accuracy_key
from server.routing.plugin import PluginConfig
from server.routing.types import Candidate

TIE = 1e-9


class MaxScorePicker:
    """Highest total score first; near-equal scores go to the more accurate variant."""

    name = "max-score"

    class Config(PluginConfig):
        pass

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def order(self, scored: list[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
        return sorted(scored, key=lambda cs: (-round(cs[1] / TIE) * TIE, accuracy_key(cs[0].variant)))


class RandomPicker:
    """Uniformly at random among the candidates left after the filters, scores ignored: the baseline a
    policy is measured against (llm-d's random picker). `seed` makes the order reproducible."""

    name = "random"

    class Config(PluginConfig):
        seed: int | None = Field(None, ge=0, description="seed of the picker's own generator (None: from the OS)")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self._random = random.Random(self.config.seed)

    def order(self, scored: list[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]:
        shuffled = list(scored)
        self._random.shuffle(shuffled)
        return shuffled
