"""Admin API (admin key, or loopback without one): models, their variants and jobs, engines."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import (
    BookDep,
    CatalogDep,
    GatewayDep,
    ModelsDep,
    SettingsDep,
    SupervisorDep,
    require_admin,
)
from server.errors import GatewayError
from server.registry.service import VARIANT_NAME, VariantSpec
from server.routing.types import Budget, RequestFeatures

class ExportFailed(GatewayError):
    status_code = 500
    error_type = "server_error"
    default_code = "export_failed"


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])


class VariantRequest(BaseModel):
    """A rung with fields other than its method's defaults (GET /admin/models shows every variant's whole config)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1, max_length=200, description="a method or a chain of them, e.g. prune-structured")
    name: str | None = Field(None, min_length=1, max_length=64, pattern=VARIANT_NAME.pattern,
                             description="the variant's name (model@name); the method's by default")
    config: dict[str, Any] = Field(default_factory=dict, max_length=64,
                                   description="the method's fields, e.g. {\"drop_layers\": 2, \"mlp_keep\": 0.875}")


class AddModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="HF checkpoint directory or .gguf file, on the gateway's host")
    name: str = Field(min_length=1, max_length=64)
    variants: list[str | VariantRequest] | None = Field(
        None, max_length=32,
        description="methods, or rungs with their own fields and name; default QUANTGATE_DEFAULT_VARIANTS")
    max_ppl_delta: float | None = Field(None, gt=0, le=100)
    tool_call_parser: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="vLLM's parser for the model's tool calls (e.g. hermes); without it requests with tools "
                    "are refused. The chat template must render tools.")  # fmt: skip


class ScheduleFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: str | None = Field(None, max_length=200, description="a substring of the tensor's name; * or none: all")
    value: float | list[float] = Field(description="t for the tensors it matches: a number or a layer gradient")


class MergeModels(BaseModel):
    """A model merged from registered ones (optimizers/merge.py), then built and gated like any model."""

    model_config = ConfigDict(extra="forbid")

    models: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=2, max_length=8, description="registered models of one architecture (slerp: exactly two)")
    name: str = Field(min_length=1, max_length=64)
    method: Literal["slerp", "linear"] = "slerp"
    t: float | list[float] | list[ScheduleFilter] = Field(
        0.5, description="slerp: 0 is the first model, 1 the second; a list is a gradient over the layers, "
                         "filters pick a value by tensor name (mergekit's parameter language)")
    weights: list[float] | None = Field(None, max_length=8, description="linear: one weight per model (default equal)")
    variants: list[str | VariantRequest] | None = Field(
        None, max_length=32, description="rungs of the merged model; default QUANTGATE_DEFAULT_VARIANTS")
    max_ppl_delta: float | None = Field(None, gt=0, le=100)


@router.post("/models", status_code=202)
async def add_model(body: AddModel, models: ModelsDep, settings: SettingsDep) -> JSONResponse:
    """Register a checkpoint; its variants are built in the background (see GET /admin/models/{name})."""
    variants = settings.default_variants if body.variants is None else tuple(
        v if isinstance(v, str) else VariantSpec(v.method, v.config, v.name) for v in body.variants)
    record = await models.add(Path(body.path), body.name, variants, body.max_ppl_delta, body.tool_call_parser)
    return JSONResponse(models.describe(record.name)[0], status_code=202)


@router.post("/merges", status_code=202)
async def merge_models(body: MergeModels, models: ModelsDep, settings: SettingsDep) -> JSONResponse:
    """Merge registered models into a new one; its checkpoint is written and its variants built in the
    background (see GET /admin/models/{name})."""
    variants = settings.default_variants if body.variants is None else tuple(
        v if isinstance(v, str) else VariantSpec(v.method, v.config, v.name) for v in body.variants)
    t = [f.model_dump() for f in body.t] if isinstance(body.t, list) and body.t and isinstance(
        body.t[0], ScheduleFilter) else body.t
    record = await models.merge(body.models, body.name, body.method, t, body.weights, variants, body.max_ppl_delta)
    return JSONResponse(models.describe(record.name)[0], status_code=202)


@router.get("/models")
async def list_models(models: ModelsDep) -> dict:
    return {"models": models.describe()}


