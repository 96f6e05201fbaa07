"""A calibrating job's progress, from its own forwards, as events for the gateway (issue 21).

llm-compressor's sequential pipeline calibrates one decoder layer at a time: every window through
the layer with the modifiers' hooks on (calibrate), then every window again through the quantized
layer (propagate), then the next layer. A forward pre-hook on each decoder layer sees that happen;
the fraction done is (layers finished + this layer's share) / layers, where a layer's share is its
forwards so far over 2 x windows, capped at 1 (AWQ's scale search runs a layer more often). Events go
to the job's `emit` at most every `interval_s` and at each new layer; the gateway turns their rate
into an ETA (server/registry/progress.py).

The same hooks keep a calibration inside its time budget (issue 21, item 2): the first layer's time,
from its first forward to the next layer's, times the number of layers projects the whole run; past
the budget the hook raises OverBudget and optimizers/llmcompressor_run.py starts again on fewer windows
(sized_windows), having spent one layer of the run it abandons."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

Emit = Callable[..., None]

_sink: Emit | None = None

# Fewer windows than this and the calibration is noise (the fast profile, for CI, takes 16).
MIN_WINDOWS = 8


class OverBudget(Exception):
    """The calibration's projected time exceeds its budget (raised from inside llm-compressor's run)."""

    def __init__(self, first_layer_s: float, projected_s: float, windows: int) -> None:
        super().__init__(f"{windows} windows: the first layer took {first_layer_s:.1f} s, "
                         f"so the calibration would take ~{projected_s:.0f} s")  # fmt: skip
        self.first_layer_s, self.projected_s, self.windows = first_layer_s, projected_s, windows


def sized_windows(windows: int, projected_s: float, budget_s: float, margin: float = 0.85) -> int:
    """Windows that fit `budget_s`, given that `windows` project to `projected_s`: a layer's time scales
    with its windows, less a per-layer part that does not (the quantization itself), hence the margin.
    Even (prose and chat windows come in pairs), at least MIN_WINDOWS, never more than given."""
    if projected_s <= 0:
        return windows
    fit = int(windows * budget_s * margin / projected_s)
    return min(windows, max(MIN_WINDOWS, fit - fit % 2))


def write_event(event: str, **fields: Any) -> None:
    """One event of a job's protocol: a JSON object on its own stdout line, read by the gateway
    (server/jobs/compress.py run_events); logs and human-readable progress go to stderr."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def reporting(emit: Emit) -> Iterator[None]:
    """Send the progress of whatever this job calibrates to `emit` (optimizers/job.py sets it)."""
    global _sink
    previous, _sink = _sink, emit
    try:
        yield
    finally:
        _sink = previous


def emit_stage(stage: str, **fields: Any) -> None:
    """A stage event from inside a handler (e.g. a calibration resized to its budget), when reporting."""
    if _sink is not None:
        _sink("stage", stage=stage, **fields)


def emit_progress(phase: str, fraction: float, **fields: Any) -> None:
    """A progress event from inside a handler that is not a calibration (e.g. distillation's steps), at most
    once a second, when reporting."""
    global _last_progress
    now = time.monotonic()
    if _sink is not None and (now - _last_progress >= 1.0 or fraction >= 1.0):
        _last_progress = now
        _sink("progress", phase=phase, fraction=round(min(max(fraction, 0.0), 1.0), 4), **fields)


_last_progress = float("-inf")


def decoder_layers(model: Any) -> list[Any]:
    """The model's decoder layers (`model.model.layers` in every architecture the ladder takes)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if layers is not None else []


class LayerProgress:
    """Counts decoder-layer forwards during calibration and emits `progress` events."""

    def __init__(self, layers: int, windows: int, emit: Emit, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, budget_s: float | None = None) -> None:  # fmt: skip
        self.layers, self.windows, self.emit = layers, max(windows, 1), emit
        self.interval_s, self.clock, self.budget_s = interval_s, clock, budget_s
        self.current = -1
        self.calls = 0
        self.first_layer_s: float | None = None
        self._started: float | None = None
        self._last_emit = float("-inf")

    def projected_s(self) -> float | None:
        """The whole calibration's time, from its first layer's (None before that layer is done)."""
        return None if self.first_layer_s is None else self.first_layer_s * self.layers

    def fraction(self) -> float:
        if self.current < 0:
            return 0.0
        share = min(self.calls / (2 * self.windows), 1.0)
        return min((self.current + share) / self.layers, 1.0)

    def forward(self, index: int) -> None:
        new_layer = index > self.current
        now = self.clock()
        if new_layer:
            if self._started is None:
                self._started = now
            elif self.first_layer_s is None:
                self.first_layer_s = now - self._started
                projected = self.projected_s()
                if self.budget_s is not None and projected is not None and projected > self.budget_s:
                    raise OverBudget(self.first_layer_s, projected, self.windows)
            self.current, self.calls = index, 0
        elif index < self.current:
            return  # an earlier layer run again (not by the sequential pipeline): no new information
        self.calls += 1
        if new_layer or now - self._last_emit >= self.interval_s:
            self._last_emit = now
            self.emit("progress", phase="calibrating", layer=index + 1, layers=self.layers,
                      fraction=round(self.fraction(), 4))  # fmt: skip


@contextlib.contextmanager
def layer_progress(model: Any, windows: int, budget_s: float | None = None) -> Iterator[LayerProgress | None]:
    """Hooks on `model`'s decoder layers for the duration of a calibration, when a job is reporting or
    the calibration has a time budget."""
    layers = decoder_layers(model)
    if (_sink is None and budget_s is None) or not layers:
        yield None
        return
    sink = _sink
    progress = LayerProgress(len(layers), windows, sink or (lambda *a, **k: None), budget_s=budget_s)
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: progress.forward(i)) for i, layer in enumerate(layers)
    ]
    try:
        yield progress
    finally:
        for handle in handles:
            handle.remove()
    # Calibrated (not reached when the calibration raised): the moment the ETA was predicting.
    if sink is not None:
        sink("progress", phase="calibrating", layer=len(layers), layers=len(layers), fraction=1.0)
