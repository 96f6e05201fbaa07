"""What the gateway serves at start-up: the bundled model's base variant and any configured
remote engines. Runs in the background so /health answers while engines load."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from server.catalog import Catalog, Variant, split_model_name
from server.engines.base import Engine
from server.engines.hardware import Hardware
from server.engines.local import LocalEngine, LocalEngineConfig
from server.engines.remote import RemoteEngine
from server.engines.supervisor import EngineSupervisor
from server.models.embedded import ensure_checkpoint, find_bundled_gguf
from server.settings import Settings

logger = logging.getLogger(__name__)

BASE_VARIANT = "bf16"


def local_engine_config(settings: Settings, hardware: Hardware, variant_id: str, model_path: Path,
                        extra_args: tuple[str, ...] = ()) -> LocalEngineConfig:
    dtype = hardware.best_dtype if settings.engine_dtype == "auto" else settings.engine_dtype
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
    def __init__(self, settings: Settings, hardware: Hardware, catalog: Catalog,
                 supervisor: EngineSupervisor) -> None:
        self.settings = settings
        self.hardware = hardware
        self.catalog = catalog
        self.supervisor = supervisor

    async def run(self) -> None:
        now = int(time.time())
        for variant_id, url in self.settings.remote_engines.items():
            model, name = split_model_name(variant_id)
            self.catalog.add_variant(_variant_from_name(model, name or BASE_VARIANT), now)
            await self.supervisor.add(RemoteEngine(variant_id, str(url)))
        if self.settings.embedded_model:
            await self._embedded(now)

    async def _embedded(self, now: int) -> None:
        variant = Variant(model=self.settings.embedded_model_name, name=BASE_VARIANT, method="base", bits=16)
        self.catalog.add_variant(variant, now)
        if variant.id in self.settings.remote_engines:
            return
        started = time.monotonic()
        checkpoint = await asyncio.to_thread(
            ensure_checkpoint, find_bundled_gguf(), self.settings.checkpoints_dir, self.settings.logs_dir
        )
        logger.info("bundled checkpoint ready at %s (%.1f s)", checkpoint, time.monotonic() - started)
        engine: Engine = LocalEngine(local_engine_config(self.settings, self.hardware, variant.id, checkpoint))
        await self.supervisor.add(engine)


_BASE_NAMES = {"bf16": 16, "fp16": 16, "fp32": 32, "base": 16}


def _variant_from_name(model: str, name: str) -> Variant:
    """A remote variant's metadata, known only from its name until the registry measures it."""
    if name in _BASE_NAMES:
        return Variant(model=model, name=name, method="base", bits=_BASE_NAMES[name])
    bits = 4 if "4" in name else 8 if "8" in name else 16
    return Variant(model=model, name=name, method=name, bits=bits)
