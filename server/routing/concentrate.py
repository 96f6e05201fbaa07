"""Concentrate, don't spread: on a device shared by several rungs, one rung is active at a time.

Engines on one device time-share it: each decode step reads that engine's own weights, so two to
four engines decoding in turn cost about the sum of their steps. On one H200 the router spread
requests over four rungs and every one of them ran 2.6-4.8x slower than alone; each single rung
beat it (the shared-device router issue). So, per model and device group:

    every `evaluate_every_s`, over the requests of the last `window_s` (routed and pinned alike:
    both load the device):
      rate   = arrivals per second, the window's, or the last `rate_fast_s`'s where that is above it
               by more than chance (a rise in load is seen within seconds, a fall only as the window
               empties, a Poisson burst of a few requests not at all), shared
               evenly when the model's rungs sit on several devices
      for each serving rung r with priors on the device:
        u_r          = the share of the device the arriving prompts' prefill takes on r (rate x
                       the marginal prefill time of the window's mean prompt); decode steps get
                       the rest, so they take 1 / (1 - u_r) as long (u_r >= 1: r saturates). A
                       rung whose kernels step fast but prefill slowly (W4A16 on Hopper prefilled
                       15x slower per token than INT8) is not mistaken for the fastest under load
        N_r          = the concurrency all of that traffic would keep on r alone (Little's law,
                       N = rate x e2e_r(N), solved by fixed-point iteration; no solution below
                       `max_concurrency`: r would saturate). Past the largest batch r was profiled
                       at, its steps grow at one rate for every rung of the device (`profiled`),
                       not along a slope extrapolated from its own noisy profile
        attainment_r = the expected share of the window's budgets r meets at N_r (0 saturated): each
                       budget counts with the chance that the measured latency is within it, the
                       predictor's error taken as log-normal with a spread of `spread_e2e` (TTFT:
                       `spread_ttft`). Counted met-or-not, two rungs a few percent apart in
                       prediction differ by a whole budget class wherever a class falls between
                       them; on one H100 that moved 0.5x load from FP8 to INT8 mid-run, two rungs
                       that met the same 65% pinned (loadtests/results/2026-12-06/router-h100-10a87e5.md)
        value_r      = attainment_r - quality_weight x (r's ppl delta in percent)
                       and, when r saturates (attainment 0), less by how far the rate exceeds its
                       capacity, rate / capacity_r - 1 (capacity_r: the most requests per second r
                       completes at any concurrency it was profiled at, prefill included), so that
                       when every rung saturates the one that drains fastest is active, not the most
                       accurate. The value is continuous at the edge: a rung that just saturates is
                       worth what one that just keeps up and meets nothing is (a cliff of 1 there
                       made every small move of the predicted load an urgent switch on a 2-core CPU:
                       loadtests/results/2026-12-07/bench-cpu-4b956f3-switches.txt)
      active = the rung of the highest value (never one that another rung of the device beats on both
               counts: more accurate, and predicted no slower for the window's mean request at every
               profiled batch), kept until another beats it by `hysteresis` (or, more
               accurate, is worth at least as much) in every evaluation of the last `confirm_s` and
               the active one has held for `min_dwell_s` (at once if it stops serving, or if the gain is `urgent_gain` or
               more: e.g. it saturates while another would keep up, or the traffic jumped from a
               trickle the dwell was started on; but never straight back to the rung it just left). A
               switch is not free: the old rung's requests decode beside the new rung's until they finish

The router then treats the other rungs of that device as standby: they take a request only when
their engine and the whole device are idle and the traffic expected during that request, at the
window's rate, is below `spill_max_overlap`; that is when taking it costs nobody anything
(`server/routing/filters/shared_device.py`).

Pure: the caller passes `now` and the latency models; no clocks, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.catalog import Variant, accuracy_key
from server.routing.predictor import VariantLatency
from server.routing.types import Budget, EngineLoad, Prediction, RequestFeatures

DOMINANCE_BATCHES = (0, 4, 16, 64)  # the requests running beside the one judged, as far as both rungs were profiled
Predict = Callable[[str, int, int, EngineLoad], Prediction | None]  # variant id, prompt, output, load
LargestBatch = Callable[[str], int | None]  # variant id -> the largest batch its step times were measured at


class SharedDeviceConfig(BaseModel):
    """How rungs that share one device take traffic (RoutingConfig.shared_device)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    policy: Literal["concentrate", "spread"] = Field(
        "concentrate", description="concentrate: one active rung per device; spread: every rung scored per request")
    window_s: float = Field(30.0, ge=1.0, le=3600.0, description="the recent traffic the active rung is chosen on")
    max_samples: int = Field(256, ge=8, le=10_000, description="most recent requests the outlook is computed over")
    evaluate_every_s: float = Field(
        0.5, ge=0.05, le=600.0, description="how often the active rungs are re-chosen (a choice costs ~0.5 ms)")
    hysteresis: float = Field(0.05, ge=0.0, le=1.0, description="value a rung must gain over the active one to switch")
    min_dwell_s: float = Field(10.0, ge=0.0, le=3600.0, description="the least time a rung stays active")
    urgent_gain: float = Field(
        0.2, ge=0.0, le=1000.0,
        description="a gain this large switches before the dwell is up (a rung that saturates while another keeps "
                    "up loses that one's share of budgets met, and more as its overload grows)")
    quality_weight: float = Field(
        0.01, ge=0.0, le=1.0, description="budget attainment given up per percent of ppl delta")
    spill_max_overlap: float = Field(
        0.5, ge=0.0, le=1000.0,
        description="a standby rung takes a request on an idle device when fewer arrivals than this are expected "
                    "while it runs")
    max_concurrency: int = Field(1024, ge=1, le=1_000_000, description="concurrency beyond which a rung saturates")
    confirm_s: float = Field(
        2.0, ge=0.0, le=3600.0,
        description="how long a rung must stay ahead by the hysteresis before it is made active (not for urgent gains)")
    spread_e2e: float = Field(
        0.1, ge=0.0, le=5.0,
        description="the predictor's e2e and TPOT error as the standard deviation of log(measured / predicted): on "
                    "one H100 the median error was 6-8%, a spread of about 0.1 (0: a budget is met or not)")
    spread_ttft: float = Field(
        0.25, ge=0.0, le=5.0, description="the same for TTFT (median error 15-16% on one H100 at 0.5x-1.0x load)")
    rate_fast_s: float = Field(
        5.0, ge=0.0, le=3600.0,
        description="the rate is the larger of the window's and this many seconds' (0: the window's only)")


