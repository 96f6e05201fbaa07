"""What a routing plugin is. Each plugin lives in its own file with its own `Config`
(defaults checked when it is built); `plugins.py` lists them all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from server.routing.types import Candidate, RequestFeatures


class PluginConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Filter(Protocol):
    name: str

    def keep(self, candidate: Candidate, features: RequestFeatures) -> bool: ...


class Scorer(Protocol):
    """Scores a candidate in [0, 1]; higher is better. Sees the whole candidate set so that
    relative scores (cost against the largest variant) need no global state."""

    name: str

    def score(self, candidate: Candidate, features: RequestFeatures, candidates: Sequence[Candidate]) -> float: ...


class Picker(Protocol):
    """Orders the scored candidates that passed every filter, best first: the first is picked, the
    rest are the retry order."""

    name: str

    def order(self, scored: list[tuple[Candidate, float]]) -> list[tuple[Candidate, float]]: ...


def clamp01(value: float) -> float:
    return 0.0 if value < 0.0 else min(value, 1.0)
