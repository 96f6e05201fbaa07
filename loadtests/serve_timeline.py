"""From `quantgate serve` on an empty QUANTGATE_HOME to every default variant being served.

    python -m loadtests.serve_timeline [--profile full|fast] [--timeout-s 7200]

Starts the gateway exactly as `make serve` does (the bundled model, QUANTGATE_DEFAULT_VARIANTS),
polls GET /admin/models every 2 s and records when each variant reached each state; stops when
every variant is ready, rejected or failed (or at the timeout). Writes serve-timeline-<profile>
.json/.md with the final `quantgate models list` table. A measurement, not a test.
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

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"ready", "rejected", "failed", "unsupported"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=["full", "fast"])
    parser.add_argument("--timeout-s", type=float, default=4 * 3600)
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="qg-timeline-"))
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "QUANTGATE_HOME": str(home), "QUANTGATE_PORT": str(port),
           "QUANTGATE_REGISTRY_PROFILE": args.profile}  # fmt: skip
    started = time.monotonic()
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - lives as long as the gateway
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, start_new_session=True)  # fmt: skip
    events: dict[str, dict[str, float]] = {}
    first_token_s = None
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
        listing = subprocess.run([sys.executable, "-m", "server", "models", "list"], capture_output=True, text=True,
                                 env=env, cwd=REPO).stdout  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "profile": args.profile,
              "first_answer_s": first_token_s, "events_s": events, "models_list": listing}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve-timeline-{args.profile}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# `quantgate serve` on an empty home, `{args.profile}` profile ({result['date']})", "",
             f"First answer from the base variant: {first_token_s} s after the command.", "",
             "| variant | " + " | ".join(["pending", "compressing", "evaluating", "ready", "rejected", "failed"])
             + " |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant_id, seen in events.items():
        cells = [str(seen.get(s, "")) for s in ("pending", "compressing", "evaluating", "ready", "rejected", "failed")]
        lines.append(f"| {variant_id} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds after the command at which each state was first seen (2 s polling).", "", "```",
              listing.rstrip(), "```", ""]  # fmt: skip
    (args.out / f"serve-timeline-{args.profile}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
