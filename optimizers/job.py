"""One compression job: check, calibrate, quantize into a temp dir, write the manifest, rename."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimizers.base import Device, MethodConfig, ModelInfo
from optimizers.data import CALIBRATION_VERSION, PROFILES, tokenized_split
from optimizers.host import NATIVE_BF16, cpu_flags, has_nvidia_gpu
from optimizers.progress import reporting
from optimizers.registry import handler_for

logger = logging.getLogger(__name__)

MANIFEST = "quantgate-variant.json"
Emit = Callable[..., None]


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def read_manifest(out: Path) -> dict[str, Any] | None:
    manifest = out / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def calibration_dtype_name() -> str:
    """The dtype calibration computes in: QUANTGATE_CALIBRATION_DTYPE if set; else the checkpoint's own
    ("auto") on GPU hosts and on CPUs with native bf16, and float32 on other CPUs, where bf16 GEMMs are
    emulated (~4.5x slower). Measured on SmolLM2 (loadtests/results/2026-12-04/host-ladder.md): int8
    calibrated in float32 and served in float32, as such a CPU serves it, passes the chat gate (22/24 facts
    vs the base's 20); served in bf16 instead it got 17/24 and failed, so float32 calibration is only
    picked where the engine also runs float32."""
    forced = os.environ.get("QUANTGATE_CALIBRATION_DTYPE")
    if forced:
        return forced
    flags = cpu_flags()
    return "auto" if has_nvidia_gpu() or NATIVE_BF16 & flags or not flags else "float32"


# The default time budget of one variant's calibration (issue 21, item 2): the full profile's int8 took
# 510 s on a 2-core AVX2-only EPYC (loadtests/results/2026-12-07/serve-timeline-full.md) and about 3.5 min a
# layer, some 2 hours, on an older one; capped, the whole default ladder fits the 30 minutes the issue asks.
DEFAULT_CALIBRATION_BUDGET_S = 300.0


def calibration_budget_s() -> float | None:
    """Seconds one calibration may take (QUANTGATE_CALIBRATION_BUDGET_S; 0 = no budget): the job measures
    its first layer and, if the whole would take longer, calibrates on fewer windows
    (optimizers/progress.py: sized_windows), recording how many in the variant's manifest."""
    raw = os.environ.get("QUANTGATE_CALIBRATION_BUDGET_S", "").strip()
    try:
        budget = float(raw) if raw else DEFAULT_CALIBRATION_BUDGET_S
    except ValueError:
        budget = DEFAULT_CALIBRATION_BUDGET_S
    return budget if budget > 0 else None


def calibration_tag(config: MethodConfig, profile: str) -> str:
    """The calibration data a job uses (the dtype it computes in when not the checkpoint's own, and its time
    budget): part of every key that says two outputs are the same. With a budget the windows used depend on
    the machine's speed too; the key names the budget and the manifest the windows."""
    if not config.needs_calibration:
        return "none"
    dtype, budget = calibration_dtype_name(), calibration_budget_s()
    return (f"{profile}/v{CALIBRATION_VERSION}" + ("" if dtype == "auto" else f"/{dtype}")
            + ("" if budget is None else f"/budget{budget:g}s"))  # fmt: skip


def job_key(config: MethodConfig, source: Path, profile: str) -> str:
    """What makes two jobs' outputs interchangeable: method config, source and calibration data."""
    key = f"{config.fingerprint()}|{source.resolve()}|{calibration_tag(config, profile)}"
    return hashlib.sha256(key.encode()).hexdigest()


def run_job(config: MethodConfig, source: Path, out: Path, profile: str, device: Device,
            emit: Emit = lambda *a, **k: None) -> dict[str, Any]:
    """Produce the variant for `config` at `out` (atomically) and return its manifest."""
    config.check(ModelInfo.from_checkpoint(source), device)  # fail fast, before any work
    key = job_key(config, source, profile)
    existing = read_manifest(out)
    if existing is not None and existing.get("job_key") == key:
        emit("stage", stage="cached")
        return existing
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        calibration: list[list[int]] = []
        if config.needs_calibration:
            emit("stage", stage="calibration-data", profile=profile)
            calibration = tokenized_split(str(source), PROFILES[profile]).calibration
        emit("stage", stage="quantizing", method=config.method)
        started = time.monotonic()
        with reporting(emit):
            artifact = handler_for(config)(config, source, tmp, calibration)
        seconds = time.monotonic() - started
        manifest = {
            "method": config.method,
            "bits": config.bits,
            "config": config.model_dump(),
            "fingerprint": config.fingerprint(),
            "job_key": key,
            "calibration_version": CALIBRATION_VERSION if config.needs_calibration else None,
            "profile": profile if config.needs_calibration else None,
            "calibration_samples": artifact.calibration_samples or len(calibration),
            "calibration_windows_offered": len(calibration),
            "calibration_budget_s": calibration_budget_s() if config.needs_calibration else None,
            "source": str(source),
            "seconds_to_make": round(seconds, 1),
            "on_load": artifact.on_load,
            # Relative for checkpoints, so the directory can move; the source for on-load methods.
            "model_path": str(source) if artifact.on_load else ".",
            "engine_args": list(artifact.engine_args),
            "size_bytes": None if artifact.on_load else checkpoint_bytes(tmp),
            "details": artifact.details,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    emit("stage", stage="done", seconds=manifest["seconds_to_make"])
    return manifest
