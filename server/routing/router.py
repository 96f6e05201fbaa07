"""The router: filters -> scorers -> picker over frozen candidate snapshots; returns a Decision.

    eligible = candidates that pass every `filters.eligible` filter (default: healthy, quality floor)
    preferred = eligible ones that pass every `filters.preferred` filter (default: shared device, which
                holds back the standby rungs of a shared device that may not take it now:
                server/routing/concentrate.py); every eligible one when that leaves none
    fitting  = preferred ones that pass every `filters.fitting` filter (default: within budget)
    fitting non-empty -> the fitting variants scored and ordered by the picker (default: max score)
    else, policy degrade -> the fastest preferred variant (header says degraded)
          policy reject  -> no variant; Retry-After from the predicted queue drain

It does no I/O; the gateway builds the snapshots and acts on the Decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.catalog import accuracy_key
from server.routing.config import PluginSpec, RoutingConfig
from server.routing.plugin import Filter
from server.routing.plugins import build, build_scorer
from server.routing.types import Candidate, Decision, RequestFeatures

UNKNOWN_DRAIN_S = 5  # Retry-After when no candidate has a prediction to drain from


class Router:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self.eligibility = self._filters(config.filters.eligible)
        self.preference = self._filters(config.filters.preferred)
        self.fit = self._filters(config.filters.fitting)
        self.picker = build("picker", config.picker.name, config.picker.parameters)
        self.scorers = {
            tier: [(build_scorer(name, spec.parameters), spec.weight)
                   for name, spec in config.scorers_for(tier).items() if spec.weight > 0]
            for tier in config.tiers
        }  # fmt: skip

    def route(self, features: RequestFeatures, candidates: Sequence[Candidate]) -> Decision:
        eligible = _passing(candidates, self.eligibility, features)
        if not eligible:
            return Decision(None, None, "no-variant", "none")
        preferred = _passing(eligible, self.preference, features) or eligible
        held_back = _fastest_first([c for c in eligible if c not in preferred])  # last in the retry order
        fitting = _passing(preferred, self.fit, features)
        if fitting:
            ranked = self._rank(fitting, features)
            rest = _fastest_first([c for c in preferred if c not in fitting]) + held_back
            best, _ = ranked[0]
            within = features.budget.any
            return Decision(best.variant, best.prediction, "within-budget" if within else "no-budget",
                            "met-predicted" if within else "none",
                            fallbacks=tuple(c for c, _ in ranked[1:]) + tuple(rest),
                            scores=tuple((c.variant.id, s) for c, s in ranked))  # fmt: skip
        if self.config.policy_for(features.tier) == "reject":
            return Decision(None, None, "rejected", "none", retry_after_s=self._retry_after(eligible))
        fastest = _fastest_first(preferred) + held_back
        return Decision(fastest[0].variant, fastest[0].prediction, "degraded", "degraded",
                        fallbacks=tuple(fastest[1:]))

    def _filters(self, specs: tuple[PluginSpec, ...]) -> tuple[Filter, ...]:
        return tuple(build("filter", spec.name, self.config.filter_parameters(spec)) for spec in specs)

    def _rank(self, candidates: list[Candidate], features: RequestFeatures) -> list[tuple[Candidate, float]]:
        scorers = self.scorers.get(features.tier) or self.scorers["default"]
        scored = [(c, sum(w * s.score(c, features, candidates) for s, w in scorers)) for c in candidates]
        return self.picker.order(scored)

    def _retry_after(self, eligible: list[Candidate]) -> int:
        drains = [(c.prediction.e2e_ms - c.prediction.idle_e2e_ms) / 1000 for c in eligible if c.prediction]
        seconds = math.ceil(min(drains)) if drains else UNKNOWN_DRAIN_S
        return min(max(seconds, 1), self.config.max_retry_after_s)


def _passing(candidates: Sequence[Candidate], filters: tuple[Filter, ...], features: RequestFeatures) -> list[Candidate]:
    return [c for c in candidates if all(f.keep(c, features) for f in filters)]


def _fastest_first(candidates: list[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (c.prediction is None,
                                             c.prediction.e2e_ms if c.prediction else 0.0,
                                             accuracy_key(c.variant)))  # fmt: skip
