"""The builder: turns pending variants into served ones, one at a time (compression and
evaluation are CPU- or GPU-bound; running them side by side only slows both).

For each variant: compress in the compression environment (skipped for the base and for
variants served remotely; the base of a GGUF source is converted instead, once), start its
engine, evaluate it *as served* (perplexity through prompt_logprobs on the model's fixed
evaluation windows; greedy answers to the chat set of optimizers/chat_quality.py), then
apply the model's quality gate: perplexity within the model's floor and chat answers within
the gate's margins of the base's own: ready (served) or rejected (kept, engine stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from optimizers import next_token
from optimizers.chat_quality import ChatGate, ChatScore, chat_answers, judge
from optimizers.data import PROFILES, evaluation_windows
from optimizers.evaluate import perplexity
from optimizers.base import MethodConfig
from optimizers.chain import ChainConfig, split_last
from optimizers.job import MANIFEST, checkpoint_bytes
from optimizers.registry import make_config
from server.engines.base import Engine, EngineState
from server.engines.local import LocalEngine, LocalEngineConfig
from server.engines.remote import RemoteEngine
from server.engines.supervisor import EngineSupervisor
from server.jobs.compress import CompressionFailed, CompressionJob, run_compression
from server.models.embedded import ConversionFailed, convert_gguf
from server.registry.artifacts import artifact_dir, artifact_key
from server.registry.ingest import IngestError, inspect_hf_dir
from server.registry.merging import MergeFailed, MergeRecipe, judge_merge, parent_scores, run_merge
from server.registry.progress import BuildProgress
from server.registry.store import ModelRecord, Registry, RegistryError, VariantRecord, VariantState
from server.routing.predictor import LatencyBook, LatencyPriors
from server.settings import RemoteEngineSpec
from server.telemetry.profiler import profile_engine

logger = logging.getLogger(__name__)

EngineFactory = Callable[[str, Path, tuple[str, ...]], LocalEngineConfig]


class BuildFailed(Exception):
    pass


def tool_call_args(parser: str | None) -> tuple[str, ...]:
    """The engine arguments for a model's tool calls: vLLM 0.32 answers a request with tools (any tool_choice
    but "none") with a 400 unless it has the parser for the model's format, and auto tool choice is on."""
    return ("--enable-auto-tool-choice", "--tool-call-parser", parser) if parser else ()


def built_head(registry: Registry, model: ModelRecord, config: MethodConfig
               ) -> tuple[VariantRecord, MethodConfig] | None:  # fmt: skip
    """For a chain `a+b` (optimizers/chain.py): a variant of this model that is `a` with the same config and
    whose artifact is on disk, and `b`; then only `b` runs, on that artifact."""
    if not isinstance(config, ChainConfig):
        return None
    head, last = split_last(config)
    for variant in registry.variants(model.name):
        if (variant.method == head.method and variant.model_path and variant.artifact_key
                and (Path(variant.model_path) / MANIFEST).is_file()
                and make_config(variant.method, variant.config).fingerprint() == head.fingerprint()):  # fmt: skip
            return variant, last
    return None


