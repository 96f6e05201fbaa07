"""Request schemas for the OpenAI endpoints, with the gateway's limits.

The gateway validates a request and then forwards the client's own JSON (not a re-serialised
model), so fields vLLM understands pass through untouched. Fields outside the OpenAI schema are
forwarded only when they are in VLLM_EXTRA_FIELDS; anything else is a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import InvalidRequest, validation_error_to_invalid_request
from server.settings import Limits

# vLLM's sampling and prompt extensions that are safe to let clients set.
VLLM_EXTRA_FIELDS = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "ignore_eos", "min_tokens",
    "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
    "allowed_token_ids", "bad_words", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "chat_template_kwargs", "structured_outputs", "return_token_ids",
    "return_tokens_as_token_ids", "cache_salt", "documents",
})  # fmt: skip

# Fields a client must never set: the chat template is code the engine runs, and the
# engine-side priority is the gateway's to derive from the request's tier.
REFUSED_FIELDS = {
    "chat_template": "a request-supplied chat_template is refused; the model's own template is used",
    "priority": "priority is set by the gateway from service_tier",
}

# Fields the gateway consumes and does not forward (the tier becomes the engine-side priority).
GATEWAY_FIELDS = frozenset({"latency_budget_ms", "service_tier"})


def upstream_body(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """What the engine gets: the client's JSON less the gateway's own fields, and less `stream_options`
    on an unstreamed request (the schema allows it there, where it means nothing; vLLM refuses it)."""
    return {k: v for k, v in body.items() if k not in GATEWAY_FIELDS and (stream or k != "stream_options")}

ServiceTier = Literal["auto", "default", "flex", "priority"]


INTEGER_FIELDS = ("n", "max_tokens", "max_completion_tokens", "seed", "logprobs", "top_logprobs")


def _integral(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2, as JSON Schema says (strict validation refused it,
    so a client or fuzzer writing 2.0 for `n` got a 400 for a valid request); 2.5 and "2" stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _Common(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=512)
    service_tier: ServiceTier | None = None
    latency_budget_ms: float | None = Field(None, gt=0, le=3_600_000)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            return body
        fields = [f for f in (*INTEGER_FIELDS, "prompt") if f in body]
        return {**body, **{f: _integral(body[f]) for f in fields}} if fields else body

    def check_extra_fields(self) -> None:
        for name in self.model_extra or {}:
            if name in REFUSED_FIELDS:
                raise InvalidRequest(REFUSED_FIELDS[name], param=name, code="unsupported_parameter")
            if name not in VLLM_EXTRA_FIELDS and name not in self._openai_fields():
                raise InvalidRequest(f"unsupported parameter '{name}'", param=name,
                                     code="unsupported_parameter")

    @classmethod
    def _openai_fields(cls) -> frozenset[str]:
        return frozenset()

    def check_limits(self, limits: Limits) -> None:
        """Raise InvalidRequest when the request exceeds the gateway's configured limits."""
        if self.n > limits.max_n:
            raise InvalidRequest(f"n={self.n} exceeds this gateway's limit of {limits.max_n}", param="n")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name, None)
            if value is not None and value > limits.max_tokens:
                raise InvalidRequest(
                    f"{name}={value} exceeds this gateway's limit of {limits.max_tokens}", param=name
                )
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16:
            raise InvalidRequest(f"at most 16 stop sequences, got {len(stops)}", param="stop")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @classmethod
    def _openai_fields(cls) -> frozenset[str]:
        # Accepted for client compatibility; vLLM ignores them.
        return frozenset({"metadata", "store", "reasoning_effort", "modalities", "prediction", "audio"})

    def check_limits(self, limits: Limits) -> None:
        super().check_limits(limits)
        if len(self.messages) > limits.max_messages:
            raise InvalidRequest(
                f"{len(self.messages)} messages exceed this gateway's limit of {limits.max_messages}",
                param="messages",
            )
        if self.top_logprobs is not None and self.top_logprobs > limits.max_logprobs:
            raise InvalidRequest(
                f"top_logprobs={self.top_logprobs} exceeds the limit of {limits.max_logprobs}",
                param="top_logprobs",
            )


Prompt = (Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
          | Annotated[list[int], Field(min_length=1)] | Annotated[list[list[int]], Field(min_length=1)])


class CompletionRequest(_Common):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None

    def check_limits(self, limits: Limits) -> None:
        super().check_limits(limits)
        if self.logprobs is not None and self.logprobs > limits.max_logprobs:
            raise InvalidRequest(
                f"logprobs={self.logprobs} exceeds the limit of {limits.max_logprobs}", param="logprobs"
            )
        if self.sequences > limits.max_sequences:
            raise InvalidRequest(
                f"{self.prompts} prompt(s) x n={self.n} = {self.sequences} sequences exceed this gateway's limit of "
                f"{limits.max_sequences} per request", param="prompt")

    @property
    def prompts(self) -> int:
        """Prompts in the request: a string or one token list is one; a list of them, each."""
        p = self.prompt
        return len(p) if isinstance(p, list) and p and isinstance(p[0], str | list) else 1

    @property
    def sequences(self) -> int:
        return self.prompts * self.n


def parse_request(schema: type[_Common], body: Any, limits: Limits) -> _Common:
    """Validate a decoded JSON body against `schema` and the limits; InvalidRequest on failure."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        # Strict: JSON types as the schema states them ("n": "2", "stream": "yes" and "temperature": false
        # are 400s, as the OpenAPI document says; lax validation took them).
        request = schema.model_validate(body, strict=True)
    except ValidationError as exc:
        raise validation_error_to_invalid_request(list(exc.errors())) from None
    request.check_extra_fields()
    request.check_limits(limits)
    return request
