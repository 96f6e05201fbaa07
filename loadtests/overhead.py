"""What the gateway costs: the same requests direct to an engine and through the gateway, and how
many requests per second one gateway core proxies.

    python -m loadtests.overhead                       # CPU: starts `quantgate serve` (the bundled model)
    python -m loadtests.overhead --gateway URL --model M [--skip-fake]

1. Latency overhead, real engine: at each concurrency, rounds of the same closed-loop trace (short
   prompts, streamed) alternate direct to the engine (its own URL, from GET /admin/engines) and
   through the gateway (the logical model: routing included). TTFT and end-to-end p50/p99 per path
   and their difference; plus the gateway's own `quantgate_gateway_overhead_seconds` histogram
   (request arrival to the upstream call).
2. Throughput, FakeEngine (zero latency; a fake only at the engine boundary): closed loop with many
   users through a fresh gateway, streamed and not; requests/s, and requests per CPU-second of the
   gateway process (its own user+system time), which is the per-core number whatever else shares
   the machine's cores.

Writes overhead-<label>.json/.md. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from loadtests import harness
from loadtests.local import bench_home, local_gateway, start, wait_ready

REPO = Path(__file__).resolve().parents[1]
SPEC = harness.TraceSpec(requests=4096, seed=7, prompt_median=24, prompt_max=64, output_median=16, output_max=16,
                         budget_factors=((1.0, 1),), tiers=(("default", 1),))  # fmt: skip


def _trace(n: int) -> list[harness.TraceRequest]:
    trace = harness.make_trace(dataclasses.replace(SPEC, requests=n))
    for r in trace:
        r.max_tokens = 16
    return trace


def _overhead_histogram(url: str) -> dict[float, float]:
    """Cumulative bucket counts of quantgate_gateway_overhead_seconds, summed over endpoints."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "quantgate_gateway_overhead_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile of what was observed between two scrapes."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return None
    for le, cumulative in counts:
        if cumulative >= q * total:
            return le
    return None


def latency_overhead(url: str, model: str, engine_url: str, engine_model: str, concurrencies: list[int],
                     per_round: int, rounds: int, headers: dict[str, str],
                     direct_headers: dict[str, str] | None = None) -> list[dict]:  # fmt: skip
    rows = []
    for concurrency in concurrencies:
        paths: dict[str, list[harness.Result]] = {"direct": [], "gateway": []}
        before = _overhead_histogram(url)
        for i in range(rounds):
            trace = _trace(per_round)
            order = [("direct", engine_url, engine_model, direct_headers or headers),
                     ("gateway", url, model, headers)]
            for name, target, target_model, sent in order if i % 2 == 0 else order[::-1]:
                fresh = [dataclasses.replace(r) for r in trace]
                paths[name] += asyncio.run(harness.closed_loop(target, fresh, concurrency, target_model, name,
                                                               headers=sent))  # fmt: skip
        after = _overhead_histogram(url)
        row = {"concurrency": concurrency, "requests_per_path": len(paths["direct"])}
        for name, results in paths.items():
            ok = [r for r in results if r.status == 200 and r.error is None]
            row[name] = {"errors": len(results) - len(ok),
                         "ttft_ms_p50": harness.percentile([r.ttft_ms for r in ok if r.ttft_ms], 0.5),
                         "ttft_ms_p99": harness.percentile([r.ttft_ms for r in ok if r.ttft_ms], 0.99),
                         "e2e_ms_p50": harness.percentile([r.e2e_ms for r in ok], 0.5),
                         "e2e_ms_p99": harness.percentile([r.e2e_ms for r in ok], 0.99)}  # fmt: skip
        for key in ("ttft_ms_p50", "ttft_ms_p99", "e2e_ms_p50", "e2e_ms_p99"):
            both = (row["gateway"][key], row["direct"][key])
            row[f"delta_{key}"] = None if None in both else both[0] - both[1]
        row["in_gateway_ms_p50_at_most"] = (_bucket_quantile(before, after, 0.5) or 0) * 1000
        row["in_gateway_ms_p99_at_most"] = (_bucket_quantile(before, after, 0.99) or 0) * 1000
        rows.append(row)
        print(f"concurrency {concurrency:>3}: TTFT p50 direct {row['direct']['ttft_ms_p50']} gateway "
              f"{row['gateway']['ttft_ms_p50']} (delta {row['delta_ttft_ms_p50']} ms), errors "
              f"{row['direct']['errors']} / {row['gateway']['errors']}", flush=True)  # fmt: skip
    return rows


