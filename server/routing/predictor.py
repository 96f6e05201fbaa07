"""Latency prediction per variant: priors from a profiling run, corrected online.

    TTFT = (prefill(prompt) + whole prefills for the requests queued + a share of the prompt tokens
            of the streams still prefilling ahead + one decode step of the decoding batch)
           * (1 + busy engines sharing the device) * ttft_scale [* load_ttft_scale under load]
    TPOT = step_time(batch the request joins) * (1 + busy engines sharing the device)
           * tpot_scale [* load_tpot_scale under load]
    e2e  = TTFT + (output_tokens - 1) * TPOT

`prefill` is linear in prompt tokens and `step_time` piecewise linear in the batch size, both
measured on the variant's own engine (never assumed from its bit width) while the other engines
of its device were idle (profiles on one device run one at a time). Engines on one device share
its compute, so other busy engines there slow this one down (on a 2-core CPU, spreading requests
over four variants' engines was 4x slower than batching them in one:
loadtests/results/2026-11-25/router-vs-base.md).

The online correction has two parts, each an exponentially weighted ratio of observed to predicted
latency, each bounded. The idle scales learn only from requests routed to an idle engine on an idle
device, so what load costs never moves the idle prediction: on one H200 an unsplit correction took in
the slowdown of four engines sharing the GPU and predicted bf16 at 4.5 s idle against 0.63 s measured
(the shared-device router issue). Idle when routed is not enough: the first request of a burst is
routed to an idle device and then prefills beside the rest of the burst, so its TTFT counts as idle
only if nothing else reached the device before its first token, and its TPOT only if it stayed alone
to its end (`Admissions`); on one H100, bursts of 16-64 took INT8's idle prediction from 509 to 671 ms
against 426 ms measured (loadtests/results/2026-12-05/router-h100-edb2964.md). The load scales learn
from the other requests what the load model misses, on top of the idle scales. Pure: no clocks, no I/O.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.routing.types import EngineLoad, Prediction

RATIO_BOUNDS = (0.1, 10.0)  # one odd observation moves a scale at most this far
# How far the corrections may take a prediction from its priors: the idle priors were measured
# alone on the device, so an idle scale beyond 3x is evidence of a changed machine (profile again),
# not something to fold in; load is modelled, so its residual may be larger.
IDLE_SCALE_BOUNDS = (1 / 3, 3.0)
LOAD_SCALE_BOUNDS = (0.25, 4.0)
# What one prompt token of a stream still prefilling ahead of a request adds to its TTFT, as a share
# of what one of its own prompt tokens costs: 0.24-0.44 by least squares over every pinned run on one
# H100 (loadtests/results/2026-12-07/predictor-ttft.md). Below 1: the engine batches the prefills, its
# per-token prior includes what happens once per request's tokens (tokenising), and those ahead are
# part done when this one arrives.
AHEAD_PREFILL_SHARE = 0.35


class RawPrediction(NamedTuple):
    """The uncorrected (TTFT, TPOT) a request was routed on, whether its engine and device were idle,
    and the device group it went to (the variant itself when its device is unknown)."""

    ttft_ms: float
    tpot_ms: float
    idle: bool
    device: str


class LatencyPriors(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_fixed_ms: float = Field(ge=0.0)
    prefill_per_token_ms: float = Field(ge=0.0)
    # (batch size, milliseconds per decode step), increasing batch sizes
    step_ms: tuple[tuple[int, float], ...] = Field(min_length=1)

    @field_validator("step_ms")
    @classmethod
    def _sorted(cls, points: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        return tuple(sorted(points))

    def prefill(self, prompt_tokens: int) -> float:
        return self.prefill_fixed_ms + self.prefill_per_token_ms * prompt_tokens

    def step(self, batch: int) -> float:
        """Decode step time at `batch` running requests: interpolated, extrapolated linearly, over the
        measured points made non-decreasing (a larger batch never steps faster: a profile that measured
        batch 16 below batch 4 is noise, and extrapolating its falling slope predicted any batch as
        cheap as batch 1 on the GPU)."""
        xs = [b for b, _ in self.step_ms]
        ys = list(itertools.accumulate((t for _, t in self.step_ms), max))
        if len(xs) == 1 or batch <= xs[0]:
            return ys[0]
        i = min(max(bisect.bisect_left(xs, batch), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(ys[0], y0 + (y1 - y0) * (batch - x0) / (x1 - x0))


@dataclass
class VariantLatency:
    priors: LatencyPriors
    alpha: float = 0.2
    ttft_scale: float = 1.0  # idle: observed / prior, on an idle engine and device
    tpot_scale: float = 1.0
    load_ttft_scale: float = 1.0  # under load: observed / (prior x idle scale)
    load_tpot_scale: float = 1.0
    observations: int = 0

    def raw(self, prompt_tokens: int, output_tokens: int, load: EngineLoad) -> tuple[float, float]:
        """Uncorrected (TTFT, TPOT) in ms for a request joining `load`.

        Ahead of its first token: a whole prefill for each request the engine reports waiting (for a
        slot), the prefills of the other streams the gateway has sent this engine and seen no first
        token of (the engine's chunked prefill batches them with this one, and they are part done: each
        of their prompt tokens costs AHEAD_PREFILL_SHARE of one of this prompt's), and a decode step of
        the requests decoding. Before, those streams counted as decoding and their prefills went
        unpriced (loadtests/results/2026-12-07/predictor-ttft.md)."""
        waiting = load.waiting
        running = max(load.running, load.in_flight - waiting)
        # The streams without a first token that the engine does not report waiting are being prefilled;
        # those it reports waiting (for a slot) cost a whole prefill each, as before.
        prefilling = max(load.prefilling - waiting, 0)
        ahead_tokens = load.prefill_tokens * prefilling / load.prefilling if load.prefilling else 0.0
        decoding = max(running - prefilling, 0)
        ttft = self.priors.prefill(prompt_tokens) * (1 + waiting)
        ttft += AHEAD_PREFILL_SHARE * self.priors.prefill_per_token_ms * ahead_tokens
        if decoding:
            ttft += self.priors.step(decoding)
        # Busy engines on one device time-share it: each gets about 1/k of the compute.
        share = 1 + load.device_peers_busy
        return ttft * share, self.priors.step(running + waiting + 1) * share

    def scales(self, idle: bool) -> tuple[float, float]:
        """The (TTFT, TPOT) corrections applied to a raw prediction on an idle or a loaded engine."""
        if idle:
            return self.ttft_scale, self.tpot_scale
        return self.ttft_scale * self.load_ttft_scale, self.tpot_scale * self.load_tpot_scale

    def predict(self, prompt_tokens: int, output_tokens: int, load: EngineLoad) -> Prediction:
        ttft, tpot = self.raw(prompt_tokens, output_tokens, load)
        ttft_scale, tpot_scale = self.scales(load.idle)
        ttft, tpot = ttft * ttft_scale, tpot * tpot_scale
        idle_ttft, idle_tpot = self.raw(prompt_tokens, output_tokens, EngineLoad())
        decode = max(output_tokens - 1, 0)
        return Prediction(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=ttft + decode * tpot,
                          idle_e2e_ms=idle_ttft * self.ttft_scale + decode * idle_tpot * self.tpot_scale)

    def observe(self, raw_ttft_ms: float | None, observed_ttft_ms: float | None,
                raw_tpot_ms: float | None, observed_tpot_ms: float | None, idle: bool = True) -> None:
        """Fold one request's observed latencies (against the raw prediction it was routed on) into
        the idle scales when it was routed to an idle engine and device, else into the load scales."""
        if idle:
            if raw_ttft_ms and observed_ttft_ms is not None:
                self.ttft_scale = self._fold(self.ttft_scale, observed_ttft_ms / raw_ttft_ms, IDLE_SCALE_BOUNDS)
            if raw_tpot_ms and observed_tpot_ms is not None:
                self.tpot_scale = self._fold(self.tpot_scale, observed_tpot_ms / raw_tpot_ms, IDLE_SCALE_BOUNDS)
        else:
            if raw_ttft_ms and observed_ttft_ms is not None:
                ratio = observed_ttft_ms / (raw_ttft_ms * self.ttft_scale)
                self.load_ttft_scale = self._fold(self.load_ttft_scale, ratio, LOAD_SCALE_BOUNDS)
            if raw_tpot_ms and observed_tpot_ms is not None:
                ratio = observed_tpot_ms / (raw_tpot_ms * self.tpot_scale)
                self.load_tpot_scale = self._fold(self.load_tpot_scale, ratio, LOAD_SCALE_BOUNDS)
        self.observations += 1

    def _fold(self, scale: float, ratio: float, bounds: tuple[float, float]) -> float:
        ratio = min(max(ratio, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
        folded = (1 - self.alpha) * scale + self.alpha * ratio
        return min(max(folded, bounds[0]), bounds[1])


class Admissions:
    """Per device group, the sequence numbers and times of its latest admissions: whether a request
    admitted to an idle device stayed alone until a given moment. Pure: the caller passes the clock."""

    def __init__(self, keep: int = 64) -> None:
        self._times: dict[str, deque[tuple[int, float]]] = {}  # (sequence number, time), consecutive
        self._keep = keep

    def admit(self, device: str, now: float) -> int:
        """Count one request onto `device`; its sequence number there."""
        times = self._times.setdefault(device, deque(maxlen=self._keep))
        seq = times[-1][0] + 1 if times else 1
        times.append((seq, now))
        return seq

    def alone(self, device: str, seq: int, until: float | None = None) -> bool:
        """Whether no request reached `device` after admission `seq`: before `until`, or at all (None)."""
        times = self._times.get(device)
        if not times or times[-1][0] <= seq:
            return True
        after = seq + 1 - times[0][0]  # where the next admission is kept
        return until is not None and after >= 0 and times[after][1] >= until  # fell out: many came since


@dataclass
class CompletionLengths:
    """Recent completion lengths of one model, for requests that do not set max_tokens."""

    window: deque[int] = field(default_factory=lambda: deque(maxlen=1000))

    def add(self, tokens: int) -> None:
        if tokens > 0:
            self.window.append(tokens)

    def quantile(self, q: float, default: int) -> int:
        if not self.window:
            return default
        ordered = sorted(self.window)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class LatencyBook:
    """Every variant's latency model and every model's completion lengths (the gateway owns one)."""

    alpha: float = 0.2
    variants: dict[str, VariantLatency] = field(default_factory=dict)
    lengths: dict[str, CompletionLengths] = field(default_factory=dict)

    def set_priors(self, variant_id: str, priors: LatencyPriors) -> None:
        self.variants[variant_id] = VariantLatency(priors, alpha=self.alpha)

    def get(self, variant_id: str) -> VariantLatency | None:
        return self.variants.get(variant_id)

    def forget(self, variant_id: str) -> None:
        self.variants.pop(variant_id, None)

    def completion_lengths(self, model: str) -> CompletionLengths:
        return self.lengths.setdefault(model, CompletionLengths())
