"""`drill-broken`: a deliberately broken rung, for drilling the registry's gate on a real model.

The base checkpoint with one decoder layer's MLP output (`down_proj`) multiplied by `scale`: same
shape and dtype, so vLLM serves it like any dense checkpoint, but its next tokens drift from the
base's (the middle layer x10 took top-1 agreement from 1.0 to 0.03 on the session's tiny model;
layer 10 x0 of SmolLM2-135M passed the perplexity floor and the answers and was caught by the
next-token KL: loadtests/results/2026-12-06/next-token-gate.md). Ask for it like any method
(`quantgate models add PATH --variants int8,drill-broken`): the gate must reject it with the
measure and value as its reason while the good rungs serve. Never a default rung.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

from optimizers.base import Artifact, InvalidConfig, MethodConfig, ModelInfo

class BrokenDrillConfig(MethodConfig):
    method = "drill-broken"
    bits = 16
    needs_calibration = False
    layer: int | None = Field(None, ge=0, description="the decoder layer to break (None: the middle one)")
    scale: float = Field(10.0, ge=0.0, le=10_000.0, description="its MLP output's factor (0 removes it)")

    def check(self, model: ModelInfo, device: str) -> None:
        if self.layer is not None and self.layer >= model.num_layers:
            raise InvalidConfig(f"drill-broken: layer {self.layer} of a model with {model.num_layers} layers")

    def layer_of(self, model: ModelInfo) -> int:
        return self.layer if self.layer is not None else model.num_layers // 2


def scale_layer(source: Path, out: Path, layer: int, scale: float) -> None:
    """Copy the checkpoint `source` into the directory `out` with `model.layers.{layer}.mlp.down_proj.weight`
    multiplied by `scale` (ValueError if no shard holds it)."""
    from safetensors.torch import load_file, save_file

    name = f"model.layers.{layer}.mlp.down_proj.weight"
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = tensors[name] * scale
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise ValueError(f"{name} is not in {source}")


def make(config: BrokenDrillConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    scale_layer(source, out, config.layer_of(ModelInfo.from_checkpoint(source)), config.scale)
    return Artifact(method=config.method, model_path=out)