def fake_throughput(seconds: float, concurrency: int, profile_to: Path | None = None) -> list[dict]:
    """A fresh gateway over one zero-latency FakeEngine, closed loop; requests per gateway CPU-second.
    With `profile_to`, the gateway runs under cProfile (slower: its rates are then not the figures)."""
    from server.engines.local import free_loopback_port

    fake_port, port = free_loopback_port(), free_loopback_port()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.fake_engine", "--model", "fake@bf16",
                             f"--port={fake_port}", "--ttft-ms=0", "--tpot-ms=0", "--max-running=100000"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    remote = {"fake@bf16": {"url": f"http://127.0.0.1:{fake_port}", "method": "base"}}
    gateway = start(bench_home("overhead-fake"), port, "", profile_to, QUANTGATE_EMBEDDED_MODEL="false",
                    QUANTGATE_LOG_LEVEL="warning", QUANTGATE_REMOTE_ENGINES=json.dumps(remote))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_ready(url, gateway, 120)
        time.sleep(3)  # the profiling run of the fake is done in well under that
        process = psutil.Process(gateway.pid)
        for stream in (True, False):
            trace = _trace(200_000)
            cpu0, t0 = sum(process.cpu_times()[:2]), time.perf_counter()
            results = asyncio.run(_closed_loop_plain(url, trace, concurrency, seconds, stream))
            cpu, wall = sum(process.cpu_times()[:2]) - cpu0, time.perf_counter() - t0
            ok = sum(1 for status in results if status == 200)
            rows.append({"stream": stream, "concurrency": concurrency, "seconds": round(wall, 2), "answered": ok,
                         "errors": len(results) - ok, "requests_per_s": ok / wall, "gateway_cpu_s": round(cpu, 2),
                         "requests_per_gateway_cpu_s": ok / cpu if cpu else None})  # fmt: skip
            print(f"fake engine, stream={stream}: {ok / wall:.0f} req/s, {ok / cpu:.0f} per gateway CPU-second", flush=True)
    finally:
        # uvicorn re-raises the signal it stopped on: SIGTERM would kill the process before cProfile writes,
        # SIGINT ends it in a KeyboardInterrupt, which lets the profile be written.
        gateway.send_signal(signal.SIGINT if profile_to else signal.SIGTERM)
        gateway.wait(timeout=60)
        fake.terminate()
        fake.wait(timeout=10)
    return rows


async def _closed_loop_plain(url: str, trace: list[harness.TraceRequest], concurrency: int, seconds: float,
                             stream: bool) -> list[int]:  # fmt: skip
    """As lean a client as possible (statuses only), so the load generator is not what is measured."""
    statuses: list[int] = []
    queue = iter(trace)
    async with harness.client(concurrency) as http:
        t0 = time.perf_counter()

        async def user() -> None:
            for r in queue:
                if time.perf_counter() - t0 > seconds:
                    return
                body = {"model": "fake", "messages": [{"role": "user", "content": r.prompt}], "max_tokens": 16,
                        "stream": stream}  # fmt: skip
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    await response.aread()
                    statuses.append(response.status_code)

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return statuses


