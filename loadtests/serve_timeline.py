"""From `quantgate serve` on an empty QUANTGATE_HOME to every default variant being served.

    python -m loadtests.serve_timeline [--profile full|fast] [--timeout-s 7200] [--emulate-avx2]

Starts the gateway exactly as `make serve` does (the bundled model, QUANTGATE_DEFAULT_VARIANTS),
polls GET /admin/models every 2 s and records when each variant reached each state; stops when
every variant is ready, rejected, failed or unsupported (or at the timeout). Then sends the France
prompt to the model and pinned to each variant, and records each answer's status (a refused rung
must say why, never 500). Writes serve-timeline-<profile>[-avx2-emulated].json/.md with the final
`quantgate models list` table. `--emulate-avx2` runs the gateway and its engines on an AVX2-only
CPU's code paths (loadtests/avx2_emulation). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.avx2_emulation import emulation_env
from loadtests.build_eta import summary

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"ready", "rejected", "failed", "unsupported"}
STATES = ("pending", "converting", "compressing", "evaluating", "ready", "rejected", "failed", "unsupported")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def ask_each(http: httpx.Client, models: list[str]) -> list[dict]:
    """The France prompt to each model id (the bare name routes; `name@variant` pins)."""
    answers = []
    for model in models:
        reply = http.post("/v1/chat/completions", json={"model": model, "messages": FRANCE, "max_tokens": 16,
                                                          "temperature": 0})  # fmt: skip
        body = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
        text = (body.get("choices") or [{}])[0].get("message", {}).get("content") or body.get("error", {}).get("message")
        answers.append({"model": model, "status": reply.status_code, "served_by": body.get("model"),
                        "text": (text or reply.text)[:160]})  # fmt: skip
    return answers


def eta_against_truth(progress: dict[str, list[dict]]) -> list[dict]:
    """Each variant's calibrating ETA as polled, against the time really left: until the first poll that
    saw its calibration done (fraction 1, or another phase). Resolution: the 2-s polling."""
    rows = []
    for variant_id, seen in progress.items():
        calibrating = [s for s in seen if s["phase"] == "calibrating"]
        if not calibrating:
            continue
        after = [s["t"] for s in seen if s["t"] > calibrating[0]["t"] and (s["phase"] != "calibrating" or
                                                                          s["fraction"] == 1.0)]  # fmt: skip
        if not after:
            continue
        for s in calibrating:
            truth = after[0] - s["t"]
            if s["t"] < after[0] and s["eta_s"] is not None and truth > 0:
                rows.append({"variant": variant_id, "t": s["t"], "fraction": s["fraction"], "eta_s": s["eta_s"],
                             "truth_s": round(truth, 1), "error": round(s["eta_s"] / truth - 1, 3)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=["full", "fast"])
    parser.add_argument("--timeout-s", type=float, default=4 * 3600)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    parser.add_argument("--emulate-avx2", action="store_true", help="AVX2-only code paths (loadtests/avx2_emulation)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="qg-timeline-"))
    port = 18000 + os.getpid() % 1000
    env = {**(emulation_env() if args.emulate_avx2 else os.environ), "QUANTGATE_HOME": str(home),
           "QUANTGATE_PORT": str(port), "QUANTGATE_REGISTRY_PROFILE": args.profile}  # fmt: skip
    stem = f"serve-timeline-{args.profile}" + ("-avx2-emulated" if args.emulate_avx2 else "")
    started = time.monotonic()
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - lives as long as the gateway
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, start_new_session=True)  # fmt: skip
    events: dict[str, dict[str, float]] = {}
    progress: dict[str, list[dict]] = {}
    first_token_s = None
    models: list[dict] = []
    answers: list[dict] = []
    host: dict = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while time.monotonic() - started < args.timeout_s and proc.poll() is None:
                time.sleep(2)
                try:
                    models = http.get("/admin/models").json()["models"]
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
                now = round(time.monotonic() - started, 1)
                for variant in (v for m in models for v in m["variants"]):
                    events.setdefault(variant["id"], {}).setdefault(variant["state"], now)
                    if variant.get("progress"):
                        progress.setdefault(variant["id"], []).append({"t": now, **variant["progress"]})
                if first_token_s is None and any("ready" in e or "evaluating" in e for e in events.values()):
                    reply = http.post("/v1/chat/completions", json={
                        "model": "smollm2-135m", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "What is the capital of France?"}]})  # fmt: skip
                    if reply.status_code == 200:
                        first_token_s = round(time.monotonic() - started, 1)
                states = [v["state"] for m in models for v in m["variants"]]
                print(f"{now:8.1f} s  " + "  ".join(f"{k.split('@')[1]}={v}" for k, v in
                      ((v["id"], v["state"]) for m in models for v in m["variants"])), flush=True)  # fmt: skip
                if states and all(s in TERMINAL for s in states):
                    break
            try:
                answers = ask_each(http, [m["name"] for m in models] + [v["id"] for m in models for v in m["variants"]])
                host = http.get("/admin/engines").json().get("host", {})
            except httpx.HTTPError as exc:
                print(f"gateway gone before the answers were asked ({exc}); see {home / 'serve.log'}", flush=True)
        listing = subprocess.run([sys.executable, "-m", "server", "models", "list"], capture_output=True, text=True,
                                 env=env, cwd=REPO).stdout  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "profile": args.profile,
              "emulated_avx2": args.emulate_avx2, "host": host, "first_answer_s": first_token_s, "events_s": events,
              "progress": progress, "eta": eta_against_truth(progress),
              "answers": answers, "models_list": listing, "command": "python -m loadtests.serve_timeline " +
              " ".join(sys.argv[1:])}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    title = " on AVX2-only code paths (emulated)" if args.emulate_avx2 else ""
    lines = [f"# `quantgate serve` on an empty home{title}, `{args.profile}` profile ({result['date']})", "",
             f"Command: `{result['command']}`. Host: {host.get('cpu_model')}, flags {host.get('cpu_flags')}, "
             f"vllm op library {host.get('library')}, kernels {host.get('kernels')}.", "",
             f"First answer from the base variant: {first_token_s} s after the command.", "",
             "| variant | " + " | ".join(STATES) + " |", "|---|" + "---|" * len(STATES)]  # fmt: skip
    for variant_id, seen in events.items():
        lines.append(f"| {variant_id} | " + " | ".join(str(seen.get(s, "")) for s in STATES) + " |")
    lines += ["", "Seconds after the command at which each state was first seen (2 s polling).", "",
              "The France prompt, to the model and pinned to each variant, once every variant was settled:", "",
              "| model | status | answered by | answer or error |", "|---|---|---|---|"]  # fmt: skip
    for a in answers:
        lines.append(f"| {a['model']} | {a['status']} | {a['served_by'] or '-'} | {a['text']!r} |")
    late = [r for r in result["eta"] if r["fraction"] >= 0.1]
    eta = summary(result["eta"])
    lines += ["", "The calibration's ETA as `GET /admin/models` showed it (server/registry/progress.py), against the "
              f"time really left (2-s polling): {eta['within_25pct']} of {eta['samples_after_10pct']} "
              "samples past 10% within 25%.", "",
              "| variant | at s | done | ETA s | truth s | error |", "|---|---|---|---|---|---|"]  # fmt: skip
    step = max(len(late) // 16, 1)
    for r in late[::step]:
        lines.append(f"| {r['variant']} | {r['t']} | {r['fraction']:.0%} | {r['eta_s']} | {r['truth_s']} | "
                     f"{r['error']:+.0%} |")  # fmt: skip
    lines += ["", "```", listing.rstrip(), "```", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
