"""Running llm-compressor's `oneshot` on a local checkpoint (compression environment only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _cpu_workarounds() -> None:
    """On a CPU-only host llm-compressor's cache pins memory and crashes with
    "Cannot access accelerator device" (seen with AWQ): pinning is pointless there anyway."""
    import torch

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda *args, **kwargs: None  # type: ignore[method-assign]


def calibration_dtype() -> Any:
    """The dtype calibration computes in: the checkpoint's own ("auto") on GPUs and on CPUs with native
    bf16, float32 elsewhere, where a bf16 GEMM is emulated and runs ~4.5x slower than float32
    (issue 23: 4.7 vs 21.4 GFLOP/s on an AVX2-only EPYC). QUANTGATE_CALIBRATION_DTYPE overrides."""
    import os

    import torch

    forced = os.environ.get("QUANTGATE_CALIBRATION_DTYPE")
    if forced:
        return forced if forced == "auto" else getattr(torch, forced)
    if torch.cuda.is_available():
        return "auto"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "auto" if {"avx512_bf16", "amx_bf16"} & set(flags) else torch.float32


def oneshot_to_dir(source: Path, out: Path, recipe: Any, calibration: list[list[int]]) -> None:
    """Calibrate `source` with `recipe` on the given token windows; save compressed to `out`."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cpu_workarounds()
    torch.manual_seed(0)
    dtype = calibration_dtype()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    dataset = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(w) for w in calibration]})
    max_len = max(len(w) for w in calibration)
    logger.info("calibrating on %d windows of %d tokens", len(calibration), max_len)
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration),
            max_seq_length=max_len, shuffle_calibration_samples=False, pipeline="sequential")
    if dtype != "auto":  # calibrated in float32 for speed; the artifact keeps the checkpoint's dtype
        config = json.loads((Path(source) / "config.json").read_text())
        saved = config.get("torch_dtype") or config.get("dtype")
        if isinstance(saved, str) and saved != "float32" and hasattr(torch, saved):
            model.to(getattr(torch, saved))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def group_scheme(bits: int, group_size: int, symmetric: bool, actorder: str | None) -> dict[str, Any]:
    """A compressed-tensors config group: weight-only, group-wise, all Linear layers."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                               group_size=group_size, actorder=actorder)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