class VariantBuilder:
    def __init__(self, registry: Registry, supervisor: EngineSupervisor, home: Path,
                 engine_config: EngineFactory, remote_engines: dict[str, RemoteEngineSpec], profile: str,
                 compress_timeout_s: float, book: LatencyBook, compress_python: str | None = None,
                 engine_ready_timeout_s: float = 900.0,
                 chat_gate_for: Callable[[str], ChatGate] | None = None) -> None:  # fmt: skip
        self.registry = registry
        self.supervisor = supervisor
        self.home = home
        self.engine_config = engine_config
        self.remote_engines = remote_engines
        self.profile = profile
        self.compress_timeout_s = compress_timeout_s
        self.compress_python = compress_python
        self.engine_ready_timeout_s = engine_ready_timeout_s
        self.book = book
        # The gate a model's rungs are judged by (Settings.chat_gate_for: its own, else the gateway's).
        self.chat_gate_for = chat_gate_for or (lambda model: ChatGate())
        self._wake = asyncio.Event()
        self._windows: dict[str, list[list[int]]] = {}
        # Engines of one device are profiled one at a time: profiled together they share the device
        # and their priors come out too slow (fp8 and w4a16 2x on one H200, FACTS.md).
        self._profiling: dict[str, asyncio.Lock] = {}
        self._building: tuple[str, asyncio.Task[None]] | None = None  # (model, the build in progress)
        self.progress = BuildProgress()

    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, model: str) -> bool:
        """Stop the build in progress if it is one of `model`'s variants (its compression process group
        is killed and its half-written output removed: server/jobs/compress.py). True if one was."""
        if self._building is None or self._building[0] != model:
            return False
        task = self._building[1]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def run(self) -> None:
        """Build pending variants forever; sleeps until woken when there are none."""
        while True:
            self._wake.clear()
            record = self.registry.next_pending()
            if record is None:
                await self._wake.wait()
                continue
            task = asyncio.create_task(self.build(record), name=f"build:{record.id}")
            self._building = (record.model, task)
            self.progress.phase(record.id, "starting")
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the builder itself is stopping (awaiting the task cancelled it too)
                logger.info("building %s stopped: its model was removed", record.id)
            except Exception as exc:  # one bad variant must not stop the others
                logger.exception("building %s failed", record.id)
                self._fail(record.id, f"{type(exc).__name__}: {exc}")
            finally:
                self._building = None
                self.progress.finish(record.id)

    async def start_engine(self, record: VariantRecord) -> Engine:
        """Start (or attach) the engine that serves `record` and wait until it is healthy."""
        if record.id in self.remote_engines:
            spec = self.remote_engines[record.id]
            engine: Engine = RemoteEngine(record.id, str(spec.url),
                                          accepts_priority=spec.priority_scheduling, device=spec.device,
                                          api_key=spec.auth_key())
        else:
            assert record.model_path is not None
            args = record.engine_args + tool_call_args(self.registry.model(record.model).tool_call_parser)
            engine = LocalEngine(self.engine_config(record.id, Path(record.model_path), args))
        await self.supervisor.add(engine)
        deadline = time.monotonic() + self.engine_ready_timeout_s
        while engine.status().state is not EngineState.READY:
            if engine.status().state is EngineState.FAILED or time.monotonic() > deadline:
                await self.supervisor.remove(record.id)
                raise BuildFailed(f"engine did not become ready ({engine.status().detail}); see "
                                  f"{engine.status().log_path}")
            await asyncio.sleep(0.5)
        return engine

    async def build(self, record: VariantRecord) -> None:
        model = self.registry.model(record.model)
        if not (Path(model.checkpoint_path) / "config.json").is_file() and record.id not in self.remote_engines:
            if record.method != "base":
                self._fail(record.id, "the model's checkpoint was never written: its base variant's conversion "
                                      "failed (see the base's reason)")
                return
            if model.source_kind not in ("gguf", "merge"):
                self._fail(record.id, f"its checkpoint {model.checkpoint_path} is gone")
                return
            if not await (self._convert(model, record) if model.source_kind == "gguf" else self._merge(model, record)):
                return
        if record.method == "base" or record.id in self.remote_engines:
            path = model.checkpoint_path if record.method == "base" else None
            size = checkpoint_bytes(Path(path)) if path else None
            record = self.registry.transition(record.id, VariantState.EVALUATING, model_path=path, size_bytes=size,
                                              reason=None)
        else:
            record = await self._compress(model, record)
        if record.state is VariantState.FAILED:
            return
        try:
            self.progress.phase(record.id, "starting the engine")
            engine = await self.start_engine(record)
        except BuildFailed as exc:
            self._fail(record.id, str(exc))
            return
        await self._evaluate(model, record, engine)

    async def _convert(self, model: ModelRecord, record: VariantRecord) -> bool:
        """Write a GGUF source's checkpoint (the base variant's job: registration only read the file's
        header, so a POST /admin/models answers at once). False, with the base failed, if it cannot be."""
        log_path = self.home / "logs" / f"convert-{record.id}.log"
        self.progress.phase(record.id, "converting the GGUF")
        job_id = self.registry.start_job(record.id, "converting")
        self.registry.transition(record.id, VariantState.CONVERTING, log_path=str(log_path), reason=None)
        checkpoint = Path(model.checkpoint_path)
        try:
            await convert_gguf(Path(model.source_path), checkpoint, log_path,
                               on_start=lambda pid: self.registry.update_job(job_id, pid=pid))
            architecture = await asyncio.to_thread(inspect_hf_dir, checkpoint)
        except (ConversionFailed, IngestError, OSError) as exc:
            self.registry.update_job(job_id, state="failed", error=str(exc))
            self._fail(record.id, f"converting the GGUF failed: {exc}")
            return False
        if architecture != model.architecture:
            logger.warning("%s: the GGUF's metadata said %s, its conversion is a %s", model.name,
                           model.architecture, architecture)
        self.registry.update_job(job_id, state="succeeded", stage="done")
        return True

    async def _merge(self, model: ModelRecord, record: VariantRecord) -> bool:
        """Write a merged model's checkpoint from its recipe (server/registry/merging.py), as its base variant's
        job. False, with the base failed, if it cannot be (a parent's checkpoint gone, the merge refused)."""
        log_path = self.home / "logs" / f"merge-{record.id}.log"
        self.progress.phase(record.id, "merging the parents")
        job_id = self.registry.start_job(record.id, "merging")
        self.registry.transition(record.id, VariantState.CONVERTING, log_path=str(log_path), reason=None)
        try:
            recipe = MergeRecipe.read(Path(model.source_path))
            done = await run_merge(recipe, Path(model.checkpoint_path), log_path,
                                   on_event=lambda event: self.progress.event(record.id, event),
                                   on_start=lambda pid: self.registry.update_job(job_id, pid=pid))  # fmt: skip
        except (MergeFailed, OSError, ValueError, KeyError) as exc:
            self.registry.update_job(job_id, state="failed", error=str(exc))
            self._fail(record.id, f"merging failed: {exc}")
            return False
        logger.info("%s merged (%s) into %s: %s", model.name, recipe.method, model.checkpoint_path, done)
        self.registry.update_job(job_id, state="succeeded", stage="done")
        return True

    async def _compress(self, model: ModelRecord, record: VariantRecord) -> VariantRecord:
        config = make_config(record.method, record.config)
        key = artifact_key(model.source_sha256, config, self.profile)
        out = artifact_dir(self.home, key)
        log_path = self.home / "logs" / f"compress-{record.id}.log"
        self.progress.phase(record.id, "compressing")
        job_id = self.registry.start_job(record.id, "compressing")
        self.registry.transition(record.id, VariantState.COMPRESSING, artifact_key=key, log_path=str(log_path),
                                 reason=None)
        job = CompressionJob(record.method, Path(model.checkpoint_path), out, profile=self.profile,
                             config=tuple(record.config.items()))
        earlier_s = 0.0
        built = built_head(self.registry, model, config)
        if built is not None and built[0].model_path:  # the chain's head is built already: its last step on it
            head, last = built
            logger.info("%s: %s on %s's artifact", record.id, last.method, head.id)
            job = CompressionJob(last.method, Path(head.model_path), out, profile=self.profile,
                                 config=tuple(last.model_dump().items()))
            earlier_s = head.seconds_to_make or 0.0
        try:
            manifest = await run_compression(
                job, log_path, self.compress_timeout_s, self.compress_python,
                on_event=lambda event: self._job_event(record.id, job_id, event),
            )  # fmt: skip
        except CompressionFailed as exc:
            self.registry.update_job(job_id, state="failed", error=f"{exc.kind}: {exc.message}")
            return self.registry.transition(record.id, VariantState.FAILED, reason=f"{exc.kind}: {exc.message}")
        self.registry.update_job(job_id, state="succeeded", stage="done")
        return self.registry.transition(
            record.id, VariantState.EVALUATING,
            model_path=manifest["model_path"] if manifest["on_load"] else str(out),
            engine_args=manifest["engine_args"], size_bytes=manifest["size_bytes"],
            seconds_to_make=round(manifest["seconds_to_make"] + earlier_s, 1),
            calibration_samples=manifest.get("calibration_samples"),
        )  # fmt: skip

    def _job_event(self, variant_id: str, job_id: int, event: dict) -> None:
        self.progress.event(variant_id, event)
        if event.get("event") != "progress":  # progress is many events a minute: memory only, not SQLite
            self.registry.update_job(job_id, stage=str(event.get("stage", event["event"])))

    async def _evaluate(self, model: ModelRecord, record: VariantRecord, engine: Engine) -> None:
        windows = await self._eval_windows(model)
        base = next((v for v in self.registry.variants(model.name) if v.method == "base"), None)
        is_base = record.method == "base"
        reference = None if is_base else await self._reference(model, base)
        async with httpx.AsyncClient(timeout=3600, trust_env=False, headers=engine.auth_headers) as http:
            self.progress.phase(record.id, "measuring perplexity")
            ppl = await perplexity(http, engine.base_url, record.id, windows)
            self.progress.phase(record.id, "asking the chat set")
            chat = await chat_answers(http, engine.base_url, record.id)
            agreement: next_token.Agreement | None = None
            try:
                if is_base:  # the reference every rung's next tokens are compared with
                    self.progress.phase(record.id, "next-token reference")
                    reference = await next_token.reference(http, engine.base_url, record.id, chat.answers)
                    self._save_reference(model, reference)
                    agreement = next_token.compare(reference, reference.positions)
                elif reference is not None:
                    self.progress.phase(record.id, "next-token agreement")
                    agreement = await next_token.agreement(http, engine.base_url, record.id, reference)
            except (ValueError, KeyError, httpx.HTTPError) as exc:  # e.g. a template that rewrites the prompt
                logger.warning("%s: next-token measure failed (%s: %s); that part of the gate skipped", record.id,
                               type(exc).__name__, exc)
        delta = 0.0 if is_base else (ppl.ppl / base.ppl - 1 if base and base.ppl else None)
        fields = {"ppl": ppl.ppl, "ppl_delta": delta, "sanity": chat.answers[0], "chat": chat.as_dict()}
        if agreement is not None:
            fields["next_token"] = agreement.as_dict()
        reason = None
        if is_base and model.source_kind == "merge":
            reason, parent = judge_merge(ppl.ppl, chat, parent_scores(self.registry, model), model.max_ppl_delta,
                                         self.chat_gate_for(model.name))  # fmt: skip
            if parent is None:
                logger.warning("%s: no parent measured to judge the merge against", record.id)
            else:
                logger.info("%s judged against its parent %s: ppl %.3f vs %.3f, chat %d vs %d right", record.id,
                            parent.name, ppl.ppl, parent.ppl, chat.correct, parent.chat.correct)
        elif delta is not None and delta > model.max_ppl_delta:
            reason = f"ppl delta {delta:+.1%} exceeds the model's floor of {model.max_ppl_delta:+.1%}"
        elif not is_base:
            base_chat = await self._base_chat(base)
            if base_chat is None:
                logger.warning("%s: no chat answers of the base to judge against; chat gate skipped", record.id)
            else:
                reason = judge(chat, base_chat, self.chat_gate_for(model.name))
            if reason is None and agreement is not None:
                reason = next_token.judge_agreement(agreement, self.chat_gate_for(model.name))
            elif agreement is None:
                logger.warning("%s: no next-token reference of the base; that part of the gate skipped", record.id)
        if reason is not None:
            # The catalog learns it at the transition, before the engine stops: no request sees a stale state.
            record = self.registry.transition(record.id, VariantState.REJECTED, reason=reason, **fields)
            await self.supervisor.remove(record.id)
            logger.warning("variant %s rejected: %s", record.id, reason)
        else:
            # Profiled before it turns ready, while the builder runs nothing else (quiet priors).
            self.progress.phase(record.id, "profiling latency")
            await self.profile_latency(record.id, engine, persist=True)
            record = self.registry.transition(record.id, VariantState.READY, **fields)
            logger.info("variant %s ready: ppl %.3f (delta %s), chat %d/%d right, %d loops, next-token %s",
                        record.id, ppl.ppl, "n/a" if delta is None else f"{delta:+.1%}", chat.correct, chat.prompts,
                        chat.loops, agreement)

    def _reference_path(self, model: ModelRecord) -> Path:
        return self.home / "references" / f"{model.name}-{model.source_sha256[:24]}.json"

    def _save_reference(self, model: ModelRecord, reference: next_token.Reference) -> None:
        path = self._reference_path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(reference.as_dict()))
        tmp.replace(path)

    async def _reference(self, model: ModelRecord, base: VariantRecord | None) -> next_token.Reference | None:
        """The base's next-token reference: stored when it was evaluated, else (a registry from before the
        next-token gate) asked of its serving engine now, on its stored answers, and stored."""
        path = self._reference_path(model)
        if path.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return next_token.Reference.from_dict(json.loads(path.read_text()))
        base_chat = await self._base_chat(base)
        engine = self.supervisor.get(base.id) if base is not None else None
        if base_chat is None or engine is None or engine.status().state is not EngineState.READY:
            return None
        try:
            async with httpx.AsyncClient(timeout=3600, trust_env=False, headers=engine.auth_headers) as http:
                reference = await next_token.reference(http, engine.base_url, base.id, base_chat.answers)
        except (ValueError, KeyError, httpx.HTTPError) as exc:
            logger.warning("%s: the base's next-token reference failed (%s: %s)", model.name, type(exc).__name__, exc)
            return None
        self._save_reference(model, reference)
        return reference

    async def _base_chat(self, base: VariantRecord | None) -> ChatScore | None:
        """The base's chat answers: stored when it was evaluated, else (a registry from before the
        chat gate, or from before the set grew) asked of its serving engine now and stored."""
        if base is None:
            return None
        if (stored := ChatScore.stored(base.chat)) is not None:
            return stored
        engine = self.supervisor.get(base.id)
        if base.state is not VariantState.READY or engine is None or engine.status().state is not EngineState.READY:
            return None
        async with httpx.AsyncClient(timeout=3600, trust_env=False, headers=engine.auth_headers) as http:
            chat = await chat_answers(http, engine.base_url, base.id)
        self.registry.set_chat(base.id, chat.as_dict())
        return chat

    async def load_or_profile(self, record: VariantRecord, engine: Engine) -> None:
        """Latency priors for a ready variant at start-up: the stored ones, else profile now."""
        if record.latency:
            try:
                self.book.set_priors(record.id, LatencyPriors.model_validate(record.latency))
                return
            except ValueError:
                logger.warning("stored latency priors of %s are unreadable; profiling again", record.id)
        await self.profile_latency(record.id, engine, persist=True)

    async def profile_latency(self, variant_id: str, engine: Engine, persist: bool) -> LatencyPriors | None:
        """Profile the engine's latency; without priors the variant is served but never predicted
        to meet a budget, so a failure here is logged and not fatal."""
        try:
            async with self._profiling.setdefault(engine.device, asyncio.Lock()):
                priors = await profile_engine(engine.base_url, variant_id, headers=engine.auth_headers)
        except (httpx.HTTPError, RuntimeError) as exc:
            logger.warning("profiling %s failed (%s); it will not be routed by budget", variant_id, exc)
            return None
        self.book.set_priors(variant_id, priors)
        if persist:
            self.registry.set_latency(variant_id, priors.model_dump(mode="json"))
        return priors

    async def profile_when_serving(self, engine: Engine) -> None:
        """For engines the registry does not know (remote ones): profile once they serve."""
        while engine.status().state is not EngineState.READY:
            if engine.status().state in (EngineState.FAILED, EngineState.STOPPED):
                return
            await asyncio.sleep(1.0)
        try:
            await self.profile_latency(engine.variant_id, engine, persist=False)
        except Exception:  # runs beside the builder: must not take it down
            logger.exception("profiling %s failed", engine.variant_id)

    async def _eval_windows(self, model: ModelRecord) -> list[list[int]]:
        if model.name not in self._windows:
            self._windows[model.name] = await asyncio.to_thread(
                evaluation_windows, model.checkpoint_path, PROFILES[self.profile]
            )
        return self._windows[model.name]

    def _fail(self, variant_id: str, reason: str) -> None:
        try:
            self.registry.transition(variant_id, VariantState.FAILED, reason=reason)
        except RegistryError as exc:  # e.g. the model was removed while it was being built
            logger.warning("could not mark %s failed: %s", variant_id, exc)
