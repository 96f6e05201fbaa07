"""Scrapes each serving engine's vLLM gauges about once a second, off the request path.

Only three lines of vLLM's /metrics matter to the router (summed over the `engine` label when
an engine runs data-parallel); they are picked out by prefix instead of parsing the whole page.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from server.engines.base import Engine

logger = logging.getLogger(__name__)

GAUGES = {
    b"vllm:num_requests_running{": "running",
    b"vllm:num_requests_waiting{": "waiting",
    b"vllm:kv_cache_usage_perc{": "kv_usage",
}


@dataclass(frozen=True)
class EngineGauges:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    scraped_at: float = 0.0  # time.monotonic()


def parse_gauges(text: bytes, now: float) -> EngineGauges:
    values = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0}
    for line in text.splitlines():
        for prefix, name in GAUGES.items():
            if line.startswith(prefix):
                try:
                    values[name] += float(line.rsplit(b" ", 1)[1])
                except (IndexError, ValueError):
                    pass
    return EngineGauges(int(values["running"]), int(values["waiting"]), min(values["kv_usage"], 1.0), now)


class EngineLoadScraper:
    def __init__(self, engines: Callable[[], Iterable[Engine]], http: httpx.AsyncClient,
                 interval_s: float = 1.0, stale_after_s: float = 5.0) -> None:
        self._engines = engines
        self._http = http
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self._gauges: dict[str, EngineGauges] = {}
        self._pages: dict[str, tuple[bytes, float]] = {}  # the last /metrics page, re-exported as is

    def gauges(self, variant_id: str) -> EngineGauges:
        """The latest gauges, or zeros when they are stale (the gateway's own counts still apply)."""
        gauges = self._gauges.get(variant_id)
        if gauges is None or time.monotonic() - gauges.scraped_at > self.stale_after_s:
            return EngineGauges()
        return gauges

    def all(self) -> dict[str, EngineGauges]:
        return {variant_id: self.gauges(variant_id) for variant_id in self._gauges}

    def pages(self) -> dict[str, bytes]:
        """Each serving engine's last /metrics page, when fresh (for GET /metrics/engines)."""
        now = time.monotonic()
        return {v: page for v, (page, at) in self._pages.items() if now - at <= self.stale_after_s}

    async def run(self) -> None:
        while True:
            serving = [e for e in self._engines() if e.status().serving]
            await asyncio.gather(*(self._scrape(e) for e in serving))
            live = {e.variant_id for e in serving}
            for gone in set(self._gauges) - live:
                del self._gauges[gone]
            for gone in set(self._pages) - live:
                del self._pages[gone]
            await asyncio.sleep(self.interval_s)

    async def _scrape(self, engine: Engine) -> None:
        try:
            response = await self._http.get(f"{engine.base_url}/metrics", timeout=self.interval_s,
                                            headers=engine.auth_headers)  # fmt: skip
            response.raise_for_status()
        except httpx.HTTPError as exc:
            logger.debug("scraping %s failed: %s", engine.variant_id, exc)
            return
        now = time.monotonic()
        self._gauges[engine.variant_id] = parse_gauges(response.content, now)
        self._pages[engine.variant_id] = (response.content, now)
