"""OpenAI endpoints: the HTTP half of the request path.

Here: the body (size limit, JSON, validation against the OpenAI schema), the budget the request
states in its headers, the client going away, and the response. Everything after that (route,
send, observe) is the serving service's, `server/gateway.py`, which sees no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from server.api.body import read_json_body
from server.api.deps import CatalogDep, GatewayDep, check_api_key, require_api_key
from server.api.features import estimate_prompt_tokens, request_budget
from server.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request, upstream_body
from server.api.responses import RelayResponse, unless_disconnected
from server.catalog import Catalog
from server.errors import ClientDisconnected, GatewayError, ModelNotFound, ShuttingDown
from server.gateway import CLIENT_CLOSED, Gateway
from server.serving_types import RequestLabels, ServeRequest, Streamed
from server.settings import Settings

# The completion handlers check the API key themselves and take their components from app.state:
# no FastAPI dependency on the hot path (see check_api_key). Everything else under /v1 depends on the key.
router = APIRouter(prefix="/v1", tags=["openai"])


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    schema: type[ChatCompletionRequest | CompletionRequest]


CHAT = Endpoint("chat", "/v1/chat/completions", ChatCompletionRequest)
COMPLETIONS = Endpoint("completions", "/v1/completions", CompletionRequest)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error the gateway answers with (server/errors.py)."""

    error: ErrorDetail


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    said = {400: "invalid request (body, limits, budget headers)", 401: "missing or invalid API key",
            404: "no such model or variant, or a pinned variant never served here (rejected, failed, unsupported)",
            413: "body too large", 415: "body not sent as application/json",
            429: "over capacity or no variant within the budget (Retry-After)", 499: "client closed the request",
            502: "the engine answered with an error", 503: "no engine available (Retry-After)"}  # fmt: skip
    return {code: {"model": ErrorResponse, "description": said[code]} for code in codes}


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _body_schema(schema: type[BaseModel]) -> dict:
    # The handlers read the raw body themselves (size limit first, then validation), so the OpenAPI
    # document gets the schema from here; its $defs are inlined, since "#/$defs/..." does not resolve at
    # the document's root (the request models are not recursive).
    full = schema.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_refs(full, full.get("$defs", {}))}}}}  # fmt: skip


COMPLETION_ERRORS = _errors(400, 401, 404, 413, 415, 429, 499, 502, 503)


@router.post("/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest), responses=COMPLETION_ERRORS)
async def chat_completions(request: Request) -> Response:
    return await _serve(request, CHAT)


@router.post("/completions", openapi_extra=_body_schema(CompletionRequest), responses=COMPLETION_ERRORS)
async def completions(request: Request) -> Response:
    return await _serve(request, COMPLETIONS)


async def _serve(request: Request, endpoint: Endpoint) -> Response:
    gateway: Gateway = request.app.state.gateway
    settings: Settings = request.app.state.settings
    check_api_key(request, settings)
    labels = RequestLabels(endpoint.name)
    try:
        if request.app.state.drain.draining:
            raise ShuttingDown()
        body = await read_json_body(request, settings.limits.max_body_bytes, settings.limits.max_json_depth)
        parsed = parse_request(endpoint.schema, body, settings.limits)
        served = await gateway.serve(ServeRequest(
            endpoint=endpoint.name, path=endpoint.path, model=parsed.model,
            upstream=upstream_body(body, bool(parsed.stream)), stream=bool(parsed.stream),
            tier=parsed.service_tier or "default", own_budget=request_budget(request.headers, parsed.latency_budget_ms),
            max_tokens=getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens,
            prompt_tokens=estimate_prompt_tokens(body),
        ), labels, watch=lambda work: unless_disconnected(request, work))  # fmt: skip
    except GatewayError as exc:
        gateway.count(labels, exc.status_code)
        raise
    except ClientDisconnected:
        gateway.count(labels, CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(served, Streamed):
        return RelayResponse(served.chunks, served.headers)
    return JSONResponse(served.data, headers=served.headers)


@router.get("/models", dependencies=[Depends(require_api_key)], responses=_errors(401))
async def list_models(gateway: GatewayDep, catalog: CatalogDep) -> dict:
    """Each logical model, then its variants (`model@variant`), with quantgate's extra fields."""
    return {"object": "list", "data": _model_entries(gateway, catalog)}


@router.get("/models/{model_id}", dependencies=[Depends(require_api_key)], responses=_errors(401, 404))
async def retrieve_model(model_id: str, gateway: GatewayDep, catalog: CatalogDep) -> dict:
    """One entry of GET /v1/models: a logical model or a `model@variant` (openai-python's models.retrieve)."""
    found = next((entry for entry in _model_entries(gateway, catalog) if entry["id"] == model_id), None)
    if found is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    return found


def _model_entries(gateway: Gateway, catalog: Catalog) -> list[dict]:
    serving = gateway.serving_variant_ids()
    data = []
    for model in catalog.models():
        ladder = model.accuracy_order()
        data.append({
            "id": model.name, "object": "model", "created": model.created, "owned_by": "quantgate",
            "variants": [v.id for v in ladder],
            "ready": any(v.servable and v.id in serving for v in ladder),
        })  # fmt: skip
        for v in ladder:
            data.append({
                "id": v.id, "object": "model", "created": model.created, "owned_by": "quantgate",
                "parent": model.name, "method": v.method, "bits": v.bits, "size_bytes": v.size_bytes,
                "ppl": v.ppl, "ppl_delta": v.ppl_delta, "kld": v.kld, "top1_agreement": v.top1_agreement,
                "chat_score": None if v.chat_score is None else round(v.chat_score, 4),
                "state": v.state, "ready": v.servable and v.id in serving,
                **({"reason": v.reason} if v.reason and not v.servable else {}),
            })  # fmt: skip
    return data
