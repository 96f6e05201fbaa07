"""`int8`: W8A8 INT8, SmoothQuant (activation outliers moved into weights) then GPTQ.
The fastest variant on CPUs with VNNI (oneDNN int8 GEMMs) and on Hopper GPUs (Cutlass)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from optimizers.base import Artifact, MethodConfig


class Int8Config(MethodConfig):
    method = "int8"
    bits = 8
    kernel = "w8a8"  # server/engines/probe.py: the engine GEMM it needs
    smoothing_strength: float = Field(0.8, ge=0.0, le=1.0)
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)


def quantize(config: Int8Config, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    from optimizers.llmcompressor_run import oneshot_to_dir

    recipe = [
        SmoothQuantModifier(smoothing_strength=config.smoothing_strength),
        GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], dampening_frac=config.dampening_frac),
    ]
    used = oneshot_to_dir(source, out, recipe, calibration)
    return Artifact(method=config.method, model_path=out, calibration_samples=used)