@dataclass(frozen=True)
class RungOutlook:
    """What one rung would do with the device's recent traffic to itself."""

    variant_id: str
    concurrency: float | None  # None: saturated
    attainment: float
    value: float
    capacity_rps: float | None = None  # computed for saturated rungs only


@dataclass(frozen=True)
class DeviceRegime:
    device: str
    active: str | None
    since: float
    switches: int
    rate_rps: float
    outlooks: tuple[RungOutlook, ...] = ()
    reason: str = ""
    challenger: str | None = None  # the rung ahead of the active one by the hysteresis, not yet switched to
    challenger_since: float = 0.0
    left: str | None = None  # the rung active before this one

    def recommend(self, margin: float) -> dict:
        """The rungs worth keeping resident on this device for the traffic seen: the active one, and any
        other whose value is within `margin` (the switching hysteresis) of the best, since a small shift
        in the traffic would make it active; every other rung could be unloaded (or put to sleep) and
        its memory given to the active rung's KV cache. Each rung with the measured reason."""
        if self.active is None or not self.outlooks:
            return {"resident": [], "unload": [], "reasons": {}, "summary": self.reason}
        best = max(o.value for o in self.outlooks)
        resident, unload, reasons = [self.active], [], {}
        for o in sorted(self.outlooks, key=lambda o: -o.value):
            said = (f"value {o.value:.2f} (predicted budgets met {o.attainment:.0%}"
                    f"{'' if o.concurrency is not None else ', saturates'})")  # fmt: skip
            if o.variant_id == self.active:
                reasons[o.variant_id] = f"active: {said}"
            elif best - o.value <= margin:
                resident.append(o.variant_id)
                reasons[o.variant_id] = f"contender, within {margin:.2f} of the best: {said}"
            else:
                unload.append(o.variant_id)
                reasons[o.variant_id] = f"{best - o.value:.2f} below the best: {said}"
        summary = (f"keep {self.active} only" if len(resident) == 1 else f"keep {', '.join(resident)}") + \
            f" at {self.rate_rps:.2f} req/s"
        return {"resident": resident, "unload": unload, "reasons": reasons, "summary": summary}

    def as_dict(self) -> dict:
        return {"device": self.device, "active": self.active, "since": self.since, "switches": self.switches,
                "rate_rps": round(self.rate_rps, 3), "reason": self.reason, "challenger": self.challenger,
                "rungs": [{"variant": o.variant_id, "attainment": round(o.attainment, 4),
                           "concurrency": None if o.concurrency is None else round(o.concurrency, 2),
                           "capacity_rps": None if o.capacity_rps is None else round(o.capacity_rps, 3),
                           "value": round(o.value, 4)} for o in self.outlooks]}  # fmt: skip


