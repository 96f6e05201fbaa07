"""The load generator: synthetic traces, open- and closed-loop replay over streaming HTTP, and the
per-request record every report is computed from.

A trace is a list of requests with ShareGPT-like lengths (log-normal prompt and output lengths,
synthesized: nothing is downloaded), arrival offsets (Poisson, or gamma for burstiness), a latency
budget expressed as a factor of the base variant's idle latency (turned into milliseconds by the
caller, who measures it on the machine at hand) and an OpenAI `service_tier`. The same seed gives the same
trace; arrivals are drawn at rate 1 and divided by the target rate, so a load sweep replays the
same requests, only closer together.

Every request is streamed (`stream_options.include_usage`) and `ignore_eos`, so each produces
exactly its `max_tokens`; the record keeps the variant that served it, TTFT, the inter-token gaps,
end-to-end latency, the budget and whether it was met (measured here, at the client).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ["the", "river", "of", "time", "carries", "small", "stones", "and", "large", "questions", "toward", "a", "quiet", "sea", "where", "engineers", "measure", "latency", "budgets", "and", "tokens", "while", "the", "lighthouse", "keeper", "counts", "ships", "under", "a", "pale", "moon", "and", "writes", "careful", "notes", "about", "weather", "cargo", "and", "the", "price", "of", "tea"]  # fmt: skip


@dataclass(frozen=True)
class TraceSpec:
    requests: int
    seed: int = 0
    arrival: str = "poisson"  # or "gamma"
    gamma_cv: float = 2.0  # coefficient of variation of gamma inter-arrivals (1 = Poisson)
    prompt_median: int = 64
    prompt_sigma: float = 0.8
    prompt_max: int = 512
    output_median: int = 48
    output_sigma: float = 0.6
    output_max: int = 160
    # (factor of the base's idle e2e, weight): tight budgets only a faster variant meets,
    # loose ones the base meets too.
    budget_factors: tuple[tuple[float, float], ...] = ((0.6, 1), (0.8, 1), (1.0, 1), (1.5, 1), (3.0, 1))
    tiers: tuple[tuple[str, float], ...] = (("default", 0.8), ("priority", 0.1), ("flex", 0.1))


@dataclass
class TraceRequest:
    index: int
    at_unit: float  # arrival offset at 1 request/s
    prompt: str
    prompt_tokens: int  # the gateway's estimate (chars / 4 + chat overhead)
    max_tokens: int
    budget_factor: float
    tier: str
    budget_ms: float | None = None  # set by the caller from the base's idle latency


@dataclass
class Result:
    index: int
    scenario: str
    model: str
    status: int
    variant: str | None
    decision: str | None
    sent_at: float  # seconds since the run started
    ttft_ms: float | None
    e2e_ms: float
    itl_ms: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    budget_ms: float | None = None
    tier: str = "default"
    met: bool | None = None
    error: str | None = None
    # What the gateway predicted for the variant it chose (x-quantgate-predicted-*), for the predictor's error.
    predicted_ttft_ms: float | None = None
    predicted_e2e_ms: float | None = None


def _lognormal(rng: random.Random, median: int, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(median * math.exp(rng.gauss(0, sigma)))))


def _pick(rng: random.Random, weighted: Sequence[tuple[object, float]]) -> object:
    values, weights = zip(*weighted, strict=True)
    return rng.choices(values, weights=weights)[0]


def make_trace(spec: TraceSpec) -> list[TraceRequest]:
    rng = random.Random(spec.seed)
    at, out = 0.0, []
    for i in range(spec.requests):
        if spec.arrival == "gamma":
            shape = 1 / spec.gamma_cv**2
            at += rng.gammavariate(shape, 1 / shape)
        else:
            at += rng.expovariate(1.0)
        tokens = _lognormal(rng, spec.prompt_median, spec.prompt_sigma, 4, spec.prompt_max)
        start = rng.randrange(len(WORDS))
        words, chars = [], 0
        while chars < tokens * 4:
            word = WORDS[(start + len(words)) % len(WORDS)]
            words.append(word)
            chars += len(word) + 1
        prompt = f"Request {i}: " + " ".join(words)
        out.append(TraceRequest(i, at, prompt, len(prompt) // 4 + 5,
                                _lognormal(rng, spec.output_median, spec.output_sigma, 1, spec.output_max),
                                float(_pick(rng, spec.budget_factors)), str(_pick(rng, spec.tiers))))  # fmt: skip
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def send(http: httpx.AsyncClient, url: str, model: str, request: TraceRequest, scenario: str,
               t0: float, headers: dict[str, str] | None = None) -> Result:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": request.prompt}], "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if request.tier != "default":
        body["service_tier"] = request.tier
    sent_headers = dict(headers or {})
    if request.budget_ms is not None:
        sent_headers["x-latency-budget-ms"] = str(round(request.budget_ms))
    sent = time.perf_counter()
    result = Result(request.index, scenario, model, 0, None, None, sent - t0, None, 0.0, budget_ms=request.budget_ms,
                    tier=request.tier)  # fmt: skip
    last = None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=sent_headers) as response:
            result.status = response.status_code
            result.variant = response.headers.get("x-quantgate-variant")
            result.decision = response.headers.get("x-quantgate-budget")
            result.predicted_ttft_ms = _number(response.headers.get("x-quantgate-predicted-ttft-ms"))
            result.predicted_e2e_ms = _number(response.headers.get("x-quantgate-predicted-ms"))
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        result.completion_tokens = chunk["usage"].get("completion_tokens")
                    if not any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_ms = (now - sent) * 1000
                    else:
                        result.itl_ms.append((now - last) * 1000)
                    last = now
                    result.variant = result.variant or chunk.get("model")
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_ms = (time.perf_counter() - sent) * 1000
    if result.budget_ms is not None:
        result.met = result.status == 200 and result.error is None and result.e2e_ms <= result.budget_ms
    return result


def client(limit: int = 1024) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), trust_env=False,
                             limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))  # fmt: skip


async def open_loop(url: str, requests: Sequence[TraceRequest], rate: float, model_for: Callable[[TraceRequest], str],
                    scenario: str, headers: dict[str, str] | None = None,
                    start_at: float | None = None) -> list[Result]:  # fmt: skip
    """Each request sent at its arrival time (at_unit / rate), whatever the answers' speed; the trace's
    zero is `start_at` (time.time()) when given, so that several client processes share one clock.
    A chooser with a `done(model)` method hears when each of its requests has ended."""
    done = getattr(model_for, "done", None)
    async with client() as http:
        t0 = time.perf_counter() + (start_at - time.time() if start_at is not None else 0.0)

        async def one(request: TraceRequest) -> Result:
            await asyncio.sleep(max(0.0, t0 + request.at_unit / rate - time.perf_counter()))
            model = model_for(request)
            try:
                return await send(http, url, model, request, scenario, t0, headers)
            finally:
                if done is not None:
                    done(model)

        return list(await asyncio.gather(*(one(r) for r in requests)))


async def closed_loop(url: str, requests: Sequence[TraceRequest], concurrency: int, model: str, scenario: str,
                      duration_s: float | None = None, headers: dict[str, str] | None = None) -> list[Result]:  # fmt: skip
    """`concurrency` users, each sending its next request as soon as the last one is answered, until
    the trace (cycled) runs out or `duration_s` passes."""
    queue = iter(requests)  # shared by the users: each takes the next request
    results: list[Result] = []
    async with client() as http:
        t0 = time.perf_counter()

        async def user() -> None:
            for request in queue:
                results.append(await send(http, url, model, request, scenario, t0, headers))
                if duration_s is not None and time.perf_counter() - t0 >= duration_s:
                    return

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return results


def summarize(results: Sequence[Result], span_s: float, ppl: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.status == 200 and r.error is None]
    budgeted = [r for r in results if r.budget_ms is not None]
    met = [r for r in budgeted if r.met]
    itl = [gap for r in ok for gap in r.itl_ms]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    e2e = [r.e2e_ms for r in ok]
    quality = [ppl[r.variant] for r in ok if ppl and r.variant in ppl]

    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 2)

    return {
        "requests": len(results), "answered": len(ok), "errors": len(results) - len(ok),
        "error_statuses": dict(Counter(r.status for r in results if r not in ok)),
        "budget_attainment": len(met) / len(budgeted) if budgeted else None,
        "goodput_rps": len(met) / span_s if span_s > 0 else None,
        "throughput_rps": len(ok) / span_s if span_s > 0 else None,
        "ttft_ms_p50": ms(ttft, 0.5), "ttft_ms_p99": ms(ttft, 0.99),
        "itl_ms_p50": ms(itl, 0.5), "itl_ms_p99": ms(itl, 0.99),
        "e2e_ms_p50": ms(e2e, 0.5), "e2e_ms_p99": ms(e2e, 0.99),
        "quality_weighted_ppl": statistics.fmean(quality) if quality else None,
        "variants": dict(Counter(r.variant for r in ok)),
        "decisions": dict(Counter(r.decision for r in ok)),
    }  # fmt: skip


def as_dicts(results: Sequence[Result]) -> list[dict]:
    return [asdict(r) for r in results]