@router.get("/models/{name}")
async def get_model(name: str, models: ModelsDep) -> dict:
    return models.describe(name)[0]


@router.delete("/models/{name}")
async def remove_model(name: str, models: ModelsDep) -> dict:
    await models.remove(name)
    return {"deleted": name}


@router.get("/models/{name}/export/onnx", response_model=None,
            responses={200: {"content": {"application/x-tar": {}}, "description": "the ONNX model directory"},
                       202: {"description": "exporting: ask again after Retry-After seconds"}})  # fmt: skip
async def export_onnx(name: str, models: ModelsDep, variant: str = Query("bf16", min_length=1, max_length=64,
                                                                         pattern=VARIANT_NAME.pattern),
                      precision: Literal["fp32", "int8", "int4"] = "int4") -> Response:  # fmt: skip
    """The model (or a dense variant of it) as an ONNX Runtime GenAI model for edge devices: 202 while it is
    exported (the first request starts it), then a tar of model.onnx, its weights, genai_config.json, the
    tokenizer and export.json (parity with PyTorch, tokens/s on this host)."""
    state, label = models.onnx_export(name, variant, precision)
    if state.status == "ready" and state.tar is not None:
        return FileResponse(state.tar, media_type="application/x-tar", filename=f"{label}.tar")
    if state.status == "failed":
        raise ExportFailed(f"the ONNX export of {name}@{variant} ({precision}) failed: {state.reason}; "
                           "ask again to retry")
    return JSONResponse({"status": "exporting", "model": name, "variant": variant, "precision": precision},
                        status_code=202, headers={"Retry-After": "5"})


@router.get("/jobs/{job_id}")
async def get_job(models: ModelsDep, job_id: int = PathParam(ge=1, le=2**63 - 1)) -> dict:  # SQLite INTEGER
    return models.job(job_id)


@router.get("/engines")
async def engines(supervisor: SupervisorDep, models: ModelsDep) -> dict:
    """Every engine with its URL; its /metrics asks the engine's key (GET /metrics/engines re-exports them)."""
    rows = []
    for status in supervisor.statuses():
        row = asdict(status)
        row["state"] = status.state.value
        row["metrics_url"] = f"{status.base_url}/metrics"
        rows.append(row)
    return {"engines": rows, "host": models.kernels.as_dict()}


@router.get("/routing/{model}")
async def routing(model: str, gateway: GatewayDep, catalog: CatalogDep, book: BookDep, settings: SettingsDep,
                  prompt_tokens: int = Query(64, ge=1, le=1_048_576),
                  output_tokens: int = Query(128, ge=1, le=1_048_576)) -> dict:
    """What the router sees for `model` now: per variant its quality, live load, latency priors,
    online corrections, and the prediction for a request of the given size; per shared device the
    active rung, what each rung would do with the recent traffic, and the rungs worth keeping resident."""
    logical, _ = catalog.resolve(model)
    features = RequestFeatures(prompt_tokens, output_tokens, Budget())
    candidates, _ = gateway.candidates(logical, features)
    rows = []
    for c in candidates:
        latency = book.get(c.variant.id)
        rows.append({
            "variant": c.variant.id, "method": c.variant.method, "ppl_delta": c.variant.ppl_delta,
            "serving": c.serving, "load": asdict(c.load),
            "priors": latency.priors.model_dump() if latency else None,
            "ttft_scale": latency.ttft_scale if latency else None,
            "tpot_scale": latency.tpot_scale if latency else None,
            "load_ttft_scale": latency.load_ttft_scale if latency else None,
            "load_tpot_scale": latency.load_tpot_scale if latency else None,
            "observations": latency.observations if latency else 0,
            "predicted": asdict(c.prediction) if c.prediction else None,
        })  # fmt: skip
    regimes = gateway.concentrator(logical.name).regimes
    config = settings.routing_for(logical.name)
    return {"model": logical.name, "config": config.model_dump(),
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "variants": rows,
            "devices": [regime.as_dict() for regime in regimes.values()],
            "recommendation": {device: {**regime.recommend(config.shared_device.hysteresis), "reason": regime.reason}
                               for device, regime in regimes.items()}}  # fmt: skip
