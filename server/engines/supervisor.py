"""Owns every engine of the gateway: adds, starts, looks up and stops them."""

from __future__ import annotations

import asyncio
import logging

from server.engines.base import Engine, EngineStatus

logger = logging.getLogger(__name__)


class EngineSupervisor:
    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}

    async def add(self, engine: Engine) -> None:
        """Register and start an engine (returns before it is ready)."""
        if engine.variant_id in self._engines:
            raise ValueError(f"an engine for {engine.variant_id} is already running")
        self._engines[engine.variant_id] = engine
        await engine.start()

    async def remove(self, variant_id: str) -> None:
        engine = self._engines.pop(variant_id, None)
        if engine is not None:
            await engine.stop()

    def get(self, variant_id: str) -> Engine | None:
        return self._engines.get(variant_id)

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def statuses(self) -> list[EngineStatus]:
        return [engine.status() for engine in self._engines.values()]

    async def stop_all(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        if engines:
            logger.info("stopping %d engine(s)", len(engines))
            await asyncio.gather(*(engine.stop() for engine in engines), return_exceptions=True)
