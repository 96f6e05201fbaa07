"""Every routing plugin, in one registry (as llm-d's register.go): filters, scorers and pickers by
name, each built with its parameters checked by its own Config. Opinions live in the plugins, not in
the router; `RoutingConfig` says which run where."""

from __future__ import annotations

from typing import Any, Literal

from server.routing.filters.healthy import HealthyFilter
from server.routing.filters.max_queue import MaxQueueFilter
from server.routing.filters.quality_floor import QualityFloorFilter
from server.routing.filters.shared_device import SharedDeviceFilter
from server.routing.filters.within_budget import WithinBudgetFilter
from server.routing.picker import MaxScorePicker, RandomPicker
from server.routing.scorers.cost import CostScorer
from server.routing.scorers.headroom import HeadroomScorer
from server.routing.scorers.load import LoadScorer
from server.routing.scorers.quality import QualityScorer

Kind = Literal["filter", "scorer", "picker"]

FILTERS = {f.name: f for f in (HealthyFilter, QualityFloorFilter, SharedDeviceFilter, WithinBudgetFilter,
                                MaxQueueFilter)}  # fmt: skip
SCORERS = {s.name: s for s in (QualityScorer, HeadroomScorer, LoadScorer, CostScorer)}
PICKERS = {p.name: p for p in (MaxScorePicker, RandomPicker)}
REGISTRY: dict[Kind, dict[str, Any]] = {"filter": FILTERS, "scorer": SCORERS, "picker": PICKERS}


def build(kind: Kind, name: str, parameters: dict[str, Any]) -> Any:
    """The `kind` plugin `name` with its parameters checked by its own Config (ValueError if unknown,
    pydantic's ValidationError if a parameter is)."""
    known = REGISTRY[kind]
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(known)}")
    plugin = known[name]
    return plugin(plugin.Config(**parameters))


def build_scorer(name: str, parameters: dict[str, Any]) -> Any:
    return build("scorer", name, parameters)
