"""PNG plots of a bench report (matplotlib, headless).

    python -m loadtests.plots loadtests/results/<date>/bench-cpu.json[.gz]
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from loadtests.bench_report import pooled, read


def _pooled(report: dict, key: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per scenario, (load, value, low, high) pooled over the trace seeds: goodput is budgets met over
    the seeds' trace seconds, attainment budgets met over requests; the band is a 95% bootstrap
    interval over the requests (fixed seed)."""
    cells: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for run in report["runs"]:
        cells[(run["scenario"], run["load"])].append(run)
    series: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    rng = random.Random(0)
    for (scenario, load), runs in cells.items():
        met = [1.0 if r.get("met") else 0.0 for run in runs for r in run["results"]]
        if not met:
            continue
        scale = (len(met) / sum(run["span_s"] for run in runs)) if key == "goodput_rps" else 1.0
        draws = sorted(sum(met[rng.randrange(len(met))] for _ in met) / len(met) for _ in range(200))
        value = sum(met) / len(met)
        series[scenario].append((load, value * scale, draws[4] * scale, draws[194] * scale))
    return series


def _lines(report: dict, key: str, ylabel: str, path: Path, percent: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    factor = 100 if percent else 1
    for scenario, points in sorted(_pooled(report, key).items()):
        xs, ys, lows, highs = zip(*sorted(points), strict=True)
        (line,) = ax.plot(xs, [y * factor for y in ys], marker="o", label=scenario)
        ax.fill_between(xs, [v * factor for v in lows], [v * factor for v in highs], color=line.get_color(), alpha=0.15)
    ax.set_xlabel(f"load (x base capacity, {report['capacity_rps']:.2f} req/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs load, 95% bands ({report['label']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tradeoff(report: dict, path: Path) -> None:
    """Each policy's (quality-weighted ppl delta, goodput) point, one panel per load: up and left is better."""
    loads = sorted({run["load"] for run in report["runs"]})
    goodput = _pooled(report, "goodput_rps")
    fig, axes = plt.subplots(1, len(loads), figsize=(4 * len(loads), 3.8), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for scenario in sorted(goodput):
            runs = [r for r in report["runs"] if r["scenario"] == scenario and r["load"] == load]
            delta = pooled(runs)["ppl_delta"] if runs else None
            point = next((p for p in goodput[scenario] if p[0] == load), None)
            if delta is None or point is None:
                continue
            ax.errorbar([delta * 100], [point[1]], yerr=[[point[1] - point[2]], [point[3] - point[1]]], fmt="o",
                        capsize=3, label=scenario)  # fmt: skip
        ax.set_title(f"{load}x load")
        ax.set_xlabel("ppl delta, quality-weighted (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("goodput (budgets met per s)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"goodput vs quality per policy ({report['label']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cdfs(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "e2e_ms", "end-to-end")):
        per_variant: dict[str, list[float]] = defaultdict(list)
        for run in report["runs"]:
            for r in run["results"]:
                if r["status"] == 200 and r.get(key) is not None and r["variant"]:
                    per_variant[r["variant"]].append(r[key])
        for variant, values in sorted(per_variant.items()):
            values.sort()
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{variant} ({len(values)})")
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{title} CDF per variant, all runs ({report['label']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _routing_mix(report: dict, path: Path) -> None:
    routed = [run for run in report["runs"] if run["scenario"] == "router"]
    if not routed:
        return
    run = max(routed, key=lambda r: (r["load"], -r.get("seed", 0)))
    answered = [r for r in run["results"] if r["variant"]]
    span = max(r["sent_at"] for r in answered) if answered else 1.0
    bins = 12
    variants = sorted({r["variant"] for r in answered})
    counts = {v: [0] * bins for v in variants}
    for r in answered:
        counts[r["variant"]][min(bins - 1, int(r["sent_at"] / span * bins))] += 1
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0] * bins
    edges = [span * i / bins for i in range(bins)]
    for v in variants:
        ax.bar(edges, counts[v], width=span / bins, bottom=bottom, align="edge", label=v)
        bottom = [b + c for b, c in zip(bottom, counts[v], strict=True)]
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("requests sent")
    ax.set_title(f"router's choices over time at {run['load']}x load ({report['label']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench(report: dict, out: Path) -> list[Path]:
    label = report["label"]
    paths = [out / f"bench-{label}-{name}.png"
             for name in ("attainment", "goodput", "latency-cdf", "routing-mix", "tradeoff")]  # fmt: skip
    _lines(report, "budget_attainment", "budgets met (%)", paths[0], percent=True)
    _lines(report, "goodput_rps", "goodput (budgets met per s)", paths[1])
    _cdfs(report, paths[2])
    _routing_mix(report, paths[3])
    _tradeoff(report, paths[4])
    return [p for p in paths if p.exists()]


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for written in bench(read(source), source.parent):
        print("wrote", written)
