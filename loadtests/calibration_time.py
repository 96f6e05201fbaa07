"""Time to make each default rung, one compression at a time, in a fresh home (no engines started).

    [QUANTGATE_CALIBRATION_DTYPE=float32] python -m loadtests.calibration_time HOME [--profile fast]

Prints one JSON line per method with the manifest's seconds_to_make. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from server.jobs.compress import CompressionJob, run_compression
from server.models.embedded import ensure_checkpoint, find_bundled_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("home", type=Path)
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--methods", nargs="+", default=["int8", "int4-gptq", "awq"])
    args = parser.parse_args()
    args.home.mkdir(parents=True, exist_ok=True)
    base = ensure_checkpoint(find_bundled_gguf(), args.home / "checkpoints", args.home / "logs")
    for method in args.methods:
        job = CompressionJob(method, base, args.home / "out" / method, profile=args.profile, device="cpu")
        manifest = asyncio.run(run_compression(job, args.home / f"{method}.log", timeout_s=4 * 3600))
        print(json.dumps({"method": method, "profile": args.profile, "seconds_to_make": manifest["seconds_to_make"]}),
              flush=True)


if __name__ == "__main__":
    main()
