"""Logical models and their variants, as the HTTP layer sees them.

A logical model (`smollm2-135m`) has a ladder of variants (`smollm2-135m@bf16`, `...@int8`),
ordered from most to least accurate. The registry (SQLite) fills this in; the skeleton fills
it with the bundled model's base variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.errors import ModelNotFound

VARIANT_SEPARATOR = "@"


@dataclass(frozen=True)
class Variant:
    model: str
    name: str  # "bf16", "int8", "int4-gptq", ...
    method: str  # "base" for the source checkpoint
    bits: int
    size_bytes: int | None = None
    ppl: float | None = None
    ppl_delta: float | None = None  # relative to the base, 0.015 = +1.5 %
    state: str = "ready"  # the registry's state: pending, compressing, evaluating, ready, ...
    reason: str | None = None  # why it is rejected, failed or unsupported

    @property
    def servable(self) -> bool:
        """May take traffic once its engine is healthy: a ready variant, or the base while its
        own evaluation runs (the base is the reference, there is nothing to gate it against)."""
        return self.state == "ready" or (self.method == "base" and self.state == "evaluating")

    @property
    def id(self) -> str:
        return f"{self.model}{VARIANT_SEPARATOR}{self.name}"


def accuracy_key(variant: Variant) -> tuple[bool, bool, float]:
    """Sorts most accurate first: the base, then by measured ppl delta, unmeasured last."""
    return (variant.method != "base", variant.ppl_delta is None, variant.ppl_delta or 0.0)


@dataclass
class LogicalModel:
    name: str
    created: int
    variants: list[Variant] = field(default_factory=list)

    def accuracy_order(self) -> list[Variant]:
        """Most accurate first: the base, then by measured ppl delta, unmeasured last."""
        return sorted(self.variants, key=accuracy_key)


def split_model_name(name: str) -> tuple[str, str | None]:
    """`"m@v"` -> `("m", "v")`; `"m"` -> `("m", None)`."""
    model, sep, variant = name.partition(VARIANT_SEPARATOR)
    return model, (variant if sep else None)


class Catalog:
    def __init__(self) -> None:
        self._models: dict[str, LogicalModel] = {}

    def add_variant(self, variant: Variant, created: int) -> None:
        model = self._models.setdefault(variant.model, LogicalModel(variant.model, created))
        model.variants = [v for v in model.variants if v.name != variant.name] + [variant]

    def remove_model(self, name: str) -> None:
        self._models.pop(name, None)

    def models(self) -> list[LogicalModel]:
        return list(self._models.values())

    def resolve(self, requested: str) -> tuple[LogicalModel, Variant | None]:
        """The logical model a request names, and the variant it pins (if any)."""
        model_name, variant_name = split_model_name(requested)
        model = self._models.get(model_name)
        if model is None:
            raise ModelNotFound(f"The model '{requested}' does not exist", param="model")
        if variant_name is None:
            return model, None
        for variant in model.variants:
            if variant.name == variant_name:
                return model, variant
        names = ", ".join(v.id for v in model.variants)
        raise ModelNotFound(f"The model '{requested}' does not exist; variants: {names}", param="model")
