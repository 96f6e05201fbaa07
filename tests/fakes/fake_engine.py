"""FakeEngine: a stand-in for a vLLM OpenAI server, for router tests and load tests only.

It speaks the real protocol (chat and text completions, streamed or not, `include_usage`,
/health, /v1/models, and the three vllm:* gauges the router scrapes) with configurable latency:
a request waits for one of `max_running` batch slots, then takes `ttft_ms` (+ `prefill_ms_per_token`
per prompt token) to its first token and `tpot_ms * (1 + batch_slowdown * (running - 1))` per
further token. It generates no text worth reading. Reconfigure a running fake with POST
/fake/config; GET /fake/stats shows what it was sent.

FakeEngines given one `--device-dir` simulate engines that share a device: each keeps a file
there saying whether it is busy, and each token costs `1 + busy others` times its own (engines on one
GPU decode in turn, each step reading its own weights: the shared-device router issue).

    python -m tests.fakes.fake_engine --model m@int8 --port 9001 --ttft-ms 50 --tpot-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel


class FakeConfig(BaseModel):
    model: str
    ttft_ms: float = 50.0
    prefill_ms_per_token: float = 0.0
    tpot_ms: float = 20.0
    batch_slowdown: float = 0.05
    max_running: int = 8
    fail: str | None = None  # "500": answer every completion with HTTP 500
    healthy: bool = True
    device_dir: str = ""  # FakeEngines given one directory simulate sharing one device


class FakeState:
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.slots = asyncio.Semaphore(config.max_running)
        self.running = 0
        self.waiting = 0
        self.requests = 0
        self.priorities: list[int] = []

    def step_s(self) -> float:
        c = self.config
        return c.tpot_ms * (1 + c.batch_slowdown * max(self.running - 1, 0)) * self.share() / 1000

    def share(self) -> int:
        """1 + the other busy engines of this fake's simulated device."""
        if not self.config.device_dir:
            return 1
        busy = 0
        for path in Path(self.config.device_dir).iterdir():
            if path.name != self._device_name() and path.suffix == ".busy":
                busy += 1
        return 1 + busy

    def set_running(self, delta: int) -> None:
        self.running += delta
        if self.config.device_dir:
            marker = Path(self.config.device_dir) / self._device_name()
            if self.running:
                marker.touch()
            else:
                marker.unlink(missing_ok=True)

    def _device_name(self) -> str:
        return f"{self.config.model.replace('/', '_')}.busy"


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", ""))) for m in body["messages"]) // 4 + 4 * len(body["messages"])
    prompt = body.get("prompt", "")
    return len(prompt) if isinstance(prompt, list) else len(str(prompt)) // 4 + 1


def create_fake_app(config: FakeConfig) -> FastAPI:
    app = FastAPI(title="FakeEngine")
    state = FakeState(config)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.config.healthy else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.config.model, "object": "model", "max_model_len": 4096}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        labels = f'engine="0",model_name="{state.config.model}"'
        kv = min(1.0, (state.running + state.waiting) / (4 * state.config.max_running))
        return PlainTextResponse(f"vllm:num_requests_running{{{labels}}} {float(state.running)}\n"
                                 f"vllm:num_requests_waiting{{{labels}}} {float(state.waiting)}\n"
                                 f"vllm:kv_cache_usage_perc{{{labels}}} {kv}\n")  # fmt: skip

    @app.post("/fake/config")
    async def reconfigure(changes: dict[str, Any]) -> dict:
        state.config = state.config.model_copy(update=changes)
        return state.config.model_dump()

    @app.get("/fake/stats")
    async def stats() -> dict:
        return {"requests": state.requests, "priorities": state.priorities, "running": state.running,
                "waiting": state.waiting}  # fmt: skip

    async def generate(request: Request, chat: bool) -> Response:
        body = await request.json()
        state.requests += 1
        state.priorities.append(int(body.get("priority", 0)))
        if state.config.fail == "500":
            return JSONResponse({"error": {"message": "FakeEngine told to fail", "type": "server_error",
                                           "param": None, "code": 500}}, status_code=500)  # fmt: skip
        n_out = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        n_in = _prompt_tokens(body)
        tokens = _tokens(state, n_in, n_out)
        if body.get("stream"):
            usage = (body.get("stream_options") or {}).get("include_usage")
            return StreamingResponse(_sse(tokens, body["model"], chat, n_in, n_out, bool(usage)),
                                     media_type="text/event-stream")
        words = [t async for t in tokens]
        return JSONResponse(_response(body["model"], chat, "".join(words), n_in, n_out))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    return app


async def _tokens(state: FakeState, n_in: int, n_out: int):
    state.waiting += 1
    await state.slots.acquire()
    state.waiting -= 1
    state.set_running(+1)
    try:
        c = state.config
        await asyncio.sleep((c.ttft_ms + c.prefill_ms_per_token * n_in) / 1000)
        for i in range(n_out):
            if i:
                await asyncio.sleep(state.step_s())
            yield f" tok{i}"
    finally:
        state.set_running(-1)
        state.slots.release()


def _usage(n_in: int, n_out: int) -> dict:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _response(model: str, chat: bool, text: str, n_in: int, n_out: int) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": f"fake-{uuid.uuid4().hex}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "service_tier": None,
            "usage": _usage(n_in, n_out)}  # fmt: skip


async def _sse(tokens, model: str, chat: bool, n_in: int, n_out: int, usage: bool):
    chunk_id, kind = f"fake-{uuid.uuid4().hex}", "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra: Any) -> bytes:
        payload = {"id": chunk_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
                   **extra}  # fmt: skip
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    first = True
    async for word in tokens:
        if chat:
            delta = {"role": "assistant", "content": word} if first else {"content": word}
            yield event([{"index": 0, "delta": delta, "finish_reason": None}])
        else:
            yield event([{"index": 0, "text": word, "finish_reason": None}])
        first = False
    yield event([{"index": 0, ("delta" if chat else "text"): ({} if chat else ""), "finish_reason": "length"}])
    if usage:
        yield event([], usage=_usage(n_in, n_out))
    yield b"data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    for name, field in FakeConfig.model_fields.items():
        if name in ("fail", "healthy"):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=field.annotation, default=field.default,
                            required=field.is_required())  # fmt: skip
    args = vars(parser.parse_args())
    port = args.pop("port")
    uvicorn.run(create_fake_app(FakeConfig(**args)), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
