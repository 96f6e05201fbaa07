"""The content-addressed artifact store: QUANTGATE_HOME/artifacts/<sha256>, keyed by
hash(source checkpoint, method config and version, calibration data). The same checkpoint
registered again (under any name) finds its variants already built."""

from __future__ import annotations

import hashlib
from pathlib import Path

from optimizers.base import MethodConfig
from optimizers.data import CALIBRATION_VERSION


def artifact_key(source_sha256: str, config: MethodConfig, profile: str) -> str:
    data = f"{profile}/v{CALIBRATION_VERSION}" if config.needs_calibration else "none"
    return hashlib.sha256(f"{source_sha256}|{config.fingerprint()}|{data}".encode()).hexdigest()


def artifact_dir(home: Path, key: str) -> Path:
    return home / "artifacts" / key
