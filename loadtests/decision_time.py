"""What a routing decision costs on the request path, and what choosing the active rungs costs off it.

    python -m loadtests.decision_time [--rungs 4] [--requests 20000] [--out DIR]

The request path's share of routing (server/gateway.py `decide` less the engine snapshots): record the
arrival, mark the standby rungs of the shared device, and route over `--rungs` candidates with
priors (server/routing/concentrate.py, server/routing/router.py). Off the request path, once a
second: the concentrator's evaluation over its window (`max_samples` requests, every rung).
Timed with perf_counter_ns per call, after a warm-up; p50, p99 and max per part. Writes
decision-time-<label>.json/.md. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import time
from pathlib import Path

from server.catalog import Variant
from server.gateway import Gateway
from server.routing.concentrate import Concentrator
from server.routing.config import RoutingConfig
from server.routing.predictor import LatencyPriors, VariantLatency
from server.routing.router import Router
from server.routing.types import Budget, Candidate, EngineLoad, RequestFeatures

LADDER = [("bf16", "base", 16, 0.0, 20.0), ("fp8", "fp8", 8, 0.005, 10.0), ("int8", "int8", 8, 0.01, 9.0),
          ("w4a16", "int4-gptq", 4, 0.03, 7.0), ("awq", "awq", 4, 0.05, 7.5), ("int4", "int4-ao", 4, 0.2, 6.0)]  # fmt: skip


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000
    return {"p50_us": at(0.5), "p99_us": at(0.99), "max_us": ordered[-1] / 1000, "mean_us":
            statistics.fmean(ordered) / 1000, "n": len(ordered)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rungs", type=int, default=4, choices=range(2, len(LADDER) + 1))
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--evaluations", type=int, default=200)
    p.add_argument("--label", default="cpu")
    p.add_argument("--out", type=Path, default=Path("loadtests/results") / dt.date.today().isoformat())
    args = p.parse_args()
    rng = random.Random(0)
    config = RoutingConfig()
    variants = [Variant("m", name, method, bits, ppl_delta=delta) for name, method, bits, delta, _ in LADDER]
    variants = variants[: args.rungs]
    latency = {v.id: VariantLatency(LatencyPriors(prefill_fixed_ms=20, prefill_per_token_ms=0.05,
                                                  step_ms=((1, tpot), (16, tpot * 1.5), (64, tpot * 3))))
               for v, (*_, tpot) in zip(variants, LADDER, strict=False)}  # fmt: skip

    def predict(variant_id: str, prompt: int, output: int, load: EngineLoad):
        return latency[variant_id].predict(prompt, output, load)

    concentrator = Concentrator(config.shared_device)
    router = Router(config)
    rungs = [(v, "gpu-0") for v in variants]
    requests = [RequestFeatures(rng.randint(16, 1024), rng.randint(16, 256),
                                Budget(e2e_ms=rng.choice((600, 800, 1000, 1500, 3000)), source="request"))
                for _ in range(args.requests)]  # fmt: skip
    path_ns, evaluate_ns = [], []
    now = 0.0
    for i, features in enumerate(requests):
        now += 1 / 40  # 40 req/s
        if concentrator.due(now):
            t0 = time.perf_counter_ns()
            concentrator.evaluate(rungs, predict, now)
            evaluate_ns.append(time.perf_counter_ns() - t0)
        loads = [EngineLoad(in_flight=rng.randint(0, 16), device="gpu-0", device_peers_busy=rng.randint(0, 1))
                 for _ in variants]  # fmt: skip
        t0 = time.perf_counter_ns()
        concentrator.arrive(features, now)
        candidates = [Candidate(v, True, load, predict(v.id, features.prompt_tokens, features.output_tokens, load))
                      for v, load in zip(variants, loads, strict=True)]  # fmt: skip
        candidates = Gateway._mark_standby(concentrator, candidates)
        router.route(features, candidates)
        if i >= 1000:  # warm-up
            path_ns.append(time.perf_counter_ns() - t0)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.processor() or platform.machine(),
        "python": platform.python_version(), "rungs": args.rungs, "requests": len(path_ns),
        "decision": percentiles(path_ns), "evaluation": percentiles(evaluate_ns[1:] or evaluate_ns),
        "max_samples": config.shared_device.max_samples,
        "command": f"python -m loadtests.decision_time --rungs {args.rungs} --requests {args.requests}",
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decision-time-{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    d, e = report["decision"], report["evaluation"]
    md = [f"# Routing decision time ({args.label}, {args.rungs} rungs on one device)", "",
          f"`{report['command']}` on {report['host']}, Python {report['python']}, {report['date']}.", "",
          "| part | where | n | p50 µs | p99 µs | max µs |", "|---|---|---|---|---|---|",
          f"| arrive + predictions + standby marks + route | request path | {d['n']} | {d['p50_us']:.1f} | "
          f"{d['p99_us']:.1f} | {d['max_us']:.1f} |",
          f"| choose the active rungs ({report['max_samples']} requests x {args.rungs} rungs) | background, once a second "
          f"| {e['n']} | {e['p50_us']:.0f} | {e['p99_us']:.0f} | {e['max_us']:.0f} |", ""]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
