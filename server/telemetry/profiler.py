"""A short profiling run against a variant's engine: the latency priors the router starts from.

Prefill time is measured at two prompt lengths (non-streamed, one output token), decode step
time at batch sizes 1, 4, 16 and 64 (streamed, `ignore_eos`). Each prompt is distinct so vLLM's
prefix cache cannot hide the prefill. About 10 s for SmolLM2 on two CPU cores.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Mapping

import httpx

from server.routing.predictor import LatencyPriors

logger = logging.getLogger(__name__)

SHORT_PROMPT, LONG_PROMPT = 16, 512
BATCHES = (1, 4, 16, 64)  # 64: a GPU runs that many at 1x load, and extrapolating from 16 missed it
DECODE_TOKENS = 16
REPEATS = 3


def _prompt(length: int, salt: int) -> list[int]:
    # Token ids below 1000 exist in every vocabulary the gateway serves; the salt makes each
    # prompt's first block different, so nothing is a prefix-cache hit.
    return [10 + (salt * 131 + i * 17) % 990 for i in range(length)]


async def _prefill_ms(http: httpx.AsyncClient, url: str, model: str, length: int, salt: int) -> float:
    started = time.perf_counter()
    response = await http.post(url, json={"model": model, "prompt": _prompt(length, salt), "max_tokens": 1})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def _step_ms(http: httpx.AsyncClient, url: str, model: str, salt: int) -> float | None:
    """Mean time between streamed tokens of one request (None if fewer than 3 chunks came)."""
    body = {"model": model, "prompt": _prompt(SHORT_PROMPT, salt), "max_tokens": DECODE_TOKENS,
            "ignore_eos": True, "stream": True}  # fmt: skip
    times = []
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    if len(times) < 3:
        return None
    return (times[-1] - times[0]) * 1000 / (len(times) - 1)


async def max_model_len(http: httpx.AsyncClient, base_url: str) -> int | None:
    response = await http.get(f"{base_url}/v1/models")
    response.raise_for_status()
    lengths = [m.get("max_model_len") for m in response.json().get("data", [])]
    return next((n for n in lengths if isinstance(n, int)), None)


async def profile_engine(base_url: str, model: str, timeout_s: float = 300.0,
                         headers: Mapping[str, str] | None = None) -> LatencyPriors:  # fmt: skip
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False, headers=headers) as http:
        limit = await max_model_len(http, base_url)
        long_prompt = min(LONG_PROMPT, (limit or 2 * LONG_PROMPT) // 2)
        await _prefill_ms(http, url, model, SHORT_PROMPT, salt=0)  # warm-up
        salt = iter(range(1, 10_000))
        short = statistics.median([await _prefill_ms(http, url, model, SHORT_PROMPT, next(salt))
                                   for _ in range(REPEATS)])  # fmt: skip
        long = statistics.median([await _prefill_ms(http, url, model, long_prompt, next(salt))
                                  for _ in range(REPEATS)])  # fmt: skip
        per_token = max(long - short, 0.0) / max(long_prompt - SHORT_PROMPT, 1)
        steps = []
        for batch in BATCHES:
            gaps = await asyncio.gather(*(_step_ms(http, url, model, next(salt)) for _ in range(batch)))
            measured = [g for g in gaps if g is not None]
            if measured:
                steps.append((batch, statistics.median(measured)))
    if not steps:
        raise RuntimeError(f"profiling {model}: the engine streamed no tokens")
    priors = LatencyPriors(prefill_fixed_ms=max(short - per_token * SHORT_PROMPT, 0.0),
                           prefill_per_token_ms=per_token, step_ms=tuple(steps))  # fmt: skip
    logger.info("profiled %s: prefill %.1f ms + %.3f ms/token, step %s", model, priors.prefill_fixed_ms,
                priors.prefill_per_token_ms, ", ".join(f"{b}:{t:.1f} ms" for b, t in steps))
    return priors
