"""The gateway service: picks a variant for a request and forwards it to that variant's engine.

Route handlers stay thin; this class holds what the app owns (catalog, engines, metrics) and
the request path. Routing policy lives apart from this mechanism (see `choose_variant`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.body import ClientDisconnected, read_json_body, unless_disconnected
from server.api.protocol import GATEWAY_FIELDS, ChatCompletionRequest, CompletionRequest, parse_request
from server.api.streaming import StreamTiming, relay
from server.catalog import Catalog, LogicalModel, Variant
from server.engines.base import Engine
from server.engines.client import EngineClient
from server.engines.supervisor import EngineSupervisor
from server.errors import EngineUnavailable, GatewayError
from server.metrics import GatewayMetrics
from server.registry.service import ModelService
from server.settings import Settings

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "client closed request"; never sent, only counted


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    schema: type[ChatCompletionRequest] | type[CompletionRequest]


CHAT = Endpoint("chat", "/v1/chat/completions", ChatCompletionRequest)
COMPLETIONS = Endpoint("completions", "/v1/completions", CompletionRequest)


def choose_variant(model: LogicalModel, serving: set[str]) -> Variant | None:
    """The most accurate servable variant whose engine is serving."""
    return next((v for v in model.accuracy_order() if v.servable and v.id in serving), None)


class Gateway:
    def __init__(self, settings: Settings, catalog: Catalog, supervisor: EngineSupervisor,
                 engines: EngineClient, metrics: GatewayMetrics, models: ModelService) -> None:
        self.settings = settings
        self.models = models
        self.catalog = catalog
        self.supervisor = supervisor
        self.engines = engines
        self.metrics = metrics

    def serving_variant_ids(self) -> set[str]:
        return {s.variant_id for s in self.supervisor.statuses() if s.serving}

    def readiness(self) -> dict[str, bool]:
        """Per logical model: does it have at least one serving variant?"""
        serving = self.serving_variant_ids()
        return {m.name: any(v.servable and v.id in serving for v in m.variants) for m in self.catalog.models()}

    def select(self, requested: str) -> tuple[LogicalModel, Variant, Engine]:
        model, pinned = self.catalog.resolve(requested)
        serving = self.serving_variant_ids()
        if pinned is not None:
            variant = pinned if pinned.servable and pinned.id in serving else None
        else:
            variant = choose_variant(model, serving)
        engine = self.supervisor.get(variant.id) if variant is not None else None
        if variant is None or engine is None:
            if pinned is not None and pinned.state in ("rejected", "failed"):
                raise EngineUnavailable(f"variant '{pinned.id}' is {pinned.state} and not served; see "
                                        "GET /admin/models for the reason")  # fmt: skip
            states = {v.id: v.state for v in model.variants}
            raise EngineUnavailable(f"no engine is serving '{requested}' yet (variants: {states})",
                                    headers={"Retry-After": "5"})
        return model, variant, engine

    async def forward(self, request: Request, endpoint: Endpoint) -> Response:
        started = time.perf_counter()
        labels = {"model": "", "variant": "", "endpoint": endpoint.name}
        try:
            body = await read_json_body(request, self.settings.limits.max_body_bytes)
            parsed = parse_request(endpoint.schema, body, self.settings.limits)
            model, variant, engine = self.select(parsed.model)
            labels.update(model=model.name, variant=variant.id)
            upstream_body = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
            upstream_body["model"] = variant.id
            url = f"{engine.base_url}{endpoint.path}"
            headers = {"x-quantgate-variant": variant.id}
            self.metrics.overhead.labels(endpoint.name).observe(time.perf_counter() - started)
            if parsed.stream:
                return await self._stream(variant, url, upstream_body, headers, labels, started)
            return await self._complete(request, variant, url, upstream_body, headers, labels, started)
        except GatewayError as exc:
            self.metrics.requests.labels(**labels, status=str(exc.status_code)).inc()
            raise
        except ClientDisconnected:
            self.metrics.requests.labels(**labels, status=str(CLIENT_CLOSED)).inc()
            return Response(status_code=CLIENT_CLOSED)

    async def _complete(self, request: Request, variant: Variant, url: str, body: dict[str, Any],
                        headers: dict[str, str], labels: dict[str, str], started: float) -> Response:
        self.metrics.in_flight.labels(variant.id).inc()
        try:
            data = await unless_disconnected(request, self.engines.post_json(variant.id, url, body))
        finally:
            self.metrics.in_flight.labels(variant.id).dec()
        self._record_usage(labels, data.get("usage"))
        self.metrics.e2e.labels(**labels).observe(time.perf_counter() - started)
        self.metrics.requests.labels(**labels, status="200").inc()
        return JSONResponse(data, headers=headers)

    async def _stream(self, variant: Variant, url: str, body: dict[str, Any], headers: dict[str, str],
                      labels: dict[str, str], started: float) -> Response:
        upstream = await self.engines.open_stream(variant.id, url, body)
        self.metrics.in_flight.labels(variant.id).inc()

        def on_close(timing: StreamTiming) -> None:
            self.metrics.in_flight.labels(variant.id).dec()
            status = "200" if timing.completed else str(CLIENT_CLOSED)
            self.metrics.requests.labels(**labels, status=status).inc()
            if timing.first_chunk is not None:
                self.metrics.ttft.labels(labels["model"], labels["variant"]).observe(timing.first_chunk - started)
            itl = self.metrics.itl.labels(labels["model"], labels["variant"])
            for gap in timing.gaps:
                itl.observe(gap)
            if timing.completed:
                self.metrics.e2e.labels(**labels).observe(time.perf_counter() - started)
            self._record_usage(labels, timing.usage)

        stream = relay(upstream, StreamTiming(started=started), on_close)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    def _record_usage(self, labels: dict[str, str], usage: dict | None) -> None:
        if not usage:
            return
        for kind in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(kind), int):
                self.metrics.tokens.labels(labels["model"], labels["variant"], kind.split("_")[0]).inc(usage[kind])
