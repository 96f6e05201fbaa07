"""Every routing plugin, in one plain list. Opinions live in the plugins, not in the router."""

from __future__ import annotations

from typing import Any

from server.routing.filters.healthy import HealthyFilter
from server.routing.filters.quality_floor import QualityFloorFilter
from server.routing.filters.shared_device import SharedDeviceFilter
from server.routing.filters.within_budget import WithinBudgetFilter
from server.routing.scorers.cost import CostScorer
from server.routing.scorers.headroom import HeadroomScorer
from server.routing.scorers.load import LoadScorer
from server.routing.scorers.quality import QualityScorer

FILTERS = {f.name: f for f in (HealthyFilter, QualityFloorFilter, SharedDeviceFilter, WithinBudgetFilter)}
SCORERS = {s.name: s for s in (QualityScorer, HeadroomScorer, LoadScorer, CostScorer)}


def build_scorer(name: str, parameters: dict[str, Any]) -> Any:
    """The scorer `name` with its parameters checked by its own Config (ValueError if unknown)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}")
    plugin = SCORERS[name]
    return plugin(plugin.Config(**parameters))