@dataclass(frozen=True)
class Arrival:
    at: float
    features: RequestFeatures


@dataclass
class Concentrator:
    """The active rung of each device group of one model."""

    config: SharedDeviceConfig
    arrivals: deque[Arrival] = field(default_factory=deque)
    regimes: dict[str, DeviceRegime] = field(default_factory=dict)
    evaluated_at: float | None = None

    def arrive(self, features: RequestFeatures, now: float) -> None:
        self.arrivals.append(Arrival(now, features))
        self._trim(now)

    def due(self, now: float) -> bool:
        return self.evaluated_at is None or now - self.evaluated_at >= self.config.evaluate_every_s

    def active(self, device: str) -> str | None:
        regime = self.regimes.get(device)
        return regime.active if regime else None

    def rate(self, device: str) -> float:
        regime = self.regimes.get(device)
        return regime.rate_rps if regime else 0.0

    def evaluate(self, rungs: Sequence[tuple[Variant, str]], predict: Predict, now: float,
                 largest_batch: LargestBatch | None = None) -> None:  # fmt: skip
        """Re-choose each device's active rung. `rungs`: the model's serving rungs with their device.
        `largest_batch`: how far each rung's step curve was measured; capacity is judged within it (a
        step curve extrapolated to 1,024 requests from a noisy profile up to 64 ranked bf16's capacity
        above fp8's on one H200, and the saturated router made bf16 active at 1x load)."""
        self.evaluated_at = now
        self._trim(now)
        if self.config.policy != "concentrate":
            self.regimes.clear()
            return
        by_device: dict[str, list[Variant]] = {}
        for variant, device in rungs:
            if device:
                by_device.setdefault(device, []).append(variant)
        for gone in set(self.regimes) - set(by_device):
            del self.regimes[gone]
        rate = self._rate(now) / max(len(by_device), 1)
        sample = [a.features for a in list(self.arrivals)[-self.config.max_samples:]]
        for device, variants in by_device.items():
            within = profiled(predict, largest_batch, _device_growth(variants, predict, largest_batch))
            outlooks = [o for o in (self._outlook(v, rate, sample, within, largest_batch) for v in variants)
                        if o is not None]  # fmt: skip
            dominated = self._dominated(variants, sample, predict, largest_batch)
            self.regimes[device] = self._choose(device, variants, outlooks, rate, now, dominated)

    @staticmethod
    def _dominated(variants: Sequence[Variant], sample: list[RequestFeatures], predict: Predict,
                   largest_batch: LargestBatch | None = None) -> dict[str, str]:  # fmt: skip
        """The rungs another rung of the device beats on both counts, each with that rung: more accurate, and
        predicted no slower for the window's mean request alone and at every batch both were profiled at.
        They are never made active, whatever their outlook: on a 2-core AVX2 CPU int8 decoded 3.3x slower
        than bf16 at +3.6% ppl, yet its cheaper prefill per token ranked it ahead whenever bf16 neared its
        predicted saturation (loadtests/results/2026-12-07/bench-cpu-4b956f3.md)."""
        if not sample:
            return {}
        prompt = round(sum(f.prompt_tokens for f in sample) / len(sample))
        output = round(sum(f.output_tokens for f in sample) / len(sample))
        e2e: dict[str, dict[int, float]] = {}  # variant id -> batch -> predicted e2e, within its profiled batches
        for variant in variants:
            largest = (largest_batch(variant.id) if largest_batch else None) or DOMINANCE_BATCHES[-1]
            predictions = {b: predict(variant.id, prompt, output, EngineLoad(running=b)) for b in DOMINANCE_BATCHES
                           if b <= largest}  # fmt: skip
            if all(predictions.values()):
                e2e[variant.id] = {b: p.e2e_ms for b, p in predictions.items()}  # type: ignore[union-attr]
        dominated = {}
        for loser in (v for v in variants if v.id in e2e):
            winner = next((w for w in variants if w.id in e2e and accuracy_key(w) < accuracy_key(loser)
                           and all(e2e[w.id][b] <= e2e[loser.id][b] for b in e2e[w.id].keys() & e2e[loser.id].keys())),
                          None)  # fmt: skip
            if winner is not None:
                dominated[loser.id] = winner.id
        return dominated

    def _trim(self, now: float) -> None:
        while self.arrivals and now - self.arrivals[0].at > self.config.window_s:
            self.arrivals.popleft()

    def _span(self, now: float) -> float:
        """Seconds the window's arrivals cover: the whole window once it is full, else since the first."""
        if not self.arrivals:
            return 0.0
        return min(self.config.window_s, max(now - self.arrivals[0].at, 1.0))

    def _rate(self, now: float) -> float:
        """Arrivals per second: the window's, or the last `rate_fast_s`'s when that is higher by more than
        chance: the recent count must exceed what the window's rate expects there by three of its Poisson
        standard deviations. On a 2-core CPU (0.85 req/s) five seconds hold ~4 arrivals, and bursts of 6-8
        read as 1.2-1.6 req/s made the base look saturated every few seconds: 93 switches of the active
        rung in 38 minutes of bench (loadtests/results/2026-12-07/bench-cpu-fbd3ac8.md). On a GPU (46 req/s) five
        seconds hold ~230, and a real step up is many deviations."""
        span = self._span(now)
        rate = len(self.arrivals) / span if span else 0.0
        fast = self.config.rate_fast_s
        if fast > 0 and span > fast:
            recent = 0
            for arrival in reversed(self.arrivals):
                if now - arrival.at >= fast:
                    break
                recent += 1
            expected = rate * fast
            if recent > expected + 3 * math.sqrt(max(expected, 1.0)):
                rate = recent / fast
        return rate

    def _outlook(self, variant: Variant, rate: float, sample: list[RequestFeatures],
                 predict: Predict, largest_batch: LargestBatch | None = None) -> RungOutlook | None:  # fmt: skip
        if not variant.is_base and variant.ppl_delta is None:
            return None  # unmeasured quality: never made active
        if predict(variant.id, 1, 1, EngineLoad()) is None:
            return None  # no priors yet
        penalty = self.config.quality_weight * 100 * (variant.ppl_delta or 0.0)
        if not sample:
            return RungOutlook(variant.id, 0.0, 1.0, 1.0 - penalty)
        prompt = sum(f.prompt_tokens for f in sample) / len(sample)
        output = sum(f.output_tokens for f in sample) / len(sample)
        prefill_ms = self._prefill_ms(variant.id, prompt, predict)
        share = rate * prefill_ms / 1000  # of the device, taken by the arriving prompts' prefill
        taxed = _taxed(predict, 1.0 - share) if share < 1 else None
        concurrency = self._concurrency(variant.id, rate, prompt, output, taxed) if taxed else None
        if concurrency is None or taxed is None:  # saturated: meets nothing, and ranks by how far behind it falls
            capacity = self._capacity(variant.id, prompt, output, predict, prefill_ms,
                                      largest_batch(variant.id) if largest_batch else None)  # fmt: skip
            overload = rate / capacity if capacity > 0 else float(self.config.max_concurrency)
            return RungOutlook(variant.id, None, 0.0, -penalty - max(overload - 1.0, 0.0), capacity)
        load = EngineLoad(running=concurrency) if concurrency > 0 else EngineLoad()  # type: ignore[arg-type]
        judged, met = 0, 0.0
        for features in sample:
            if not features.budget.any:
                continue
            judged += 1
            prediction = taxed(variant.id, features.prompt_tokens, features.output_tokens, load)
            if prediction is not None:
                met += chance(prediction, features.budget, self.config.spread_ttft, self.config.spread_e2e)
        attainment = met / judged if judged else 1.0
        return RungOutlook(variant.id, concurrency, attainment, attainment - penalty)

    def _concurrency(self, variant_id: str, rate: float, prompt: float, output: float,
                     predict: Predict) -> float | None:  # fmt: skip
        """Requests in flight on the rung if it took all the traffic: the least N = rate x e2e(N);
        None when it saturates. The rung has priors."""
        idle = predict(variant_id, round(prompt), round(output), EngineLoad())
        n = rate * idle.e2e_ms / 1000  # type: ignore[union-attr]
        for _ in range(100):
            if n > self.config.max_concurrency:
                return None
            loaded = predict(variant_id, round(prompt), round(output), EngineLoad(running=n))  # type: ignore[arg-type]
            nxt = rate * loaded.e2e_ms / 1000 if loaded else n
            if abs(nxt - n) < 0.01:
                return nxt
            n = nxt
        return None  # still climbing: as good as saturated

    @staticmethod
    def _prefill_ms(variant_id: str, prompt: float, predict: Predict) -> float:
        """The device time one arriving prompt's prefill takes: the idle TTFT's part that grows with the
        prompt (the fixed part is a step the decoders share, not time taken from them)."""
        one = predict(variant_id, 1, 1, EngineLoad())
        whole = predict(variant_id, max(round(prompt), 1), 1, EngineLoad())
        return max(whole.ttft_ms - one.ttft_ms, 0.0) if one and whole else 0.0

    def _capacity(self, variant_id: str, prompt: float, output: float, predict: Predict,
                  prefill_ms: float = 0.0, largest_batch: int | None = None) -> float:  # fmt: skip
        """The most requests per second the rung completes over concurrencies 1, 2, 4, ... up to the
        largest batch it was profiled at (or `max_concurrency`): at N, decoding alone completes
        N / e2e(N) per second, and each request's prefill takes `prefill_ms` of the device besides
        (1 / capacity = 1 / decoding + prefill). The rung has priors."""
        top = min(self.config.max_concurrency, largest_batch or self.config.max_concurrency)
        best, n = 0.0, 1
        while True:
            loaded = predict(variant_id, round(prompt), round(output), EngineLoad(running=n) if n > 1 else EngineLoad())
            if loaded is not None and loaded.e2e_ms > 0:
                decoding = n * 1000 / loaded.e2e_ms
                best = max(best, 1 / (1 / decoding + prefill_ms / 1000))
            if n >= top:
                return best
            n = min(n * 2, top)

    def _choose(self, device: str, variants: list[Variant], outlooks: list[RungOutlook], rate: float,
                now: float, dominated: Mapping[str, str] | None = None) -> DeviceRegime:  # fmt: skip
        previous = self.regimes.get(device)
        accuracy = {v.id: accuracy_key(v) for v in variants}
        if not outlooks:
            return DeviceRegime(device, None, now, previous.switches if previous else 0, rate, (), "no rung has priors")
        dominated = dominated or {}
        eligible = [o for o in outlooks if o.variant_id not in dominated]  # never empty: the most accurate is not
        best = min(eligible, key=lambda o: (-o.value, accuracy[o.variant_id]))
        current = next((o for o in eligible if previous and o.variant_id == previous.active), None)
        switches = previous.switches if previous else 0
        summary = ", ".join(f"{o.variant_id.split('@')[-1]} {o.attainment:.0%}" for o in outlooks)
        what = f"at {rate:.2f} req/s, predicted budgets met if it took them all: {summary}"
        if previous is not None and previous.active in dominated:
            what += f"; {previous.active} is slower than {dominated[previous.active]} and less accurate"
        if current is None:
            return DeviceRegime(device, best.variant_id, now, switches + (previous is not None), rate,
                                tuple(outlooks), f"{best.variant_id} has the best value {what}",
                                left=previous.active if previous else None)  # fmt: skip
        held = now - previous.since  # type: ignore[union-attr]
        gain = best.value - current.value
        if best.variant_id == current.variant_id or gain <= self.config.hysteresis:
            # No rung beats the active one by the hysteresis; a more accurate rung predicted at least as good
            # still takes over (confirmed as any switch). On one H100 INT8 was made active under the bench's
            # capacity burst and kept at 0.25x and 1.0x, where FP8 was predicted as good (and measured better)
            # at half INT8's ppl delta (loadtests/results/2026-12-07/router-h100-8e90486.md). It cannot flap:
            # going back to the less accurate rung takes a gain beyond the hysteresis.
            upgrades = [o for o in eligible if o.value >= current.value
                        and accuracy[o.variant_id] < accuracy[current.variant_id]]  # fmt: skip
            if not upgrades:
                return DeviceRegime(device, current.variant_id, previous.since, switches, rate,  # type: ignore[union-attr]
                                    tuple(outlooks), f"{current.variant_id} stays active {what}",
                                    left=previous.left)  # type: ignore[union-attr]  # fmt: skip
            best = min(upgrades, key=lambda o: accuracy[o.variant_id])
            gain = best.value - current.value
            beat = f"is as good as {current.variant_id} and more accurate (value {gain:+.2f})"
        else:
            beat = f"beat {current.variant_id} by {gain:.2f}"
        since = previous.challenger_since if previous.challenger == best.variant_id else now  # type: ignore[union-attr]
        # An urgent gain skips the dwell, but not straight back to the rung just left: on a 2-core CPU at
        # 1.5x, two rungs on either side of their predicted saturation traded places every 1-3 s, each move
        # an "urgent" gain of 0.2-1.2 (loadtests/results/2026-12-07/bench-cpu-4b956f3.md).
        back = best.variant_id == previous.left and held < self.config.min_dwell_s  # type: ignore[union-attr]
        urgent = gain >= self.config.urgent_gain and not back
        if urgent or (held >= self.config.min_dwell_s and now - since >= self.config.confirm_s):
            return DeviceRegime(device, best.variant_id, now, switches + 1, rate, tuple(outlooks),
                                f"{best.variant_id} {beat} {what}", left=current.variant_id)
        return DeviceRegime(device, current.variant_id, previous.since, switches, rate,  # type: ignore[union-attr]
                            tuple(outlooks), f"{current.variant_id} stays active, {best.variant_id} ahead by "
                            f"{gain:.2f} for {now - since:.1f} s, {what}", best.variant_id, since,
                            previous.left)  # type: ignore[union-attr]  # fmt: skip


