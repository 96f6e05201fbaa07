"""Running llm-compressor's `oneshot` on a local checkpoint (compression environment only)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from optimizers.base import to_source_dtype
from optimizers.data import spread
from optimizers.job import calibration_budget_s, calibration_dtype_name
from optimizers.progress import MIN_WINDOWS, OverBudget, emit_stage, layer_progress, sized_windows

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


def oneshot_to_dir(source: Path, out: Path, recipe: Any, calibration: list[list[int]]) -> int:
    """Calibrate `source` with `recipe` on the given token windows (`calibrated`); save compressed to `out`.
    Returns the windows used."""
    from transformers import AutoTokenizer

    model, used = calibrated(source, recipe, calibration)
    if calibration_dtype() != "auto":  # calibrated in float32 for speed; the artifact keeps the checkpoint's dtype
        to_source_dtype(model, Path(source))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return used


def calibrated(source: Path, recipe: Any, calibration: list[list[int]]) -> tuple[Any, int]:
    """`source` loaded in the calibration dtype and calibrated with `recipe` on the given token windows:
    (the model, in memory, with the recipe's quantization parameters on its modules; the windows used).
    Fewer windows than given when the whole would outrun the calibration's time budget (optimizers/job.py:
    calibration_budget_s): the first layer measures the rate; past the budget the run stops there and
    starts again, from the checkpoint, on an evenly spread subset (at most twice more)."""
    import torch
    from llmcompressor.core.session_functions import create_session
    from transformers import AutoModelForCausalLM

    _cpu_workarounds()
    dtype = calibration_dtype()
    budget = calibration_budget_s()
    windows = calibration
    for attempt in range(3):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        # The last attempt, or one already at the floor, runs to its end whatever it projects.
        limit = budget if attempt < 2 and len(windows) > MIN_WINDOWS else None
        try:
            with create_session():  # a fresh session (and copy of the recipe) per attempt: nothing carried over
                _oneshot(model, copy.deepcopy(recipe), windows, limit)
            return model, len(windows)
        except OverBudget as over:
            assert budget is not None
            fit = sized_windows(len(windows), over.projected_s, budget)
            logger.warning("calibration over its %.0f s budget (%s): again on %d windows", budget, over, fit)
            emit_stage("calibration-resized", windows=fit, was=len(windows), budget_s=budget,
                       projected_s=round(over.projected_s, 1))  # fmt: skip
            windows = spread(windows, fit)
            del model
    raise AssertionError("unreachable: the last attempt runs to its end")


def _oneshot(model: Any, recipe: Any, windows: list[list[int]], budget_s: float | None) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot

    dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    max_len = max(len(w) for w in windows)
    logger.info("calibrating on %d windows of %d tokens", len(windows), max_len)
    with layer_progress(model, len(windows), budget_s):
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(windows),
                max_seq_length=max_len, shuffle_calibration_samples=False, pipeline="sequential")


def group_scheme(bits: int, group_size: int, symmetric: bool, actorder: str | None) -> dict[str, Any]:
    """A compressed-tensors config group: weight-only, group-wise, all Linear layers."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                               group_size=group_size, actorder=actorder)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
