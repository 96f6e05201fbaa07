"""How good the build ETA is: each method compressed once, its ETA replayed against the truth (issue 21).

    python -m loadtests.build_eta [--profile fast] [--methods int8 awq] [--out DIR]

Runs the compression job as the registry does (server/jobs/compress.py) on the bundled model, keeps
every event with its arrival time, and replays them through the gateway's BuildProgress
(server/registry/progress.py) with a clock set to each event's time: the ETA the API would have shown
then, against the time that was really left until the calibration finished (its fraction-1.0 event).
Writes build-eta-<profile>.json and .md. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from server.jobs.compress import CompressionJob, run_compression
from server.models.embedded import ensure_checkpoint, find_bundled_gguf
from server.registry.progress import BuildProgress

REPO = Path(__file__).resolve().parent.parent


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def replay(events: list[tuple[float, dict]]) -> list[dict]:
    """The ETA shown at each calibrating event against the truth (seconds to the fraction-1.0 event)."""
    done = [t for t, e in events if e.get("event") == "progress" and e.get("fraction") == 1.0]
    if not done:
        return []
    clock = _Clock()
    builds = BuildProgress(clock=clock)
    builds.phase("v", "compressing")
    rows = []
    for t, event in events:
        clock.now = t
        builds.event("v", event)
        if event.get("event") != "progress" or t >= done[0]:
            continue
        eta = builds.eta_s("v")
        truth = done[0] - t
        rows.append({"at_s": round(t, 1), "fraction": event["fraction"], "eta_s": None if eta is None else round(eta, 1),
                     "truth_s": round(truth, 1),
                     "error": None if eta is None or truth <= 0 else round(eta / truth - 1, 3)})  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    late = [r for r in rows if r["fraction"] >= 0.1 and r["error"] is not None]
    errors = [abs(r["error"]) for r in late]
    return {"samples_after_10pct": len(late), "median_abs_error": round(statistics.median(errors), 3) if late else None,
            "max_abs_error": round(max(errors), 3) if late else None,
            "within_25pct": sum(e <= 0.25 for e in errors),
            "misses": [{k: r[k] for k in ("fraction", "eta_s", "truth_s")} for r in late if abs(r["error"]) > 0.25]}  # fmt: skip


def render(report: dict) -> str:
    lines = [f"# Build ETA against the truth ({report['profile']} profile)", "",
             f"`{report['command']}` on {report['cpu']}, {report['date']}.", "",
             "The ETA is what `GET /admin/models` showed at each progress event of the calibration (the rest of "
             "the phase at the rate measured since its first event, given from 5% on); the truth is the time "
             "actually left until the calibration finished.", "",
             "| method | calibration s | samples after 10% | median abs error | max abs error | within 25% | "
             "the others (done, ETA s, truth s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in report["methods"]:
        s = m["summary"]
        misses = "; ".join(f"{x['fraction']:.0%}, {x['eta_s']}, {x['truth_s']}" for x in s["misses"]) or "-"
        lines.append(f"| {m['method']} | {m['calibration_s']} | {s['samples_after_10pct']} | "
                     f"{s['median_abs_error']:.1%} | {s['max_abs_error']:.0%} | {s['within_25pct']} | {misses} |")  # fmt: skip
    for m in report["methods"]:
        lines += ["", f"## {m['method']}: sampled", "", "| at s | done | ETA s | truth s | error |", "|---|---|---|---|---|"]
        step = max(len(m["rows"]) // 12, 1)
        for r in m["rows"][::step]:
            error = "-" if r["error"] is None else f"{r['error']:+.0%}"
            eta = "-" if r["eta_s"] is None else r["eta_s"]
            lines.append(f"| {r['at_s']} | {r['fraction']:.0%} | {eta} | {r['truth_s']} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="fast", choices=["fast", "full"])
    parser.add_argument("--methods", nargs="+", default=["int8", "awq"])
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    parser.add_argument("--render", type=Path, help="only re-render this report's JSON (its measured rows)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        report = json.loads(args.render.read_text())
        for m in report["methods"]:
            m["summary"] = summary(m["rows"])
        (args.out / f"build-eta-{report['profile']}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"build-eta-{report['profile']}.md").write_text(render(report))
        return
    with tempfile.TemporaryDirectory(prefix="build-eta-") as tmp:
        home = Path(tmp)
        base = ensure_checkpoint(find_bundled_gguf(), home / "checkpoints", home / "logs")
        methods = []
        for method in args.methods:
            events: list[tuple[float, dict]] = []
            started = time.monotonic()
            job = CompressionJob(method, base, home / "out" / method, profile=args.profile, device="cpu")
            asyncio.run(run_compression(job, home / f"{method}.log", timeout_s=4 * 3600,
                                        on_event=lambda e, log=events, t0=started: log.append((time.monotonic() - t0, e))))  # fmt: skip
            rows = replay(events)
            calibrating = [t for t, e in events if e.get("event") == "progress"]
            methods.append({"method": method, "rows": rows, "summary": summary(rows),
                            "calibration_s": round(calibrating[-1] - calibrating[0], 1) if calibrating else None})  # fmt: skip
            print(json.dumps({"method": method, **methods[-1]["summary"]}), flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    report = {"profile": args.profile, "methods": methods, "date": dt.date.today().isoformat(),
              "cpu": f"{model} ({platform.machine()}, avx512f: {'avx512f' in cpu})",
              "command": f"python -m loadtests.build_eta --profile {args.profile} --methods {' '.join(args.methods)}"}  # fmt: skip
    (args.out / f"build-eta-{args.profile}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"build-eta-{args.profile}.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
