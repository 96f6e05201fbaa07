"""Ingest refuses what must never be loaded, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.registry.ingest import IngestError, checkpoint_sha256, inspect_hf_dir


def _checkpoint(path: Path, config: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    for name, content in (files or {"model.safetensors": b"weights"}).items():
        (path / name).write_bytes(content)
    return path


def test_a_plain_safetensors_checkpoint_passes(tmp_path) -> None:
    assert inspect_hf_dir(_checkpoint(tmp_path / "ok")) == "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_weights_are_refused(tmp_path, name: str) -> None:
    path = _checkpoint(tmp_path / "p", files={"model.safetensors": b"w", name: b"pickle"})
    with pytest.raises(IngestError, match=f"pickle weights are refused.*{name}"):
        inspect_hf_dir(path)


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused(tmp_path, where: str) -> None:
    path = _checkpoint(tmp_path / "r")
    target = path / where
    data = json.loads(target.read_text()) if target.exists() else {}
    target.write_text(json.dumps({**data, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    with pytest.raises(IngestError, match=rf"remote-code models are refused \({where} has auto_map\)"):
        inspect_hf_dir(path)


@pytest.mark.parametrize(
    ("config", "files", "fragment"),
    [
        ({"architectures": ["A"]}, {"x.txt": b""}, "no \\*.safetensors"),
        ({"architectures": []}, None, "exactly one architecture"),
    ],
)
def test_incomplete_checkpoints_are_refused(tmp_path, config: dict, files: dict | None, fragment: str) -> None:
    with pytest.raises(IngestError, match=fragment):
        inspect_hf_dir(_checkpoint(tmp_path / "x", config, files))


def test_missing_config_is_refused(tmp_path) -> None:
    with pytest.raises(IngestError, match="no config.json"):
        inspect_hf_dir(tmp_path)


def test_hash_covers_weights_and_config(tmp_path) -> None:
    a = checkpoint_sha256(_checkpoint(tmp_path / "a"))
    b = checkpoint_sha256(_checkpoint(tmp_path / "b"))
    c = checkpoint_sha256(_checkpoint(tmp_path / "c", files={"model.safetensors": b"other"}))
    assert a == b != c
