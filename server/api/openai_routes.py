"""OpenAI endpoints: thin handlers over Gateway."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.deps import GatewayDep, require_api_key
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.gateway import CHAT, COMPLETIONS

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


def _body_schema(schema: type) -> dict:
    # The handlers read the raw body themselves (size limit first, then validation), so the
    # OpenAPI document gets the schema from here.
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


@router.post("/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request, gateway: GatewayDep) -> Response:
    return await gateway.forward(request, CHAT)


@router.post("/completions", openapi_extra=_body_schema(CompletionRequest))
async def completions(request: Request, gateway: GatewayDep) -> Response:
    return await gateway.forward(request, COMPLETIONS)


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict:
    """Each logical model, then its variants (`model@variant`), with quantgate's extra fields."""
    serving = gateway.serving_variant_ids()
    data = []
    for model in gateway.catalog.models():
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
                "ppl": v.ppl, "ppl_delta": v.ppl_delta, "state": v.state, "ready": v.servable and v.id in serving,
                **({"reason": v.reason} if v.reason and not v.servable else {}),
            })  # fmt: skip
    return {"object": "list", "data": data}
