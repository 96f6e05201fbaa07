"""An engine somebody else runs (a Kubernetes pod, another host): only its URL is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import httpx

from server.engines.base import Engine, EngineState, EngineStatus

logger = logging.getLogger(__name__)


def remote_device(base_url: str) -> str:
    """A remote engine's device group when its spec names none: its host. Engines behind one host
    name (several vLLM servers on one GPU box, each on its own port) are taken to share a device;
    engines on different hosts (pods) not. A `device` key in the spec says otherwise."""
    return f"remote:{httpx.URL(base_url).host}"


class RemoteEngine(Engine):
    def __init__(self, variant_id: str, base_url: str, poll_interval_s: float = 2.0,
                 accepts_priority: bool = False, device: str | None = None,
                 api_key: str | None = None) -> None:
        self.variant_id = variant_id
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.accepts_priority = accepts_priority
        self._base_url = base_url.rstrip("/")
        self.device = device or remote_device(self._base_url)
        self._poll_interval_s = poll_interval_s
        self._state = EngineState.STOPPED
        self._detail = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def auth_headers(self) -> Mapping[str, str]:
        return self._auth

    def status(self) -> EngineStatus:
        return EngineStatus(self.variant_id, "remote", self._base_url, self._state, 0, None, None, self._detail,
                            self.device)

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._state = EngineState.STARTING
            self._task = asyncio.create_task(self._poll(), name=f"engine:{self.variant_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._state = EngineState.STOPPED

    async def _poll(self) -> None:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False, headers=self._auth) as client:
            while True:
                try:
                    response = await client.get(f"{self._base_url}/health")
                    healthy = response.status_code == 200
                    self._detail = "" if healthy else f"/health answered {response.status_code}"
                except httpx.HTTPError as exc:
                    healthy, self._detail = False, f"/health: {type(exc).__name__}"
                new_state = EngineState.READY if healthy else EngineState.UNHEALTHY
                if new_state is not self._state:
                    logger.info("remote engine %s at %s: %s", self.variant_id, self._base_url, new_state.value)
                self._state = new_state
                await asyncio.sleep(self._poll_interval_s)
