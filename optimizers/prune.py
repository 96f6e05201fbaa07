"""Pruning (issue 17): `prune-2of4`, 2:4 semi-structured sparsity by SparseGPT, and `prune-magnitude`, the
article's unstructured magnitude pruning. Both zero weights of the decoder's linear layers (never the
embeddings or lm_head) and write a dense checkpoint that vLLM serves like the base; the registry then
measures, gates and serves it as any variant.

Dense on disk: compressed-tensors 0.19 (the compression environment's) no longer writes sparse formats
("Sparse compression is no longer supported"), and the CPU engine has no sparse kernels, so the zeros are
stored as zeros and cost the same bytes and FLOPs as the base. The manifest's `details` says so. Pruning
alone loses a small model's quality (FACTS.md: 2:4 SparseGPT took SmolLM2's perplexity from 11.35 to
26.4): the gate is expected to reject these rungs until distillation recovers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from optimizers.base import Artifact, MethodConfig

DENSE = ("dense: compressed-tensors 0.19 writes no sparse format and vLLM's CPU engine has no sparse kernels, "
         "so the zeros cost the base's bytes and FLOPs")


class Prune2of4Config(MethodConfig):
    method = "prune-2of4"
    bits = 16
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0, description="SparseGPT's Hessian dampening")
    block_size: int = Field(128, ge=1, le=4096, description="columns SparseGPT prunes in one pass")


class PruneMagnitudeConfig(MethodConfig):
    method = "prune-magnitude"
    bits = 16
    needs_calibration = False
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="share of each decoder linear weight set to zero")


def prune_2of4(config: Prune2of4Config, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    from optimizers.llmcompressor_run import oneshot_to_dir

    # Every Linear but lm_head: the decoder's projections (the embeddings are no Linear).
    recipe = [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"],
                                dampening_frac=config.dampening_frac, block_size=config.block_size)]  # fmt: skip
    used = oneshot_to_dir(source, out, recipe, calibration)
    return Artifact(method=config.method, model_path=out, calibration_samples=used,
                    details={"pattern": "2:4", **decoder_sparsity(out), "format": DENSE})  # fmt: skip


def prune_magnitude(config: PruneMagnitudeConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    """torch.nn.utils.prune's L1 (magnitude) criterion per weight tensor, made permanent, saved in the
    checkpoint's dtype."""
    import torch
    from torch.nn.utils import prune
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_decoder_linear(name):
            prune.l1_unstructured(module, "weight", amount=config.sparsity)
            prune.remove(module, "weight")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return Artifact(method=config.method, model_path=out,
                    details={"pattern": "unstructured", **decoder_sparsity(out), "format": DENSE})  # fmt: skip


def _is_decoder_linear(name: str) -> bool:
    """A decoder layer's projection, by module name (`model.layers.3.mlp.up_proj`) or by its weight's key."""
    parts = name.removesuffix(".weight").split(".")
    return "layers" in parts and parts[-1].endswith("_proj")


def decoder_sparsity(path: Path) -> dict[str, Any]:
    """The share of zeros in the saved decoder linear weights, and in every tensor (the whole checkpoint)."""
    from safetensors import safe_open

    zeros = total = all_zeros = all_total = 0
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(key)
                z, n = int((tensor == 0).sum()), tensor.numel()
                all_zeros, all_total = all_zeros + z, all_total + n
                if key.endswith(".weight") and _is_decoder_linear(key):
                    zeros, total = zeros + z, total + n
    return {"decoder_linear_sparsity": round(zeros / total, 4) if total else 0.0,
            "checkpoint_sparsity": round(all_zeros / all_total, 4) if all_total else 0.0}  # fmt: skip
