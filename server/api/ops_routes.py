"""Liveness, readiness, Prometheus metrics, and the admin view of engines."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.deps import GatewayDep, require_admin

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    """Liveness: the gateway process answers. Engines are /ready's business."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(gateway: GatewayDep) -> JSONResponse:
    """Ready when every configured model has at least one serving variant."""
    models = gateway.readiness()
    is_ready = bool(models) and all(models.values())
    return JSONResponse({"ready": is_ready, "models": models}, status_code=200 if is_ready else 503)


@router.get("/metrics")
async def metrics(gateway: GatewayDep) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/engines", dependencies=[Depends(require_admin)])
async def engines(gateway: GatewayDep) -> dict:
    """Every engine with its URL (also the scrape target for its vllm:* metrics)."""
    rows = []
    for status in gateway.supervisor.statuses():
        row = asdict(status)
        row["state"] = status.state.value
        row["metrics_url"] = f"{status.base_url}/metrics"
        rows.append(row)
    return {"engines": rows}
