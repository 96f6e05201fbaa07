"""The bench's report: router vs the best single variant per load (pooled over trace seeds, with a
paired bootstrap interval), the predictor's error per load and variant, the markdown table, and the
files (JSON, markdown, plots) `loadtests/bench.py` writes after every run."""

from __future__ import annotations

import gzip
import json
import random
import statistics
from pathlib import Path

from loadtests import harness


def predictor_error(runs: list[dict]) -> list[dict]:
    """Per load and variant, over every answered request that carried the gateway's prediction: the
    relative error |predicted - measured| / measured of TTFT and e2e (median and p90) and its sign
    (median of predicted / measured - 1: negative = optimistic)."""
    groups: dict[tuple[float, str], list[dict]] = {}
    for run in runs:
        for r in run["results"]:
            if r["status"] == 200 and not r.get("error") and r.get("predicted_e2e_ms") is not None and r["variant"]:
                groups.setdefault((run["load"], r["variant"]), []).append(r)
    rows = []
    for (load, variant), results in sorted(groups.items()):
        row = {"load": load, "variant": variant, "requests": len(results)}
        for kind in ("ttft", "e2e"):
            pairs = [(r[f"predicted_{kind}_ms"], r[f"{kind}_ms"]) for r in results
                     if r.get(f"predicted_{kind}_ms") is not None and r.get(f"{kind}_ms")]  # fmt: skip
            relative = [abs(p - m) / m for p, m in pairs]
            row[f"{kind}_abs_rel_error_p50"] = harness.percentile(relative, 0.5)
            row[f"{kind}_abs_rel_error_p90"] = harness.percentile(relative, 0.9)
            row[f"{kind}_bias_p50"] = statistics.median(p / m - 1 for p, m in pairs) if pairs else None
        rows.append(row)
    return rows


def headline(report: dict) -> dict:
    """Router goodput vs the best single variant at each load, pooled over the trace seeds (budgets met
    over trace seconds), with a paired bootstrap interval, and the router's quality cost."""
    out = {}
    for load in sorted({r["load"] for r in report["runs"]}):
        at: dict[str, list[dict]] = {}
        for r in report["runs"]:
            if r["load"] == load:
                at.setdefault(r["scenario"], []).append(r)
        seeds = {r.get("seed", 0) for runs in at.values() for r in runs}
        complete = {s: runs for s, runs in at.items() if {r.get("seed", 0) for r in runs} == seeds}
        pooled_runs = {s: pooled(runs) for s, runs in complete.items()}
        singles = [s for s in pooled_runs if s in ("always-base", "always-fastest") or s.startswith("pin:")]
        if "router" not in pooled_runs or not singles:
            continue
        best = max(singles, key=lambda s: pooled_runs[s]["goodput_rps"] or 0)
        router = pooled_runs["router"]
        ratio = (router["goodput_rps"] / pooled_runs[best]["goodput_rps"]) if pooled_runs[best]["goodput_rps"] else None
        low, high = paired_ratio_ci(_keyed(complete["router"]), _keyed(complete[best]))
        dominated_by = [s for s in singles if (pooled_runs[s]["goodput_rps"] or 0) > (router["goodput_rps"] or 0)
                        and (pooled_runs[s]["ppl_delta"] or 0) < (router["ppl_delta"] or 0)]  # fmt: skip
        out[str(load)] = {"seeds": sorted(seeds), "router_goodput_rps": router["goodput_rps"], "best_single": best,
                          "best_single_goodput_rps": pooled_runs[best]["goodput_rps"], "goodput_ratio": ratio,
                          "goodput_ratio_ci95": [low, high], "router_ppl_delta": router["ppl_delta"],
                          "best_single_ppl_delta": pooled_runs[best]["ppl_delta"],
                          "singles_better_on_both": dominated_by}  # fmt: skip
    return out


def pooled(runs: list[dict]) -> dict:
    """One scenario's runs at one load, pooled over the seeds: budgets met per trace second, and the ppl
    delta weighted by answered requests."""
    met = sum(bool(r.get("met")) for run in runs for r in run["results"])
    span = sum(r["span_s"] for r in runs)
    answered = sum(r["answered"] for r in runs)
    deltas = [(r["quality_weighted_ppl_delta"], r["answered"]) for r in runs if r["quality_weighted_ppl_delta"] is not None]
    return {"goodput_rps": met / span if span else None,
            "ppl_delta": sum(d * n for d, n in deltas) / answered if deltas and answered else None}  # fmt: skip


def _keyed(runs: list[dict]) -> list[dict]:
    """Each request keyed by (seed, trace index), so the bootstrap pairs the same request across scenarios."""
    return [{**r, "index": (run.get("seed", 0), r["index"])} for run in runs for r in run["results"]]


def paired_ratio_ci(a: list[dict], b: list[dict], resamples: int = 2000, seed: int = 0) -> tuple[float | None, ...]:
    """95% paired bootstrap interval of (budgets met by a) / (budgets met by b): both replayed the same
    trace, so requests are resampled by their index, the same draw for both."""
    met_a = {r["index"]: bool(r.get("met")) for r in a}
    met_b = {r["index"]: bool(r.get("met")) for r in b}
    indices = sorted(met_a.keys() & met_b.keys())
    if not indices:
        return None, None
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        draw = [indices[rng.randrange(len(indices))] for _ in indices]
        denominator = sum(met_b[i] for i in draw)
        if denominator:
            ratios.append(sum(met_a[i] for i in draw) / denominator)
    if len(ratios) < resamples // 2:
        return None, None
    ratios.sort()
    return ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]


