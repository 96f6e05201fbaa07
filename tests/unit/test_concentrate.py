"""The shared-device policy (server/routing/concentrate.py) over snapshots: one active rung per device,
chosen from the recent budgets and load with hysteresis; standby rungs take a request only when that
costs nobody anything."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from server.catalog import Variant
from server.routing.concentrate import (Concentrator, DeviceRegime, RungOutlook, SharedDeviceConfig, _device_growth,
                                        device_priced, profiled, standby_map)  # fmt: skip
from server.routing.config import RoutingConfig
from server.routing.predictor import LatencyPriors, VariantLatency
from server.routing.router import Router
from server.routing.types import Budget, Candidate, EngineLoad, RequestFeatures

BASE = Variant("m", "bf16", "base", 16, ppl_delta=0.0)
INT8 = Variant("m", "int8", "int8", 8, ppl_delta=0.015)
INT4 = Variant("m", "int4", "int4-gptq", 4, ppl_delta=0.20)
UNMEASURED = Variant("m", "new", "int8", 8)
# The base: 20 ms/token alone, batching well; int8: 8 ms/token alone, 24 ms at 64.
LATENCY = {
    BASE.id: VariantLatency(LatencyPriors(prefill_fixed_ms=20, prefill_per_token_ms=0.1,
                                          step_ms=((1, 20.0), (16, 30.0), (64, 60.0)))),
    INT8.id: VariantLatency(LatencyPriors(prefill_fixed_ms=10, prefill_per_token_ms=0.05,
                                          step_ms=((1, 8.0), (16, 12.0), (64, 24.0)))),
    INT4.id: VariantLatency(LatencyPriors(prefill_fixed_ms=10, prefill_per_token_ms=0.05,
                                          step_ms=((1, 6.0), (16, 10.0), (64, 20.0)))),
    UNMEASURED.id: VariantLatency(LatencyPriors(prefill_fixed_ms=1, prefill_per_token_ms=0.01, step_ms=((1, 1.0),))),
}  # fmt: skip


def predict(variant_id: str, prompt: int, output: int, load: EngineLoad):
    latency = LATENCY.get(variant_id)
    return latency.predict(prompt, output, load) if latency else None


def feats(e2e_ms: float | None = None, prompt: int = 100, output: int = 100) -> RequestFeatures:
    return RequestFeatures(prompt, output, Budget(e2e_ms=e2e_ms, source="request" if e2e_ms else "none"))


def traffic(concentrator: Concentrator, rate_rps: float, seconds: float, budget_ms: float | None,
            start: float = 0.0) -> float:  # fmt: skip
    """Arrivals at a steady rate; returns the time of the last one."""
    return traffic_of(concentrator, [feats(budget_ms)], rate_rps, seconds, start)


def traffic_of(concentrator: Concentrator, mix: list[RequestFeatures], rate_rps: float, seconds: float,
               start: float = 0.0) -> float:  # fmt: skip
    """Arrivals at a steady rate cycling through `mix`; returns the time of the last one."""
    n = int(rate_rps * seconds)
    for i in range(n):
        concentrator.arrive(mix[i % len(mix)], start + i / rate_rps)
    return start + (n - 1) / rate_rps


ON_ONE_GPU = [(BASE, "gpu-0"), (INT8, "gpu-0")]


def test_busy_tight_traffic_makes_the_fast_rung_active() -> None:
    # 100 tokens: the base needs ~2.0 s alone, int8 ~0.8 s; budgets of 1.2 s only int8 meets.
    c = Concentrator(SharedDeviceConfig())
    now = traffic(c, 10, 30, 1200)
    c.evaluate(ON_ONE_GPU, predict, now)
    regime = c.regimes["gpu-0"]
    assert regime.active == INT8.id
    outlook = {o.variant_id: o for o in regime.outlooks}
    # int8's predicted e2e at that load (~1.19 s) is just within the budgets: met, but about a coin flip once
    # the predictor's error is counted; the base's ~3 s is out of reach either way.
    assert 0.5 < outlook[INT8.id].attainment < 0.6 and outlook[BASE.id].attainment < 1e-6
    exact = Concentrator(SharedDeviceConfig(spread_e2e=0))
    exact.evaluate(ON_ONE_GPU, predict, traffic(exact, 10, 30, 1200))
    assert {o.variant_id: o.attainment for o in exact.regimes["gpu-0"].outlooks} == {INT8.id: 1.0, BASE.id: 0.0}
    # Little's law with int8's loaded steps: N = 10/s x (0.79 s + 27 ms x N) -> ~10.8 in flight, and the
    # arriving prompts' prefill (10/s x 5 ms: 5% of the device) slows decoding: ~12
    assert outlook[INT8.id].concurrency == pytest.approx(12.0, rel=0.1)
    assert regime.rate_rps == pytest.approx(10, rel=0.05)


def test_loose_or_no_budgets_make_the_most_accurate_rung_active() -> None:
    for budget in (None, 60_000):
        c = Concentrator(SharedDeviceConfig())
        now = traffic(c, 2, 30, budget)
        c.evaluate(ON_ONE_GPU, predict, now)
        assert c.active("gpu-0") == BASE.id, budget


def test_a_rung_that_cannot_keep_up_is_saturated_and_never_chosen_for_it() -> None:
    # At 25 req/s the base's steps grow faster than it drains (no fixed point of Little's law); int8 keeps up.
    c = Concentrator(SharedDeviceConfig())
    now = traffic(c, 25, 10, None)
    c.evaluate(ON_ONE_GPU, predict, now)
    outlook = {o.variant_id: o for o in c.regimes["gpu-0"].outlooks}
    assert outlook[BASE.id].concurrency is None and outlook[BASE.id].attainment == 0.0
    assert c.active("gpu-0") == INT8.id


def test_when_every_rung_saturates_the_one_that_drains_fastest_is_active() -> None:
    # 1.5x of the bench's CPU load made both rungs saturate; ranking them by quality alone (0 budgets
    # met each) made the base active, and it met 19% of the budgets against int8's 44% pinned.
    c = Concentrator(SharedDeviceConfig())
    now = traffic(c, 400, 10, 1200)
    c.evaluate(ON_ONE_GPU, predict, now)
    outlook = {o.variant_id: o for o in c.regimes["gpu-0"].outlooks}
    assert outlook[BASE.id].concurrency is None and outlook[INT8.id].concurrency is None
    # The most each completes (N / e2e(N) over N = 1, 2, 4, ...): int8 ~39 req/s, the base ~15
    assert outlook[INT8.id].capacity_rps > 2 * outlook[BASE.id].capacity_rps > 0
    assert c.active("gpu-0") == INT8.id
    # Saturated rungs meet nothing and rank by how far the rate exceeds what they complete: 400 req/s is
    # ~10x int8's capacity and ~26x the base's.
    rate = c.regimes["gpu-0"].rate_rps
    for o in outlook.values():
        penalty = 100 * {BASE.id: BASE, INT8.id: INT8}[o.variant_id].ppl_delta * c.config.quality_weight
        assert o.value == pytest.approx(-penalty - (rate / o.capacity_rps - 1))


def test_a_rungs_value_has_no_cliff_at_its_saturation_edge() -> None:
    # This 2-core AVX2 box's bf16 profile (loadtests/results/2026-12-07/bench-cpu-4b956f3.md). Its value fell by
    # more than 1 where its predicted saturation began, so each small move of the measured rate across that edge
    # was an urgent switch (bench-cpu-4b956f3-switches.txt: "beat ... by 1.09", then back "by 0.29").
    base, base_latency = _rung("bf16", 0.0, 2.294, ((1, 48.6), (4, 76.9), (16, 124.1), (64, 320.2)), 46.9)

    def on_cpu(variant_id: str, prompt: int, output: int, load: EngineLoad):
        return base_latency.predict(prompt, output, load)

    outlooks = []
    for rate in [r / 20 for r in range(16, 50)]:  # 0.8 to 2.45 req/s
        c = Concentrator(SharedDeviceConfig())
        c.evaluate([(base, "cpu")], on_cpu, traffic(c, rate, 30, 16_000))
        outlooks.append(c.regimes["cpu"].outlooks[0])
    edge = next(i for i, o in enumerate(outlooks) if o.concurrency is None)
    assert 0 < edge < len(outlooks) - 10 and all(o.concurrency is None for o in outlooks[edge:])
    # Attainment is gone before the edge (the queue grows without bound as the rate nears capacity) ...
    assert outlooks[edge - 1].attainment < 0.01 and outlooks[0].attainment > 0.5
    # ... and past it the value falls with the overload, in steps no larger than the rate's
    steps = [a.value - b.value for a, b in zip(outlooks, outlooks[1:])]
    assert max(steps[edge - 1:]) < SharedDeviceConfig().urgent_gain
    assert all(step >= 0 for step in steps) and outlooks[-1].value < -0.5


def test_quality_weight_trades_attainment_for_ppl() -> None:
    # Budgets only int4 meets at this load: int4's +20 % costs 0.2 of attainment at the default
    # weight, which it still wins by; with a heavy weight for quality int8 stays.
    rungs = [(INT8, "gpu-0"), (INT4, "gpu-0")]
    light = Concentrator(SharedDeviceConfig())
    heavy = Concentrator(SharedDeviceConfig(quality_weight=0.1))
    for c in (light, heavy):
        now = traffic(c, 5, 30, 750)
        c.evaluate(rungs, predict, now)
    assert light.active("gpu-0") == INT4.id
    assert heavy.active("gpu-0") == INT8.id


def test_switching_waits_for_hysteresis_and_dwell_but_not_for_a_rung_that_stopped() -> None:
    # urgent_gain out of reach: only the dwell and the hysteresis decide (the default's urgent switch is
    # tested below).
    c = Concentrator(SharedDeviceConfig(window_s=10, min_dwell_s=10, urgent_gain=10))
    t = traffic(c, 2, 10, None)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == BASE.id
    # Tight budgets arrive: int8 is better by far, but the base has held for only 3 s.
    t = traffic(c, 10, 3, 1200, start=t + 0.05)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == BASE.id and c.regimes["gpu-0"].switches == 0
    t = traffic(c, 10, 10, 1200, start=t + 0.05)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == INT8.id and c.regimes["gpu-0"].switches == 1
    # Loose budgets now: both meet them all, and the base, worth as much and more accurate, takes over once
    # it has been ahead for the confirmation time (it needs no hysteresis to go up the ladder).
    t = traffic(c, 2, 20, 60_000, start=t + 0.05)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == INT8.id and c.regimes["gpu-0"].challenger == BASE.id
    c.evaluate(ON_ONE_GPU, predict, t + c.config.confirm_s)
    regime = c.regimes["gpu-0"]
    assert regime.active == BASE.id and regime.switches == 2 and "more accurate" in regime.reason
    # Back to tight budgets for a moment: int8 is ahead but the base has held for under the dwell.
    t = traffic(c, 10, 3, 1200, start=t + c.config.confirm_s + 0.05)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == BASE.id
    # The base stops serving: int8 at once.
    c.evaluate([(INT8, "gpu-0")], predict, t + 0.1)
    assert c.active("gpu-0") == INT8.id and c.regimes["gpu-0"].switches == 3


def test_each_device_gets_its_own_regime_and_unmeasured_rungs_are_never_active() -> None:
    c = Concentrator(SharedDeviceConfig())
    now = traffic(c, 20, 30, 1200)
    c.evaluate([(BASE, "gpu-0"), (INT8, "gpu-0"), (UNMEASURED, "gpu-1"), (INT4, "gpu-1")], predict, now)
    assert c.active("gpu-0") == INT8.id and c.active("gpu-1") == INT4.id
    # Traffic is shared evenly over the model's two devices.
    assert c.rate("gpu-0") == pytest.approx(10, rel=0.05)


def test_spread_policy_keeps_no_regime() -> None:
    c = Concentrator(SharedDeviceConfig(policy="spread"))
    now = traffic(c, 20, 30, 1200)
    c.evaluate(ON_ONE_GPU, predict, now)
    assert c.regimes == {} and standby_map(c, {BASE.id: "gpu-0", INT8.id: "gpu-0"}) == {BASE.id: False,
                                                                                          INT8.id: False}


def test_standby_only_while_the_active_rung_can_take_the_request() -> None:
    c = Concentrator(SharedDeviceConfig())
    now = traffic(c, 10, 30, 1200)
    c.evaluate(ON_ONE_GPU + [(INT4, "gpu-1")], predict, now)
    available = {BASE.id: "gpu-0", INT8.id: "gpu-0", INT4.id: "gpu-1"}
    assert standby_map(c, available) == {BASE.id: True, INT8.id: False, INT4.id: False}
    # int8 full or not serving: nothing on its device is held back.
    assert standby_map(c, {BASE.id: "gpu-0", INT4.id: "gpu-1"}) == {BASE.id: False, INT4.id: False}


def candidates(shared: bool, busy: bool, rate: float) -> list[Candidate]:
    """The base and int8 either on one device (int8 active, the base standby) or on two."""
    out = []
    for variant in (BASE, INT8):
        device = "gpu-0" if shared or variant is BASE else "gpu-1"
        load = EngineLoad(in_flight=4 if busy and variant is INT8 else 0, device=device,
                          device_peers_busy=1 if busy and shared and variant is BASE else 0)  # fmt: skip
        prediction = predict(variant.id, 100, 100, load)
        standby = shared and variant is BASE
        out.append(Candidate(variant, True, load, prediction, standby=standby, device_rate_rps=rate if standby else 0))
    return out


@pytest.mark.parametrize(("shared", "busy", "rate", "picked"), [
    (False, True, 5.0, BASE.id),   # two devices: the base is free, and the most accurate to meet 10 s
    (True, True, 5.0, INT8.id),    # one device, int8 active and busy: the base would slow it down
    (True, False, 0.1, BASE.id),   # one device, idle, little traffic expected meanwhile: the base, for free
    (True, False, 5.0, INT8.id),   # idle now, but ~10 arrivals expected during the base's 2 s
])  # fmt: skip
def test_one_device_and_two_devices_give_different_picks(shared: bool, busy: bool, rate: float, picked: str) -> None:
    router = Router(RoutingConfig())
    decision = router.route(feats(10_000), candidates(shared, busy, rate))
    assert decision.variant.id == picked
    assert {c.variant.id for c in decision.fallbacks} | {picked} == {BASE.id, INT8.id}


def test_a_budget_only_the_standby_rung_meets_is_degraded_to_the_active_one() -> None:
    # On one busy device with int8 active, a request int8 cannot meet is served degraded by int8
    # instead of starting the base beside it.
    slow_int8 = [replace(c, prediction=replace(c.prediction, e2e_ms=9e9)) if c.variant is INT8 else c
                 for c in candidates(True, True, 5.0)]  # fmt: skip
    decision = Router(RoutingConfig()).route(feats(5_000), slow_int8)
    assert decision.variant.id == INT8.id and decision.reason == "degraded"


def test_shared_device_config_is_checked() -> None:
    with pytest.raises(ValidationError):
        RoutingConfig(shared_device={"policy": "herd"})
    with pytest.raises(ValidationError):
        RoutingConfig(shared_device={"hysteresis": -1})
    assert RoutingConfig(shared_device={"policy": "spread"}).shared_device.policy == "spread"


def test_recommendation_keeps_the_active_rung_and_close_contenders_resident() -> None:
    # Tight busy traffic: int8 meets nearly every budget (~98%), the base none: keep int8 only, unload the base.
    c = Concentrator(SharedDeviceConfig())
    c.evaluate(ON_ONE_GPU, predict, traffic(c, 10, 30, 1500))
    advice = c.regimes["gpu-0"].recommend(margin=0.05)
    assert advice["resident"] == [INT8.id] and advice["unload"] == [BASE.id]
    assert advice["reasons"][INT8.id].startswith("active") and "0.97 below the best" in advice["reasons"][BASE.id]
    assert advice["summary"].startswith(f"keep {INT8.id} only")
    # Loose budgets at a low rate: both meet them all; the base is active, int8 (0.015 below it in
    # value, from its ppl) is a contender only when the margin covers that.
    c = Concentrator(SharedDeviceConfig())
    c.evaluate(ON_ONE_GPU, predict, traffic(c, 1, 30, 60_000))
    assert c.regimes["gpu-0"].recommend(margin=0.01)["resident"] == [BASE.id]
    assert c.regimes["gpu-0"].recommend(margin=0.02)["resident"] == [BASE.id, INT8.id]
    assert Concentrator(SharedDeviceConfig()).regimes.get("gpu-0") is None


def test_every_rung_of_a_device_is_priced_with_the_active_rungs_load_correction() -> None:
    # int8 carried the load and learned that the device runs 3x its profile under it; the base sat
    # idle with a correction of 1.0. Priced as is, the base would look 3x better under load than it is.
    c = Concentrator(SharedDeviceConfig())
    c.evaluate(ON_ONE_GPU, predict, traffic(c, 10, 30, 1200))
    assert c.active("gpu-0") == INT8.id
    book = {v: replace(latency) for v, latency in LATENCY.items()}
    book[INT8.id].load_tpot_scale = book[INT8.id].load_ttft_scale = 3.0
    priced = device_priced(book.get, c, {BASE.id: "gpu-0", INT8.id: "gpu-0", INT4.id: "gpu-1"})
    busy = EngineLoad(running=8)
    assert priced(BASE.id, 100, 100, busy).tpot_ms == pytest.approx(3 * book[BASE.id].predict(100, 100, busy).tpot_ms)
    assert priced(INT8.id, 100, 100, busy) == book[INT8.id].predict(100, 100, busy)
    # idle predictions, and rungs of another device, keep their own corrections
    assert priced(BASE.id, 100, 100, EngineLoad()) == book[BASE.id].predict(100, 100, EngineLoad())
    assert priced(INT4.id, 100, 100, busy) == book[INT4.id].predict(100, 100, busy)
    assert priced("m@missing", 100, 100, busy) is None


def _rung(name: str, ppl: float, prefill_per_token_ms: float, steps: tuple,
          prefill_fixed_ms: float = 10) -> tuple[Variant, VariantLatency]:  # fmt: skip
    variant = Variant("m", name, "base" if ppl == 0 else "int8", 16 if ppl == 0 else 8, ppl_delta=ppl)
    return variant, VariantLatency(LatencyPriors(prefill_fixed_ms=prefill_fixed_ms,
                                                 prefill_per_token_ms=prefill_per_token_ms, step_ms=steps))  # fmt: skip


def test_capacity_is_judged_within_the_profiled_batches() -> None:
    # One H200's profile (loadtests/results/2026-12-05/router-h200.md): bf16's steps rose little from batch 16
    # to 64, fp8's more; extrapolated to 1,024 requests bf16 "drained" 2.5x faster and was made active at 1x load.
    slow, slow_lat = _rung("slow", 0.0, 0.01, ((1, 20.0), (4, 20.5), (16, 21.0)))
    fast, fast_lat = _rung("fast", 0.005, 0.01, ((1, 8.0), (4, 10.0), (16, 16.0)))
    book = {slow.id: slow_lat, fast.id: fast_lat}

    def predict2(variant_id, prompt, output, load):
        return book[variant_id].predict(prompt, output, load)

    rungs = [(slow, "gpu-0"), (fast, "gpu-0")]
    unbounded, bounded = Concentrator(SharedDeviceConfig()), Concentrator(SharedDeviceConfig())
    for c in (unbounded, bounded):
        traffic(c, 200, 10, 1200)
    unbounded.evaluate(rungs, predict2, 10.0)
    bounded.evaluate(rungs, predict2, 10.0, largest_batch=lambda _: 16)
    assert all(o.concurrency is None for o in bounded.regimes["gpu-0"].outlooks)  # both saturate at 200 req/s
    assert unbounded.active("gpu-0") == slow.id  # the extrapolation's verdict
    capacity = {o.variant_id: o.capacity_rps for o in bounded.regimes["gpu-0"].outlooks}
    # Within batch 16: fast completes 16 / (10 ms + 100 x 16 ms) ~ 9.9 req/s, slow 16 / 2.1 s ~ 7.6.
    assert capacity[fast.id] == pytest.approx(9.9, rel=0.05) and capacity[slow.id] == pytest.approx(7.6, rel=0.05)
    assert bounded.active("gpu-0") == fast.id


def test_prefill_of_arriving_prompts_is_priced_under_load() -> None:
    # The same decode steps; one rung prefills 40x slower per token (as W4A16 against INT8 on one H200) and
    # is more accurate. At a trickle it is active; with 500-token prompts at 1.2 req/s its prefill alone
    # would need the whole device (1.2 x 1,000 ms), so the other one is.
    steps = ((1, 8.0), (16, 12.0), (64, 24.0))
    slowfill, slowfill_lat = _rung("slowfill", 0.0, 2.0, steps)
    quickfill, quickfill_lat = _rung("quickfill", 0.01, 0.05, steps)
    book = {slowfill.id: slowfill_lat, quickfill.id: quickfill_lat}

    def predict2(variant_id, prompt, output, load):
        return book[variant_id].predict(prompt, output, load)

    rungs = [(slowfill, "gpu-0"), (quickfill, "gpu-0")]

    def active_at(rate: float) -> Concentrator:
        c = Concentrator(SharedDeviceConfig())
        n = int(rate * 30)
        for i in range(n):
            c.arrive(RequestFeatures(500, 100, Budget(e2e_ms=60_000, source="request")), i / rate)
        c.evaluate(rungs, predict2, (n - 1) / rate)
        return c

    assert active_at(0.1).active("gpu-0") == slowfill.id
    busy = active_at(1.2)
    outlook = {o.variant_id: o for o in busy.regimes["gpu-0"].outlooks}
    assert outlook[slowfill.id].concurrency is None and outlook[quickfill.id].concurrency is not None
    assert busy.active("gpu-0") == quickfill.id
    # Below saturation the tax still slows decoding: at 0.6 req/s (60% of the device on prefill) the
    # predicted concurrency is higher than the untaxed Little's law would give.
    half = {o.variant_id: o for o in active_at(0.6).regimes["gpu-0"].outlooks}
    assert half[slowfill.id].concurrency > 1.5 * half[quickfill.id].concurrency


def test_a_rise_in_load_is_seen_within_the_fast_span_and_an_urgent_gain_skips_the_dwell() -> None:
    # Ten quiet seconds of loose budgets keep the base active; then 40 req/s of tight ones for 3 s. The 30-s
    # window's average (6.5 req/s) would hide the rise; the last 5 s show it, and the base, which saturates
    # at that rate, is left before its dwell is up.
    c = Concentrator(SharedDeviceConfig(min_dwell_s=60))
    t = traffic(c, 1, 25, None)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == BASE.id
    t = traffic(c, 40, 3, 1200, start=t + 0.05)
    c.evaluate(ON_ONE_GPU, predict, t)
    regime = c.regimes["gpu-0"]
    assert regime.rate_rps > 20
    assert c.active("gpu-0") == INT8.id and regime.switches == 1
    slow = Concentrator(SharedDeviceConfig(min_dwell_s=60, rate_fast_s=0))
    t = traffic(slow, 1, 25, None)
    slow.evaluate(ON_ONE_GPU, predict, t)
    t = traffic(slow, 40, 3, 1200, start=t + 0.05)
    slow.evaluate(ON_ONE_GPU, predict, t)
    assert slow.regimes["gpu-0"].rate_rps < 10


def test_rungs_a_few_percent_apart_do_not_trade_places_over_one_budget_class() -> None:
    # Two rungs of equal speed within the predictor's error (3% apart), a budget class falling between their
    # predictions. Counted met-or-not the faster one gains the whole class (a fifth of the budgets) and takes
    # over; on one H100 that was a mid-run switch between FP8 and INT8 that bought nothing. Counted as the
    # chance of meeting each budget, the gain is a few points, within the hysteresis.
    fine = Variant("m", "fp8", "fp8", 8, ppl_delta=0.005)
    quick = Variant("m", "int8", "int8", 8, ppl_delta=0.010)
    latency = {
        fine.id: VariantLatency(LatencyPriors(prefill_fixed_ms=10, prefill_per_token_ms=0.01, step_ms=((1, 4.0),))),
        quick.id: VariantLatency(LatencyPriors(prefill_fixed_ms=10, prefill_per_token_ms=0.01, step_ms=((1, 3.88),))),
    }  # fmt: skip

    def predict2(variant_id: str, prompt: int, output: int, load: EngineLoad):
        return latency[variant_id].predict(prompt, output, load)

    fine_ms = predict2(fine.id, 100, 100, EngineLoad()).e2e_ms
    quick_ms = predict2(quick.id, 100, 100, EngineLoad()).e2e_ms
    assert quick_ms < fine_ms < 1.04 * quick_ms
    between = (fine_ms + quick_ms) / 2
    rungs = [(fine, "gpu-0"), (quick, "gpu-0")]

    def run(config: SharedDeviceConfig) -> Concentrator:
        c = Concentrator(config)
        t = traffic(c, 1, 20, None)
        c.evaluate(rungs, predict2, t)
        assert c.active("gpu-0") == fine.id  # loose traffic: the more accurate rung
        for i, budget in enumerate([0.5 * between, between, 2 * between, 3 * between, 6 * between] * 6):
            c.arrive(feats(budget), t + 0.2 * (i + 1))
        for k in range(1, 12):
            c.evaluate(rungs, predict2, t + 6 + k)
        return c

    exact = run(SharedDeviceConfig(spread_e2e=0, min_dwell_s=0, confirm_s=0))
    assert exact.active("gpu-0") == quick.id
    soft = run(SharedDeviceConfig(min_dwell_s=0))
    outlook = {o.variant_id: o for o in soft.regimes["gpu-0"].outlooks}
    assert 0 < outlook[quick.id].value - outlook[fine.id].value < soft.config.hysteresis
    assert soft.active("gpu-0") == fine.id and soft.regimes["gpu-0"].switches == 0


def test_a_challenger_must_stay_ahead_for_the_confirmation_time() -> None:
    c = Concentrator(SharedDeviceConfig(min_dwell_s=0, confirm_s=2, urgent_gain=10))
    t = traffic(c, 2, 10, None)
    c.evaluate(ON_ONE_GPU, predict, t)
    assert c.active("gpu-0") == BASE.id
    t = traffic(c, 10, 10, 1500, start=t + 0.05)
    c.evaluate(ON_ONE_GPU, predict, t)
    regime = c.regimes["gpu-0"]
    assert regime.active == BASE.id and regime.challenger == INT8.id and "ahead by" in regime.reason
    c.evaluate(ON_ONE_GPU, predict, t + 1)
    assert c.active("gpu-0") == BASE.id
    # The tight budgets stop for a moment (the base is no worse): the count starts again.
    c.arrivals.clear()
    c.evaluate(ON_ONE_GPU, predict, t + 1.5)
    assert c.active("gpu-0") == BASE.id and c.regimes["gpu-0"].challenger is None
    t = traffic(c, 10, 2, 1500, start=t + 1.6)
    c.evaluate(ON_ONE_GPU, predict, t)
    c.evaluate(ON_ONE_GPU, predict, t + 1.9)
    assert c.active("gpu-0") == BASE.id
    c.evaluate(ON_ONE_GPU, predict, t + 2.0)
    assert c.active("gpu-0") == INT8.id and c.regimes["gpu-0"].switches == 1


def test_a_more_accurate_rung_as_good_as_the_active_one_takes_over_and_never_flaps_back() -> None:
    # On one H100, INT8 was made active under the bench's capacity burst (predicted 55% of budgets vs FP8's
    # 50%) and then kept through 0.25x and 1.0x, where FP8 was predicted as good (76% each) and had half
    # INT8's ppl delta: the router lost to pin:fp8 on both goodput and quality. Two rungs of equal speed here,
    # but for FP8's largest batch (so that INT8 is not dominated: that would switch at once).
    fine = Variant("m", "fp8", "fp8", 8, ppl_delta=0.005)
    coarse = Variant("m", "int8", "int8", 8, ppl_delta=0.010)
    step = ((1, 4.0), (16, 6.0), (64, 12.0))
    latency = {v.id: VariantLatency(LatencyPriors(prefill_fixed_ms=10, prefill_per_token_ms=0.01,
                                                  step_ms=step if v is coarse else (*step[:2], (64, 12.5))))
               for v in (fine, coarse)}  # fmt: skip

    def predict2(variant_id: str, prompt: int, output: int, load: EngineLoad):
        return latency[variant_id].predict(prompt, output, load)

    rungs = [(fine, "gpu-0"), (coarse, "gpu-0")]
    c = Concentrator(SharedDeviceConfig(min_dwell_s=0, confirm_s=2))
    c.regimes["gpu-0"] = replace(_regime_on(c, rungs, predict2), active=coarse.id)  # as the burst left it
    t = traffic(c, 2, 10, 2000)
    c.evaluate(rungs, predict2, t)
    outlook = {o.variant_id: o for o in c.regimes["gpu-0"].outlooks}
    assert outlook[fine.id].attainment == pytest.approx(outlook[coarse.id].attainment)
    assert 0 < outlook[fine.id].value - outlook[coarse.id].value < c.config.hysteresis
    assert c.active("gpu-0") == coarse.id and c.regimes["gpu-0"].challenger == fine.id
    c.evaluate(rungs, predict2, t + 2)
    assert c.active("gpu-0") == fine.id and c.regimes["gpu-0"].switches == 1
    # Going back down the ladder still takes a gain beyond the hysteresis: FP8 stays for good.
    for k in range(1, 20):
        c.evaluate(rungs, predict2, t + 2 + k)
    assert c.active("gpu-0") == fine.id and c.regimes["gpu-0"].switches == 1


def test_an_urgent_gain_never_goes_straight_back_to_the_rung_just_left() -> None:
    # On a 2-core CPU at 1.5x, bf16 and int8 sat on either side of their predicted saturation and traded
    # places every 1-3 s, each move an urgent gain. Back to the rung just left takes the dwell like any switch;
    # an urgent gain towards any other rung still skips it.
    base = Variant("m", "bf16", "base", 16, ppl_delta=0.0)
    int8 = Variant("m", "int8", "int8", 8, ppl_delta=0.02)
    int4 = Variant("m", "int4", "int4-gptq", 4, ppl_delta=0.05)
    c = Concentrator(SharedDeviceConfig(min_dwell_s=10, confirm_s=2, urgent_gain=0.2))
    c.regimes["cpu"] = DeviceRegime("cpu", base.id, 90.0, 3, 1.2, left=int8.id)  # bf16 just took over from int8

    def outlooks(**values: float) -> list[RungOutlook]:
        return [RungOutlook(f"m@{name}", None, 0.0, value) for name, value in values.items()]

    c.regimes["cpu"] = c._choose("cpu", [base, int8, int4], outlooks(bf16=-2.1, int8=-0.9, int4=-3.0), 1.6, 93.0)
    assert c.active("cpu") == base.id and c.regimes["cpu"].challenger == int8.id  # gain 1.2, but it is going back
    c.regimes["cpu"] = c._choose("cpu", [base, int8, int4], outlooks(bf16=-2.1, int8=-0.9, int4=-3.0), 1.6, 100.5)
    assert c.active("cpu") == int8.id and c.regimes["cpu"].left == base.id  # dwell held and confirmed: switched
    c.regimes["cpu"] = c._choose("cpu", [base, int8, int4], outlooks(bf16=0.1, int8=-0.9, int4=-0.5), 1.0, 101.0)
    assert c.active("cpu") == int8.id  # bf16 is where it just came from: no urgent way back
    c.regimes["cpu"] = c._choose("cpu", [base, int8, int4], outlooks(bf16=-2.0, int8=-0.9, int4=0.1), 1.0, 101.5)
    assert c.active("cpu") == int4.id and c.regimes["cpu"].switches == 5  # urgent, and not back: at once


def test_a_rung_slower_and_less_accurate_than_another_is_never_made_active() -> None:
    # The two profiles of this 2-core AVX2 box (loadtests/results/2026-12-07/bench-cpu-4b956f3.md): int8 decodes
    # 3.3x slower than bf16 alone, but prefills cheaper per token, and near bf16's predicted saturation the
    # outlook ranked it ahead by more than an urgent gain. bf16 is no slower for the mean request at any batch.
    base, base_latency = _rung("bf16", 0.0, 2.294, ((1, 48.6), (4, 76.9), (16, 124.1), (64, 320.2)), 46.9)
    int8, int8_latency = _rung("int8", 0.036, 1.427, ((1, 160.0), (4, 171.7), (16, 205.4), (64, 393.8)), 147.7)
    latency = {base.id: base_latency, int8.id: int8_latency}

    def on_cpu(variant_id: str, prompt: int, output: int, load: EngineLoad):
        return latency[variant_id].predict(prompt, output, load)

    c = Concentrator(SharedDeviceConfig())
    now = traffic(c, 1.6, 30, 8000)
    assert Concentrator._dominated([base, int8], [feats(8000)], on_cpu) == {int8.id: base.id}
    c.evaluate([(base, "cpu"), (int8, "cpu")], on_cpu, now)
    outlook = {o.variant_id: o for o in c.regimes["cpu"].outlooks}
    assert outlook[int8.id].value > outlook[base.id].value  # the outlook alone would make int8 active
    assert c.active("cpu") == base.id
    c.regimes["cpu"] = replace(c.regimes["cpu"], active=int8.id)  # however it got there, it leaves at once
    c.evaluate([(base, "cpu"), (int8, "cpu")], on_cpu, now + 1)
    assert c.active("cpu") == base.id and f"slower than {base.id} and less accurate" in c.regimes["cpu"].reason
    # Faster at some batch is not dominated: FP8 and INT8 as profiled on one H100 (router-h100-4b956f3-routing-end.json)
    fp8, fp8_latency = _rung("fp8", 0.005, 0.0015, ((1, 3.73), (4, 4.74), (16, 3.90), (64, 5.54)), 17.5)
    w8, w8_latency = _rung("int8", 0.010, 0.007, ((1, 3.85), (4, 4.82), (16, 4.07), (64, 5.51)), 12.7)
    gpu = {fp8.id: fp8_latency, w8.id: w8_latency}
    assert Concentrator._dominated([fp8, w8], [feats(1000, prompt=256, output=128)],
                                   lambda v, p, o, load: gpu[v].predict(p, o, load)) == {}


def _regime_on(c: Concentrator, rungs, predict_fn):
    """A regime for gpu-0 as an evaluation over no traffic makes it (the active rung set by the caller)."""
    c.evaluate(rungs, predict_fn, 0.0)
    return c.regimes["gpu-0"]


def test_a_step_curve_is_not_trusted_past_its_largest_profiled_batch() -> None:
    # One H100's profiles at c0a0c38 (loadtests/results/2026-12-07/router-h100-c0a0c38-routing-end.json): bf16's
    # flat, noisy curve extrapolated along its own slope made it faster than FP8 past ~150 requests, and at 1.5x
    # load (the load corrections up) the router moved two thirds of the requests to bf16.
    bf16, bf16_lat = _rung("bf16", 0.0, 0.00897, ((1, 5.92), (4, 6.59), (16, 6.22), (64, 6.82)), 13.2)
    fp8, fp8_lat = _rung("fp8", 0.005, 0.00907, ((1, 3.72), (4, 4.38), (16, 3.91), (64, 5.43)), 12.7)
    book = {v.id: replace(lat, load_tpot_scale=1.8, load_ttft_scale=3.8)
            for v, lat in ((bf16, bf16_lat), (fp8, fp8_lat))}  # fmt: skip

    def on_h100(variant_id: str, prompt: int, output: int, load: EngineLoad):
        return book[variant_id].predict(prompt, output, load)

    def largest(variant_id: str) -> int:
        return 64

    def e2e(predict_fn, variant: Variant, running: int) -> float:
        return predict_fn(variant.id, 256, 128, EngineLoad(running=running)).e2e_ms

    assert e2e(on_h100, bf16, 256) < e2e(on_h100, fp8, 256)  # the inversion, each along its own slope
    growth = _device_growth([bf16, fp8], on_h100, largest)
    assert growth == pytest.approx((0.045 + 0.257) / 2, abs=0.01)  # the median of the two rungs' growth
    within = profiled(on_h100, largest, growth)
    for running in (1, 16, 64, 65, 100, 256, 1024):
        assert e2e(within, fp8, running) < e2e(within, bf16, running), running
    assert e2e(within, fp8, 64) == e2e(on_h100, fp8, 64)  # unchanged within the profile
    # past the profile bf16 grows at the device's rate, not along its own flat slope; FP8 less steeply than its own
    assert e2e(within, bf16, 128) > e2e(on_h100, bf16, 128) and e2e(within, fp8, 128) < e2e(on_h100, fp8, 128)
    # 75 req/s of the bench's budgets (0.6-3x bf16's idle e2e, ~630 ms) with FP8 active: the outlook along each
    # rung's own slope put bf16 ahead; within the profiles FP8 is well ahead.
    bounded, unbounded = Concentrator(SharedDeviceConfig()), Concentrator(SharedDeviceConfig())
    for c in (bounded, unbounded):
        c.regimes["gpu"] = DeviceRegime("gpu", fp8.id, 0.0, 1, 0.0)
        now = traffic_of(c, [feats(f * 630, prompt=256, output=128) for f in (0.6, 0.8, 1.0, 1.5, 3.0)], 75, 30)
        c.evaluate([(bf16, "gpu"), (fp8, "gpu")], on_h100, now + 0.1, largest if c is bounded else None)
    value = {name: {o.variant_id: o.value for o in c.regimes["gpu"].outlooks}
             for name, c in (("bounded", bounded), ("unbounded", unbounded))}  # fmt: skip
    assert value["unbounded"][bf16.id] > value["unbounded"][fp8.id]
    assert value["bounded"][fp8.id] > value["bounded"][bf16.id] + SharedDeviceConfig().hysteresis
    assert bounded.active("gpu") == fp8.id


def test_a_burst_within_chance_does_not_raise_the_rate() -> None:
    # This 2-core CPU's load (0.85 req/s): seven arrivals in the last five seconds, where the window's rate
    # expects ~5, are a Poisson burst (under three deviations), not a rise; 3.4 req/s for five seconds is.
    c = Concentrator(SharedDeviceConfig())
    t = traffic(c, 0.85, 25, 8000)
    for i in range(7):
        c.arrive(feats(8000), t + 0.5 + i * 0.6)
    now = t + 5
    window = len(c.arrivals) / c._span(now)
    assert c._rate(now) == pytest.approx(window, rel=0.01) and window < 1
    for i in range(10):  # ten more in the same seconds: 17 in 5 s
        c.arrive(feats(8000), t + 0.7 + i * 0.4)
    assert c._rate(now) == pytest.approx(17 / 5)
