"""Routing policy, table-driven: each filter, scorer, the picker and the router (no network)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.catalog import Variant
from server.registry.store import VariantState
from server.routing.config import RoutingConfig
from server.routing.filters.healthy import HealthyFilter
from server.routing.filters.quality_floor import QualityFloorFilter
from server.routing.filters.within_budget import WithinBudgetFilter
from server.routing.picker import MaxScorePicker
from server.routing.router import Router
from server.routing.scorers.cost import CostScorer
from server.routing.scorers.headroom import HeadroomScorer
from server.routing.scorers.load import LoadScorer
from server.routing.scorers.quality import QualityScorer
from server.routing.types import Budget, Candidate, EngineLoad, Prediction, RequestFeatures

BASE = Variant("m", "bf16", "base", 16, size_bytes=270)
INT8 = Variant("m", "int8", "int8", 8, size_bytes=160, ppl_delta=0.015)
INT4 = Variant("m", "int4", "int4-gptq", 4, size_bytes=110, ppl_delta=0.21)
UNMEASURED = Variant("m", "new", "awq", 4, state=VariantState.EVALUATING)


def pred(e2e: float, ttft: float = 50.0, tpot: float = 20.0, idle: float | None = None) -> Prediction:
    return Prediction(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e, idle_e2e_ms=e2e if idle is None else idle)


def cand(variant: Variant, e2e: float | None = None, serving: bool = True, load: EngineLoad | None = None,
         **kw: float) -> Candidate:  # fmt: skip
    return Candidate(variant, serving, load or EngineLoad(), None if e2e is None else pred(e2e, **kw))


def feats(e2e: float | None = None, ttft: float | None = None, tpot: float | None = None,
          tier: str = "default") -> RequestFeatures:  # fmt: skip
    budget = Budget(e2e, ttft, tpot, "request") if (e2e or ttft or tpot) else Budget()
    return RequestFeatures(prompt_tokens=32, output_tokens=64, budget=budget, tier=tier)


# --- filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(("candidate", "kept"), [
    (cand(BASE), True),
    (cand(BASE, serving=False), False),
    (cand(UNMEASURED), False),  # evaluating and not the base: not servable
    # the base serves while it is measured
    (cand(Variant("m", "bf16", "base", 16, state=VariantState.EVALUATING)), True),
])  # fmt: skip
def test_healthy_filter(candidate: Candidate, kept: bool) -> None:
    assert HealthyFilter().keep(candidate, feats()) is kept


@pytest.mark.parametrize(("floor", "variant", "kept"), [
    (None, INT4, True), (0.1, INT4, False), (0.1, INT8, True), (0.0, BASE, True),
    (0.5, Variant("m", "x", "awq", 4), False),  # no measured delta never passes a floor
])  # fmt: skip
def test_quality_floor_filter(floor: float | None, variant: Variant, kept: bool) -> None:
    f = QualityFloorFilter(QualityFloorFilter.Config(max_ppl_delta=floor))
    assert f.keep(cand(variant), feats()) is kept


@pytest.mark.parametrize(("candidate", "features", "kept"), [
    (cand(BASE, 900), feats(e2e=1000), True),
    (cand(BASE, 1100), feats(e2e=1000), False),
    (cand(BASE, 900, ttft=300), feats(e2e=1000, ttft=200), False),
    (cand(BASE, 900, tpot=30), feats(tpot=25), False),
    (cand(BASE), feats(e2e=1000), False),  # no priors: cannot be predicted to fit
    (cand(BASE), feats(), True),  # no budget: everything fits
])  # fmt: skip
def test_within_budget_filter(candidate: Candidate, features: RequestFeatures, kept: bool) -> None:
    assert WithinBudgetFilter().keep(candidate, features) is kept


# --- scorers -------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "score"), [
    (BASE, 1.0), (INT8, 0.95), (INT4, 0.3), (Variant("m", "x", "awq", 4, ppl_delta=0.6), 0.0),
    (Variant("m", "x", "awq", 4), 0.0), (Variant("m", "x", "awq", 4, ppl_delta=-0.01), 1.0),
])  # fmt: skip
def test_quality_scorer(variant: Variant, score: float) -> None:
    assert QualityScorer().score(cand(variant), feats(), []) == pytest.approx(score)


@pytest.mark.parametrize(("candidate", "features", "score"), [
    (cand(BASE, 500), feats(), 1.0),
    (cand(BASE, 500), feats(e2e=1000), 0.5),
    (cand(BASE, 500, ttft=90), feats(e2e=1000, ttft=100), 0.1),  # the tightest bound counts
    (cand(BASE, 1500), feats(e2e=1000), 0.0),
    (cand(BASE), feats(e2e=1000), 0.0),
])  # fmt: skip
def test_headroom_scorer(candidate: Candidate, features: RequestFeatures, score: float) -> None:
    assert HeadroomScorer().score(candidate, features, [candidate]) == pytest.approx(score)


@pytest.mark.parametrize(("load", "score"), [
    (EngineLoad(), 1.0),
    (EngineLoad(running=8), 0.75),  # half the queue part
    (EngineLoad(in_flight=8, running=2), 0.75),  # the gateway's own count is fresher
    (EngineLoad(kv_usage=1.0), 0.5),
])  # fmt: skip
def test_load_scorer(load: EngineLoad, score: float) -> None:
    assert LoadScorer().score(cand(BASE, load=load), feats(), []) == pytest.approx(score)


def test_cost_scorer_prefers_small_variants() -> None:
    pool = [cand(BASE), cand(INT8), cand(INT4)]
    scores = [CostScorer().score(c, feats(), pool) for c in pool]
    assert scores[0] == 0.0 and scores[2] == 1.0 and 0 < scores[1] < 1


def test_picker_breaks_ties_towards_accuracy() -> None:
    ordered = MaxScorePicker().order([(cand(INT4), 0.5), (cand(BASE), 0.5), (cand(INT8), 0.7)])
    assert [c.variant.name for c, _ in ordered] == ["int8", "bf16", "int4"]


def test_scorer_config_is_checked_when_built() -> None:
    with pytest.raises(ValidationError, match="scale"):
        LoadScorer.Config(scale=0)
    with pytest.raises(ValidationError, match="unknown scorer 'speedy'"):
        RoutingConfig(scorers={"speedy": {"weight": 1}})
    with pytest.raises(ValidationError, match="kv_weight"):
        RoutingConfig(scorers={"load": {"weight": 1, "parameters": {"kv_weight": 3}}})
    with pytest.raises(ValidationError, match="at least one scorer"):
        RoutingConfig(tiers={"flex": {"scorers": {"cost": {"weight": 0}}}})


# --- the router ----------------------------------------------------------------------------

LADDER = [cand(BASE, 3000), cand(INT8, 2000), cand(INT4, 2500)]


@pytest.mark.parametrize(("features", "variant", "status", "reason"), [
    (feats(), "bf16", "none", "no-budget"),
    (feats(e2e=10_000), "bf16", "met-predicted", "within-budget"),  # loose: the most accurate
    (feats(e2e=2_600), "int8", "met-predicted", "within-budget"),  # tight: the accurate one that fits
    (feats(e2e=1_000), "int8", "degraded", "degraded"),  # nothing fits: the fastest
    (feats(tier="flex"), "int4", "none", "no-budget"),  # flex: the cheapest
    (feats(ttft=1000, tier="priority"), "bf16", "met-predicted", "within-budget"),
])  # fmt: skip
def test_router_decisions(features: RequestFeatures, variant: str, status: str, reason: str) -> None:
    decision = Router(RoutingConfig()).route(features, LADDER)
    assert (decision.variant.name, decision.budget_status, decision.reason) == (variant, status, reason)


def test_fallbacks_are_the_other_eligible_variants_fitting_first() -> None:
    decision = Router(RoutingConfig()).route(feats(e2e=2_600), LADDER)
    assert [c.variant.name for c in decision.fallbacks] == ["int4", "bf16"]


def test_quality_floor_keeps_poor_variants_out_even_when_degrading() -> None:
    decision = Router(RoutingConfig(quality_floor=0.1)).route(feats(e2e=100), [cand(BASE, 3000), cand(INT4, 500)])
    assert decision.variant.name == "bf16" and decision.budget_status == "degraded"


def test_a_growing_queue_shifts_the_choice() -> None:
    quiet = [cand(BASE, 3000), cand(INT8, 1500)]
    busy = [cand(BASE, 3000), cand(INT8, 4000, load=EngineLoad(running=16, waiting=8))]
    router = Router(RoutingConfig())
    assert router.route(feats(e2e=3500), quiet).variant.name == "bf16"  # both fit: accuracy wins
    assert router.route(feats(e2e=2000), quiet).variant.name == "int8"
    assert router.route(feats(e2e=3500), busy).variant.name == "bf16"


# --- filters and picker from the plugin registry --------------------------------------------


def test_filters_and_picker_are_configured_by_name_and_checked_when_built() -> None:
    config = RoutingConfig(filters={"preferred": ["shared-device", {"name": "max-queue",
                                                                      "parameters": {"max_queue": 4}}]},
                           picker="random")  # fmt: skip
    assert [s.name for s in config.filters.eligible] == ["healthy", "quality-floor"]  # defaults kept
    assert [s.name for s in config.filters.preferred] == ["shared-device", "max-queue"]
    assert config.picker.name == "random"
    with pytest.raises(ValidationError, match="unknown filter 'fastest'"):
        RoutingConfig(filters={"fitting": ["within-budget", "fastest"]})
    with pytest.raises(ValidationError, match=r"(?s)filters.preferred.max-queue.*max_queue"):
        RoutingConfig(filters={"preferred": [{"name": "max-queue", "parameters": {"max_queue": -1}}]})
    with pytest.raises(ValidationError, match="must include 'healthy'"):
        RoutingConfig(filters={"eligible": ["quality-floor"]})
    with pytest.raises(ValidationError, match="unknown picker 'best'"):
        RoutingConfig(picker="best")
    with pytest.raises(ValidationError, match="seed"):
        RoutingConfig(picker={"name": "random", "parameters": {"seed": "x"}})


def test_older_fields_feed_their_filters_and_a_spec_overrides_them() -> None:
    inherited = RoutingConfig(quality_floor=0.1)
    spec = inherited.filters.eligible[1]
    assert inherited.filter_parameters(spec) == {"max_ppl_delta": 0.1}
    overridden = RoutingConfig(quality_floor=0.1, filters={
        "eligible": ["healthy", {"name": "quality-floor", "parameters": {"max_ppl_delta": 0.5}}]})
    decision = Router(overridden).route(feats(e2e=600), [cand(BASE, 3000), cand(INT4, 500)])
    assert decision.variant.name == "int4"  # +21% passes the spec's 0.5 floor, not the field's 0.1


def test_max_queue_in_the_preferred_stage_passes_over_a_long_queue_while_another_has_room() -> None:
    router = Router(RoutingConfig(filters={"preferred": ["shared-device", {"name": "max-queue",
                                                                             "parameters": {"max_queue": 2}}]}))  # fmt: skip
    long_queue = EngineLoad(running=2, waiting=1)
    pool = [cand(BASE, 3000, load=long_queue), cand(INT8, 2000)]
    assert Router(RoutingConfig()).route(feats(e2e=3500), pool).variant.name == "bf16"  # default: accuracy
    decision = router.route(feats(e2e=3500), pool)
    assert decision.variant.name == "int8" and [c.variant.name for c in decision.fallbacks] == ["bf16"]
    # Every rung over the bound: none is preferred, so all are kept (it is a preference, not admission).
    both_long = [cand(BASE, 3000, load=long_queue), cand(INT8, 2000, load=long_queue)]
    assert router.route(feats(e2e=3500), both_long).variant.name == "bf16"
    # In the eligible stage the same filter is a hard bound: nothing left is "no variant".
    hard = Router(RoutingConfig(filters={"eligible": ["healthy", {"name": "max-queue", "parameters": {"max_queue": 2}}]}))
    assert hard.route(feats(e2e=3500), both_long).reason == "no-variant"


def test_the_random_picker_ignores_scores_and_is_reproducible_with_a_seed() -> None:
    pool = [cand(BASE, 3000), cand(INT8, 2000), cand(INT4, 2500)]
    seeded = [Router(RoutingConfig(picker={"name": "random", "parameters": {"seed": 7}})) for _ in range(2)]
    picks = [[r.route(feats(), pool).variant.name for _ in range(30)] for r in seeded]
    assert picks[0] == picks[1]  # same seed, same sequence
    assert set(picks[0]) == {"bf16", "int8", "int4"}  # not the max score (bf16) every time
    decision = seeded[0].route(feats(), pool)
    assert sorted([decision.variant.name, *(c.variant.name for c in decision.fallbacks)]) == ["bf16", "int4", "int8"]
    assert Router(RoutingConfig()).route(feats(), pool).variant.name == "bf16"


@pytest.mark.parametrize(("config", "tier", "rejected"), [
    (RoutingConfig(policy="reject"), "default", True),
    (RoutingConfig(policy="reject", tiers={"priority": {"policy": "degrade"}}), "priority", False),
    (RoutingConfig(tiers={"flex": {"policy": "reject"}}), "flex", True),
])  # fmt: skip
def test_reject_policy_per_model_and_tier(config: RoutingConfig, tier: str, rejected: bool) -> None:
    decision = Router(config).route(feats(e2e=100, tier=tier), LADDER)
    assert (decision.variant is None) is rejected
    if rejected:
        assert decision.reason == "rejected" and 1 <= decision.retry_after_s <= 60


@pytest.mark.parametrize(("idle", "e2e", "retry_after"), [(1000, 1000, 1), (1000, 8400, 8), (1000, 500_000, 60)])
def test_retry_after_is_the_predicted_queue_drain(idle: float, e2e: float, retry_after: int) -> None:
    decision = Router(RoutingConfig(policy="reject")).route(feats(e2e=500), [cand(BASE, e2e, idle=idle)])
    assert decision.retry_after_s == retry_after


def test_no_serving_variant() -> None:
    decision = Router(RoutingConfig()).route(feats(), [cand(BASE, serving=False)])
    assert decision.variant is None and decision.reason == "no-variant"


@pytest.mark.parametrize(("own", "tier", "stream", "expected"), [
    # The request's own budget wins over its tier's default.
    (Budget(900.0, None, None, "request"), "priority", True, Budget(900.0, None, None, "request")),
    # None of its own: the tier's (priority: TTFT 1 s), streamed as given...
    (Budget(), "priority", True, Budget(None, 1000.0, None, "tier")),
    # ...unstreamed, the first token comes with the last: the TTFT bound bounds the whole answer.
    (Budget(), "priority", False, Budget(1000.0, None, None, "tier")),
    (Budget(2000.0, 500.0, 30.0, "request"), "default", False, Budget(500.0, None, 30.0, "request")),
    (Budget(300.0, 500.0, None, "request"), "default", False, Budget(300.0, None, None, "request")),
    # No budget anywhere: none.
    (Budget(), "default", False, Budget()),
])  # fmt: skip
def test_the_budget_is_built_in_one_place(own: Budget, tier: str, stream: bool, expected: Budget) -> None:
    assert RoutingConfig().budget(own, tier, stream) == expected
