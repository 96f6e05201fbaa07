"""The engine interface the gateway talks to, and the frozen status it reports."""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from dataclasses import dataclass


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"  # remote engine not answering /health
    RESTARTING = "restarting"  # local engine crashed, waiting out its backoff
    FAILED = "failed"  # gave up (start timeout, or too many crashes)
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineStatus:
    variant_id: str
    kind: str  # "local" or "remote"
    base_url: str
    state: EngineState
    restarts: int
    pid: int | None
    log_path: str | None
    detail: str
    # The device group it runs on: engines of one group share its compute (a GPU, or this host's
    # cores), so one's busy steps slow the others (server/routing/predictor.py).
    device: str = ""

    @property
    def serving(self) -> bool:
        return self.state is EngineState.READY


class Engine(abc.ABC):
    """A vLLM OpenAI-compatible server for exactly one variant.

    The gateway only needs `base_url` and `status()`; local and remote engines differ in who
    starts the process, never in how requests reach it.
    """

    variant_id: str
    # Started with `--scheduling-policy priority`: requests may carry a `priority` (vLLM refuses
    # a non-zero one otherwise).
    accepts_priority: bool = False
    device: str = ""  # its device group (EngineStatus.device)

    @property
    @abc.abstractmethod
    def base_url(self) -> str: ...

    @property
    def auth_headers(self) -> Mapping[str, str]:
        """What every request to the engine carries (its key); never shown in a status."""
        return {}

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin bringing the engine up; returns at once (readiness shows in status())."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the engine and everything it started; idempotent."""

    @abc.abstractmethod
    def status(self) -> EngineStatus: ...
