"""vLLM's own client through the gateway vs direct: the table of `vllm bench serve` results.

    python -m loadtests.vllm_bench_table RESULTS.tgz|DIR [--out report.md]

Reads the result JSONs loadtests/gpu/overhead_run.sh saves (`{direct,gateway}-c{C}-r{R}.json`, the same flags
both ways) and prints one row per run and, per concurrency, the gateway's added TTFT / TPOT / ITL / e2e
(mean over rounds of the gateway's figure minus the direct one of the same round). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

METRICS = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "e2e")]
NAME = re.compile(r"(direct|gateway)-c(\d+)-r(\d+)\.json$")


def load(source: Path) -> dict[tuple[int, int, str], dict]:
    """(concurrency, round, path) -> the run's result."""
    runs = {}
    if source.is_dir():
        files = [(p.name, p.read_bytes()) for p in source.rglob("*.json")]
    else:
        with tarfile.open(source) as tar:
            files = [(Path(m.name).name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    for name, data in files:
        match = NAME.search(name)
        if match:
            runs[(int(match[2]), int(match[3]), match[1])] = json.loads(data)
    return runs


def _ms(run: dict, stat: str, metric: str) -> float | None:
    value = run.get(f"{stat}_{metric}_ms")
    return float(value) if isinstance(value, int | float) else None


def render(runs: dict[tuple[int, int, str], dict]) -> str:
    head = " | ".join(f"{label} p50 / p99 (ms)" for _, label in METRICS)
    lines = [f"| concurrency | round | path | completed | req/s | {head} |", "|---" * (5 + len(METRICS)) + "|"]
    deltas: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (c, r, path), run in sorted(runs.items()):
        cells = " | ".join(f"{_ms(run, 'median', m) or 0:.1f} / {_ms(run, 'p99', m) or 0:.1f}" for m, _ in METRICS)
        lines.append(f"| {c} | {r} | {path} | {run.get('completed')} | {run.get('request_throughput', 0):.2f} | "
                     f"{cells} |")  # fmt: skip
        other = runs.get((c, r, "direct"))
        if path == "gateway" and other is not None:
            for m, _ in METRICS:
                for stat in ("median", "p99"):
                    mine, theirs = _ms(run, stat, m), _ms(other, stat, m)
                    if mine is not None and theirs is not None:
                        deltas[c][f"{stat}_{m}"].append(mine - theirs)
    lines += ["", "Gateway minus direct, mean over rounds (ms):", "",
              "| concurrency | rounds | " + " | ".join(f"{label} p50 / p99" for _, label in METRICS) + " |",
              "|---" * (2 + len(METRICS)) + "|"]  # fmt: skip
    for c, by in sorted(deltas.items()):
        def mean(key: str) -> str:
            values = by.get(key, [])
            return f"{sum(values) / len(values):+.2f}" if values else "-"
        rounds = len(by.get("median_ttft", []))
        lines.append(f"| {c} | {rounds} | " + " | ".join(f"{mean('median_' + m)} / {mean('p99_' + m)}"
                                                        for m, _ in METRICS) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    text = render(load(args.source))
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
