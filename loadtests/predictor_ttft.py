"""How much of the predictor's TTFT error under load the gateway could remove, from a bench report.

    python -m loadtests.predictor_ttft REPORT.json[.gz] [...] --out loadtests/results/DATE/predictor-ttft

For every pinned run of `loadtests.bench` reports (per-request results kept), the state the gateway
sees when it routes each request is rebuilt from the report itself: the seeded trace gives each
request's prompt tokens (the gateway's estimate), and the other requests of the run, by their send,
first-token and end times, give what was in flight on the same engine then: the streams with no
first token yet (their count and prompt tokens) and the requests decoding. Against the measured
TTFT it reports

- the error of the prediction the gateway made (its `x-quantgate-predicted-ttft-ms`),
- the error of TTFT = a + b x prompt + c x prompt tokens prefilling ahead + d x decoding, fitted by
  relative least squares on the other seed's run of the same variant and load (out of sample), and
  on the run itself (in sample: the floor for a model of that state),
- c / b: what one prompt token still prefilling ahead costs next to one of the request's own.

An analysis of measurements already taken, not a measurement; numpy only, no gateway.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from loadtests import bench_report, harness

Key = tuple[float, str, int]  # load, variant, seed


def _trace(report: dict, seed: int) -> list[harness.TraceRequest]:
    fields = {k: tuple(map(tuple, v)) if isinstance(v, list) else v for k, v in report["trace"].items()
              if k in harness.TraceSpec.__dataclass_fields__}  # fmt: skip
    return harness.make_trace(dataclasses.replace(harness.TraceSpec(**fields), seed=seed))


def states(report: dict, run: dict) -> np.ndarray:
    """Rows of (measured TTFT, predicted TTFT, prompt tokens, prompt tokens prefilling ahead, decoding)
    for every answered streamed request of `run` with a prediction."""
    trace = _trace(report, run["seed"])
    done = [r for r in run["results"] if r.get("ttft_ms") and r.get("predicted_ttft_ms") and r["index"] >= 0]
    sent = np.array([r["sent_at"] for r in done])
    first = sent + np.array([r["ttft_ms"] for r in done]) / 1000
    end = sent + np.array([r["e2e_ms"] for r in done]) / 1000
    prompt = np.array([trace[r["index"]].prompt_tokens for r in done], dtype=float)
    variant = np.array([r["variant"] for r in done])
    rows = []
    for i, r in enumerate(done):
        on = (variant == variant[i]) & (sent <= sent[i]) & (end > sent[i])
        on[i] = False
        prefilling = on & (first > sent[i])
        rows.append((r["ttft_ms"], r["predicted_ttft_ms"], prompt[i], prompt[prefilling].sum(),
                     on.sum() - prefilling.sum()))  # fmt: skip
    return np.array(rows, dtype=float).reshape(-1, 5)


def _design(rows: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones(len(rows)), rows[:, 2], rows[:, 3], rows[:, 4]])


def fit(rows: np.ndarray) -> np.ndarray:
    """Coefficients (a, b, c, d) minimising the squared relative error."""
    coef, *_ = np.linalg.lstsq(_design(rows) / rows[:, [0]], np.ones(len(rows)), rcond=None)
    return coef


def median_error(rows: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.median(np.abs(predicted - rows[:, 0]) / rows[:, 0]))


def analyse(paths: list[Path]) -> list[dict]:
    runs: dict[Key, np.ndarray] = {}
    sources: dict[Key, str] = {}
    for path in paths:
        report = bench_report.read(path)
        for run in report["runs"]:
            if not run["scenario"].startswith("pin:"):
                continue  # one engine per run: the state is that engine's
            rows = states(report, run)
            variant = run["scenario"].split(":", 1)[1]
            runs[(run["load"], variant, run["seed"])] = rows
            sources[(run["load"], variant, run["seed"])] = path.name
    by_cell = collections.defaultdict(list)
    for key in runs:
        by_cell[key[:2]].append(key)
    out = []
    for key in sorted(runs):
        rows = runs[key]
        own = fit(rows)
        others = [k for k in by_cell[key[:2]] if k != key]
        crossed = median_error(rows, _design(rows) @ fit(runs[others[0]])) if others else None
        out.append({"load": key[0], "variant": key[1], "seed": key[2], "report": sources[key], "requests": len(rows),
                    "ttft_ms_p50": float(np.median(rows[:, 0])),
                    "prefilling_ahead_mean": float(np.mean(rows[:, 3] > 0)),
                    "decoding_mean": float(np.mean(rows[:, 4])),
                    "gateway_error_p50": median_error(rows, rows[:, 1]),
                    "other_seed_fit_error_p50": crossed,
                    "in_sample_fit_error_p50": median_error(rows, _design(rows) @ own),
                    "coefficients": [float(c) for c in own],
                    "ahead_share": float(own[2] / own[1]) if own[1] > 0 else None})  # fmt: skip
    return out


def markdown(rows: list[dict], command: str) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    lines = [
        "# TTFT under load: what the gateway's own view of an engine explains",
        "",
        f"`{command}`",
        "",
        "Per pinned run: median |predicted - measured| / measured TTFT for the prediction the gateway made, for",
        "TTFT = a + b x prompt + c x prompt tokens of streams prefilling ahead + d x requests decoding fitted on",
        "the other seed's run (out of sample) and on the run itself (in sample), and c / b. `ahead` is the share",
        "of requests that found at least one stream prefilling on their engine.",
        "",
        "| load | variant | seed | requests | TTFT p50 (ms) | ahead | decoding (mean) | gateway's error | "
        "other-seed fit | in-sample fit | c / b |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "-" if r["ahead_share"] is None else f"{r['ahead_share']:.2f}"
        lines.append(f"| {r['load']}x | {r['variant']} | {r['seed']} | {r['requests']} | {r['ttft_ms_p50']:.1f} | "
                     f"{r['prefilling_ahead_mean']:.0%} | {r['decoding_mean']:.1f} | {pct(r['gateway_error_p50'])} | "
                     f"{pct(r['other_seed_fit_error_p50'])} | {pct(r['in_sample_fit_error_p50'])} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="path without suffix: .md and .json are written")
    args = p.parse_args()
    rows = analyse(args.reports)
    command = "python -m loadtests.predictor_ttft " + " ".join(str(r) for r in args.reports) + f" --out {args.out}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": rows}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