def chance(prediction: Prediction, budget: Budget, spread_ttft: float, spread: float) -> float:
    """The chance that a request predicted at `prediction` meets `budget`, each latency's error taken as
    log-normal (standard deviation of log(measured / predicted): `spread_ttft` for TTFT, `spread` for TPOT
    and e2e) and the bounds independent; with a spread of 0, 1 or 0 as `Prediction.fits` says."""
    p = 1.0
    for bound, value, sd in ((budget.e2e_ms, prediction.e2e_ms, spread), (budget.ttft_ms, prediction.ttft_ms, spread_ttft),
                             (budget.tpot_ms, prediction.tpot_ms, spread)):  # fmt: skip
        if bound is None:
            continue
        if value <= 0 or bound <= 0 or sd <= 0:
            p *= float(value <= bound)
        else:
            p *= 0.5 * (1 + math.erf(math.log(bound / value) / (sd * math.sqrt(2))))
    return p


def profiled(predict: Predict, largest_batch: LargestBatch | None, growth: float = 1.0) -> Predict:
    """Predictions that do not extrapolate a rung's own step curve past the largest batch it was measured
    at: beyond it, its step time grows as step(L) x (1 + growth x (N / L - 1)), with one `growth` for every
    rung of the device (`_device_growth`), so the rung that steps faster at L stays faster at any larger
    batch. Extrapolated along its own last slope, a noisy flat profile wins: on one H100 bf16 stepped 5.9,
    6.6, 6.2 and 6.8 ms at batch 1-64 and FP8 3.7 to 5.4 ms, so past ~150 requests bf16 was predicted the
    faster; at 1.5x load, with the load corrections up, the outlook's concurrencies went past that and the
    router served two thirds of the requests on bf16, at 0.44x FP8's goodput
    (loadtests/results/2026-12-07/router-h100-c0a0c38.md)."""
    if largest_batch is None:
        return predict

    def within(variant_id: str, prompt_tokens: int, output_tokens: int, load: EngineLoad) -> Prediction | None:
        largest = largest_batch(variant_id)
        if not largest or load.running <= largest:
            return predict(variant_id, prompt_tokens, output_tokens, load)
        p = predict(variant_id, prompt_tokens, output_tokens, replace(load, running=largest))
        if p is None:
            return None
        grow = 1 + growth * (load.running / largest - 1)
        return replace(p, tpot_ms=p.tpot_ms * grow, e2e_ms=p.ttft_ms + (p.e2e_ms - p.ttft_ms) * grow)

    return within


