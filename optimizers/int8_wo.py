"""`int8-wo`: INT8 weight-only (per-row scales), applied by vLLM while loading through torchao.
No calibration and no artifact: the variant is the source checkpoint plus engine arguments.
Needs `torchao` beside vLLM (the runtime environment installs torchao 0.18)."""

from __future__ import annotations

import json
from pathlib import Path

from optimizers.base import Artifact, MethodConfig

# torchao 0.18's `config_to_dict(Int8WeightOnlyConfig())`, written out so the compression
# environment need not import torchao to describe it.
TORCHAO_INT8_WEIGHT_ONLY = {
    "_type": "Int8WeightOnlyConfig",
    "_version": 2,
    "_data": {"group_size": None, "granularity": {"_type": "PerRow", "_version": 1, "_data": {"dim": -1}},
              "set_inductor_config": True},
}  # fmt: skip


class Int8WeightOnlyConfig(MethodConfig):
    method = "int8-wo"
    bits = 8
    needs_calibration = False


def quantize(config: Int8WeightOnlyConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    overrides = {"quantization_config_dict_json": json.dumps(TORCHAO_INT8_WEIGHT_ONLY)}
    # vLLM's on-load quantization refuses float32, which is the engine default on CPUs without bf16.
    args = ("--quantization", "torchao", "--hf-overrides", json.dumps(overrides), "--dtype", "bfloat16")
    return Artifact(method=config.method, model_path=source, engine_args=args, on_load=True)
