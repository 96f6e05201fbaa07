"""ONNX exports of registered checkpoints for edge devices (optimizers/onnx_export.py), made on request and kept.

`GET /admin/models/{name}/export/onnx` asks for one: the first call starts the export (one at a time, in the
compression environment, where onnxruntime-genai's builder is installed) and answers 202; later calls answer 202
until it is done, then 200 with a tar of the ONNX Runtime GenAI model directory (model.onnx, its weights,
genai_config.json, the tokenizer, and export.json: the parity check against PyTorch and the tokens/s measured on
this host). Exports are kept under QUANTGATE_HOME/exports/, keyed by the checkpoint's digest and the precision.
A failed export answers its reason once; the next request tries again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from server.jobs.compress import last_event, run_events

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class ExportState:
    status: str  # "ready", "exporting", "failed"
    tar: Path | None = None
    reason: str | None = None


class OnnxExports:
    def __init__(self, home: Path, python: str, timeout_s: float = 3600.0) -> None:
        self.root = home / "exports"
        self.python = python
        self.timeout_s = timeout_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, str] = {}
        self._lock = asyncio.Lock()  # one export at a time: each holds the whole model and a CPU

    def request(self, checkpoint: Path, digest: str, precision: str, label: str) -> ExportState:
        """The export of `checkpoint` at `precision`: its tar when done, else started (or still running)."""
        key = f"onnx-{digest[:24]}-{precision}"
        tar = self.root / f"{key}.tar"
        if tar.is_file():
            return ExportState("ready", tar=tar)
        if key in self._failed:
            return ExportState("failed", reason=self._failed.pop(key))
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.create_task(self._export(checkpoint, key, precision, label),
                                                   name=f"onnx-export:{key}")  # fmt: skip
        return ExportState("exporting")

    async def _export(self, checkpoint: Path, key: str, precision: str, label: str) -> None:
        out, tar = self.root / key, self.root / f"{key}.tar"
        log_path = self.root / f"{key}.log"
        try:
            async with self._lock:
                self.root.mkdir(parents=True, exist_ok=True)
                report = await self._run(checkpoint, out, precision, log_path)
                (out / "export.json").write_text(json.dumps(report, indent=1))
                await asyncio.to_thread(_write_tar, out, tar, label)
                logger.info("ONNX export %s (%s) ready: %s", label, precision, tar)
        except Exception as exc:  # noqa: BLE001 - reported to the next request, not raised into the loop
            logger.warning("ONNX export of %s (%s) failed: %s", label, precision, exc)
            self._failed[key] = str(exc)[:2000]
        finally:
            self._tasks.pop(key, None)

    async def _run(self, checkpoint: Path, out: Path, precision: str, log_path: Path) -> dict:
        argv = [self.python, "-m", "optimizers.onnx_export", str(checkpoint), str(out), "--precision", precision,
                "--check-steps", "16", "--speed-runs", "3"]  # fmt: skip
        returncode, events = await run_events(argv, log_path, self.timeout_s, out)
        done, error = last_event(events, "done"), last_event(events, "error")
        if returncode != 0 or done is None:
            raise RuntimeError(error["message"] if error else f"the export exited {returncode}; see {log_path}")
        return done


def _write_tar(directory: Path, tar: Path, label: str) -> None:
    tmp = tar.with_suffix(".tar.partial")
    with tarfile.open(tmp, "w") as archive:
        archive.add(directory, arcname=label)
    os.replace(tmp, tar)
