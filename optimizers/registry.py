"""The one explicit list of methods: config type -> handler, and name -> config type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from optimizers import (
    awq,
    bnb,
    chain,
    distill,
    drill,
    fp8,
    int4_ao,
    int4_gptq,
    int4_gptq_ao,
    int8,
    int8_wo,
    prune,
    prune_structured,
)
from optimizers.base import Artifact, InvalidConfig, MethodConfig

Handler = Callable[[Any, Path, Path, list[list[int]]], Artifact]

METHODS: dict[type[MethodConfig], Handler] = {
    int8.Int8Config: int8.quantize,
    int8_wo.Int8WeightOnlyConfig: int8_wo.quantize,
    int4_gptq.Int4GptqConfig: int4_gptq.quantize,
    int4_ao.Int4TorchaoConfig: int4_ao.quantize,
    int4_gptq_ao.Int4GptqAoConfig: int4_gptq_ao.quantize,
    awq.AwqConfig: awq.quantize,
    fp8.Fp8Config: fp8.quantize,
    bnb.BnbNf4Config: bnb.quantize_nf4,
    prune.Prune2of4Config: prune.prune_2of4,
    prune.PruneMagnitudeConfig: prune.prune_magnitude,
    prune_structured.PruneStructuredConfig: prune_structured.prune,
    distill.DistillConfig: distill.distill,
    drill.BrokenDrillConfig: drill.make,  # a deliberately broken rung: the gate's drill
    chain.ChainConfig: chain.run,  # `a+b`: b applied to a's output (optimizers/chain.py)
}
# Listed so that asking for them gives the reason they are refused, not "unknown method".
REFUSED_ONLY: tuple[type[MethodConfig], ...] = (bnb.BnbInt8Config,)

CONFIGS: dict[str, type[MethodConfig]] = {
    cls.method: cls for cls in (*METHODS, *REFUSED_ONLY) if cls is not chain.ChainConfig}


def make_config(method: str, fields: dict[str, Any] | None = None) -> MethodConfig:
    """A method's config from its name and field values; InvalidConfig with the reason otherwise. A name
    `a+b` is a chain of methods (optimizers/chain.py)."""
    if chain.SEPARATOR in method:
        try:
            return chain.chain_config(method, fields)
        except ValidationError as exc:
            raise InvalidConfig(f"{method}: {exc.errors()[0]['msg']}") from None
    cls = CONFIGS.get(method)
    if cls is None:
        raise InvalidConfig(f"unknown method {method!r}; known: {', '.join(sorted(CONFIGS))}, "
                            f"or a chain of them ({chain.SEPARATOR.join(('distill', 'int8'))})")
    try:
        return cls(**(fields or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or method}: {e['msg']}" for e in exc.errors())
        raise InvalidConfig(f"{method}: {problems}") from None


def handler_for(config: MethodConfig) -> Handler:
    try:
        return METHODS[type(config)]
    except KeyError:
        raise InvalidConfig(f"{config.method} has no handler") from None
