"""Running llm-compressor's `oneshot` on a local checkpoint (compression environment only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from optimizers.job import calibration_dtype_name
from optimizers.progress import layer_progress

logger = logging.getLogger(__name__)


def _cpu_workarounds() -> None:
    """On a CPU-only host llm-compressor's cache pins memory and crashes with
    "Cannot access accelerator device" (seen with AWQ): pinning is pointless there anyway."""
    import torch

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda *args, **kwargs: None  # type: ignore[method-assign]


def calibration_dtype() -> Any:
    """optimizers/job.py: calibration_dtype_name, as a torch dtype (or "auto": the checkpoint's own)."""
    import torch

    name = calibration_dtype_name()
    return name if name == "auto" else getattr(torch, name)


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
    with layer_progress(model, len(calibration)):
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
