"""Group size for group-wise quantization: it must divide every quantized layer's input width."""

from __future__ import annotations

from optimizers.base import InvalidConfig, ModelInfo

PREFERRED_GROUP_SIZES = (128, 64, 32)


def resolve_group_size(requested: int | None, model: ModelInfo, method: str) -> int:
    """`requested`, checked; or the largest preferred size that divides all widths (128 where it
    divides, 64 for SmolLM2's hidden size 576)."""
    dims = model.linear_in_dims
    if requested is not None:
        bad = [d for d in dims if d % requested]
        if bad:
            raise InvalidConfig(
                f"{method}: group_size={requested} does not divide the layer input width(s) {bad} of this "
                f"{model.architecture} (widths {list(dims)}); use one of "
                f"{[g for g in PREFERRED_GROUP_SIZES if all(d % g == 0 for d in dims)]}"
            )
        return requested
    for size in PREFERRED_GROUP_SIZES:
        if all(d % size == 0 for d in dims):
            return size
    raise InvalidConfig(f"{method}: no group size in {PREFERRED_GROUP_SIZES} divides the widths {list(dims)}")
