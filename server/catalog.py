"""Logical models and their variants, as the serving path sees them.

A logical model (`smollm2-135m`) has a ladder of variants (`smollm2-135m@bf16`, `...@int8`),
ordered from most to least accurate. The catalog is a read view: it follows the registry
(`Catalog.follow`; the registry, server/registry/store.py, is the only writer of variant state and
tells the catalog of each committed write), and holds besides the remote variants declared in the
settings that no registry record describes (`add_variant`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.errors import ModelNotFound
from server.registry.store import ModelRecord, Registry, VariantRecord, VariantState

VARIANT_SEPARATOR = "@"
BASE_METHOD = "base"  # the method of a model's source checkpoint, the reference of its ladder


@dataclass(frozen=True)
class Variant:
    model: str
    name: str  # "bf16", "int8", "int4-gptq", ...
    method: str  # "base" for the source checkpoint
    bits: int
    size_bytes: int | None = None
    ppl: float | None = None
    ppl_delta: float | None = None  # relative to the base, 0.015 = +1.5 %
    state: VariantState = VariantState.READY  # a declared remote variant is ready as declared
    reason: str | None = None  # why it is rejected, failed or unsupported
    kld: float | None = None  # next-token KL from the base on the chat windows (optimizers/next_token.py)
    top1_agreement: float | None = None  # share of those positions whose most likely token is the base's
    chat_score: float | None = None  # share of the chat set's prompts answered right (optimizers/chat_quality.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", VariantState(self.state))  # "ready" -> VariantState.READY; checked

    @classmethod
    def from_record(cls, record: VariantRecord) -> Variant:
        agreement, chat = record.next_token or {}, record.chat or {}
        return cls(model=record.model, name=record.name, method=record.method, bits=record.bits,
                   size_bytes=record.size_bytes, ppl=record.ppl, ppl_delta=record.ppl_delta,
                   state=record.state, reason=record.reason, kld=agreement.get("kld"),
                   top1_agreement=agreement.get("top1"),
                   chat_score=chat["correct"] / chat["prompts"] if chat.get("prompts") else None)  # fmt: skip

    @property
    def is_base(self) -> bool:
        return self.method == BASE_METHOD

    @property
    def servable(self) -> bool:
        """May take traffic once its engine is healthy: a ready variant, or the base while its
        own evaluation runs (the base is the reference, there is nothing to gate it against)."""
        return self.state is VariantState.READY or (self.is_base and self.state is VariantState.EVALUATING)

    @property
    def withdrawn(self) -> bool:
        """Measured or tried and not served: rejected by its gate, failed, or unsupported here."""
        return self.state in (VariantState.REJECTED, VariantState.FAILED, VariantState.UNSUPPORTED)

    @property
    def id(self) -> str:
        return f"{self.model}{VARIANT_SEPARATOR}{self.name}"


def accuracy_key(variant: Variant) -> tuple[bool, bool, float]:
    """Sorts most accurate first: the base, then by measured ppl delta, unmeasured last."""
    return (not variant.is_base, variant.ppl_delta is None, variant.ppl_delta or 0.0)


@dataclass
class LogicalModel:
    name: str
    created: int
    variants: list[Variant] = field(default_factory=list)
    # Why a request with tools (tool_choice other than "none") is refused: a registered model without a
    # tool-call parser. None: its engines parse tool calls, or (a declared remote model) the engine decides.
    tools_refused: str | None = None

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

    def follow(self, registry: Registry) -> None:
        """Load every registered variant, then stay in step with the registry's writes."""
        for model in registry.models():
            for record in registry.variants(model.name):
                self.variant_written(record, model)
        registry.watch(self)

    # server.registry.store.RegistryWatcher
    def variant_written(self, record: VariantRecord, model: ModelRecord) -> None:
        self.add_variant(Variant.from_record(record), int(model.created_at))
        self._models[model.name].tools_refused = None if model.tool_call_parser else (
            f"model '{model.name}' was registered without a tool_call_parser, so its tool calls cannot be parsed: "
            'only tool_choice "none" is served with tools. Register the model with tool_call_parser (POST '
            "/admin/models) where its chat template renders tools")

    def model_removed(self, name: str) -> None:
        self._models.pop(name, None)

    def add_variant(self, variant: Variant, created: int) -> None:
        """Add or replace a variant (a declared remote one; registered ones arrive through `follow`)."""
        model = self._models.setdefault(variant.model, LogicalModel(variant.model, created))
        model.variants = [v for v in model.variants if v.name != variant.name] + [variant]

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