def _device_growth(variants: Sequence[Variant], predict: Predict, largest_batch: LargestBatch | None) -> float:
    """How a device's decode step grows past the rungs' profiles, relative to its size there: the median over
    its rungs of each one's growth over the last quarter of its profile, (1 - step(L/4) / step(L)) / 0.75,
    at most 1 (no batching gain) and 1 when nothing is known. One H100's four rungs gave 0.04-0.41
    (median 0.23), this 2-core CPU's two 0.60 and 0.85."""
    if largest_batch is None:
        return 1.0
    slopes = []
    for variant in variants:
        largest = largest_batch(variant.id)
        if not largest or largest < 4:
            continue
        top = predict(variant.id, 1, 2, EngineLoad(running=largest))
        quarter = predict(variant.id, 1, 2, EngineLoad(running=largest // 4))
        if top is not None and quarter is not None and top.tpot_ms > 0:
            slopes.append(min(max((1 - quarter.tpot_ms / top.tpot_ms) / 0.75, 0.0), 1.0))
    return statistics.median(slopes) if slopes else 1.0


def _taxed(predict: Predict, left: float) -> Predict:
    """Predictions whose decode gets only `left` of the device (the rest goes to arriving prefills)."""

    def taxed(variant_id: str, prompt_tokens: int, output_tokens: int, load: EngineLoad) -> Prediction | None:
        p = predict(variant_id, prompt_tokens, output_tokens, load)
        if p is None or left >= 1:
            return p
        return replace(p, tpot_ms=p.tpot_ms / left, e2e_ms=p.ttft_ms + (p.e2e_ms - p.ttft_ms) / left)

    return taxed


def standby_map(concentrator: Concentrator, available: Mapping[str, str]) -> dict[str, bool]:
    """For each available rung (variant id -> device): True when another rung of its device is the
    active one and is available itself."""
    out = {}
    for variant_id, device in available.items():
        active = concentrator.active(device) if device else None
        out[variant_id] = active is not None and active != variant_id and active in available
    return out


def device_priced(latency_of: Callable[[str], VariantLatency | None], concentrator: Concentrator,
                  devices: Mapping[str, str]) -> Predict:  # fmt: skip
    """Predictions for the outlooks: under load, every rung of a device takes the load correction of
    the device's active rung, the one measured under the current traffic. A rung's own load correction
    says only how the device behaved when that rung last carried traffic; used as is, rungs that have
    sat idle look better than the one carrying the load (the likely reason the router moved 1x load
    from int8 to bf16 on one H100 and met fewer budgets than int8 alone: loadtests/results/2026-12-05/
    router-h100.md). `devices`: variant id -> device group."""
    priced: dict[str, VariantLatency | None] = {}

    def latency(variant_id: str) -> VariantLatency | None:
        if variant_id not in priced:
            own = latency_of(variant_id)
            active = concentrator.active(devices.get(variant_id, ""))
            reference = latency_of(active) if active and active != variant_id else None
            if own is not None and reference is not None:
                own = replace(own, load_ttft_scale=reference.load_ttft_scale, load_tpot_scale=reference.load_tpot_scale)
            priced[variant_id] = own
        return priced[variant_id]

    def predict(variant_id: str, prompt_tokens: int, output_tokens: int, load: EngineLoad) -> Prediction | None:
        found = latency(variant_id)
        return found.predict(prompt_tokens, output_tokens, load) if found is not None else None

    return predict
