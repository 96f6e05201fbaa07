"""This host's CPU as /proc/cpuinfo describes it, and whether it has a GPU: read by the gateway's
hardware detection (server/engines/hardware.py), the kernel probe and calibration, from one place."""

from __future__ import annotations

import shutil
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})  # CPU flags with bf16 GEMMs in hardware


def _field(name: str, cpuinfo: Path) -> str | None:
    """The first `name : value` line's value (every core repeats the same ones)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(name)), None)


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    return set((_field("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    return _field("model name", cpuinfo) or "unknown"


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()
