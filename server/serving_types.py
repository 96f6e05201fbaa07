"""The frozen types between the steps of the serving service's request path (server/gateway.py):
ServeRequest (what HTTP hands over) -> Plan (where it goes) -> Answer | Streamed (what comes back)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from server.catalog import LogicalModel, Variant
from server.routing.predictor import RawPrediction
from server.routing.types import Budget, Decision, Prediction, RequestFeatures

T = TypeVar("T")
Watch = Callable[[Awaitable[T]], Awaitable[T]]  # runs the work, raising ClientDisconnected if the client goes


async def unwatched(work: Awaitable[T]) -> T:
    return await work


@dataclass(frozen=True)
class ServeRequest:
    """A completion request as HTTP hands it over: parsed and validated, its gateway-only fields
    already split off."""

    endpoint: str  # "chat" | "completions": the metrics' label
    path: str  # the engine's route, e.g. /v1/chat/completions
    model: str  # as requested: a logical model or `model@variant`
    upstream: Mapping[str, Any]  # the body the engine gets (gateway fields removed; `model` set per engine)
    stream: bool
    tier: str
    own_budget: Budget  # the request's own (headers, latency_budget_ms); tier defaults come in `route`
    max_tokens: int | None
    prompt_tokens: int


@dataclass(frozen=True)
class Plan:
    """Where a request goes: the decision and the engines to try, in order, before the first byte."""

    request: ServeRequest
    model: LogicalModel
    features: RequestFeatures
    decision: Decision
    raws: Mapping[str, RawPrediction]
    attempts: tuple[tuple[Variant, Prediction | None], ...]
    priority: int
    started: float


@dataclass(frozen=True)
class Answer:
    data: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True)
class Streamed:
    chunks: AsyncIterator[bytes]
    headers: dict[str, str]


@dataclass
class RequestLabels:
    """The labels a request is counted under, filled in as it goes (an early failure has fewer)."""

    endpoint: str
    model: str = ""
    variant: str = ""
    tier: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "variant": self.variant, "endpoint": self.endpoint, "tier": self.tier}
