"""Side by side on the same engines and the same trace: always the base, always the fastest variant,
round-robin over the variants, and the quantgate router, with the load swept from a fraction to
more than the base variant's capacity.

    python -m loadtests.bench                          # CPU: starts `quantgate serve` (bundled model + variants)
    python -m loadtests.bench --gateway http://127.0.0.1:8000 --model llama-3.1-8b --label h100

1. Variants and their quality from GET /v1/models (ppl delta; ppl where the registry measured it).
2. Budgets: each request's budget is its factor (0.6x-3x) times the base's idle latency for its
   size, measured here before any load (`--budgets measured`: requests one at a time to each variant,
   TTFT fitted linear in the prompt, plus the median inter-token gap per output token), not taken
   from the router's own predictor (`--budgets predicted` reads GET /admin/routing instead). So
   budgets are tight or loose relative to the machine at hand. The fastest variant is the one with
   the lowest idle latency for the median request.
3. Capacity: closed loop on the base (`--capacity-concurrency` users) for `--capacity-s`; the base
   capacity in requests/s for this trace's lengths.
4. For each trace seed, each load (x capacity) and each scenario: the seeded trace, open loop,
   streamed; a request meets its budget when its measured end-to-end latency is within it. Goodput =
   budgets met per second of trace. Ratios pool the seeds, with a paired bootstrap interval.
5. The predictor's error: what the gateway predicted (x-quantgate-predicted-* headers) against what
   the client measured, per load and variant, median and p90 of the relative error.

Writes bench-<label>.json (every request) and bench-<label>.md (loadtests/bench_report.py) after every run (a cut-short run keeps
what it measured), and plots at the end (loadtests/plots.py).
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import itertools
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

from loadtests import harness
from loadtests.bench_report import write
from loadtests.local import local_gateway

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("always-base", "always-fastest", "round-robin", "least-loaded", "router")
# The default: every ready variant pinned ("singles" expands to pin:<each>), the two load balancers, the router.
DEFAULT_SCENARIOS = ("singles", "round-robin", "least-loaded", "router")
ADMIN_HEADERS: dict[str, str] = {}  # Authorization for /admin/* when the gateway has an admin key


def discover(http: httpx.Client, model: str) -> list[dict]:
    data = http.get("/v1/models").json()["data"]
    variants = [m for m in data if m.get("parent") == model and m.get("ready")]
    if not variants:
        raise SystemExit(f"no ready variant of {model!r}: {[m['id'] for m in data]}")
    return variants


def predicted_idle(http: httpx.Client, model: str, prompt_tokens: int, output_tokens: int) -> dict[str, float]:
    view = http.get(f"/admin/routing/{model}", params={"prompt_tokens": prompt_tokens, "output_tokens": output_tokens},
                    headers=ADMIN_HEADERS).json()  # fmt: skip
    return {row["variant"]: row["predicted"]["idle_e2e_ms"] for row in view["variants"] if row["predicted"]}


def set_budgets(http: httpx.Client, model: str, base: str, trace: list[harness.TraceRequest]) -> None:
    """Budgets from the router's own prediction of the base's idle latency (`--budgets predicted`)."""
    cache: dict[tuple[int, int], dict[str, float]] = {}
    for r in trace:
        key = (r.prompt_tokens, r.max_tokens)
        if key not in cache:
            cache[key] = predicted_idle(http, model, *key)
        r.budget_ms = r.budget_factor * cache[key][base]


@dataclasses.dataclass(frozen=True)
class IdleFit:
    """A variant's idle latency as measured here: TTFT linear in the prompt, then one median
    inter-token gap per further output token."""

    ttft_ms_intercept: float
    ttft_ms_per_prompt_token: float
    itl_ms: float
    samples: int

    def e2e_ms(self, prompt_tokens: int, output_tokens: int) -> float:
        ttft = self.ttft_ms_intercept + self.ttft_ms_per_prompt_token * prompt_tokens
        return max(ttft, 0.0) + max(output_tokens - 1, 0) * self.itl_ms


def idle_sample(trace: list[harness.TraceRequest], n: int) -> list[harness.TraceRequest]:
    """n requests spread over the trace's prompt lengths (quantiles), so the TTFT fit sees short and long."""
    ordered = sorted(trace, key=lambda r: r.prompt_tokens)
    picks = {round(i * (len(ordered) - 1) / max(n - 1, 1)) for i in range(n)}
    return [dataclasses.replace(ordered[i], budget_ms=None, tier="default") for i in sorted(picks)]


