"""Request validation and limits: table-driven, no network."""

from __future__ import annotations

import pytest

from server.api.protocol import ChatCompletionRequest, CompletionRequest, parse_request, upstream_body
from server.errors import InvalidRequest
from server.settings import Limits

LIMITS = Limits(max_n=4, max_tokens=512, max_logprobs=5, max_messages=3)
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        ({"messages": MSG}, "model", "Field required"),
        ({"model": "m", "messages": MSG, "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"model": "m", "messages": MSG, "n": 5}, "n", "limit of 4"),
        ({"model": "m", "messages": MSG, "max_tokens": 513}, "max_tokens", "limit of 512"),
        ({"model": "m", "messages": MSG, "max_completion_tokens": 600}, "max_completion_tokens", "limit of 512"),
        ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "m", "messages": MSG, "logprobs": True, "top_logprobs": 6}, "top_logprobs", "limit of 5"),
        ({"model": "m", "messages": MSG * 4}, "messages", "limit of 3"),
        ({"model": "m", "messages": MSG, "chat_template": "{{ x }}"}, "chat_template", "refused"),
        ({"model": "m", "messages": MSG, "priority": -10}, "priority", "service_tier"),
        ({"model": "m", "messages": MSG, "frobnicate": 1}, "frobnicate", "unsupported parameter"),
        ({"model": "m", "messages": MSG, "service_tier": "gold"}, "service_tier", "Input should be"),
        ({"model": "m", "messages": MSG, "n": "2"}, "n", "valid integer"),
        ({"model": "m", "messages": MSG, "n": 2.5}, "n", "valid integer"),
        ({"model": "m", "messages": MSG, "n": True}, "n", "valid integer"),
        ({"model": "m", "messages": MSG, "stream": "yes"}, "stream", "valid boolean"),
        ({"model": "m", "messages": MSG, "temperature": False}, "temperature", "valid number"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "Input should be"),
        ({"model": "m", "messages": MSG, "stop": ["a"] * 17}, "stop", "at most 16"),
        ({"model": "m", "messages": MSG, "latency_budget_ms": -1}, "latency_budget_ms", "greater than 0"),
    ],
)
def test_invalid_chat_requests_are_400_with_param(body: dict, param: str | None, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(ChatCompletionRequest, body, LIMITS)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": "m", "prompt": {"text": "x"}}, "prompt"),
        ({"model": "m"}, "prompt"),
        # More sequences than the limit (16 by default): prompts x n, each within its own limit.
        ({"model": "m", "prompt": ["x"] * 17}, "prompt"),
        ({"model": "m", "prompt": ["x"] * 5, "n": 4}, "prompt"),
        ({"model": "m", "prompt": [[1, 2]] * 9, "n": 2}, "prompt"),
    ],
)
def test_invalid_completion_requests(body: dict, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(CompletionRequest, body, LIMITS)
    assert info.value.param == param


@pytest.mark.parametrize(("prompt", "n", "sequences"),
                         [("x", 4, 4), ([1, 2, 3], 4, 4), (["a", "b"], 4, 8), ([[1], [2], [3]], 1, 3), (["x"] * 16, 1, 16)])
def test_sequences_are_prompts_times_n(prompt: object, n: int, sequences: int) -> None:
    parsed = parse_request(CompletionRequest, {"model": "m", "prompt": prompt, "n": n}, LIMITS)
    assert parsed.sequences == sequences  # type: ignore[attr-defined]


def test_non_object_body_is_400() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_request(ChatCompletionRequest, [MSG], LIMITS)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": MSG, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
        {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}},
        {"model": "m", "messages": MSG, "service_tier": "priority", "latency_budget_ms": 250},
        {"model": "m@int8", "messages": MSG, "max_tokens": 512, "n": 4, "logprobs": True, "top_logprobs": 5},
        {"model": "m", "messages": MSG, "metadata": {"k": "v"}, "store": False},
    ],
)
def test_valid_chat_requests_pass(body: dict) -> None:
    request = parse_request(ChatCompletionRequest, body, LIMITS)
    assert request.model == body["model"]


@pytest.mark.parametrize("prompt", ["x", ["x", "y"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_shapes(prompt: object) -> None:
    request = parse_request(CompletionRequest, {"model": "m", "prompt": prompt}, LIMITS)
    assert request.prompt == prompt
    assert request.max_tokens == 16  # OpenAI's default for completions


def test_stream_options_without_stream_is_accepted_and_not_forwarded() -> None:
    # Schema-valid (the OpenAPI document cannot say "only with stream"), meaningless unstreamed, and vLLM
    # refuses it there: dropped on the way to the engine.
    body = {"model": "m", "messages": MSG, "stream_options": {"include_usage": True}, "service_tier": "flex"}
    assert not parse_request(ChatCompletionRequest, body, LIMITS).stream
    assert upstream_body(body, stream=False) == {"model": "m", "messages": MSG}
    assert upstream_body({**body, "stream": True}, stream=True) == {
        "model": "m", "messages": MSG, "stream_options": {"include_usage": True}, "stream": True}


def test_an_integral_number_is_an_integer_as_json_schema_says() -> None:
    """2.0 is the integer 2 in JSON (and to the fuzzer reading /openapi.json); strict validation refused it."""
    chat = parse_request(ChatCompletionRequest, {"model": "m", "messages": MSG, "n": 2.0, "max_tokens": 8.0,
                                                 "seed": -3.0, "top_logprobs": 1.0, "logprobs": True}, LIMITS)
    assert (chat.n, chat.max_tokens, chat.seed, chat.top_logprobs) == (2, 8, -3, 1)
    text = parse_request(CompletionRequest, {"model": "m", "prompt": [[1.0, 2.0]], "logprobs": 2.0}, LIMITS)
    assert text.prompt == [[1, 2]] and text.logprobs == 2