def render(report: dict) -> str:
    def f(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"# Router vs single variants, side by side ({report['label']}, {report['date']})", "",
             f"`{report['command']}` on {report['machine']}; model `{report['model']}`.", "",
             f"Budgets from the base's idle latency, {report.get('budgets', 'predicted')}; trace seeds "
             f"{report.get('seeds', [0])}"
             + (f"; {report['warmup_s']:g} s of unmeasured traffic before each run, "
                + (f"at {report['warmup_load']:g}x load: each run measures a step from that load to its own"
                   if report.get("warmup_load") else "at the run's rate") if report.get("warmup_s") else "") + ".", "",
             "| variant | method | ppl delta | idle e2e, median request (ms) | predicted by the gateway (ms) |",
             "|---|---|---|---|---|"]  # fmt: skip
    idle = report.get("idle_ms_median_request", report["idle_predicted_ms_median_request"])
    for v in report["variants"]:
        lines.append(f"| {v['id']} | {v['method']} | {f(v.get('ppl_delta'), '+.1%')} | {f(idle.get(v['id']), '.0f')} | "
                     f"{f(report['idle_predicted_ms_median_request'].get(v['id']), '.0f')} |")  # fmt: skip
    capacity = (f"Base capacity: **{report['capacity_rps']:.2f} req/s** (closed loop, {report['capacity_concurrency']} "
                f"concurrent). Fastest variant by prediction: `{report['fastest']}`.")
    header = ("| seed | load | scenario | req | budgets met | goodput req/s | ppl delta (quality-weighted) | TTFT p50 / p99 ms | "
              "ITL p50 / p99 ms | e2e p50 / p99 ms | errors | served |")
    lines += ["", capacity, "", header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r.get('seed', 0)} | {r['load']}x | {r['scenario']} | {r['requests']} | {f(r['budget_attainment'], '.0%')} | "
                     f"{f(r['goodput_rps'], '.2f')} | {f(r['quality_weighted_ppl_delta'], '+.2%')} | "
                     f"{f(r['ttft_ms_p50'], '.0f')} / {f(r['ttft_ms_p99'], '.0f')} | "
                     f"{f(r['itl_ms_p50'], '.1f')} / {f(r['itl_ms_p99'], '.1f')} | "
                     f"{f(r['e2e_ms_p50'], '.0f')} / {f(r['e2e_ms_p99'], '.0f')} | {r['errors']} | "
                     f"{', '.join(f'{k.split(chr(64))[-1]}:{n}' for k, n in sorted(r['variants'].items()))} |")
    lines += ["", "Headline: router goodput over the best single variant run (always-base, always-fastest, pin:*), "
              "per load, pooled over the seeds; 95% paired bootstrap interval of the ratio (requests resampled by "
              "seed and trace index). Last column: single variants with more goodput and a smaller ppl delta.", "",
              "| load | router goodput | best single | its goodput | ratio (95% CI) | router ppl delta | its ppl delta | "
              "better on both |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for load, h in report["headline"].items():
        low, high = h.get("goodput_ratio_ci95") or (None, None)
        lines.append(f"| {load}x | {f(h['router_goodput_rps'], '.2f')} | {h['best_single']} | "
                     f"{f(h['best_single_goodput_rps'], '.2f')} | {f(h['goodput_ratio'], '.2f')} "
                     f"({f(low, '.2f')}-{f(high, '.2f')}) | {f(h['router_ppl_delta'], '+.2%')} | "
                     f"{f(h.get('best_single_ppl_delta'), '+.2%')} | {', '.join(h.get('singles_better_on_both', [])) or 'none'} |")  # fmt: skip
    errors = report.get("predictor_error") or []
    if errors:
        lines += ["", "Predictor error (every answered request of every scenario at that load; |predicted - measured| / "
                  "measured, and the median signed error predicted / measured - 1):", "",
                  "| load | variant | req | TTFT p50 / p90 | TTFT bias | e2e p50 / p90 | e2e bias |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in errors:
            lines.append(f"| {e['load']}x | {e['variant']} | {e['requests']} | "
                         f"{f(e['ttft_abs_rel_error_p50'], '.0%')} / {f(e['ttft_abs_rel_error_p90'], '.0%')} | "
                         f"{f(e['ttft_bias_p50'], '+.0%')} | {f(e['e2e_abs_rel_error_p50'], '.0%')} / "
                         f"{f(e['e2e_abs_rel_error_p90'], '.0%')} | {f(e['e2e_bias_p50'], '+.0%')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def read(path: Path) -> dict:
    """A report written by `write`, or the same gzipped (reports with every request are kept as .json.gz)."""
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def write(report: dict, out: Path, draw: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["headline"] = headline(report)
    report["predictor_error"] = predictor_error(report["runs"])
    (out / f"bench-{report['label']}.json").write_text(json.dumps(report, indent=None if report.get("compact") else 1)
                                                       + "\n")  # fmt: skip
    markdown = render(report)
    (out / f"bench-{report['label']}.md").write_text(markdown)
    if not draw:
        return
    print(markdown)
    try:
        from loadtests import plots
    except ImportError as exc:  # matplotlib is in the test extra; a GPU box may not have it
        print(f"no plots ({exc}); run `python -m loadtests.plots {out / ('bench-' + report['label'] + '.json')}`")
        return
    plots.bench(report, out)