async def measure_idle(url: str, variant: str, sample: list[harness.TraceRequest],
                       headers: dict[str, str]) -> IdleFit:  # fmt: skip
    """The sample sent one at a time to `variant` (pinned), nothing else in flight from here."""
    results = []
    async with harness.client(4) as http:
        for request in [sample[len(sample) // 2], *sample]:  # the first one warms the path up, not counted
            results.append(await harness.send(http, url, variant, request, "idle", time.perf_counter(), headers))
    ok = [(req, r) for req, r in zip(sample, results[1:], strict=True)
          if r.status == 200 and r.error is None and r.ttft_ms is not None]  # fmt: skip
    if len(ok) < 2:
        raise SystemExit(f"idle measurement of {variant}: {len(ok)} of {len(sample)} answered "
                         f"({[r.error for r in results if r.error][:2]})")  # fmt: skip
    xs = [float(req.prompt_tokens) for req, _ in ok]
    ys = [r.ttft_ms for _, r in ok]
    if len(set(xs)) > 1:
        slope, intercept = statistics.linear_regression(xs, ys)
    else:
        slope, intercept = 0.0, statistics.median(ys)
    gaps = [gap for _, r in ok for gap in r.itl_ms]
    return IdleFit(intercept, max(slope, 0.0), statistics.median(gaps) if gaps else 0.0, len(ok))


class LeastLoaded:
    """The variant with the fewest of this client's requests in flight (ties: the ladder's order): the
    queue-depth pick of a least-busy load balancer (LiteLLM's `least-busy`, llm-d's queue scorer)."""

    def __init__(self, ladder: list[str]) -> None:
        self.ladder = ladder
        self.in_flight = dict.fromkeys(ladder, 0)

    def __call__(self, request: harness.TraceRequest) -> str:
        chosen = min(self.ladder, key=lambda v: self.in_flight[v])
        self.in_flight[chosen] += 1
        return chosen

    def done(self, variant: str) -> None:
        self.in_flight[variant] -= 1


def model_for(scenario: str, model: str, base: str, fastest: str, ladder: list[str]):
    """always-base, always-fastest, round-robin, least-loaded, router, or pin:<variant name>."""
    if scenario == "always-base":
        return lambda r: base
    if scenario == "always-fastest":
        return lambda r: fastest
    if scenario == "round-robin":
        cycle = itertools.cycle(ladder)
        return lambda r: next(cycle)
    if scenario == "least-loaded":
        return LeastLoaded(ladder)
    if scenario.startswith("pin:"):
        pinned = f"{model}@{scenario[4:]}"
        if pinned not in ladder:
            raise SystemExit(f"{scenario}: no ready variant {pinned} (ready: {ladder})")
        return lambda r: pinned
    if scenario != "router":
        raise SystemExit(f"unknown scenario {scenario!r}")
    return lambda r: model


def _client_process(url: str, requests: list[harness.TraceRequest], rate: float, scenario: str,
                    choice: tuple[str, str, str, list[str]], headers: dict[str, str],
                    start_at: float) -> list[harness.Result]:  # fmt: skip
    """One client process's share of an open-loop run (its own event loop, connections and chooser)."""
    chooser = model_for(scenario, *choice)
    return asyncio.run(harness.open_loop(url, requests, rate, chooser, scenario, headers, start_at=start_at))


def replay(pool: ProcessPoolExecutor | None, processes: int, url: str, requests: list[harness.TraceRequest],
           rate: float, scenario: str, choice: tuple[str, str, str, list[str]],
           headers: dict[str, str]) -> list[harness.Result]:  # fmt: skip
    """The open-loop run, in this process or split round-robin over `processes` client processes
    (one Python client parses only ~5k streamed chunks per CPU-second: the shared-device router issue)."""
    if pool is None or processes <= 1:
        return asyncio.run(harness.open_loop(url, requests, rate, model_for(scenario, *choice), scenario, headers))
    start_at = time.time() + 1.0  # every process has its requests ready by then
    futures = [pool.submit(_client_process, url, requests[i::processes], rate, scenario, choice, headers, start_at)
               for i in range(processes)]  # fmt: skip
    results = [r for f in futures for r in f.result()]
    return sorted(results, key=lambda r: r.index)


def with_warmup(requests: list[harness.TraceRequest], warmup: list[harness.TraceRequest], rate: float,
                seconds: float, warmup_rate: float | None = None) -> tuple[list[harness.TraceRequest], float]:  # fmt: skip
    """The measured requests preceded by `seconds` of warm-up traffic (from another trace, negative
    indices, left out of every statistic) at the same rate, so that a run is measured in the steady state
    its load reaches rather than from the state the previous run left (a router that has just seen a
    trickle starts a run on the rung chosen for it); or at `warmup_rate`, so that the run measures a step
    in load from that rate to its own, the onset included. Returns the requests and the measured ones'
    offset in seconds."""
    if seconds <= 0:
        return requests, 0.0
    before = warmup_rate or rate
    shift = seconds * rate  # in at_unit, which counts seconds at 1 request/s of the run's rate
    head = [dataclasses.replace(r, index=-1 - i, at_unit=r.at_unit * rate / before)
            for i, r in enumerate(warmup) if r.at_unit < seconds * before]  # fmt: skip
    return head + [dataclasses.replace(r, at_unit=r.at_unit + shift) for r in requests], seconds


def rotated(scenarios: list[str], i: int) -> list[str]:
    """The scenarios of the i-th (seed, load) in the order they run: rotated by one each time, so that no
    scenario always runs in the same place. Run in a fixed order, the router always ran last, after two
    runs at the same load: on one H100 the last of three 1.0x runs had the highest TTFT p50 in both seeds,
    whichever rung served it (loadtests/results/2026-12-07/router-h100-4b956f3.md)."""
    k = i % len(scenarios) if scenarios else 0
    return scenarios[k:] + scenarios[:k]


def run(args: argparse.Namespace, url: str, out: Path | None = None) -> dict:
    """Every seed x load x scenario; the report so far is written to `out` after each run."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.admin_key:
        ADMIN_HEADERS["Authorization"] = f"Bearer {args.admin_key}"
    specs = [harness.TraceSpec(requests=args.max_requests, seed=seed, arrival=args.arrival,
                               prompt_median=args.prompt_median, output_median=args.output_median,
                               prompt_max=args.prompt_max, output_max=args.output_max)
             for seed in args.seeds]  # fmt: skip
    traces = {spec.seed: harness.make_trace(spec) for spec in specs}
    warmups = {spec.seed: harness.make_trace(dataclasses.replace(spec, seed=spec.seed + 2000)) for spec in specs}
    first = traces[args.seeds[0]]
    median = sorted(first, key=lambda r: r.prompt_tokens + r.max_tokens)[len(first) // 2]
    with httpx.Client(base_url=url, timeout=60, trust_env=False, headers=headers) as http:
        variants = discover(http, args.model)
        base = next(v["id"] for v in variants if v["method"] == "base")
        ladder = [v["id"] for v in variants]
        scenarios = [x for s in args.scenarios
                     for x in ([f"pin:{v.split('@', 1)[1]}" for v in ladder] if s == "singles" else [s])]  # fmt: skip
        predicted = predicted_idle(http, args.model, median.prompt_tokens, median.max_tokens)
        fits: dict[str, IdleFit] = {}
        if args.budgets == "predicted":
            for trace in [*traces.values(), *warmups.values()]:
                set_budgets(http, args.model, base, trace)
            idle = predicted
        else:
            sample = idle_sample(first, args.idle_samples)
            for variant in ladder:  # the base first: its fit sets every budget
                fits[variant] = asyncio.run(measure_idle(url, variant, sample if variant == base
                                                         else sample[:: 2], headers))  # fmt: skip
                print(f"idle {variant}: {fits[variant]}", flush=True)
            for trace in [*traces.values(), *warmups.values()]:
                for r in trace:
                    r.budget_ms = r.budget_factor * fits[base].e2e_ms(r.prompt_tokens, r.max_tokens)
            idle = {v: fit.e2e_ms(median.prompt_tokens, median.max_tokens) for v, fit in fits.items()}
    fastest = min(idle, key=idle.get)
    ppl_delta = {v["id"]: v.get("ppl_delta") or 0.0 for v in variants}
    ppl = {v["id"]: v["ppl"] for v in variants if v.get("ppl")}
    print(f"variants {ladder}; base {base}; fastest (idle, median request) {fastest}", flush=True)

    capacity_trace = harness.make_trace(dataclasses.replace(specs[0], requests=4096, seed=args.seeds[0] + 1000))
    for r in capacity_trace:
        r.tier = "default"
    started = time.perf_counter()
    results = asyncio.run(harness.closed_loop(url, capacity_trace, args.capacity_concurrency, base, "capacity",
                                              duration_s=args.capacity_s, headers=headers))  # fmt: skip
    capacity = len(results) / (time.perf_counter() - started)
    print(f"base capacity: {capacity:.2f} req/s at {args.capacity_concurrency} concurrent", flush=True)

    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "label": args.label,
              "command": "python -m loadtests.bench " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "model": args.model,
              "variants": variants, "base": base, "fastest": fastest, "budgets": args.budgets,
              "idle_ms_median_request": idle, "idle_predicted_ms_median_request": predicted,
              "idle_fits": {v: dataclasses.asdict(f) for v, f in fits.items()},
              "capacity_rps": capacity, "capacity_concurrency": args.capacity_concurrency,
              "trace": specs[0].__dict__, "seeds": args.seeds, "warmup_s": args.warmup_s,
              "warmup_load": args.warmup_load, "compact": args.compact,
              "runs": []}  # fmt: skip
    pool = (ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
            if args.client_processes > 1 else None)  # fmt: skip
    cells = [(seed, load, scenario) for i, (seed, load) in enumerate(itertools.product(args.seeds, args.loads))
             for scenario in rotated(scenarios, i)]  # fmt: skip
    for seed, load, scenario in cells:
        rate = load * capacity
        n = max(4, min(args.max_requests, round(rate * args.seconds_per_run)))
        requests = traces[seed][:n]
        span = requests[-1].at_unit / rate
        time.sleep(args.pause_s)
        step_from = args.warmup_load * capacity if args.warmup_load else None
        sent, offset = with_warmup(requests, warmups[seed], rate, args.warmup_s, step_from)
        began = time.time()  # wall clock, to line the run up with the gateway's log (e.g. rung switches)
        results = replay(pool, args.client_processes, url, sent, rate, scenario,
                         (args.model, base, fastest, ladder), headers)  # fmt: skip
        results = [dataclasses.replace(r, sent_at=r.sent_at - offset) for r in results if r.index >= 0]
        summary = harness.summarize(results, span, ppl or None)
        answered = [r for r in results if r.variant in ppl_delta]
        summary["quality_weighted_ppl_delta"] = (statistics.fmean(ppl_delta[r.variant] for r in answered)
                                                 if answered else None)  # fmt: skip
        records = harness.as_dicts(results)
        if args.compact:  # per-token gaps dominate the file; the summaries keep their percentiles
            for record in records:
                record.pop("itl_ms")
        report["runs"].append({"seed": seed, "scenario": scenario, "load": load, "rate_rps": rate, "span_s": span,
                               "began_unix": began, "measured_from_unix": began + offset,
                               **summary, "results": records})  # fmt: skip
        print(f"{time.strftime('%H:%M:%S', time.localtime(began))} seed {seed} load {load:>4}x "
              f"({rate:6.2f} req/s, {n} req)  {scenario:<15} attainment "
              f"{summary['budget_attainment']:.0%}  goodput {summary['goodput_rps']:.2f}/s  "
              f"ttft p50 {summary['ttft_ms_p50']}  e2e p50 {summary['e2e_ms_p50']}  {summary['variants']}",
              flush=True)  # fmt: skip
        if out is not None:
            write(report, out, draw=False)
    if pool is not None:
        pool.shutdown()
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", help="a running gateway's URL; default: start `quantgate serve` here")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="int8,int4-gptq", help="variants a local gateway builds (fast profile)")
    p.add_argument("--api-key")
    p.add_argument("--admin-key", help="for GET /admin/routing (not needed from the gateway's own host without one)")
    p.add_argument("--label", default="cpu")
    p.add_argument("--scenarios", type=lambda s: s.split(","), default=list(DEFAULT_SCENARIOS),
                   help="always-base, always-fastest, round-robin, least-loaded, router, pin:<variant>, "
                        "singles (= pin: every ready variant)")
    p.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1.0, 1.5])
    p.add_argument("--seconds-per-run", type=float, default=24.0)
    p.add_argument("--max-requests", type=int, default=400)
    p.add_argument("--capacity-concurrency", type=int, default=8)
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--warmup-s", type=float, default=0.0,
                   help="seconds of unmeasured traffic at the run's rate before its measured requests")
    p.add_argument("--warmup-load", type=float, default=None,
                   help="the warm-up at this load (x capacity) instead of the run's: each run then measures a step "
                        "in load, e.g. --warmup-s 20 --warmup-load 0.5 --loads 1.5")
    p.add_argument("--pause-s", type=float, default=3.0, help="quiet time between runs (queues drain)")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    p.add_argument("--prompt-median", type=int, default=64)
    p.add_argument("--prompt-max", type=int, default=512)
    p.add_argument("--output-median", type=int, default=48)
    p.add_argument("--output-max", type=int, default=160)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="trace seeds, each replayed by every scenario at every load (the issue asks for 3)")
    p.add_argument("--budgets", choices=["measured", "predicted"], default="measured",
                   help="the base's idle latency behind each budget: measured here, or the router's prediction")
    p.add_argument("--idle-samples", type=int, default=16, help="requests per idle measurement of the base (half for others)")
    p.add_argument("--client-processes", type=int, default=1, help="split each open-loop run over this many processes")
    p.add_argument("--compact", action="store_true", help="leave per-token gaps out of the JSON (big runs)")
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    return p


def main() -> None:
    args = parser().parse_args()
    if args.gateway:
        write(run(args, args.gateway.rstrip("/"), args.out), args.out)
        return
    with local_gateway("bench", 18900 + os.getpid() % 90, args.variants) as (url, built):
        ready = {v["id"] for v in built if v["state"] == "ready"}
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            deadline = time.monotonic() + 300  # every ready variant profiled and served
            while time.monotonic() < deadline:
                view = http.get(f"/admin/routing/{args.model}").json()["variants"]
                # every built (ready) variant serving and profiled; rejected ones are listed, never serve
                if view and all(v["serving"] and v["priors"] for v in view if v["variant"] in ready):
                    break
                time.sleep(2)
        write(run(args, url, args.out), args.out)


if __name__ == "__main__":
    main()
