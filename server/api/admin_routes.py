"""Admin API (admin key, or loopback without one): models, their variants and jobs, engines."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import GatewayDep, require_admin

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])


class AddModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="HF checkpoint directory or .gguf file, on the gateway's host")
    name: str = Field(min_length=1, max_length=64)
    variants: list[str] | None = Field(None, description="methods; default QUANTGATE_DEFAULT_VARIANTS")
    max_ppl_delta: float | None = Field(None, gt=0, le=100)


@router.post("/models", status_code=202)
async def add_model(body: AddModel, gateway: GatewayDep) -> JSONResponse:
    """Register a checkpoint; its variants are built in the background (see GET /admin/models/{name})."""
    methods = tuple(body.variants) if body.variants is not None else gateway.settings.default_variants
    record = await gateway.models.add(Path(body.path), body.name, methods, body.max_ppl_delta)
    return JSONResponse(gateway.models.describe(record.name)[0], status_code=202)


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict:
    return {"models": gateway.models.describe()}


@router.get("/models/{name}")
async def get_model(name: str, gateway: GatewayDep) -> dict:
    return gateway.models.describe(name)[0]


@router.delete("/models/{name}")
async def remove_model(name: str, gateway: GatewayDep) -> dict:
    await gateway.models.remove(name)
    return {"deleted": name}


@router.get("/jobs/{job_id}")
async def get_job(job_id: int, gateway: GatewayDep) -> dict:
    job = gateway.models.registry.job(job_id)
    variant = gateway.models.registry.variant(job.variant_id)
    return {**asdict(job), "variant_state": variant.state.value, "variant_reason": variant.reason,
            "log_path": variant.log_path}  # fmt: skip


@router.get("/engines")
async def engines(gateway: GatewayDep) -> dict:
    """Every engine with its URL (also the scrape target for its vllm:* metrics)."""
    rows = []
    for status in gateway.supervisor.statuses():
        row = asdict(status)
        row["state"] = status.state.value
        row["metrics_url"] = f"{status.base_url}/metrics"
        rows.append(row)
    return {"engines": rows}
