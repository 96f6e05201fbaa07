"""`python -m optimizers quantize ...`: run one compression job in this (compression) environment.

stdout carries one JSON event per line for the caller (`{"event": "stage"|"done"|"error", ...}`);
human-readable progress and library logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from optimizers.base import InvalidConfig, OptimizerError, UnsupportedHere
from optimizers.job import run_job
from optimizers.progress import write_event
from optimizers.registry import make_config

EXIT_REFUSED = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="compress a checkpoint into one variant")
    q.add_argument("--method", required=True)
    q.add_argument("--source", required=True, type=Path, help="HF checkpoint directory")
    q.add_argument("--out", required=True, type=Path, help="variant directory to create")
    q.add_argument("--profile", default="full", choices=["full", "fast"])
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.add_argument("--config", default="{}", help="JSON object of the method's config fields")
    args = parser.parse_args(argv)

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    device = args.device
    if device == "auto":
        device = "cuda" if shutil.which("nvidia-smi") else "cpu"
    try:
        config = make_config(args.method, json.loads(args.config))
        with console.status(f"{args.method}: compressing {args.source.name} ({args.profile} profile)"):
            manifest = run_job(config, args.source, args.out, args.profile, device, emit=write_event)
    except (InvalidConfig, UnsupportedHere) as exc:
        kind = "unsupported" if isinstance(exc, UnsupportedHere) else "invalid_config"
        write_event("error", kind=kind, message=str(exc))
        console.print(f"[red]refused:[/red] {exc}")
        return EXIT_REFUSED
    except (OptimizerError, ValueError) as exc:
        write_event("error", kind="failed", message=str(exc))
        console.print(f"[red]failed:[/red] {exc}")
        return 1
    write_event("done", manifest=manifest)
    console.print(f"[green]done[/green] {args.out} in {manifest['seconds_to_make']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
