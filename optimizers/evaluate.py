"""Evaluating a variant as served: perplexity through vLLM's `prompt_logprobs`, a greedy sanity
answer, and throughput — the same code for every variant, so the numbers compare.

Needs only httpx: it runs in the gateway's environment against a running engine.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import httpx

SANITY_PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    scored_tokens: int
    windows: int


def _window_logprob(prompt_logprobs: list, window: list[int]) -> tuple[float, int]:
    """Sum of log p(token_i | tokens_<i) over a window; vLLM gives None for the first token."""
    total, count = 0.0, 0
    for position, entry in enumerate(prompt_logprobs):
        if entry is None:
            continue
        chosen = entry.get(str(window[position]))
        if chosen is None:
            raise ValueError(f"no logprob for the prompt token at position {position}")
        total += chosen["logprob"]
        count += 1
    return total, count


async def perplexity(http: httpx.AsyncClient, base_url: str, model: str, windows: list[list[int]],
                     batch: int = 8) -> Perplexity:
    """exp(mean negative log-likelihood) over every window's tokens but the first."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        response = await http.post(f"{base_url}/v1/completions", json={
            "model": model, "prompt": chunk, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
        })  # fmt: skip
        response.raise_for_status()
        for choice in sorted(response.json()["choices"], key=lambda c: c["index"]):
            window_total, window_count = _window_logprob(choice["prompt_logprobs"], chunk[choice["index"]])
            total += window_total
            count += window_count
    return Perplexity(ppl=math.exp(-total / count), scored_tokens=count, windows=len(windows))


async def sanity_answer(http: httpx.AsyncClient, base_url: str, model: str) -> str:
    response = await http.post(f"{base_url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": SANITY_PROMPT}], "temperature": 0, "max_tokens": 32,
    })  # fmt: skip
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


async def throughput(http: httpx.AsyncClient, base_url: str, model: str, concurrency: int,
                     output_tokens: int = 128) -> float:
    """Generated tokens per second with `concurrency` simultaneous requests (ignore_eos)."""

    async def one() -> int:
        response = await http.post(f"{base_url}/v1/completions", json={
            "model": model, "prompt": "Once upon a time", "max_tokens": output_tokens, "ignore_eos": True,
            "temperature": 0,
        })  # fmt: skip
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    await one()  # warm-up
    started = time.perf_counter()
    tokens = await asyncio.gather(*(one() for _ in range(concurrency)))
    return sum(tokens) / (time.perf_counter() - started)
