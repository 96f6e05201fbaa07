"""The OpenAPI document as the gateway behaves, for generated clients and API fuzzers.

FastAPI's own document says 422 where the gateway answers 400 (server/errors.py turns validation errors
into OpenAI-shaped 400s), omits the admin routes' errors, calls /metrics JSON, and leaves the request
bodies open to any extra field and any size, where the gateway refuses fields outside its allowlist
and requests past its limits. `document(app, limits)` patches the generated document once, with the
limits this gateway enforces (tests/integration/test_openapi_fuzz.py runs schemathesis against it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.api.protocol import VLLM_EXTRA_FIELDS, ChatCompletionRequest, CompletionRequest
from server.settings import Limits

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
ADMIN_ERRORS = {"400": "invalid request", "401": "missing or invalid admin key",
                "403": "admin without a key is for loopback clients only", "404": "no such model, variant or job",
                "409": "already exists, or not in a state that allows it"}  # fmt: skip
TEXT = {"text/plain": {"schema": {"type": "string"}}}
MAX_STOP = 16  # server/api/protocol.py's check_limits


def document(app: FastAPI, limits: Limits) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _patch(generate(), limits)  # generate() caches the document in app.openapi_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _patch(schema: dict[str, Any], limits: Limits) -> None:
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None or operation.get("parameters") or "requestBody" in operation:
                responses.setdefault("400", {"description": "invalid request", "content": ERROR})
            if path.startswith("/admin/"):
                for code, said in ADMIN_ERRORS.items():
                    responses.setdefault(code, {"description": said, "content": ERROR})
            if path in ("/metrics", "/metrics/engines") and method == "get":
                responses["200"]["content"] = TEXT
            if path == "/ready" and method == "get":
                responses["503"] = {"description": "not ready, or draining", "content": responses["200"]["content"]}
    paths = schema.get("paths", {})
    for path, model in (("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)):
        body = paths.get(path, {}).get("post", {}).get("requestBody")
        if body is not None:
            _close_body(body["content"]["application/json"]["schema"], model, limits)


def _close_body(body: dict[str, Any], model: type[ChatCompletionRequest | CompletionRequest], limits: Limits) -> None:
    """Extra fields only from the allowlist, and the limits as the schema's own bounds."""
    properties = body.setdefault("properties", {})
    for name in sorted(VLLM_EXTRA_FIELDS | model._openai_fields()):
        properties.setdefault(name, {})  # forwarded as is: vLLM validates them
    body["additionalProperties"] = False
    bounds = {"n": ("maximum", limits.max_n), "max_tokens": ("maximum", limits.max_tokens),
              "max_completion_tokens": ("maximum", limits.max_tokens),
              "top_logprobs": ("maximum", limits.max_logprobs), "logprobs": ("maximum", limits.max_logprobs),
              "messages": ("maxItems", limits.max_messages), "stop": ("maxItems", MAX_STOP),
              "prompt": ("maxItems", limits.max_sequences)}  # fmt: skip
    for name, (keyword, value) in bounds.items():
        if name in properties:
            _bound(properties[name], keyword, value)
    if "prompt" in properties:
        body["anyOf"] = _sequences(properties["prompt"], limits)


def _sequences(prompt: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """prompts x n <= max_sequences, as the schema can say it: for each n up to max_n, the prompt lists
    of at most max_sequences // n prompts (a string or one list of token ids is one prompt)."""
    branches = []
    for n in range(1, limits.max_n + 1):
        most = limits.max_sequences // n
        if most < 1:
            break
        shapes = []
        for shape in prompt.get("anyOf", [prompt]):
            several = shape.get("type") == "array" and shape.get("items", {}).get("type") != "integer"
            shapes.append({**shape, "maxItems": min(most, shape.get("maxItems", most))} if several else shape)
        branches.append({"properties": {"n": {"maximum": n}, "prompt": {"anyOf": shapes}}})
    return branches


def _bound(node: dict[str, Any], keyword: str, value: int) -> None:
    """Set `keyword` on each branch it applies to (integers for maximum, arrays for maxItems)."""
    kind = "integer" if keyword == "maximum" else "array"
    branches = node.get("anyOf") or node.get("oneOf") or [node]
    for branch in branches:
        # A list of token ids is one prompt, not several: only lists of prompts count against max_sequences.
        one_prompt = keyword == "maxItems" and branch.get("items", {}).get("type") == "integer"
        if branch.get("type") == kind and not one_prompt:
            branch[keyword] = min(value, branch.get(keyword, value))
