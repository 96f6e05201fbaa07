"""PNG plots of a bench report (matplotlib, headless).

    python -m loadtests.plots loadtests/results/<date>/bench-cpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _by_scenario(report: dict, key: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in report["runs"]:
        if run.get(key) is not None:
            series[run["scenario"]].append((run["load"], run[key]))
    return series


def _lines(report: dict, key: str, ylabel: str, path: Path, percent: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for scenario, points in _by_scenario(report, key).items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, [y * 100 for y in ys] if percent else ys, marker="o", label=scenario)
    ax.set_xlabel(f"load (x base capacity, {report['capacity_rps']:.2f} req/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs load ({report['label']})")
    ax.grid(alpha=0.3)
    ax.legend()
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
    run = max(routed, key=lambda r: r["load"])
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
    paths = [out / f"bench-{label}-{name}.png" for name in ("attainment", "goodput", "latency-cdf", "routing-mix")]
    _lines(report, "budget_attainment", "budgets met (%)", paths[0], percent=True)
    _lines(report, "goodput_rps", "goodput (budgets met per s)", paths[1])
    _cdfs(report, paths[2])
    _routing_mix(report, paths[3])
    return [p for p in paths if p.exists()]


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for written in bench(json.loads(source.read_text()), source.parent):
        print("wrote", written)
