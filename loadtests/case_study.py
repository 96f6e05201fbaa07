"""The article's case study ("optimisation before and after": memory, latency, accuracy drop for
FP32 / INT8 / INT4-GPTQ), measured on served engines.

    python -m loadtests.case_study --engine fp32=http://127.0.0.1:8101,llama-3.1-8b@fp32,/tmp/g/engine-fp32.log \
        [--engine ...] --label h100 --out DIR

Each `--engine NAME=URL,MODEL[,LOG][,pid=N]`, one at a time (nothing else sent to the device meanwhile):
- latency: `--runs` streamed completions of a ~`--prompt-tokens`-token prompt and `--output-tokens`
  tokens (EOS ignored) after a warm-up: TTFT, decode ms per token ((e2e - TTFT) / (tokens - 1)) and e2e,
  mean and 95% CI (Student's t);
- memory: the weights vLLM loaded ("Model loading took X GiB" in the engine's log, when given; vLLM
  logs it on GPUs), and with `pid=N` the resident memory of that engine's process tree after the runs
  (CPU engines: weights, KV cache and runtime together, what the host gives up).
Accuracy drop comes from the registry's own measures (perplexity, chat set, next-token KL), not from here:
random weights (the GPU machine's 8B-shaped models) have no quality to drop. Writes case-study-<label>.json
and .md. A measurement: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import time
from pathlib import Path

import httpx

T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
LOADED = re.compile(r"Model loading took ([0-9.]+) ?GiB")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values), 2.0) * statistics.stdev(values) / len(values) ** 0.5


def long_prompt(tokens: int) -> str:
    """A prompt of about `tokens` tokens (one pangram of 9 words, repeated)."""
    return " ".join(["the quick brown fox jumps over the lazy dog"] * max(tokens // 9, 1))


def one(http: httpx.Client, url: str, model: str, prompt: str, tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, usage = None, {}
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    n = usage.get("completion_tokens", tokens)
    ttft = (first or ended) - started
    return {"ttft_ms": ttft * 1000, "tpot_ms": (ended - (first or ended)) * 1000 / max(n - 1, 1),
            "e2e_ms": (ended - started) * 1000, "prompt_tokens": usage.get("prompt_tokens"), "output_tokens": n}


def tree_rss_gib(pid: int) -> float | None:
    """Resident memory of a process and its descendants (vLLM's API server, engine core, workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in (root, *root.children(recursive=True))) / 2**30
    except psutil.Error:
        return None


def measure(name: str, url: str, model: str, log: Path | None, args: argparse.Namespace,
            pid: int | None = None) -> dict:  # fmt: skip
    prompt = long_prompt(args.prompt_tokens)
    with httpx.Client(timeout=600, trust_env=False) as http:
        one(http, url, model, prompt, 8)  # warm-up
        runs = [one(http, url, model, prompt, args.output_tokens) for _ in range(args.runs)]
    loaded = None
    if log is not None and log.is_file():
        found = LOADED.findall(log.read_text(errors="replace"))
        loaded = float(found[-1]) if found else None
    row = {"name": name, "model": model, "weights_gib": loaded, "runs": runs,
           "rss_gib": tree_rss_gib(pid) if pid else None,
           "prompt_tokens": runs[0]["prompt_tokens"], "output_tokens": runs[0]["output_tokens"]}
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        row[key] = mean_ci([r[key] for r in runs])
    print(f"{name}: weights {loaded} GiB, TTFT {row['ttft_ms'][0]:.1f} ms, {row['tpot_ms'][0]:.2f} ms/token, "
          f"e2e {row['e2e_ms'][0]:.0f} ms", flush=True)
    return row


def render(report: dict) -> str:
    lines = [f"# Case study: memory and latency per precision ({report['label']}, {report['date']})", "",
             f"`{report['command']}` on {report['machine']}.", "",
             f"Batch 1, one engine at a time: {report['runs']} streamed completions of ~{report['prompt_tokens']} "
             f"prompt tokens and {report['output_tokens']} output tokens each (EOS ignored) after a warm-up; "
             "mean ± 95% CI. Weights: what vLLM reports it loaded.", "",
             "| precision | weights (GiB) | engine RSS (GiB) | TTFT (ms) | decode (ms/token) | e2e (ms) | vs first row, decode |",
             "|---|---|---|---|---|---|---|"]
    first = report["rows"][0]["tpot_ms"][0] if report["rows"] else None
    for r in report["rows"]:
        f = lambda pair, fmt: f"{pair[0]:{fmt}} ± {pair[1]:{fmt}}"  # noqa: E731
        ratio = f"{r['tpot_ms'][0] / first:.2f}x" if first else "-"
        weights = "-" if r["weights_gib"] is None else f"{r['weights_gib']:.2f}"
        rss = "-" if r.get("rss_gib") is None else f"{r['rss_gib']:.2f}"
        lines.append(f"| {r['name']} | {weights} | {rss} | {f(r['ttft_ms'], '.1f')} | {f(r['tpot_ms'], '.2f')} | "
                     f"{f(r['e2e_ms'], '.0f')} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, help="NAME=URL,MODEL[,LOG][,pid=N]")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--label", default="local")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    rows = []
    for spec in args.engine:
        name, _, rest = spec.partition("=")
        url, model, *extra = rest.split(",")
        pid = next((int(e[4:]) for e in extra if e.startswith("pid=")), None)
        log = next((Path(e) for e in extra if not e.startswith("pid=")), None)
        try:
            rows.append(measure(name, url, model, log, args, pid))
        except httpx.HTTPError as exc:
            print(f"{name}: failed ({exc})", flush=True)
    report = {"label": args.label, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {platform.node()}", "runs": args.runs,
              "prompt_tokens": rows[0]["prompt_tokens"] if rows else None, "output_tokens": args.output_tokens,
              "command": "python -m loadtests.case_study " + " ".join(f"--engine {e}" for e in args.engine),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"case-study-{args.label}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"case-study-{args.label}.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
