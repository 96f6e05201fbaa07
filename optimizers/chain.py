"""Chained methods (issue 17's recipe, prune -> distill -> quantize): a method named `a+b[+c]` runs `a` on the
source, `b` on `a`'s output, and so on, in one job; the variant is the last step's output, registered,
measured and gated like any other. `distill+int8` is the distilled student in W8A8; `prune-structured+int8`
the pruned model without the training.

Each step is checked against the checkpoint it will run on (the student has fewer layers and channels), and
gets the job's calibration windows (every step's model shares the source's tokenizer). A step that vLLM
applies while loading (`int8-wo`, `int4-ao`, `fp8`) can only be the last: its engine arguments are the
variant's, over the previous step's checkpoint. Per-step fields: `{"steps": {"distill": {"steps": 200}}}`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from optimizers.base import Artifact, Device, InvalidConfig, MethodConfig, ModelInfo, UnsupportedHere

SEPARATOR = "+"


class ChainConfig(MethodConfig):
    """Its method is `a+b`; its bits, kernel and substitute are the last step's (the variant is its output)."""

    steps: dict[str, dict[str, Any]] = Field(description="each step's method and its fields, in order")

    def parts(self) -> list[MethodConfig]:
        from optimizers.registry import make_config

        return [make_config(name, fields) for name, fields in self.steps.items()]

    @property  # type: ignore[override]
    def method(self) -> str:
        return SEPARATOR.join(self.steps)

    @property  # type: ignore[override]
    def bits(self) -> int:
        return self.parts()[-1].bits

    @property  # type: ignore[override]
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.parts())

    @property  # type: ignore[override]
    def kernel(self) -> str | None:
        return self.parts()[-1].kernel

    @property  # type: ignore[override]
    def substitute(self) -> str | None:
        """The chain with its last step's substitute (`distill+int4-gptq` -> `distill+int4-ao`)."""
        last = self.parts()[-1].substitute
        return SEPARATOR.join([*list(self.steps)[:-1], last]) if last else None

    def check(self, model: ModelInfo, device: Device) -> None:
        if len(self.steps) < 2:
            raise InvalidConfig(f"a chain needs at least two methods, got {self.method!r}")
        parts = self.parts()
        if any(isinstance(p, ChainConfig) for p in parts):
            raise InvalidConfig(f"{self.method}: a chain's steps are methods, not chains")
        parts[0].check(model, device)
        # The later steps' shapes are checked on the checkpoints they get (optimizers/chain.py: run); what this
        # host cannot run at all (fp8 on CPU, int4-ao on CUDA) is refused now.
        for part in parts[1:]:
            try:
                part.check(model, device)
            except UnsupportedHere:
                raise
            except InvalidConfig:
                pass


def chain_config(method: str, fields: dict[str, Any] | None) -> ChainConfig:
    """`a+b` with optional `{"steps": {"a": {...}}}` (or the config's own dump, as the registry stores it)."""
    names = method.split(SEPARATOR)
    if len(set(names)) != len(names) or "" in names:
        raise InvalidConfig(f"{method!r}: a chain names each method once, separated by '{SEPARATOR}'")
    given = (fields or {}).get("steps") or {}
    if not isinstance(given, dict) or set(given) - set(names):
        raise InvalidConfig(f"{method}: `steps` must map some of {names} to their fields")
    version = (fields or {}).get("version", 1)
    config = ChainConfig(steps={name: dict(given.get(name) or {}) for name in names}, version=version)
    config.parts()  # every step a known method with valid fields, now
    return config


def split_last(config: ChainConfig) -> tuple[MethodConfig, MethodConfig]:
    """(everything but the last step, the last step): `a+b+c` -> (`a+b`, `c`); `a+b` -> (`a`, `b`). A registry
    that already built the first part serves it as the source of the last (server/registry/builder.py), so
    `distill` and `distill+int8` registered together train once."""
    from optimizers.registry import make_config

    names = list(config.steps)
    head = names[:-1]
    first = (make_config(head[0], config.steps[head[0]]) if len(head) == 1
             else chain_config(SEPARATOR.join(head), {"steps": {n: config.steps[n] for n in head}}))  # fmt: skip
    return first, make_config(names[-1], config.steps[names[-1]])


def run(config: ChainConfig, source: Path, out: Path, calibration: list[list[int]]) -> Artifact:
    from optimizers.registry import handler_for

    parts = config.parts()
    current, details = source, {}
    steps_dir = out / ".steps"
    artifact = None
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        part.check(ModelInfo.from_checkpoint(current), "cpu" if _cpu() else "cuda")
        step_out = steps_dir / f"{index}-{part.method}"
        step_out.mkdir(parents=True)
        artifact = handler_for(part)(part, current, step_out, calibration if part.needs_calibration else [])
        if artifact.on_load and not last:
            raise InvalidConfig(f"{config.method}: {part.method} is applied by vLLM at load, so it can only be the "
                                "last step")  # fmt: skip
        details[part.method] = {"calibration_samples": artifact.calibration_samples, **(artifact.details or {})}
        if not artifact.on_load:
            current = step_out
    assert artifact is not None
    # The variant's directory holds the last checkpoint (for an on-load last step, the one before it).
    for item in current.iterdir():
        shutil.move(str(item), out / item.name)
    shutil.rmtree(steps_dir, ignore_errors=True)
    return Artifact(method=config.method, model_path=out, engine_args=artifact.engine_args,
                    calibration_samples=artifact.calibration_samples, details={"steps": details})  # fmt: skip


def _cpu() -> bool:
    from optimizers.host import has_nvidia_gpu

    return not has_nvidia_gpu()
