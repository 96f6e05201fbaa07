"""Cold start (command to first token) and the gateway's TTFT overhead vs the engine directly.

    python -m loadtests.skeleton_bench [--requests 20] [--fresh-home] [--out loadtests/results/DATE]

Starts `quantgate serve` itself, measures, stops it, prints a table and writes skeleton.json/.md.
A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BODY = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32, "temperature": 0, "stream": True}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_once(client: httpx.Client, url: str, model: str) -> tuple[float, float]:
    """(TTFT, e2e) in seconds for one streamed chat request; TTFT = first chunk with content."""
    started = time.perf_counter()
    ttft = None
    with client.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "model": model}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if ttft is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - started
    return ttft if ttft is not None else float("nan"), time.perf_counter() - started


def cold_start(home: Path, port: int) -> tuple[subprocess.Popen, float, Path]:
    log_path = home / "bench-gateway.log"
    # The base variant only: compressing variants in the background would load the 2 CPUs
    # this benchmark measures on.
    env = {**os.environ, "QUANTGATE_HOME": str(home), "QUANTGATE_PORT": str(port), "QUANTGATE_DEFAULT_VARIANTS": ""}
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=60) as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited: see {log_path}")
            try:
                stream_once(client, url, "smollm2-135m")
                return proc, time.perf_counter() - started, log_path
            except httpx.HTTPError:
                time.sleep(0.25)


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean_ms": 1000 * statistics.fmean(values), "p50_ms": 1000 * statistics.median(values),
            "max_ms": 1000 * ordered[-1], "min_ms": 1000 * ordered[0]}  # fmt: skip


def overhead(url: str, engine_url: str, requests: int) -> dict:
    rows: dict[str, dict[str, list[float]]] = {"direct": {"ttft": [], "e2e": []}, "gateway": {"ttft": [], "e2e": []}}
    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # warm both paths (connections, engine caches)
            stream_once(client, engine_url, "smollm2-135m@bf16")
            stream_once(client, url, "smollm2-135m")
        for _ in range(requests):  # interleaved, so drift hits both alike
            for name, target, model in (("direct", engine_url, "smollm2-135m@bf16"), ("gateway", url, "smollm2-135m")):
                ttft, e2e = stream_once(client, target, model)
                rows[name]["ttft"].append(ttft)
                rows[name]["e2e"].append(e2e)
    result = {name: {k: summarize(v) for k, v in series.items()} for name, series in rows.items()}
    deltas = [g - d for g, d in zip(rows["gateway"]["ttft"], rows["direct"]["ttft"], strict=True)]
    result["ttft_delta"] = summarize(deltas)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--home", type=Path, default=REPO / ".cache" / "bench-home")
    parser.add_argument("--fresh-home", action="store_true", help="empty QUANTGATE_HOME: include the conversion")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="qg-bench-")) if args.fresh_home else args.home
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc, cold_s, log_path = cold_start(home, port)
    try:
        engines = httpx.get(f"http://127.0.0.1:{port}/admin/engines").json()["engines"]
        result = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "fresh_home": args.fresh_home,
            "cold_start_to_first_token_s": round(cold_s, 2),
            "requests": args.requests,
            "overhead": overhead(f"http://127.0.0.1:{port}", engines[0]["base_url"], args.requests),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "skeleton-fresh" if args.fresh_home else "skeleton"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    o = result["overhead"]
    lines = [
        f"# Skeleton benchmark ({result['date']}, {result['machine']})", "",
        f"Cold start, `quantgate serve` to first streamed token ({'empty' if result['fresh_home'] else 'warm'} "
        f"QUANTGATE_HOME): **{result['cold_start_to_first_token_s']} s**", "",
        f"{result['requests']} sequential streamed chat requests (32 tokens), direct to the engine vs through the "
        "gateway, interleaved:", "",
        "| path | TTFT mean ms | TTFT p50 ms | TTFT max ms | e2e mean ms | e2e p50 ms |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in ("direct", "gateway"):
        t, e = o[name]["ttft"], o[name]["e2e"]
        lines.append(f"| {name} | {t['mean_ms']:.2f} | {t['p50_ms']:.2f} | {t['max_ms']:.2f} | "
                     f"{e['mean_ms']:.2f} | {e['p50_ms']:.2f} |")
    d = o["ttft_delta"]
    lines += ["", f"Gateway minus direct, TTFT per request pair: mean {d['mean_ms']:.2f} ms, "
              f"p50 {d['p50_ms']:.2f} ms, max {d['max_ms']:.2f} ms", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
