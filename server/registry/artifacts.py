"""The content-addressed artifact store: QUANTGATE_HOME/artifacts/<sha256>, keyed by
hash(source checkpoint, method config and version, calibration data). The same checkpoint
registered again (under any name) finds its variants already built."""

from __future__ import annotations

import hashlib
from pathlib import Path

from optimizers.base import MethodConfig
from optimizers.job import calibration_tag


def artifact_key(source_sha256: str, config: MethodConfig, profile: str) -> str:
    key = f"{source_sha256}|{config.fingerprint()}|{calibration_tag(config, profile)}"
    return hashlib.sha256(key.encode()).hexdigest()


def artifact_dir(home: Path, key: str) -> Path:
    return home / "artifacts" / key
