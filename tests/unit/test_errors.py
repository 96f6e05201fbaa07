"""Upstream error mapping and the OpenAI error shape."""

from __future__ import annotations

import json

import pytest

from server.engines.client import upstream_error
from server.errors import (
    ContextLengthExceeded,
    EngineUnavailable,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    validation_error_to_invalid_request,
)

VLLM_CONTEXT = {
    "error": {
        "message": "This model's maximum context length is 2048 tokens. However, your prompt contains at least "
        "2049 input tokens.",
        "type": "BadRequestError", "param": "input_tokens", "code": 400,
    }
}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "payload", "expected", "status_out"),
    [
        (400, VLLM_CONTEXT, ContextLengthExceeded, 400),
        (400, {"error": {"message": "bad logit_bias", "param": "logit_bias"}}, InvalidRequest, 400),
        (400, {"object": "error", "message": "old-style vLLM error"}, InvalidRequest, 400),
        (404, {"error": {"message": "The model `x` does not exist."}}, EngineUnavailable, 503),
        (500, {"error": {"message": "EngineCore died"}}, EngineUnavailable, 503),
        (503, b"not json at all", EngineUnavailable, 503),
        (422, {"error": {"message": "unprocessable"}}, UpstreamError, 422),
    ],
)
def test_upstream_error_mapping(status: int, payload: object, expected: type, status_out: int) -> None:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    err = upstream_error("m@bf16", status, content)
    assert type(err) is expected
    assert err.status_code == status_out
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}


def test_context_length_keeps_vllms_message() -> None:
    err = upstream_error("m@bf16", 400, json.dumps(VLLM_CONTEXT).encode())
    assert err.message == VLLM_CONTEXT["error"]["message"]
    assert err.code == "context_length_exceeded"


def test_model_not_found_shape() -> None:
    body = ModelNotFound("The model 'x' does not exist", param="model").body()
    assert body == {"error": {"message": "The model 'x' does not exist", "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}


def test_validation_errors_name_the_first_field_and_count_the_rest() -> None:
    err = validation_error_to_invalid_request([
        {"loc": ("body", "messages", 0, "role"), "msg": "bad role"},
        {"loc": ("body", "n"), "msg": "too big"},
    ])  # fmt: skip
    assert err.param == "messages.0.role"
    assert err.message == "messages.0.role: bad role (and 1 more error(s))"
