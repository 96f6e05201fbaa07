"""A calibrating job's progress, from its own forwards, as events for the gateway (issue 21).

llm-compressor's sequential pipeline calibrates one decoder layer at a time: every window through
the layer with the modifiers' hooks on (calibrate), then every window again through the quantized
layer (propagate), then the next layer. A forward pre-hook on each decoder layer sees that happen;
the fraction done is (layers finished + this layer's share) / layers, where a layer's share is its
forwards so far over 2 x windows, capped at 1 (AWQ's scale search runs a layer more often). Events go
to the job's `emit` at most every `interval_s` and at each new layer; the gateway turns their rate
into an ETA (server/registry/progress.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

Emit = Callable[..., None]

_sink: Emit | None = None


@contextlib.contextmanager
def reporting(emit: Emit) -> Iterator[None]:
    """Send the progress of whatever this job calibrates to `emit` (optimizers/job.py sets it)."""
    global _sink
    previous, _sink = _sink, emit
    try:
        yield
    finally:
        _sink = previous


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers (`model.model.layers` in every architecture the ladder takes)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if layers is not None else []


class LayerProgress:
    """Counts decoder-layer forwards during calibration and emits `progress` events."""

    def __init__(self, layers: int, windows: int, emit: Emit, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.layers, self.windows, self.emit = layers, max(windows, 1), emit
        self.interval_s, self.clock = interval_s, clock
        self.current = -1
        self.calls = 0
        self._last_emit = float("-inf")

    def fraction(self) -> float:
        if self.current < 0:
            return 0.0
        share = min(self.calls / (2 * self.windows), 1.0)
        return min((self.current + share) / self.layers, 1.0)

    def forward(self, index: int) -> None:
        new_layer = index > self.current
        if new_layer:
            self.current, self.calls = index, 0
        elif index < self.current:
            return  # an earlier layer run again (not by the sequential pipeline): no new information
        self.calls += 1
        now = self.clock()
        if new_layer or now - self._last_emit >= self.interval_s:
            self._last_emit = now
            self.emit("progress", phase="calibrating", layer=index + 1, layers=self.layers,
                      fraction=round(self.fraction(), 4))  # fmt: skip


@contextlib.contextmanager
def layer_progress(model: Any, windows: int) -> Iterator[LayerProgress | None]:
    """Hooks on `model`'s decoder layers for the duration of a calibration, when a job is reporting."""
    layers = decoder_layers(model)
    if _sink is None or not layers:
        yield None
        return
    progress = LayerProgress(len(layers), windows, _sink)
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: progress.forward(i)) for i, layer in enumerate(layers)
    ]
    try:
        yield progress
    finally:
        for handle in handles:
            handle.remove()
    # Calibrated (not reached when the calibration raised): the moment the ETA was predicting.
    _sink("progress", phase="calibrating", layer=len(layers), layers=len(layers), fraction=1.0)
