"""What every compression method shares: a frozen, versioned config; the artifact it produces;
the errors that refuse a job before any work is done."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

Device = Literal["cpu", "cuda"]


class OptimizerError(Exception):
    """A job that cannot run; the message says why and what to do instead."""


class InvalidConfig(OptimizerError):
    pass


class UnsupportedHere(OptimizerError):
    """The method exists but cannot produce a servable variant on this hardware."""


@dataclass(frozen=True)
class ModelInfo:
    """The few facts about a checkpoint that methods check their configs against."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    tie_word_embeddings: bool
    num_heads: int = 0  # attention (query) heads; 0 where not known
    num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 where not known

    @classmethod
    def from_checkpoint(cls, path: Path) -> ModelInfo:
        config = json.loads((path / "config.json").read_text())
        return cls(
            architecture=(config.get("architectures") or ["?"])[0],
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config.get("intermediate_size", config["hidden_size"] * 4)),
            num_layers=int(config.get("num_hidden_layers", 0)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_heads=int(config.get("num_attention_heads", 0)),
            num_kv_heads=int(config.get("num_key_value_heads", config.get("num_attention_heads", 0))),
        )

    @property
    def linear_in_dims(self) -> tuple[int, ...]:
        """Input widths of the decoder's linear layers (q/k/v/o/gate/up take hidden, down takes intermediate)."""
        return (self.hidden_size, self.intermediate_size)


class MethodConfig(BaseModel):
    """Base of every method's config: frozen, unknown fields refused, versioned.

    Bump `version` whenever a change to the handler changes its output: the registry keys
    artifacts by hash(source, config, version), so old artifacts are not reused by mistake.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: ClassVar[str]
    bits: ClassVar[int]
    needs_calibration: ClassVar[bool] = True
    kernel: ClassVar[str | None] = None  # the engine GEMM it needs, if the host may lack it
    substitute: ClassVar[str | None] = None  # the method built in its place where the host lacks `kernel`
    version: int = 1

    def check(self, model: ModelInfo, device: Device) -> None:
        """Raise InvalidConfig or UnsupportedHere before any work starts; default: accept."""

    def fingerprint(self) -> str:
        payload = json.dumps({"method": self.method, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """What a handler produced: a directory vLLM loads, plus engine arguments.

    For checkpoint methods `model_path` is the output directory itself; for on-load methods
    (vLLM quantizes while loading) it is the source checkpoint and `engine_args` carry the method.
    """

    method: str
    model_path: Path
    engine_args: tuple[str, ...] = ()
    on_load: bool = False
    calibration_samples: int | None = None  # windows the method used, when fewer than it was given
    details: dict[str, Any] | None = None  # what else the manifest should say (e.g. a pruned rung's sparsity)


def to_source_dtype(model: Any, source: Path) -> None:
    """Cast `model` (calibrated or trained in float32) back to the dtype its source checkpoint was saved in,
    so the variant is served as the base is."""
    import torch

    config = json.loads((source / "config.json").read_text())
    saved = config.get("torch_dtype") or config.get("dtype")
    if isinstance(saved, str) and saved != "float32" and hasattr(torch, saved):
        model.to(getattr(torch, saved))