def top_entries(profile: Path, n: int = 25) -> list[dict]:
    """The profile's functions by own time (tottime), with their cumulative time and call counts."""
    import pstats

    stats = pstats.Stats(str(profile))
    total = stats.total_tt or 1.0  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = file.split("site-packages/")[-1] if "site-packages/" in file else file.replace(str(REPO) + "/", "")
        rows.append({"function": f"{where}:{line}({name})", "calls": calls, "tottime_s": round(tottime, 3),
                     "tottime_share": round(tottime / total, 4), "cumtime_s": round(cumtime, 3)})  # fmt: skip
    return sorted(rows, key=lambda r: -r["tottime_s"])[:n]


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(report: dict) -> str:
    lines = [f"# Gateway overhead ({report['label']}, {report['date']})", "",
             f"`{report['command']}` on {report['machine']}.", "",
             "Same closed-loop requests (16 output tokens, streamed), direct to the engine vs through the gateway "
             "(routing included), alternating rounds. Deltas are gateway minus direct.", "",
             "| concurrency | req/path | TTFT p50 direct / gateway (ms) | TTFT p50 delta | TTFT p99 delta | e2e p50 delta | "
             "e2e p99 delta | in-gateway p50 / p99 (bucket bound, ms) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["latency"]:
        lines.append(f"| {r['concurrency']} | {r['requests_per_path']} | {_f(r['direct']['ttft_ms_p50'], '.1f')} / "
                     f"{_f(r['gateway']['ttft_ms_p50'], '.1f')} | {_f(r['delta_ttft_ms_p50'], '+.2f')} | "
                     f"{_f(r['delta_ttft_ms_p99'], '+.2f')} | {_f(r['delta_e2e_ms_p50'], '+.2f')} | "
                     f"{_f(r['delta_e2e_ms_p99'], '+.2f')} | "
                     f"{r['in_gateway_ms_p50_at_most']:.2f} / {r['in_gateway_ms_p99_at_most']:.2f} |")  # fmt: skip
    if report.get("fake"):
        lines += ["", "Proxied throughput over a zero-latency FakeEngine (load generator, gateway and fake share the "
                  "machine's cores; per gateway CPU-second is the per-core figure):", "",
                  "| stream | concurrency | req/s | per gateway CPU-second | errors |", "|---|---|---|---|---|"]  # fmt: skip
        for r in report["fake"]:
            lines.append(f"| {r['stream']} | {r['concurrency']} | {r['requests_per_s']:.0f} | "
                         f"{_f(r['requests_per_gateway_cpu_s'], '.0f')} | {r['errors']} |")  # fmt: skip
    if report.get("profile"):
        lines += ["", (f"Where the gateway's CPU time went (cProfile of the gateway process over the FakeEngine "
                       f"runs, {report['profile']['requests']} requests; top {len(report['profile']['top'])} by own "
                       "time):"), "",
                  "| function | calls | own s | share | cumulative s |", "|---|---|---|---|---|"]  # fmt: skip
        for r in report["profile"]["top"]:
            lines.append(f"| `{r['function']}` | {r['calls']} | {r['tottime_s']:.3f} | {r['tottime_share']:.1%} | "
                         f"{r['cumtime_s']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _latency_against(url: str, args: argparse.Namespace) -> list[dict]:
    """Direct to the model's first ready engine (GET /admin/engines) vs through the gateway at `url`."""
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        engines = [e for e in http.get("/admin/engines").json()["engines"] if e["state"] == "ready"
                   and e["variant_id"].split("@")[0] == args.model]  # fmt: skip
    if args.variant:  # one engine both ways: the gateway pinned to it, so the delta is the gateway alone
        base = next((e for e in engines if e["variant_id"] == args.variant), None)
        if base is None:
            raise SystemExit(f"no ready engine serves {args.variant}: {[e['variant_id'] for e in engines]}")
    else:
        base = min(engines, key=lambda e: e["variant_id"])
    print(f"direct: {base['variant_id']} at {base['base_url']}; gateway: {args.variant or args.model}", flush=True)
    return latency_overhead(url, args.variant or args.model, base["base_url"], base["variant_id"], args.concurrency,
                            args.per_round, args.rounds, {}, _engine_key(base))  # fmt: skip


def _engine_key(engine: dict) -> dict[str, str]:
    """A local engine asks the key its gateway gave it (server/engines/engine_guard.py): on this host it
    is in the engine process's environment. A remote engine: none (or start it without --api-key)."""
    if engine.get("pid") is None:
        return {}
    key = psutil.Process(engine["pid"]).environ().get("VLLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variant", help="pin the gateway path to this variant (model@variant) and go direct to its "
                   "engine; without it the gateway routes the logical model and direct is its first engine")
    p.add_argument("--label", default="cpu")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--per-round", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--skip-fake", action="store_true")
    p.add_argument("--fake-only", action="store_true", help="only the FakeEngine throughput (no real engine)")
    p.add_argument("--profile", action="store_true", help="and a cProfile'd FakeEngine run: its top entries")
    p.add_argument("--fake-seconds", type=float, default=15)
    p.add_argument("--fake-concurrency", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    args = p.parse_args()
    if args.fake_only:
        latency = []
    elif args.gateway:
        latency = _latency_against(args.gateway.rstrip("/"), args)
    else:
        with local_gateway("overhead", 18990 + os.getpid() % 9, "") as (url, _):
            latency = _latency_against(url, args)
    fake = [] if args.skip_fake else fake_throughput(args.fake_seconds, args.fake_concurrency)
    profile = None
    if args.profile:  # a second, profiled run: cProfile slows the gateway, so its rates are not reported
        path = args.out / f"overhead-{args.label}.prof"
        args.out.mkdir(parents=True, exist_ok=True)
        rows = fake_throughput(args.fake_seconds, args.fake_concurrency, path)
        profile = {"requests": sum(r["answered"] for r in rows), "top": top_entries(path)}
        path.unlink()
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "label": args.label,
              "command": "python -m loadtests.overhead " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "latency": latency, "fake": fake,
              "profile": profile}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"overhead-{args.label}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"overhead-{args.label}.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
