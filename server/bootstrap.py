"""What the gateway serves at start-up: the registry's variants (recovered after a crash), the
bundled model when the registry is empty, and remote engines named in the settings.
Runs in the background so /health answers while engines load."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from server.catalog import BASE_METHOD, Catalog, Variant, split_model_name
from server.engines.hardware import Hardware, engine_dtype
from server.engines.local import LocalEngineConfig, last_flag
from server.engines.remote import RemoteEngine
from server.engines.supervisor import EngineSupervisor
from server.models.embedded import find_bundled_gguf, remove_conversion_leftovers
from server.registry.builder import VariantBuilder
from server.registry.service import BASE_VARIANT, ModelService
from server.registry.store import Registry, VariantRecord, VariantState
from server.settings import RemoteEngineSpec, Settings

logger = logging.getLogger(__name__)


def local_engine_config(settings: Settings, hardware: Hardware, variant_id: str, model_path: Path,
                        extra_args: tuple[str, ...] = ()) -> LocalEngineConfig:
    # a variant's own --dtype (the on-load torchao methods run in bfloat16) is its engine's
    dtype = last_flag(extra_args, "--dtype") or engine_dtype(hardware, settings.engine_dtype, model_path, variant_id)
    return LocalEngineConfig(
        variant_id=variant_id,
        model_path=model_path,
        device=hardware.device,
        dtype=dtype,
        max_model_len=settings.engine_max_model_len,
        log_dir=settings.logs_dir,
        cpu_kvcache_gib=settings.engine_cpu_kvcache_gib,
        gpu_memory_utilization=settings.engine_gpu_memory_utilization,
        extra_args=settings.engine_extra_args + extra_args,
        start_timeout_s=settings.engine_start_timeout_s,
        stop_timeout_s=settings.engine_stop_timeout_s,
    )


class Bootstrap:
    def __init__(self, settings: Settings, registry: Registry, builder: VariantBuilder, service: ModelService,
                 catalog: Catalog, supervisor: EngineSupervisor) -> None:
        self.settings = settings
        self.registry = registry
        self.builder = builder
        self.service = service
        self.catalog = catalog
        self.supervisor = supervisor

    async def run(self) -> None:
        for variant in self.registry.recover():
            logger.warning("recovered %s after an interrupted start: now %s", variant.id, variant.state.value)
        for leftover in (self.settings.home / "artifacts").glob(".*.tmp-*"):
            logger.warning("removing %s, left by a job that was killed", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in remove_conversion_leftovers(self.settings.checkpoints_dir):
            logger.warning("removed %s, left by a GGUF conversion that was killed", leftover)
        remotes = await self._attach_unregistered_remotes()
        if self.settings.embedded_model and not self.registry.models():
            await self.service.add(find_bundled_gguf(), self.settings.embedded_model_name,
                                   self.settings.default_variants)
        await self._serve_registered()
        async with asyncio.TaskGroup() as tasks:
            for engine in remotes:
                tasks.create_task(self.builder.profile_when_serving(engine))
            tasks.create_task(self.builder.run())

    async def _serve_registered(self) -> None:
        """Start engines for the registered ready variants (the catalog follows the registry)."""
        starts = [self._start_ready(r) for r in self.registry.variants() if r.state is VariantState.READY]
        results = await asyncio.gather(*starts, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                logger.error("a ready variant's engine failed to start: %s", result)

    async def _start_ready(self, record: VariantRecord) -> None:
        engine = await self.builder.start_engine(record)
        await self.builder.load_or_profile(record, engine)

    async def _attach_unregistered_remotes(self) -> list[RemoteEngine]:
        """QUANTGATE_REMOTE_ENGINES entries whose model is not registered: served as declared."""
        registered = {m.name for m in self.registry.models()}
        now = int(time.time())
        attached = []
        for variant_id, spec in self.settings.remote_engines.items():
            model, name = split_model_name(variant_id)
            if model in registered:
                continue  # the builder attaches it when it builds that variant
            self.catalog.add_variant(_declared_variant(model, name or BASE_VARIANT, spec), now)
            engine = RemoteEngine(variant_id, str(spec.url), accepts_priority=spec.priority_scheduling,
                                  device=spec.device, api_key=spec.auth_key())
            await self.supervisor.add(engine)
            attached.append(engine)
        return attached


_BASE_NAMES = {"bf16": 16, "fp16": 16, "fp32": 32, "base": 16}


def _declared_variant(model: str, name: str, spec: RemoteEngineSpec) -> Variant:
    """A remote variant's metadata with no registry record: as declared in the settings, else
    guessed from its name (then it has no measured quality and ranks after measured variants)."""
    method = spec.method or (BASE_METHOD if name in _BASE_NAMES else name)
    guessed = _BASE_NAMES.get(name, 4 if "4" in name else 8 if "8" in name else 16)
    ppl_delta = 0.0 if method == BASE_METHOD else spec.ppl_delta
    return Variant(model=model, name=name, method=method, bits=spec.bits or guessed, size_bytes=spec.size_bytes,
                   ppl_delta=ppl_delta)
