"""Liveness, readiness and Prometheus metrics: open to probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import GatewayDep, LoadDep, MetricsDep
from server.telemetry import engine_metrics

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """Liveness: the gateway process answers. Engines are /ready's business."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(gateway: GatewayDep) -> JSONResponse:
    """Ready when every configured model has at least one serving variant, and not draining."""
    models = gateway.readiness()
    draining = gateway.drain.draining
    is_ready = bool(models) and all(models.values()) and not draining
    body = {"ready": is_ready, "models": models, **({"draining": True} if draining else {})}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics")
async def metrics(gateway_metrics: MetricsDep) -> Response:
    return Response(generate_latest(gateway_metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/engines")
async def engine_metrics_page(load: LoadDep) -> Response:
    """Every serving engine's own metrics (`vllm:*`), as last scraped, with a `variant` label."""
    return Response(engine_metrics.render(load.pages()), media_type=CONTENT_TYPE_LATEST)
