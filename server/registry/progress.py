"""What each variant's build is doing now, how far along it is, and when it should be done (issue 21).

The compression job reports its phase and, while it calibrates, the fraction done from its own
decoder-layer forwards (optimizers/progress.py). The ETA comes from the rate measured since the
phase's first progress event: (1 - fraction) / rate, less the time since the last event. No ETA is
given before `min_fraction` is done (the first layer's rate includes warm-up), nor for a phase that
reports no fraction (converting, evaluating: shown with their elapsed time only). Kept in memory: a
restarted gateway starts its builds again and measures afresh."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The job's stage events (optimizers/job.py) in words a user reads.
STAGE_PHASES = {"calibration-data": "preparing calibration data", "quantizing": "quantizing",
                "calibration-resized": "fitting the calibration to its time budget",
                "cached": "reusing a cached artifact", "done": "compressed"}  # fmt: skip


@dataclass
class _Phase:
    name: str
    started: float
    fraction: float | None = None
    detail: str | None = None
    first: tuple[float, float] | None = None  # (time, fraction) of the first progress event
    last: tuple[float, float] | None = None


def queued(ahead: int, waited_s: float) -> dict[str, Any]:
    """A pending variant's progress: how many builds run before it (the one at work included)."""
    return {"phase": "queued", "detail": f"{ahead} build{'s' * (ahead != 1)} ahead", "fraction": None,
            "phase_elapsed_s": round(waited_s, 1), "elapsed_s": round(waited_s, 1), "eta_s": None}  # fmt: skip


class BuildProgress:
    def __init__(self, min_fraction: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_fraction = min_fraction
        self.clock = clock
        self._started: dict[str, float] = {}
        self._phases: dict[str, _Phase] = {}

    def phase(self, variant_id: str, name: str) -> None:
        """`variant_id`'s build entered `name` (its first phase starts the build's clock)."""
        now = self.clock()
        self._started.setdefault(variant_id, now)
        current = self._phases.get(variant_id)
        if current is None or current.name != name:
            self._phases[variant_id] = _Phase(name, now)

    def event(self, variant_id: str, event: dict[str, Any]) -> None:
        """One event of the compression job (`{"event": "stage"|"progress", ...}`)."""
        kind = event.get("event")
        if kind == "stage" and isinstance(event.get("stage"), str):
            self.phase(variant_id, STAGE_PHASES.get(event["stage"], event["stage"]))
        elif kind == "progress" and isinstance(event.get("fraction"), (int, float)):
            self.phase(variant_id, str(event.get("phase") or "compressing"))
            phase, now = self._phases[variant_id], self.clock()
            fraction = min(max(float(event["fraction"]), 0.0), 1.0)
            phase.fraction = fraction
            phase.first = phase.first or (now, fraction)
            phase.last = (now, fraction)
            if isinstance(event.get("layer"), int) and isinstance(event.get("layers"), int):
                phase.detail = f"layer {event['layer']} of {event['layers']}"
            elif isinstance(event.get("step"), int) and isinstance(event.get("steps"), int):
                phase.detail = f"step {event['step']} of {event['steps']}"

    def finish(self, variant_id: str) -> None:
        self._started.pop(variant_id, None)
        self._phases.pop(variant_id, None)

    def eta_s(self, variant_id: str) -> float | None:
        phase = self._phases.get(variant_id)
        if phase is None or phase.first is None or phase.last is None or phase.fraction is None:
            return None
        (t0, f0), (t1, f1) = phase.first, phase.last
        if f1 < self.min_fraction or f1 <= f0 or t1 <= t0:
            return None
        rate = (f1 - f0) / (t1 - t0)
        return max((1.0 - f1) / rate - (self.clock() - t1), 0.0)

    def view(self, variant_id: str) -> dict[str, Any] | None:
        """`{phase, detail, fraction, phase_elapsed_s, elapsed_s, eta_s}` for a build in progress, else None."""
        phase = self._phases.get(variant_id)
        if phase is None:
            return None
        now = self.clock()
        eta = self.eta_s(variant_id)
        return {"phase": phase.name, "detail": phase.detail,
                "fraction": None if phase.fraction is None else round(phase.fraction, 4),
                "phase_elapsed_s": round(now - phase.started, 1),
                "elapsed_s": round(now - self._started[variant_id], 1),
                "eta_s": None if eta is None else round(eta, 1)}  # fmt: skip

    def building(self) -> list[str]:
        """The variants whose build is in progress."""
        return list(self._phases)

    def views(self) -> dict[str, dict[str, Any]]:
        return {variant_id: view for variant_id in self.building() if (view := self.view(variant_id))}
