"""The gate's drill rung (optimizers/drill.py): the base with one layer's MLP output scaled, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimizers.base import InvalidConfig, ModelInfo
from optimizers.drill import BrokenDrillConfig, make
from optimizers.registry import make_config


def _checkpoint(path: Path, layers: int = 4) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                                  "intermediate_size": 16, "num_hidden_layers": layers}))
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.full((8, 16), float(i + 1)) for i in range(layers)}
    tensors["model.embed_tokens.weight"] = torch.ones(32, 8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "tokenizer.json").write_text("{}")
    return path


def test_the_middle_layer_is_scaled_and_everything_else_is_copied(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "base")
    config = make_config("drill-broken")
    assert isinstance(config, BrokenDrillConfig) and (config.layer, config.scale) == (None, 10.0)
    artifact = make(config, source, tmp_path / "out", [])
    assert artifact.model_path == tmp_path / "out" and not artifact.on_load
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(before) == set(after)
    for name, tensor in before.items():
        expected = tensor * 10 if name == "model.layers.2.mlp.down_proj.weight" else tensor  # 4 layers: the 3rd
        assert torch.equal(after[name], expected), name
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()


def test_a_layer_the_model_does_not_have_is_refused_before_any_work(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "base", layers=2)
    with pytest.raises(InvalidConfig, match="layer 5 of a model with 2 layers"):
        BrokenDrillConfig(layer=5).check(ModelInfo.from_checkpoint(source), "cpu")
    with pytest.raises(InvalidConfig, match="scale"):
        make_config("drill-broken", {"scale": -1})
