"""A short profiling run against a variant's engine: the latency priors the router starts from.

Prefill time is measured on text prompts at three lengths (non-streamed, one output token), fitted
by least squares against the length the gateway estimates for each (server/api/features.py), the unit
the predictor is asked in: what a prompt token costs includes tokenising it, and token-id prompts of
16 and 512 tokens differed by a few tenths of a millisecond on an H100, which priced FP8's prompt tokens
at a fifth of what chat requests measured (loadtests/results/2026-12-07/router-h100-4b956f3.md). Decode
step time at batch sizes 1, 4, 16 and 64 (streamed, `ignore_eos`). Each prompt is distinct from its
first words so vLLM's prefix cache cannot hide the prefill. About 10 s for SmolLM2 on two CPU cores.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Mapping

import httpx

from server.api.features import CHARS_PER_TOKEN, estimate_prompt_tokens
from server.routing.predictor import LatencyPriors

logger = logging.getLogger(__name__)

SHORT_PROMPT, LONG_PROMPT = 16, 512  # the gateway's estimate of the prompt's tokens
BATCHES = (1, 4, 16, 64)  # 64: a GPU runs that many at 1x load, and extrapolating from 16 missed it
DECODE_TOKENS = 16
REPEATS = 3
WORDS = ("the", "model", "answers", "a", "question", "about", "cities", "and", "rivers", "in", "short", "plain",
         "sentences", "while", "each", "request", "waits", "for", "its", "first", "token", "from", "engine", "that",
         "serves", "many", "users", "at", "once", "with", "budget", "of", "time")  # fmt: skip


def _prompt(length: int, salt: int) -> list[int]:
    # Token ids below 1000 exist in every vocabulary the gateway serves; the salt makes each
    # prompt's first block different, so nothing is a prefix-cache hit.
    return [10 + (salt * 131 + i * 17) % 990 for i in range(length)]


def _text(estimate: int, salt: int) -> str:
    """English-like prose the gateway estimates at `estimate` tokens, different from its first word on."""
    target = max(estimate - 1, 1) * CHARS_PER_TOKEN  # estimate_prompt_tokens: chars // 4 + 1
    words, chars, i = [f"Note {salt}:"], len(f"Note {salt}:"), salt * 7
    while chars < target:
        word = WORDS[i % len(WORDS)]
        words.append(word)
        chars += len(word) + 1
        i += 1
    return " ".join(words)[:target]


async def _prefill_ms(http: httpx.AsyncClient, url: str, model: str, estimate: int, salt: int) -> tuple[int, float]:
    """(the gateway's estimate of the prompt's tokens, milliseconds to a one-token answer)."""
    body = {"model": model, "prompt": _text(estimate, salt), "max_tokens": 1}
    started = time.perf_counter()
    response = await http.post(url, json=body)
    response.raise_for_status()
    return estimate_prompt_tokens(body), (time.perf_counter() - started) * 1000


def fit_prefill(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed ms, ms per estimated token) by least squares over (tokens, ms), neither below zero. Where
    the line meets zero below zero tokens (a prefill that grows faster than linearly), the fixed part is
    what the shortest prompts took beyond their tokens' share."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    slope, intercept = statistics.linear_regression(xs, ys) if len(set(xs)) > 1 else (0.0, statistics.fmean(ys))
    per_token, fixed = (slope, intercept) if slope > 0 else (0.0, statistics.fmean(ys))
    if fixed < 0:
        shortest = min(x for x, _ in points)
        fixed = max(statistics.median([y for x, y in points if x == shortest]) - per_token * shortest, 0.0)
    return fixed, per_token


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
        # A quarter of the context: a tokenizer may split these words into more tokens than estimated.
        long_prompt = max(min(LONG_PROMPT, (limit or 4 * LONG_PROMPT) // 4), SHORT_PROMPT + 2)
        await _prefill_ms(http, url, model, SHORT_PROMPT, salt=0)  # warm-up
        salt = iter(range(1, 10_000))
        lengths = (SHORT_PROMPT, (SHORT_PROMPT + long_prompt) // 2, long_prompt)
        points = [await _prefill_ms(http, url, model, length, next(salt)) for length in lengths for _ in range(REPEATS)]
        fixed, per_token = fit_prefill(points)
        steps = []
        for batch in BATCHES:
            gaps = await asyncio.gather(*(_step_ms(http, url, model, next(salt)) for _ in range(batch)))
            measured = [g for g in gaps if g is not None]
            if measured:
                steps.append((batch, statistics.median(measured)))
    if not steps:
        raise RuntimeError(f"profiling {model}: the engine streamed no tokens")
    priors = LatencyPriors(prefill_fixed_ms=fixed, prefill_per_token_ms=per_token, step_ms=tuple(steps))
    logger.info("profiled %s: prefill %.1f ms + %.3f ms/token, step %s", model, priors.prefill_fixed_ms,
                priors.prefill_per_token_ms, ", ".join(f"{b}:{t:.1f} ms" for b, t in steps))
    return priors
